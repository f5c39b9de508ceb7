"""losses.py: both KLs against a naive float64 loop, the two traps of METHOD.md 3, and the void
picture."""
import math

import pytest
import torch

import losses


def naive_kl(student, teacher, mask, direction, eps=1e-8):
    """Independent float64 reference: explicit sums over positions and vocabulary, 0 log 0 = 0."""
    total, count = 0.0, 0
    positions = student.shape[0]
    for t in range(positions):
        if mask is not None and not mask[t]:
            continue
        q = torch.softmax(student[t].double(), -1)
        p = torch.softmax(teacher[t].double(), -1)
        kl = 0.0
        for w in range(student.shape[1]):
            if direction == "forward" and p[w] > 0:
                kl += float(p[w]) * (math.log(float(p[w])) - math.log(float(q[w])))
            if direction == "reverse":
                # the floor on voids only
                log_p = math.log(float(p[w])) if p[w] > 0 else math.log(eps)
                kl += float(q[w]) * (math.log(float(q[w])) - log_p)
        total += kl
        count += 1
    return total / count if count else 0.0


def voided_teacher(positions=5, vocab=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(positions, vocab, generator=g)
    teacher[torch.rand(positions, vocab, generator=g) < 0.4] = float("-inf")
    teacher[:, 0] = 1.0  # at least one live token per position
    return teacher, torch.randn(positions, vocab, generator=g)


@pytest.mark.parametrize("direction,loss_fn",
                         [("forward", losses.forward_kl), ("reverse", losses.reverse_kl)])
@pytest.mark.parametrize("use_mask", [False, True])
def test_losses_equal_a_naive_float64_loop(direction, loss_fn, use_mask):
    teacher, student = voided_teacher()
    mask = torch.tensor([True, False, True, True, False]) if use_mask else None
    got = loss_fn(student, teacher, mask).item()
    assert got == pytest.approx(naive_kl(student, teacher, mask, direction), rel=1e-5)


@pytest.mark.parametrize("eps", [1e-8, 1e-4])
def test_reverse_kl_is_exact_on_a_teacher_without_voids(eps):
    """No -inf in the teacher: the floor must not touch kept tokens, however unlikely (TRL's
    generalized_jsd_loss(beta=1) is this exact sum). Wide logits put most tokens below eps."""
    g = torch.Generator().manual_seed(0)
    teacher, student = 6 * torch.randn(3, 32_000, generator=g), 2 * torch.randn(3, 32_000,
                                                                                generator=g)
    log_q, log_p = torch.log_softmax(student.double(), -1), torch.log_softmax(teacher.double(), -1)
    assert (log_p < math.log(eps)).float().mean() > 0.5  # a floor on real tokens would show
    exact = (log_q.exp() * (log_q - log_p)).sum(-1).mean().item()
    assert losses.reverse_kl(student, teacher, eps=eps).item() == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("loss_fn", [losses.forward_kl, losses.reverse_kl])
def test_kl_is_zero_exactly_when_distributions_match(loss_fn):
    logits = torch.randn(4, 3, 20)
    assert loss_fn(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert loss_fn(logits + 5.0, logits).item() == pytest.approx(0.0, abs=1e-6)  # same softmax
    assert loss_fn(torch.randn(4, 3, 20), logits).item() > 1e-3


@pytest.mark.parametrize("loss_fn", [losses.forward_kl, losses.reverse_kl])
def test_all_false_mask_gives_zero_not_nan(loss_fn):
    teacher, student = voided_teacher()
    assert loss_fn(student, teacher, torch.zeros(5, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_fn", [losses.forward_kl, losses.reverse_kl])
def test_voids_give_finite_loss_and_gradients(loss_fn, dtype):
    teacher, student = voided_teacher(positions=6, vocab=30)
    student = student.to(dtype).requires_grad_()
    loss = loss_fn(student, teacher.to(dtype))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(student.grad.float()).all() and student.grad.abs().sum() > 0


def test_masking_after_the_product_is_the_nan_trap():
    """The trap the floor avoids: zeroing p * log p after the product gives NaN gradients."""
    teacher, student = voided_teacher()
    student.requires_grad_()
    log_p = torch.log_softmax(teacher, -1)
    q = torch.softmax(student, -1)
    trap = (q * (torch.log_softmax(student, -1) - log_p)).masked_fill(torch.isinf(log_p), 0.0).sum()
    trap.backward()
    # what published code gets; losses.reverse_kl does not (above)
    assert torch.isnan(student.grad).any()


def fit_free_logits(loss_fn, teacher, steps=1000):
    student = torch.zeros_like(teacher, requires_grad=True)
    optimizer = torch.optim.Adam([student], lr=0.1)
    for _ in range(steps):
        loss = loss_fn(student, teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses.void_mass(student.detach(), teacher).item()


def dropped_void_reverse_kl(student, teacher):
    """The other trap: reverse KL with the void terms masked to 0 instead of floored."""
    log_q = torch.log_softmax(student, -1)
    log_p = torch.log_softmax(teacher, -1)
    live = ~torch.isinf(log_p)
    return (log_q.exp() * (log_q - log_p.masked_fill(~live, 0.0))).masked_fill(~live,
                                                                               0.0).sum(-1).mean()


def test_reverse_kl_drives_free_student_mass_out_of_the_voids():
    teacher, _ = voided_teacher(positions=4, vocab=40, seed=1)
    assert fit_free_logits(losses.reverse_kl, teacher) < 1e-3
    # Dropping the void terms rewards mass there instead: the test above is not vacuous.
    assert fit_free_logits(dropped_void_reverse_kl, teacher) > 0.5


def test_void_picture_forward_kl_fills_the_void_reverse_kl_does_not():
    grid = torch.linspace(-5, 5, 201)
    teacher = losses.two_bump_teacher(grid)
    _, forward_width, forward_void = losses.fit_one_bump(losses.forward_kl, teacher, grid)
    reverse_mean, reverse_width, reverse_void = losses.fit_one_bump(losses.reverse_kl, teacher,
                                                                    grid)
    assert forward_void >= 10 * reverse_void
    assert reverse_void < 0.05
    assert abs(abs(reverse_mean) - 2.5) < 0.3  # settled on one bump (mode-seeking)
    assert forward_width > 2 * reverse_width  # spread across both (mean-seeking)
