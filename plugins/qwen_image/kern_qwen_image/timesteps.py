"""Qwen-Image's training timestep methods, built from ``kern.maths.timesteps``: ``qwen_shift`` (the default), a
shift on the line of the official scheduler (log s = 0.5 at 256 tokens to 0.9 at 8192; s = 2.00 at 1024²), and
musubi's ``qinglong_qwen`` mixture around it. Tokens are 2×2 patches of the 8× latent, the target's only.
"""

from __future__ import annotations

from collections.abc import Sequence

from kern.maths import timesteps as ts

from kern_qwen_image.schedule import BASE_SEQ, BASE_SHIFT, MAX_SEQ, MAX_SHIFT


def qwen_tokens(latent_shape: Sequence[int]) -> int:
    """Qwen-Image: 8× latent, 2×2 patches: ``(h//2)·(w//2)``."""
    return ts.latent_tokens(latent_shape, 2, "qwen_shift")


def qwen_shift_factor(latent_shape: Sequence[int]) -> float:
    return ts.shift_for_tokens(qwen_tokens(latent_shape), x1=BASE_SEQ, y1=BASE_SHIFT, x2=MAX_SEQ, y2=MAX_SHIFT)


METHODS = {
    **ts.METHODS,
    "qwen_shift": ts.resolution_shift(qwen_shift_factor),  # shift_s(σ(k·z)), s = exp(lin(256→0.5, 8192→0.9)(tokens))
    # per sample: 95 % qwen_shift, 5 % logsnr2 = N(5.36, 1) (no middle logsnr component)
    "qinglong_qwen": ts.qinglong_mixture(qwen_shift_factor, shift_share=0.95, logsnr_share=0.0),
}


def sample(method, batch_size, latent_shape, generator, options=None, *, uniforms=None):
    """``kern.maths.timesteps.sample`` over Qwen-Image's methods (the kernel's and the ones above)."""
    return ts.sample(method, batch_size, latent_shape, generator, options, uniforms=uniforms, methods=METHODS)
