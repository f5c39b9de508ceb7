"""Identify, isolate and purge the language prior: the purified next-token distribution.

Paper: "Identify, Isolate, and Purge: Mitigating Hallucinations in LVLMs via Self-Evolving
Distillation" (SEED), arXiv 2507.04680 -- the *identify* and *isolate/purge* steps.
Formulas: METHOD.md sections 1 (distort) and 2 (purify).

Identify: the same model sees the clean image v and a distorted copy v'; what it still believes
on v' is the language prior. Isolate: contrast the two logit vectors. Purge: cut every token that
is implausible under the clean distribution, leaving *void spaces* (probability exactly zero).

Not from the paper (ours, or VCD's, which the paper builds on): the diffusion schedule and
k = 500 follow VCD (Leng et al., CVPR 2024); alpha = 1 and beta = 0.1 are VCD's defaults; the clean
argmax is always kept so a row is never all-void.
Imports: torch and the standard library only, so this file can be copied on its own.
"""
import math

import torch

NUM_DIFFUSION_STEPS = 1000  # T, as in VCD
# VCD's defaults, the one home of each: every other signature and flag refers to these.
ALPHA = 1.0       # contrast strength: c = (1 + alpha) z - alpha z'
BETA = 0.1        # plausibility cut: keep p >= beta p_max
NOISE_STEP = 500  # diffusion step k of the distortion


def noise_schedule(num_steps=NUM_DIFFUSION_STEPS):
    """abar_k for k = 0..T-1 in float64: the share of the signal's variance left after k+1 steps."""
    # beta_s = sigmoid(linspace(-6, 6, T)) * (5e-3 - 1e-5) + 1e-5   (VCD's schedule)
    s = torch.linspace(-6, 6, num_steps, dtype=torch.float64)
    betas = torch.sigmoid(s) * (5e-3 - 1e-5) + 1e-5
    # abar_k = prod_{s<=k} (1 - beta_s)
    return torch.cumprod(1 - betas, dim=0)


def distort(pixel_values, noise_step=NOISE_STEP, generator=None):
    """v' = sqrt(abar_k) v + sqrt(1 - abar_k) eps: one-shot forward diffusion on normalised pixels.

    Any shape, device and float dtype; `generator` (on any device) makes the noise repeatable.
    """
    if not 0 <= noise_step < NUM_DIFFUSION_STEPS:
        raise ValueError(f"noise_step must be in 0..{NUM_DIFFUSION_STEPS - 1}, got {noise_step}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"distort expects a float pixel tensor, got dtype {pixel_values.dtype}")
    abar = noise_schedule()[noise_step].item()
    # Drawn on the generator's device: one CPU generator gives the same noise on any device.
    noise_device = generator.device if generator is not None else pixel_values.device
    noise = torch.randn(pixel_values.shape, generator=generator, device=noise_device,
                        dtype=torch.float32)
    noise = noise.to(pixel_values.device)
    distorted = math.sqrt(abar) * pixel_values.float() + math.sqrt(1 - abar) * noise  # v'
    return distorted.to(pixel_values.dtype)


def plausible_set(logits, beta=BETA):
    """V_t = {w : p(w) >= beta * max_u p(u)}, as a bool mask over the last dimension.

    In log space the normaliser cancels: z(w) >= log(beta) + max z, so no softmax is needed.
    The argmax satisfies it for every beta in (0, 1], so a row is never empty.
    """
    return logits >= math.log(beta) + logits.max(dim=-1, keepdim=True).values


def purify(logits, distorted_logits, alpha=ALPHA, beta=BETA):
    """Purified logits: the contrast on the plausible set, -inf (a void) elsewhere. Shapes (..., V).

    softmax of the result is the purified knowledge pt_t that SEED distils back into the model.
    Computed in at least float32 whatever the input dtype.
    """
    if logits.shape != distorted_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and distorted_logits "
                         f"{tuple(distorted_logits.shape)} differ in shape")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z, z_distorted = logits.to(dtype), distorted_logits.to(dtype)
    c = (1 + alpha) * z - alpha * z_distorted  # c = (1 + alpha) z - alpha z'
    # The plausibility cut looks at the clean distribution only (METHOD.md 2).
    return c.masked_fill(~plausible_set(z, beta), float("-inf"))
