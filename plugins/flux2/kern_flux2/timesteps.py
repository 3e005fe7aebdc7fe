"""FLUX.2's training timestep methods: the resolution-dependent shift rules, built from ``kern.maths.timesteps``.

``flux2_shift`` (the default) reads the packed latent (pixels/16, one token per cell); ``flux_shift`` and
``qinglong_flux`` are musubi's FLUX.1 rules, which count 2×2 patches of an unpacked 8× latent, kept for users who
name them in a config. Both lines run from log s = 0.5 at 256 tokens to 1.15 at 4096 (s = 3.16 at 1024²).
"""

from __future__ import annotations

from collections.abc import Sequence

from kern.maths import timesteps as ts

SHIFT_LINE = {"x1": 256, "y1": 0.5, "x2": 4096, "y2": 1.15}  # tokens -> log s, musubi's get_lin_function for FLUX


def flux_tokens(latent_shape: Sequence[int]) -> int:
    """FLUX.1: unpacked 8× latent, 2×2 patches: ``(h//2)·(w//2)``."""
    return ts.latent_tokens(latent_shape, 2, "flux_shift")


def flux2_tokens(latent_shape: Sequence[int]) -> int:
    """FLUX.2: the cached latent is already packed (pixels/16): ``h·w``."""
    return ts.latent_tokens(latent_shape, 1, "flux2_shift")


def flux_shift_factor(latent_shape: Sequence[int]) -> float:
    return ts.shift_for_tokens(flux_tokens(latent_shape), **SHIFT_LINE)


def flux2_shift_factor(latent_shape: Sequence[int]) -> float:
    return ts.shift_for_tokens(flux2_tokens(latent_shape), **SHIFT_LINE)


METHODS = {
    **ts.METHODS,
    # shift_s(σ(k·z)), s = exp(lin(256→0.5, 4096→1.15)(tokens))
    "flux_shift": ts.resolution_shift(flux_shift_factor),
    "flux2_shift": ts.resolution_shift(flux2_shift_factor),
    # per sample: 79 % flux_shift, 11 % logsnr(logit_mean, logit_std), 10 % logsnr2 = N(5.36, 1)
    "qinglong_flux": ts.qinglong_mixture(flux_shift_factor, shift_share=0.79, logsnr_share=0.11),
}


def sample(method, batch_size, latent_shape, generator, options=None, *, uniforms=None):
    """``kern.maths.timesteps.sample`` over FLUX.2's methods (the kernel's and the ones above)."""
    return ts.sample(method, batch_size, latent_shape, generator, options, uniforms=uniforms, methods=METHODS)
