"""purge.py: distort follows the VCD schedule; purify is the contrast on exactly the plausible
set."""
import math

import pytest
import torch

import purge


def reference_purify(z, z_distorted, alpha, beta):
    """An independent float64 computation, one row at a time, with explicit probabilities."""
    out = torch.empty_like(z, dtype=torch.float64)
    for row in range(z.shape[0]):
        p = torch.softmax(z[row].double(), -1)
        for w in range(z.shape[1]):
            if p[w] >= beta * p.max():
                out[row, w] = (1 + alpha) * float(z[row, w]) - alpha * float(z_distorted[row, w])
            else:
                out[row, w] = -math.inf
    return out


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.1), (0.5, 0.3), (2.0, 1.0), (1.0, 0.01)])
def test_purify_matches_float64_reference(alpha, beta):
    g = torch.Generator().manual_seed(0)
    z, z_distorted = torch.randn(6, 40, generator=g) * 3, torch.randn(6, 40, generator=g) * 3
    got = purge.purify(z.double(), z_distorted.double(), alpha, beta)
    want = reference_purify(z, z_distorted, alpha, beta)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = ~torch.isinf(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-12, atol=1e-12)


def test_alpha_zero_returns_clean_logits_on_plausible_set():
    z, z_distorted = torch.randn(3, 5, 50), torch.randn(3, 5, 50)
    got = purge.purify(z, z_distorted, alpha=0.0, beta=0.2)
    kept = purge.plausible_set(z, 0.2)
    assert torch.equal(got[kept], z[kept])
    assert torch.all(torch.isneginf(got[~kept]))


def test_kept_set_is_exactly_the_plausible_set():
    z = torch.randn(8, 100) * 4
    got = purge.purify(z, torch.randn(8, 100), beta=0.1)
    p = torch.softmax(z.double(), -1)
    expected = p >= 0.1 * p.max(-1, keepdim=True).values
    assert torch.equal(~torch.isneginf(got), expected)
    # The clean argmax is always kept, so no row is all-void, even at beta = 1.
    only_top = purge.purify(z, torch.randn(8, 100), beta=1.0)
    assert torch.equal((~torch.isneginf(only_top)).sum(-1), torch.ones(8, dtype=torch.long))
    assert torch.equal(only_top.argmax(-1), z.argmax(-1))


def test_purify_rejects_bad_arguments():
    z = torch.randn(2, 10)
    with pytest.raises(ValueError, match="shape"):
        purge.purify(z, torch.randn(2, 11))
    with pytest.raises(ValueError, match="alpha"):
        purge.purify(z, z, alpha=-0.1)
    for beta in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match="beta"):
            purge.purify(z, z, beta=beta)


def test_purify_keeps_bfloat16_inputs_finite_in_float32():
    z = torch.randn(4, 30).bfloat16()
    got = purge.purify(z, torch.randn(4, 30).bfloat16())
    assert got.dtype == torch.float32
    assert torch.isfinite(got[~torch.isneginf(got)]).all()


@pytest.mark.parametrize("step", [0, 500, 999])
def test_distort_noise_statistics_match_the_schedule(step):
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    abar = torch.prod(1 - betas[: step + 1]).item()  # independent of purge.noise_schedule's cumprod
    v = torch.full((200_000,), 0.7)
    out = purge.distort(v, step, torch.Generator().manual_seed(1))
    # v' = sqrt(abar) v + sqrt(1 - abar) eps: mean sqrt(abar) * 0.7, std sqrt(1 - abar)
    assert abs(out.mean().item() - math.sqrt(abar) * 0.7) < 0.01
    assert abs(out.std().item() - math.sqrt(1 - abar)) < 0.01
    if step == 500:
        assert abs(math.sqrt(abar) - 0.863) < 0.001


def test_distort_is_repeatable_and_keeps_shape_and_dtype():
    v = torch.randn(2, 3, 8, 8).bfloat16()
    a = purge.distort(v, 500, torch.Generator().manual_seed(3))
    b = purge.distort(v, 500, torch.Generator().manual_seed(3))
    c = purge.distort(v, 500, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == v.shape and a.dtype == torch.bfloat16


def test_distort_rejects_steps_outside_the_schedule():
    for step in (-1, 1000):
        with pytest.raises(ValueError, match="0..999"):
            purge.distort(torch.zeros(3), step)
