"""Qwen-Image's training timestep methods (kern_qwen_image.timesteps) against their closed forms (reference
training.md §2), through the plugin's ``sample`` and its ``sample_timesteps`` hook. Tolerances: see
tests/kernel/test_timesteps.py."""

from __future__ import annotations

import pytest
import torch
from kern.core.plugins import get_manager
from kern.errors import UsageError
from kern_qwen_image import timesteps as qi

from tests.kernel import test_timesteps as kernel_tests
from tests.kernel.test_timesteps import QS, N, Phi_inv, assert_cdf, gen, logistic, logsnr_cdf, shift_s, shifted_cdf

QWEN_1024 = (16, 1, 128, 128)  # Qwen-Image: 16 × 1 × H/8 × W/8

# resolution → qwen_shift s, the reference §2 table (two decimals).
TABLE = {512: 1.71, 768: 1.83, 1024: 2.00, 1328: 2.30, 1536: 2.59}


def draw(method: str, latent_shape=QWEN_1024, seed: int = 0, n: int = N, **options) -> torch.Tensor:
    t = qi.sample(method, n, latent_shape, gen(seed), options)
    assert t.shape == (n,) and t.dtype == torch.float32
    return t


@pytest.mark.parametrize("res", sorted(TABLE))
def test_shift_factors_match_reference_table(res):
    # Table values are rounded to 2 decimals: allow half a unit in the last place.
    assert qi.qwen_shift_factor((16, 1, res // 8, res // 8)) == pytest.approx(TABLE[res], abs=0.005)


def test_token_counts():
    assert qi.qwen_tokens(QWEN_1024) == 4096
    assert qi.qwen_tokens((16, 1, 65, 67)) == 32 * 33  # floor division of odd sizes


@pytest.mark.parametrize("shape,s,median", [(QWEN_1024, 2.00, 0.67), ((16, 1, 166, 166), 2.30, 0.70)])
def test_resolution_shift_method(shape, s, median):
    exact = qi.qwen_shift_factor(shape)
    assert exact == pytest.approx(s, abs=0.005)
    assert exact / (exact + 1) == pytest.approx(median, abs=0.005)  # the table's "median t after shift"
    t = draw("qwen_shift", shape)
    for q in QS:
        assert_cdf(t, shift_s(logistic(Phi_inv(q)), exact), q)
    # sigmoid_scale widens the base logit-normal before the shift
    t = draw("qwen_shift", shape, sigmoid_scale=2.0)
    for q in (0.1, 0.5, 0.9):
        assert_cdf(t, shift_s(logistic(2.0 * Phi_inv(q)), exact), q)


def test_qinglong_qwen_mixture_and_no_middle_logsnr():
    s = qi.qwen_shift_factor(QWEN_1024)
    t = draw("qinglong_qwen", QWEN_1024, logit_mean=-30.0, logit_std=0.01)
    assert float((t > 1 - 1e-5).double().mean()) == 0.0  # logit_mean/std feed no component
    for x in (0.02, 0.06, 0.1, 0.3, 0.5, 0.7, 0.9, 0.97):
        assert_cdf(t, x, 0.95 * shifted_cdf(x, s) + 0.05 * logsnr_cdf(x, 5.36, 1.0))


def test_preserve_distribution_shape_rejection():
    kernel_tests.test_preserve_distribution_shape_rejection(
        "qwen_shift", QWEN_1024, sample=qi.sample, shift_factor=qi.qwen_shift_factor
    )


@pytest.mark.parametrize("method", ["qwen_shift", "qinglong_qwen"])
def test_determinism(method):
    a = draw(method, n=64, seed=7)
    b = draw(method, n=64, seed=7)
    c = draw(method, n=64, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_unknown_method_and_the_hook():
    with pytest.raises(UsageError, match="'nope'") as exc:
        qi.sample("nope", 4, QWEN_1024, gen(), {})
    for name in ("uniform", "sigma", "qwen_shift", "qinglong_qwen"):
        assert name in str(exc.value)
    hook = get_manager().hook
    for method in ("qwen_shift", "qinglong_qwen", "shift"):
        t = hook.sample_timesteps(
            arch="qwen-image", method=method, batch_size=64, latent_shape=QWEN_1024, generator=gen(3), options={}
        )
        assert torch.equal(t, qi.sample(method, 64, QWEN_1024, gen(3), {}))
