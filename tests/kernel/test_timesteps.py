"""Each timestep method against its closed-form distribution (musubi-tuner's formulas).

Statistical tolerance. Most checks compare the empirical CDF at a point x with the exact value
F(x) = q. Over N independent draws the count below x is Binomial(N, q), so the empirical CDF has
standard error sqrt(q(1−q)/N); every check allows Z = 5 standard errors (≈ 0.0056 at q = 0.5 with
N = 200 000; a correct sampler fails one check with probability ≈ 6e-7, and the seeds are fixed, so
the suite is deterministic). Comparing CDFs at the theoretical quantiles is the same statement as
"the q-quantile of t is x_q", without needing the density for a delta-method bound.
"""

from __future__ import annotations

import math

import pytest
import structlog
import torch
from kern.errors import UsageError
from kern.maths import timesteps as ts

N = 200_000
Z = 5.0

FLUX1_1024 = (16, 128, 128)  # an unpacked 8× latent of a 1024² image (the methods here ignore the shape)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draw(method: str, latent_shape=FLUX1_1024, seed: int = 0, n: int = N, sample=None, **options) -> torch.Tensor:
    """``n`` draws with ``sample`` (default the kernel's; an architecture's plugin passes its own)."""
    t = (sample or ts.sample)(method, n, latent_shape, gen(seed), options)
    assert t.shape == (n,) and t.dtype == torch.float32
    return t


def Phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def Phi_inv(q: float) -> float:
    return float(torch.special.ndtri(torch.tensor(q, dtype=torch.float64)))


def logistic(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def shift_s(t: float, s: float) -> float:
    return s * t / (1 + (s - 1) * t)


def unshift_s(x: float, s: float) -> float:
    return x / (s - (s - 1) * x)


def shifted_cdf(x: float, s: float, k: float = 1.0) -> float:
    """CDF of shift_s(σ(k·z)), z ~ N(0, 1)."""
    return Phi(logit(unshift_s(x, s)) / k)


def logsnr_cdf(x: float, mean: float, std: float) -> float:
    """CDF of σ(−L/2), L ~ N(mean, std): t ≤ x ⟺ L ≥ −2·logit(x)."""
    return 1 - Phi((-2 * logit(x) - mean) / std)


def assert_cdf(t: torch.Tensor, x: float, q: float, eps: float = 0.0) -> None:
    n = t.numel()
    emp = float((t.double() <= x + eps).double().mean())
    tol = Z * math.sqrt(max(q * (1 - q), 1e-12) / n) + 1e-9
    assert abs(emp - q) <= tol, f"P(t <= {x:.6f}) = {emp:.5f}, expected {q:.5f} ± {tol:.5f}"


QS = (0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.98)


# --- shift factors and token counts -----------------------------------------------------------------


def test_token_counts_and_lin():
    # The architectures' token counts and shift lines are in their plugins' tests (tests/flux2, tests/qwen_image).
    assert ts.latent_tokens((16, 65, 67), 2, "m") == 32 * 33  # floor division of odd sizes
    assert ts.latent_tokens((128, 33, 35), 1, "m") == 33 * 35
    assert ts.shift_for_tokens(256) == pytest.approx(math.exp(0.5))
    assert ts.shift_for_tokens(4096) == pytest.approx(math.exp(1.15))
    assert ts.shift_for_tokens(8192, x2=8192, y2=0.9) == pytest.approx(math.exp(0.9))
    assert ts.apply_shift(torch.tensor([0.0, 0.5, 1.0]), 3.0).tolist() == pytest.approx([0.0, 0.75, 1.0])


# --- per-method distributions ------------------------------------------------------------------------


def test_uniform_moments_and_cdf():
    t = draw("uniform")
    assert 0.0 <= float(t.min()) and float(t.max()) < 1.0
    # mean: sd = sqrt(1/12 / N); variance: sd = sqrt((μ4 − σ⁴)/N) with μ4 = 1/80, σ⁴ = 1/144.
    assert float(t.double().mean()) == pytest.approx(0.5, abs=Z * math.sqrt(1 / 12 / N))
    assert float(t.double().var()) == pytest.approx(1 / 12, abs=Z * math.sqrt((1 / 80 - 1 / 144) / N))
    for q in QS:
        assert_cdf(t, q, q)
    # kern feeds the model exactly t: no musubi "+0.001", the smallest draws lie below 0.001.
    assert float(t.min()) < 1e-3


@pytest.mark.parametrize("k", [1.0, 2.5])
def test_sigmoid_quantiles(k):
    t = draw("sigmoid", sigmoid_scale=k)
    for q in QS:
        assert_cdf(t, logistic(k * Phi_inv(q)), q)


@pytest.mark.parametrize("s,k", [(1.0, 1.0), (3.0, 1.0), (2.2, 1.5)])
def test_shift_quantiles_and_median(s, k):
    t = draw("shift", discrete_flow_shift=s, sigmoid_scale=k)
    assert_cdf(t, s / (s + 1), 0.5)  # median of shift_s(σ(k·z)) is s/(s+1) for any k
    for q in QS:
        assert_cdf(t, shift_s(logistic(k * Phi_inv(q)), s), q)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-6.0, 2.0), (5.36, 1.0)])
def test_logsnr_quantiles(mean, std):
    t = draw("logsnr", logit_mean=mean, logit_std=std)
    assert_cdf(t, logistic(-mean / 2), 0.5)  # median σ(−mean/2): 0.5, ≈0.953, ≈0.064
    for q in QS:
        # t is decreasing in logsnr, so t's q-quantile comes from logsnr's (1 − q)-quantile.
        assert_cdf(t, logistic(-(mean + std * Phi_inv(1 - q)) / 2), q)


def test_logsnr_reference_medians():
    assert logistic(6 / 2) == pytest.approx(0.95, abs=0.005)
    assert logistic(-5.36 / 2) == pytest.approx(0.064, abs=0.0005)


# --- the sigma method --------------------------------------------------------------------------------

GRID = [k / 1000 for k in (1, 20, 100, 250, 500, 637, 750, 900, 980, 999)]


def sigma_cdf(x: float, u_cdf) -> float:
    """For grid x = k/1000 (min/max default): t = 1 − floor(1000u)/1000 ≤ x ⟺ u ≥ 1 − x."""
    return 1 - u_cdf(1 - x)


def mode_u(up: float, scale: float) -> float:
    return 1 - up - scale * (math.cos(math.pi * up / 2) ** 2 - 1 + up)


def mode_u_cdf(v: float, scale: float) -> float:
    """u = g(u') is decreasing for scale < 1/(π/2 − 1) ≈ 1.75, so P(u ≤ v) = 1 − g⁻¹(v)."""
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if mode_u(mid, scale) > v:
            lo = mid
        else:
            hi = mid
    return 1 - lo


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_sigma_uniform_density_on_the_table(scheme):
    t = draw("sigma", weighting_scheme=scheme)
    k = t.double() * 1000
    assert torch.allclose(k, k.round(), atol=1e-3), "t must be an entry of the 1000-step table"
    assert float(t.min()) >= 0.001 - 1e-7 and float(t.max()) <= 1.0
    assert len(torch.unique(t)) == 1000
    for x in GRID:
        assert_cdf(t, x, sigma_cdf(x, lambda v: v), eps=1e-6)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 1.2)])
def test_sigma_logit_normal(mean, std):
    t = draw("sigma", weighting_scheme="logit_normal", logit_mean=mean, logit_std=std)
    for x in GRID:
        assert_cdf(t, x, sigma_cdf(x, lambda v: Phi((logit(v) - mean) / std)), eps=1e-6)


@pytest.mark.parametrize("scale", [1.29, 0.5])
def test_sigma_mode(scale):
    t = draw("sigma", weighting_scheme="mode", mode_scale=scale)
    for x in GRID:
        assert_cdf(t, x, sigma_cdf(x, lambda v: mode_u_cdf(v, scale)), eps=1e-6)


def test_sigma_min_max_index_range():
    t = draw("sigma", min_timestep=200, max_timestep=600)
    # idx = int(u·400 + 200) ∈ [200, 599] → t = 1 − idx/1000 ∈ [0.401, 0.800], 400 equally likely values
    assert float(t.min()) == pytest.approx(0.401) and float(t.max()) == pytest.approx(0.8)
    assert len(torch.unique(t)) == 400
    for x in (0.45, 0.5, 0.6, 0.75):
        assert_cdf(t, x, (1000 * x - 400) / 400, eps=1e-6)


# --- loss weighting ----------------------------------------------------------------------------------


def test_loss_weighting_formulas():
    s = torch.linspace(0.001, 1.0, 1000, dtype=torch.float64)
    torch.testing.assert_close(ts.loss_weighting("sigma_sqrt", s), 1 / s**2)
    torch.testing.assert_close(ts.loss_weighting("cosmap", s), 2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    for scheme in ("none", "logit_normal", "mode"):
        assert torch.equal(ts.loss_weighting(scheme, s), torch.ones_like(s))
    assert float(ts.loss_weighting("sigma_sqrt", torch.tensor(0.001, dtype=torch.float64))) == pytest.approx(1e6)
    cos = ts.loss_weighting("cosmap", torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert cos.tolist() == pytest.approx([2 / math.pi, 4 / math.pi, 2 / math.pi])
    with pytest.raises(UsageError, match="weighting scheme 'bogus'"):
        ts.loss_weighting("bogus", s)


# --- min/max timestep for the other methods ---------------------------------------------------------


def test_min_max_rescales_linearly():
    t = draw("uniform", min_timestep=200, max_timestep=600)
    assert float(t.min()) >= 0.2 and float(t.max()) <= 0.6
    for x in (0.25, 0.4, 0.55):
        assert_cdf(t, x, (x - 0.2) / 0.4)
    # shift: t' = 0.2 + 0.4·shift_s(σ(z)); its median is 0.2 + 0.4·s/(s+1)
    t = draw("shift", discrete_flow_shift=3.0, min_timestep=200, max_timestep=600)
    assert float(t.min()) >= 0.2 and float(t.max()) <= 0.6
    assert_cdf(t, 0.2 + 0.4 * 0.75, 0.5)


@pytest.mark.parametrize("method,shape", [("shift", FLUX1_1024), ("logsnr", FLUX1_1024)])
def test_preserve_distribution_shape_rejection(method, shape, sample=None, shift_factor=None):
    """Also run by tests/qwen_image for its qwen_shift, with its ``sample`` and shift factor."""
    opts = dict(discrete_flow_shift=3.0, logit_mean=-1.0, logit_std=2.0)
    lo, hi = 0.3, 0.7
    t = draw(method, shape, min_timestep=300, max_timestep=700, preserve_distribution_shape=True, sample=sample, **opts)
    assert float(t.min()) >= lo and float(t.max()) <= hi
    if method == "logsnr":
        F = lambda x: logsnr_cdf(x, -1.0, 2.0)  # noqa: E731
    else:
        s = 3.0 if method == "shift" else shift_factor(shape)
        F = lambda x: shifted_cdf(x, s)  # noqa: E731
    # The shape is kept: conditional CDF (F(x) − F(lo)) / (F(hi) − F(lo)) of the unrestricted law.
    for x in (0.35, 0.45, 0.5, 0.55, 0.65):
        assert_cdf(t, x, (F(x) - F(lo)) / (F(hi) - F(lo)))


def test_preserve_distribution_shape_falls_back_with_warning():
    # logsnr ≈ N(−30, 0.01) gives t ≈ 1, never below 0.5: 1000 loops fail, then an unrestricted batch.
    with structlog.testing.capture_logs() as logs:
        t = draw("logsnr", n=4, logit_mean=-30.0, logit_std=0.01, max_timestep=500, preserve_distribution_shape=True)
    assert t.shape == (4,) and float(t.min()) > 0.99
    assert any(e["log_level"] == "warning" and "could not sample" in e["event"] for e in logs)


# --- stratified buckets ------------------------------------------------------------------------------


def test_stratified_uniforms_pool():
    u = ts.stratified_uniforms(1000, 10, gen())
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert counts.tolist() == [100.0] * 10
    u = ts.stratified_uniforms(1005, 10, gen())  # ceil(1005/10) = 101 per stratum, trimmed to 1005
    assert u.numel() == 1005 and all(c <= 101 for c in torch.histc(u, bins=10, min=0, max=1).tolist())


def test_stratified_uniforms_go_through_inverse_cdf():
    u = ts.stratified_uniforms(1000, 10, gen())
    t = ts.sigmoid(1000, FLUX1_1024, gen(), ts.TimestepOptions(sigmoid_scale=1.0), uniforms=u)
    edges = [logistic(Phi_inv(i / 10)) if 0 < i < 10 else float(i // 10) for i in range(11)]
    counts = [int(((t >= a) & (t < b)).sum()) for a, b in zip(edges[:-1], edges[1:])]
    assert counts == [100] * 10  # exactly one tenth of the draws in each decile of σ(z)
    # the dispatcher's within-batch stratification keeps the shape of logsnr
    t = draw("logsnr", n=N, logit_mean=-6.0, logit_std=2.0, num_timestep_buckets=8)
    for q in (0.1, 0.5, 0.9):
        assert_cdf(t, logistic(-(-6.0 + 2.0 * Phi_inv(1 - q)) / 2), q)


# --- dispatcher --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(ts.METHODS))
def test_determinism(method):
    a = draw(method, n=64, seed=7)
    b = draw(method, n=64, seed=7)
    c = draw(method, n=64, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_unknown_method():
    with pytest.raises(UsageError, match="'nope'") as exc:
        ts.sample("nope", 4, FLUX1_1024, gen(), {})
    # The architectures' own methods are listed by their plugins' sample (tests/flux2, tests/qwen_image).
    for name in ("uniform", "sigma"):
        assert name in str(exc.value)


def test_options_mapping_and_defaults():
    assert ts.TimestepOptions() == ts.TimestepOptions(
        sigmoid_scale=1.0, discrete_flow_shift=1.0, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
        weighting_scheme="none", min_timestep=None, max_timestep=None, preserve_distribution_shape=False,
    )  # fmt: skip
    # Unknown keys (e.g. the rest of a train section) are ignored; None means the default.
    a = ts.sample("shift", 16, FLUX1_1024, gen(), {"discrete_flow_shift": 3, "learning_rate": 1e-4, "logit_mean": None})
    b = ts.sample("shift", 16, FLUX1_1024, gen(), ts.TimestepOptions(discrete_flow_shift=3.0))
    assert torch.equal(a, b)
    for bad in (
        {"weighting_scheme": "foo"},
        {"min_timestep": 600, "max_timestep": 500},
        {"max_timestep": 0},
        {"discrete_flow_shift": 0},
    ):
        with pytest.raises(UsageError):
            ts.sample("uniform", 4, FLUX1_1024, gen(), bad)
    with pytest.raises(UsageError, match="last two dims"):
        ts.sample(
            "res",
            4,
            (128,),
            gen(),
            {},
            methods={"res": ts.resolution_shift(lambda shape: ts.latent_tokens(shape, 1, "res"))},
        )
