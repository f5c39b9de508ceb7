"""Forward KL (classic distillation) versus reverse KL (SEED's Mode-Seeking Evolving).

Paper: "Identify, Isolate, and Purge: Mitigating Hallucinations in LVLMs via Self-Evolving
Distillation" (SEED), arXiv 2507.04680 -- "Mode-Seeking Evolving". Formulas: METHOD.md section 3.

The purified teacher has *void spaces*: tokens of probability exactly zero. Forward KL is blind to
them (pt = 0 contributes nothing), so a student that cannot represent every mode smears mass across
the voids. Reverse KL charges q (log q - log 0) = +inf for any student mass on a void, so the
student is pushed out of the voids and onto the dominant modes.

Not from the paper (ours): log pt on a void (and only there) is replaced by log(eps), eps = 1e-8,
and 0 log 0 = 0, so both losses and their gradients stay finite in float32 and bfloat16. Both losses
are computed in float32 whatever the input dtype. `python losses.py` runs the
one-bump-versus-two-bumps picture and draws it to void_picture.png. Imports: torch and the standard
library only, so this file can be copied on its own.
"""
import math

import torch
import torch.nn.functional as F


def _mean_over_positions(per_position, mask):
    """Mean of a (...,) tensor over the positions where mask is true (all when None); none: 0."""
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.device, torch.bool)
    if mask.shape != per_position.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the positions "
                         f"{tuple(per_position.shape)}")
    # clamp: an all-false mask gives 0 / 1 = 0, not 0 / 0 = NaN.
    return per_position.masked_fill(~mask, 0.0).sum() / mask.sum().clamp(min=1)


def forward_kl(student_logits, teacher_logits, mask=None):
    """L_F = mean_t sum_w pt(w) [log pt(w) - log q(w)].

    Logits (..., V); the teacher's may hold -inf voids.
    """
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    p = log_p.exp()
    # 0 log 0 = 0: zero the void log-probs *before* the product (masking it after the product
    # gives NaN gradients).
    log_p = log_p.masked_fill(p == 0, 0.0)
    per_position = (p * (log_p - log_q)).sum(dim=-1)
    return _mean_over_positions(per_position, mask)


def reverse_kl(student_logits, teacher_logits, mask=None, eps=1e-8):
    """L_R = mean_t sum_w q(w) [log q(w) - log pt(w)], with log pt floored at log(eps) on the voids.

    The floor keeps the void terms in the loss (dropping them would *reward* student mass there, as
    METHOD.md 3 explains) while keeping the loss and its gradients finite.
    """
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    # Only the voids (log pt = -inf) are floored: a kept token keeps its exact log pt, however
    # small, so on a teacher without voids this is the exact reverse KL. A void costs log(1/eps) per
    # unit of mass.
    log_p = log_p.masked_fill(torch.isneginf(log_p), math.log(eps))
    q = log_q.exp()
    per_position = (q * (log_q - log_p)).sum(dim=-1)
    return _mean_over_positions(per_position, mask)


def void_mass(student_logits, teacher_logits, mask=None):
    """Mean student probability on the teacher's void tokens (those with teacher logit -inf)."""
    q = F.softmax(student_logits.float(), dim=-1)
    per_position = q.masked_fill(~torch.isneginf(teacher_logits), 0.0).sum(dim=-1)
    return _mean_over_positions(per_position, mask)


# ----------------------------------------------------------------------------------------------
# The same three on a sparse teacher: the purified distribution as its kept tokens alone
# (METHOD.md 3)
#
# purify keeps only the plausible set, so a purified teacher is exactly a short list per position:
# teacher_ids (N, K) and their purified logits teacher_logits (N, K), a row padded with -inf logits
# (any id) when it keeps fewer than K. Every token not listed is a void. Equal to the dense forms
# above on the dense teacher the list came from, in value and gradient.

def _sparse_parts(student_logits, teacher_ids, teacher_logits):
    """(log q (N, V), log pt on the listed tokens (-inf on padding), q on them (0 on padding),
    the mask of kept tokens)."""
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    # the normaliser runs over the kept tokens only
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    kept = torch.isfinite(teacher_logits)
    q_kept = log_q.gather(-1, teacher_ids).exp().masked_fill(~kept, 0.0)
    return log_q, log_p, q_kept, kept


def sparse_forward_kl(student_logits, teacher_ids, teacher_logits, mask=None):
    """forward_kl against the sparse teacher: sum over the listed tokens of pt (log pt - log q)."""
    log_q, log_p, _, kept = _sparse_parts(student_logits, teacher_ids, teacher_logits)
    p = log_p.exp()
    log_p = log_p.masked_fill(~kept, 0.0)  # 0 log 0 = 0 on padding, before the product
    per_position = (p * (log_p - log_q.gather(-1, teacher_ids).masked_fill(~kept, 0.0))).sum(dim=-1)
    return _mean_over_positions(per_position, mask)


def sparse_reverse_kl(student_logits, teacher_ids, teacher_logits, mask=None, eps=1e-8):
    """reverse_kl against the sparse teacher, the voids floored at log(eps) as there:
    sum_w q log q - sum_{w listed} q log pt - log(eps) * (student mass off the list)."""
    log_q, log_p, q_kept, kept = _sparse_parts(student_logits, teacher_ids, teacher_logits)
    q = log_q.exp()
    on_voids = q.sum(dim=-1) - q_kept.sum(dim=-1)
    per_position = ((q * log_q).sum(dim=-1) - (q_kept * log_p.masked_fill(~kept, 0.0)).sum(dim=-1)
                    - math.log(eps) * on_voids)
    return _mean_over_positions(per_position, mask)


def sparse_void_mass(student_logits, teacher_ids, teacher_logits, mask=None):
    """void_mass against the sparse teacher: the student's probability off the listed tokens."""
    log_q, _, q_kept, _ = _sparse_parts(student_logits, teacher_ids, teacher_logits)
    return _mean_over_positions(log_q.exp().sum(dim=-1) - q_kept.sum(dim=-1), mask)


# ----------------------------------------------------------------------------------------------
# The void-space picture of METHOD.md 3: a one-bump student against a two-bump purified teacher.

def two_bump_teacher(grid, centres=(-2.5, 2.5), width=0.6, void=(-1.0, 1.0)):
    """Teacher logits on a 1-D grid: two Gaussian bumps, purged (-inf) on the void between them."""
    bumps = torch.stack([-(grid - c) ** 2 / (2 * width ** 2) for c in centres])
    logits = torch.logsumexp(bumps, dim=0)
    return logits.masked_fill((grid > void[0]) & (grid < void[1]), float("-inf"))


def fit_one_bump(loss_fn, teacher_logits, grid, steps=400, lr=0.05, init_mean=0.3, init_width=0.5):
    """Fit a discretised Gaussian (learnable mean and log-width) to the teacher; returns mean,
    width, void mass.

    The student starts narrow and just off the centre of the void. (Started wide, reverse KL can
    also escape the void by flattening into a near-uniform student, where the width gradient
    vanishes on a finite grid: a plateau, not the mode it would otherwise find.)
    """
    mean = torch.tensor(init_mean, requires_grad=True)
    log_width = torch.tensor(math.log(init_width), requires_grad=True)
    optimizer = torch.optim.Adam([mean, log_width], lr=lr)
    for _ in range(steps):
        student_logits = -(grid - mean) ** 2 / (2 * log_width.exp() ** 2)
        loss = loss_fn(student_logits, teacher_logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    student_logits = -(grid - mean) ** 2 / (2 * log_width.exp() ** 2)
    return mean.item(), log_width.exp().item(), void_mass(student_logits, teacher_logits).item()


if __name__ == "__main__":
    grid = torch.linspace(-5, 5, 201)
    teacher = two_bump_teacher(grid)
    print("one-bump student fitted to a two-bump purified teacher (void on (-1, 1))")
    print(f"{'loss':<22}{'mean':>8}{'width':>8}{'mass in void':>14}")
    series = {"purified teacher": (torch.softmax(teacher, -1).tolist(), (40, 40, 40))}
    for name, loss_fn, colour in [("forward KL (classic)", forward_kl, (235, 150, 50)),
                                  ("reverse KL (SEED)", reverse_kl, (200, 50, 50))]:
        mean, width, mass = fit_one_bump(loss_fn, teacher, grid)
        print(f"{name:<22}{mean:>8.2f}{width:>8.2f}{mass:>13.2%}")
        student = torch.softmax(-(grid - mean) ** 2 / (2 * width ** 2), -1)
        series[f"{name} student"] = (student.tolist(), colour)
    import pictures  # pillow, only for the picture: this file's functions need torch alone

    pictures.curves(grid.tolist(), series, "void_picture.png", shade=(-1.0, 1.0),
                    title="A one-bump student fitted to a two-bump purified teacher (METHOD.md 3)")
    print("picture: void_picture.png")
