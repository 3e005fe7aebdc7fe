"""FLUX.2's training timestep methods (kern_flux2.timesteps) against their closed forms (reference training.md §2),
through the plugin's ``sample`` and its ``sample_timesteps`` hook. Tolerances: see tests/kernel/test_timesteps.py."""

from __future__ import annotations

import math

import pytest
import torch
from kern.core.plugins import get_manager
from kern.errors import UsageError
from kern_flux2 import timesteps as f2

from tests.kernel.test_timesteps import QS, N, Phi_inv, Z, assert_cdf, gen, logistic, logsnr_cdf, shift_s, shifted_cdf

FLUX1_1024 = (16, 128, 128)  # FLUX.1: unpacked 8× latent of a 1024² image
FLUX2_1024 = (128, 64, 64)  # FLUX.2: packed latent (pixels/16) of a 1024² image

# resolution → flux_shift / flux2_shift s, the reference §2 table (two decimals).
TABLE = {512: 1.88, 768: 2.33, 1024: 3.16, 1328: 5.07, 1536: 7.51}


def draw(method: str, latent_shape=FLUX1_1024, seed: int = 0, n: int = N, **options) -> torch.Tensor:
    t = f2.sample(method, n, latent_shape, gen(seed), options)
    assert t.shape == (n,) and t.dtype == torch.float32
    return t


@pytest.mark.parametrize("res", sorted(TABLE))
def test_shift_factors_match_reference_table(res):
    # Table values are rounded to 2 decimals: allow half a unit in the last place.
    assert f2.flux_shift_factor((16, res // 8, res // 8)) == pytest.approx(TABLE[res], abs=0.005)
    assert f2.flux2_shift_factor((128, res // 16, res // 16)) == pytest.approx(TABLE[res], abs=0.005)


def test_token_counts():
    assert f2.flux_tokens(FLUX1_1024) == 4096
    assert f2.flux2_tokens(FLUX2_1024) == 4096
    assert f2.flux_tokens((16, 65, 67)) == 32 * 33  # floor division of odd sizes
    assert f2.flux2_tokens((128, 33, 35)) == 33 * 35


@pytest.mark.parametrize(
    "method,shape,s,median",
    [
        ("flux_shift", FLUX1_1024, 3.16, 0.76),
        ("flux_shift", (16, 64, 64), 1.88, 0.65),
        ("flux2_shift", FLUX2_1024, 3.16, 0.76),
        ("flux2_shift", (128, 83, 83), 5.07, 0.84),
    ],
)
def test_resolution_shift_methods(method, shape, s, median):
    exact = {"flux_shift": f2.flux_shift_factor, "flux2_shift": f2.flux2_shift_factor}[method](shape)
    assert exact == pytest.approx(s, abs=0.005)
    assert exact / (exact + 1) == pytest.approx(median, abs=0.005)  # the table's "median t after shift"
    t = draw(method, shape)
    for q in QS:
        assert_cdf(t, shift_s(logistic(Phi_inv(q)), exact), q)
    # sigmoid_scale widens the base logit-normal before the shift
    t = draw(method, shape, sigmoid_scale=2.0)
    for q in (0.1, 0.5, 0.9):
        assert_cdf(t, shift_s(logistic(2.0 * Phi_inv(q)), exact), q)


def test_shift_methods_ignore_discrete_flow_shift():
    a = draw("flux2_shift", FLUX2_1024, n=1000)
    b = draw("flux2_shift", FLUX2_1024, n=1000, discrete_flow_shift=5.0)
    assert torch.equal(a, b)


def test_qinglong_flux_mixture():
    s = f2.flux_shift_factor(FLUX1_1024)
    mean, std = -1.0, 1.5
    t = draw("qinglong_flux", FLUX1_1024, logit_mean=mean, logit_std=std)
    for x in (0.02, 0.06, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.97):
        q = 0.79 * shifted_cdf(x, s) + 0.11 * logsnr_cdf(x, mean, std) + 0.10 * logsnr_cdf(x, 5.36, 1.0)
        assert_cdf(t, x, q)


def test_qinglong_flux_proportions():
    # Push the logsnr component to t ≈ σ(15) ≈ 1 − 3e-7: nothing else reaches 1 − 1e-5
    # (flux_shift would need z > 11; logsnr2 stays below 0.9). Its share must be 11 %.
    t = draw("qinglong_flux", FLUX1_1024, logit_mean=-30.0, logit_std=0.01)
    frac = float((t > 1 - 1e-5).double().mean())
    assert frac == pytest.approx(0.11, abs=Z * math.sqrt(0.11 * 0.89 / N))
    # The low-noise logsnr2 share is 10 %: its CDF at a point where flux_shift has no mass.
    x = 0.05  # flux_shift at s=3.16 needs σ(z) < 0.0164, z < −4.1: mass 2e-5
    assert_cdf(t, x, 0.79 * shifted_cdf(x, s=f2.flux_shift_factor(FLUX1_1024)) + 0.10 * logsnr_cdf(x, 5.36, 1.0))


@pytest.mark.parametrize("method", sorted(set(f2.METHODS) - {"uniform", "sigmoid", "shift", "logsnr", "sigma"}))
def test_determinism(method):
    a = draw(method, n=64, seed=7)
    b = draw(method, n=64, seed=7)
    c = draw(method, n=64, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_unknown_method_lists_the_architectures_methods():
    with pytest.raises(UsageError, match="'nope'") as exc:
        f2.sample("nope", 4, FLUX1_1024, gen(), {})
    for name in ("uniform", "sigma", "flux2_shift", "qinglong_flux"):
        assert name in str(exc.value)
    with pytest.raises(UsageError, match="last two dims"):
        f2.sample("flux2_shift", 4, (128,), gen(), {})


def test_the_hook_draws_what_the_plugin_draws():
    hook = get_manager().hook
    for method in ("flux2_shift", "flux_shift", "qinglong_flux", "uniform", "sigma"):
        t = hook.sample_timesteps(
            arch="flux2", method=method, batch_size=64, latent_shape=FLUX2_1024, generator=gen(3), options={}
        )
        assert torch.equal(t, f2.sample(method, 64, FLUX2_1024, gen(3), {}))
    with pytest.raises(UsageError, match="flux2_shift"):  # an unknown method names FLUX.2's methods
        hook.sample_timesteps(
            arch="flux2", method="nope", batch_size=2, latent_shape=FLUX2_1024, generator=gen(), options={}
        )
