"""Training timestep sampling: one small pure function per method, plus loss weighting.

Conventions (musubi's, shared by the flow-matching architectures kern trains): ``t`` in ``[0, 1]`` with ``t = 1``
pure noise, ``x_t = (1 - t)·x0 + t·eps``, target ``eps - x0``.

Every method has the signature ``fn(batch_size, latent_shape, generator, options=TimestepOptions(),
*, uniforms=None) -> Tensor`` and returns float32 ``t`` of shape ``(batch_size,)`` on the CPU.
``latent_shape`` is one item's latent shape (``(C, h, w)``, or ``(C, F, h, w)``); the
resolution-dependent methods read ``h, w`` from its last two dims. ``uniforms`` (optional, shape
``(batch_size,)``, values in ``[0, 1)``) replace the method's base random draw and are pushed through
its inverse CDF, which is how stratified timestep buckets keep each method's shape (reference §5).

``METHODS`` are the methods that need nothing of an architecture. An architecture's own methods (a shift that
depends on its token count, musubi's qinglong mixture for it) live in its plugin, built from the pieces here
(``resolution_shift``, ``qinglong_mixture``, ``shift_for_tokens``, ``latent_tokens``), and its ``sample_timesteps``
hook answers with ``sample(method, ..., methods={**METHODS, **its_own})``, so ``min_timestep`` /
``max_timestep``, buckets and the unknown-method error cover them too.

The model's timestep input. musubi builds ``timesteps = 1000·t + 1`` for every non-``sigma`` method
and feeds the DiT ``timesteps / 1000``, so the model sees ``t + 0.001`` while the noise is mixed with
``t`` (a code observation, not a documented design). kern does not copy that: the ``t`` returned here
is used both to mix the noise and as the model's timestep, so noise and model always agree.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import attrs
import torch

from kern.errors import UsageError
from kern.log import get_logger

log = get_logger(__name__)

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
NUM_TRAIN_TIMESTEPS = 1000
MAX_REJECTION_LOOPS = 1000
_PPF_EPS = 1e-7  # uniforms are clamped to [eps, 1 - eps] before an inverse normal CDF (as musubi)

# logsnr2: the fixed low-noise component of the qinglong mixtures (median t = σ(-5.36/2) ≈ 0.064).
LOGSNR2_MEAN = 5.36
LOGSNR2_STD = 1.0


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise UsageError(message)


@attrs.frozen
class TimestepOptions:
    """Every option the timestep methods read, with musubi's defaults.

    ``min_timestep`` / ``max_timestep`` are on the 0..1000 scale (``None`` means 0 / 1000).
    ``num_timestep_buckets`` (``None`` or < 2: off) enables stratified base uniforms (reference §5).
    """

    sigmoid_scale: float = attrs.field(default=1.0, converter=float)
    discrete_flow_shift: float = attrs.field(default=1.0, converter=float)
    logit_mean: float = attrs.field(default=0.0, converter=float)
    logit_std: float = attrs.field(default=1.0, converter=float)
    mode_scale: float = attrs.field(default=1.29, converter=float)
    weighting_scheme: str = "none"
    min_timestep: int | None = None
    max_timestep: int | None = None
    preserve_distribution_shape: bool = False
    num_timestep_buckets: int | None = None

    def __attrs_post_init__(self) -> None:
        for name in ("sigmoid_scale", "discrete_flow_shift", "logit_mean", "logit_std", "mode_scale"):
            _check(
                math.isfinite(getattr(self, name)),
                f"timestep option {name!r} must be a finite number, got {getattr(self, name)}",
            )
        for name in ("min_timestep", "max_timestep", "num_timestep_buckets"):
            value = getattr(self, name)
            _check(
                value is None or (isinstance(value, int) and not isinstance(value, bool)),
                f"timestep option {name!r} must be an integer, got {value!r}",
            )
        if self.num_timestep_buckets is not None:
            _check(
                self.num_timestep_buckets <= 100000,
                f"timestep option 'num_timestep_buckets' must be at most 100000, got {self.num_timestep_buckets}",
            )
        _check(
            self.weighting_scheme in WEIGHTING_SCHEMES,
            f"timestep option 'weighting_scheme' must be one of {list(WEIGHTING_SCHEMES)}, got {self.weighting_scheme!r}",
        )
        _check(
            self.discrete_flow_shift > 0,
            f"timestep option 'discrete_flow_shift' must be > 0, got {self.discrete_flow_shift}",
        )
        _check(self.logit_std >= 0, f"timestep option 'logit_std' must be >= 0, got {self.logit_std}")
        if self.min_timestep is not None:
            _check(
                0 <= self.min_timestep <= 999,
                f"timestep option 'min_timestep' must be in 0..999, got {self.min_timestep}",
            )
        if self.max_timestep is not None:
            _check(
                1 <= self.max_timestep <= 1000,
                f"timestep option 'max_timestep' must be in 1..1000, got {self.max_timestep}",
            )
        _check(
            self.t_min_index < self.t_max_index,
            f"timestep options: 'min_timestep' ({self.min_timestep}) must be below 'max_timestep' ({self.max_timestep})",
        )
        _check(
            isinstance(self.preserve_distribution_shape, bool),
            f"timestep option 'preserve_distribution_shape' must be true or false, got {self.preserve_distribution_shape!r}",
        )
        if self.num_timestep_buckets is not None:
            _check(
                isinstance(self.num_timestep_buckets, int) and self.num_timestep_buckets >= 0,
                f"timestep option 'num_timestep_buckets' must be a non-negative integer, got {self.num_timestep_buckets!r}",
            )

    @property
    def t_min_index(self) -> int:
        return 0 if self.min_timestep is None else int(self.min_timestep)

    @property
    def t_max_index(self) -> int:
        return NUM_TRAIN_TIMESTEPS if self.max_timestep is None else int(self.max_timestep)

    @property
    def buckets(self) -> int:
        """Number of strata, 0 when stratification is off."""
        n = self.num_timestep_buckets
        return n if n is not None and n >= 2 else 0

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | TimestepOptions | None) -> TimestepOptions:
        """Options from a mapping: keys that are not timestep options are ignored (the mapping may be a
        whole training section); a ``None`` value means "use the default"."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        names = {f.name for f in attrs.fields(cls)}
        given = {k: v for k, v in options.items() if k in names and v is not None}
        try:
            return cls(**given)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"bad timestep option: {exc}") from None


DEFAULT_OPTIONS = TimestepOptions()


# ---------------------------------------------------------------------------------------------------
# Formula helpers
# ---------------------------------------------------------------------------------------------------


def lin(x1: float, y1: float, x2: float, y2: float) -> Callable[[float], float]:
    """The line through (x1, y1) and (x2, y2) (musubi ``get_lin_function``)."""
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def shift_for_tokens(tokens: int, x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15) -> float:
    """Resolution-dependent shift factor ``s = exp(lin(x1→y1, x2→y2)(tokens))``: ``log s`` is linear in the token
    count. The defaults are diffusers' ``FlowMatchEulerDiscreteScheduler`` ones (musubi's ``get_lin_function``)."""
    return math.exp(lin(x1, y1, x2, y2)(tokens))


def apply_shift(t: torch.Tensor, s: float) -> torch.Tensor:
    """``shift_s(t) = s·t / (1 + (s − 1)·t)``; equals ``e^μ / (e^μ + 1/t − 1)`` with ``s = e^μ``."""
    return s * t / (1 + (s - 1) * t)


def latent_hw(latent_shape: Sequence[int], method: str) -> tuple[int, int]:
    """``(h, w)`` of one item's latent, its last two dims; ``method`` names the method for the error."""
    shape = tuple(int(d) for d in latent_shape)
    _check(
        len(shape) >= 2,
        f"timestep method {method!r} needs a latent shape with (h, w) as its last two dims, got {shape}",
    )
    return shape[-2], shape[-1]


def latent_tokens(latent_shape: Sequence[int], patch: int, method: str) -> int:
    """The image tokens a transformer makes of the latent with ``patch``×``patch`` patches: ``(h//patch)·(w//patch)``
    (``patch = 1`` for a latent that is already packed)."""
    h, w = latent_hw(latent_shape, method)
    return (h // patch) * (w // patch)


def _uniform(n: int, generator: torch.Generator, uniforms: torch.Tensor | None) -> torch.Tensor:
    if uniforms is not None:
        return _as_uniforms(uniforms, n)
    return torch.rand((n,), generator=generator, dtype=torch.float64)


def _normal(
    n: int, generator: torch.Generator, uniforms: torch.Tensor | None, mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    """N(mean, std) draws; with ``uniforms`` the inverse normal CDF of them."""
    if uniforms is not None:
        z = torch.special.ndtri(_as_uniforms(uniforms, n).clamp(_PPF_EPS, 1 - _PPF_EPS))
    else:
        z = torch.randn((n,), generator=generator, dtype=torch.float64)
    return mean + std * z


def _as_uniforms(uniforms: torch.Tensor, n: int) -> torch.Tensor:
    u = torch.as_tensor(uniforms, dtype=torch.float64).flatten()
    _check(u.numel() == n, f"timestep uniforms: expected {n} values, got {u.numel()}")
    return u


def _out(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


# ---------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------

Uniforms = torch.Tensor | None
Method = Callable[..., torch.Tensor]


def uniform(
    batch_size: int,
    latent_shape: Sequence[int],
    generator: torch.Generator,
    options: TimestepOptions = DEFAULT_OPTIONS,
    *,
    uniforms: Uniforms = None,
) -> torch.Tensor:
    """``t = u``, u ~ U(0, 1)."""
    return _out(_uniform(batch_size, generator, uniforms))


def sigmoid(
    batch_size: int,
    latent_shape: Sequence[int],
    generator: torch.Generator,
    options: TimestepOptions = DEFAULT_OPTIONS,
    *,
    uniforms: Uniforms = None,
) -> torch.Tensor:
    """``t = σ(k·z)``, z ~ N(0, 1), k = ``sigmoid_scale``."""
    return _out(torch.sigmoid(options.sigmoid_scale * _normal(batch_size, generator, uniforms)))


def shifted(
    batch_size: int, generator: torch.Generator, options: TimestepOptions, s: float, uniforms: Uniforms
) -> torch.Tensor:
    """``shift_s(σ(k·z))``, z ~ N(0, 1) (or the inverse normal CDF of ``uniforms``), k = ``sigmoid_scale``; float64."""
    base = torch.sigmoid(options.sigmoid_scale * _normal(batch_size, generator, uniforms))
    return apply_shift(base, s)


def shift(
    batch_size: int,
    latent_shape: Sequence[int],
    generator: torch.Generator,
    options: TimestepOptions = DEFAULT_OPTIONS,
    *,
    uniforms: Uniforms = None,
) -> torch.Tensor:
    """``t = shift_s(σ(k·z))`` with the fixed ``s = discrete_flow_shift``."""
    return _out(shifted(batch_size, generator, options, options.discrete_flow_shift, uniforms))


ShiftFactor = Callable[[Sequence[int]], float]


def resolution_shift(shift_factor: ShiftFactor) -> Method:
    """A method ``t = shift_s(σ(k·z))`` whose ``s = shift_factor(latent_shape)`` grows with the image (usually
    ``shift_for_tokens(latent_tokens(...))`` on an architecture's line); ``discrete_flow_shift`` is ignored."""

    def method(
        batch_size: int,
        latent_shape: Sequence[int],
        generator: torch.Generator,
        options: TimestepOptions = DEFAULT_OPTIONS,
        *,
        uniforms: Uniforms = None,
    ) -> torch.Tensor:
        return _out(shifted(batch_size, generator, options, shift_factor(latent_shape), uniforms))

    return method


def logsnr_t(n: int, generator: torch.Generator, mean: float, std: float, uniforms: Uniforms) -> torch.Tensor:
    """``σ(−logsnr/2)``, logsnr ~ N(mean, std) (or the inverse normal CDF of ``uniforms``); float64."""
    return torch.sigmoid(-_normal(n, generator, uniforms, mean, std) / 2)


def logsnr(
    batch_size: int,
    latent_shape: Sequence[int],
    generator: torch.Generator,
    options: TimestepOptions = DEFAULT_OPTIONS,
    *,
    uniforms: Uniforms = None,
) -> torch.Tensor:
    """``t = σ(−logsnr/2)``, logsnr ~ N(``logit_mean``, ``logit_std``) (arXiv 2411.14793)."""
    return _out(logsnr_t(batch_size, generator, options.logit_mean, options.logit_std, uniforms))


def mixture(
    batch_size: int,
    generator: torch.Generator,
    uniforms: Uniforms,
    parts: Sequence[tuple[float, Callable[[int, Uniforms], torch.Tensor]]],
) -> torch.Tensor:
    """Per sample, a decision d ~ U(0, 1) picks the component whose cumulative share first exceeds d.
    Each component draws only its own samples (or takes its share of ``uniforms``)."""
    d = torch.rand((batch_size,), generator=generator, dtype=torch.float64)
    u = None if uniforms is None else _as_uniforms(uniforms, batch_size)
    t = torch.zeros((batch_size,), dtype=torch.float64)
    lo = 0.0
    for i, (share, draw) in enumerate(parts):
        hi = 1.0 if i == len(parts) - 1 else lo + share
        mask = (d >= lo) & (d < hi)
        count = int(mask.sum())
        if count:
            t[mask] = draw(count, None if u is None else u[mask]).to(torch.float64)
        lo = hi
    return t


def qinglong_mixture(shift_factor: ShiftFactor, shift_share: float, logsnr_share: float) -> Method:
    """musubi's qinglong method for one architecture: per sample, ``shift_share`` of ``resolution_shift(shift_factor)``,
    ``logsnr_share`` of ``logsnr(logit_mean, logit_std)`` (left out when 0), the rest logsnr2 = N(5.36, 1)."""

    def method(
        batch_size: int,
        latent_shape: Sequence[int],
        generator: torch.Generator,
        options: TimestepOptions = DEFAULT_OPTIONS,
        *,
        uniforms: Uniforms = None,
    ) -> torch.Tensor:
        s = shift_factor(latent_shape)
        parts: list[tuple[float, Callable[[int, Uniforms], torch.Tensor]]] = [
            (shift_share, lambda n, u: shifted(n, generator, options, s, u))
        ]
        if logsnr_share:
            parts.append((logsnr_share, lambda n, u: logsnr_t(n, generator, options.logit_mean, options.logit_std, u)))
        parts.append(
            (1.0 - shift_share - logsnr_share, lambda n, u: logsnr_t(n, generator, LOGSNR2_MEAN, LOGSNR2_STD, u))
        )
        return _out(mixture(batch_size, generator, uniforms, parts))

    return method


def density_uniforms(
    batch_size: int,
    generator: torch.Generator,
    options: TimestepOptions = DEFAULT_OPTIONS,
    *,
    uniforms: Uniforms = None,
) -> torch.Tensor:
    """u from the ``weighting_scheme`` density (SD3 / diffusers PR #8528), float64 in [0, 1].

    none / sigma_sqrt / cosmap: u ~ U(0, 1); logit_normal: u = σ(N(logit_mean, logit_std));
    mode: u' ~ U(0, 1), u = 1 − u' − mode_scale·(cos²(π·u'/2) − 1 + u').
    """
    scheme = options.weighting_scheme
    if scheme == "logit_normal":
        return torch.sigmoid(_normal(batch_size, generator, uniforms, options.logit_mean, options.logit_std))
    u = _uniform(batch_size, generator, uniforms)
    if scheme == "mode":
        u = 1 - u - options.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sigma(
    batch_size: int,
    latent_shape: Sequence[int],
    generator: torch.Generator,
    options: TimestepOptions = DEFAULT_OPTIONS,
    *,
    uniforms: Uniforms = None,
) -> torch.Tensor:
    """musubi's default: index the unshifted 1000-step table with u from the weighting-scheme density.

    ``idx = int(u·(t_max − t_min) + t_min)`` (t_min/t_max on 0..1000); the table is descending,
    ``timesteps[idx] = 1000 − idx``, so ``t = σ = 1 − idx/1000`` exactly (values 0.001 … 1.0).
    ``min_timestep`` / ``max_timestep`` act here, through the index range, not by rescaling t.
    (With ``uniforms`` the density's base draw is stratified; musubi ignores buckets for this method.)
    """
    u = density_uniforms(batch_size, generator, options, uniforms=uniforms)
    lo, hi = options.t_min_index, options.t_max_index
    idx = (u * (hi - lo) + lo).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    return _out((NUM_TRAIN_TIMESTEPS - idx).to(torch.float64) / NUM_TRAIN_TIMESTEPS)


# The methods every architecture has; a plugin adds its own through its sample_timesteps hook (module docstring).
METHODS: dict[str, Method] = {
    "uniform": uniform,
    "sigmoid": sigmoid,
    "shift": shift,
    "logsnr": logsnr,
    "sigma": sigma,
}


# ---------------------------------------------------------------------------------------------------
# Loss weighting, stratified buckets, dispatcher
# ---------------------------------------------------------------------------------------------------


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight w(σ): sigma_sqrt → σ⁻², cosmap → 2 / (π·(1 − 2σ + 2σ²)), others → 1.

    Computed on the given σ directly (musubi first rounds non-table timesteps to the nearest entry of
    its 1000-step table). Not clamped: sigma_sqrt gives 10⁶ at σ = 0.001 and more below.
    """
    _check(scheme in WEIGHTING_SCHEMES, f"unknown weighting scheme {scheme!r}; known: {list(WEIGHTING_SCHEMES)}")
    if scheme == "sigma_sqrt":
        return sigmas**-2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def stratified_uniforms(total: int, num_buckets: int, generator: torch.Generator) -> torch.Tensor:
    """Reference §5 pool: ``ceil(total/N)`` draws from each stratum ``U(i/N, (i+1)/N)``, shuffled, trimmed
    to ``total``. Chunk the result into per-batch ``uniforms``."""
    _check(num_buckets >= 1, f"num_timestep_buckets must be >= 1, got {num_buckets}")
    per = -(-total // num_buckets)
    lower = torch.arange(num_buckets, dtype=torch.float64).repeat_interleave(per)
    pool = (lower + torch.rand((per * num_buckets,), generator=generator, dtype=torch.float64)) / num_buckets
    return pool[torch.randperm(pool.numel(), generator=generator)][:total]


def sample(
    method: str,
    batch_size: int,
    latent_shape: Sequence[int],
    generator: torch.Generator,
    options: Mapping[str, Any] | TimestepOptions | None = None,
    *,
    uniforms: Uniforms = None,
    methods: Mapping[str, Method] | None = None,
) -> torch.Tensor:
    """Draw ``t`` (float32, shape ``(batch_size,)``, t = 1 pure noise) with ``method``, one of ``methods``
    (default ``METHODS``; a plugin passes its architecture's, e.g. ``{**METHODS, **its_own}``).

    The same ``t`` mixes the noise and is the model's timestep (see the module docstring).

    ``min_timestep`` / ``max_timestep`` (0..1000): the ``sigma`` method narrows its index range; other
    methods rescale t linearly to ``[min/1000, max/1000]`` (this distorts the shape), or, with
    ``preserve_distribution_shape``, keep only draws inside the range (up to 1000 loops, then a
    warning and an unrestricted batch). ``uniforms`` are the batch's stratified base uniforms (from
    ``stratified_uniforms``); without them, ``num_timestep_buckets >= 2`` stratifies within the batch.
    """
    methods = METHODS if methods is None else methods
    fn = methods.get(method)
    if fn is None:
        raise UsageError(f"unknown timestep sampling method {method!r}; known methods: {', '.join(methods)}")
    opts = TimestepOptions.from_mapping(options)
    _check(int(batch_size) >= 1, f"timestep sampling: batch_size must be >= 1, got {batch_size}")

    def base_uniforms(n: int) -> Uniforms:
        return stratified_uniforms(n, opts.buckets, generator) if opts.buckets else None

    if method == "sigma":
        return fn(
            batch_size,
            latent_shape,
            generator,
            opts,
            uniforms=uniforms if uniforms is not None else base_uniforms(batch_size),
        )

    t_min, t_max = opts.t_min_index / NUM_TRAIN_TIMESTEPS, opts.t_max_index / NUM_TRAIN_TIMESTEPS
    if not opts.preserve_distribution_shape:
        u = uniforms if uniforms is not None else base_uniforms(batch_size)
        t = fn(batch_size, latent_shape, generator, opts, uniforms=u).to(torch.float64)
        return _out(t * (t_max - t_min) + t_min)

    # Rejection sampling keeps the method's shape, conditioned on [t_min, t_max].
    kept: list[torch.Tensor] = []
    have = 0
    for _ in range(MAX_REJECTION_LOOPS):
        t = fn(batch_size, latent_shape, generator, opts, uniforms=base_uniforms(batch_size))
        inside = t[(t >= t_min) & (t <= t_max)]
        kept.append(inside)
        have += inside.numel()
        if have >= batch_size:
            return torch.cat(kept)[:batch_size]
    log.warning(
        "could not sample timesteps inside the range; using an unrestricted batch",
        method=method, batch_size=batch_size, loops=MAX_REJECTION_LOOPS,
        min_timestep=opts.min_timestep, max_timestep=opts.max_timestep,
    )  # fmt: skip
    return fn(batch_size, latent_shape, generator, opts, uniforms=base_uniforms(batch_size))
