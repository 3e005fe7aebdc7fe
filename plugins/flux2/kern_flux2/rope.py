"""4-axis rotary position embedding (t, h, w, l) of FLUX.2.

Each axis gets ``axes_dim[i]`` channels of head_dim (32 each in the real models), i.e. ``axes_dim[i] / 2``
frequencies ``theta ** (-2k / axes_dim[i])``; the axes' tables are concatenated in id order. Channels
(2k, 2k+1) are rotated as a pair by the angle ``position * frequency``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_tables(ids: Tensor, axes_dim: tuple[int, ...], theta: float) -> tuple[Tensor, Tensor]:
    """(cos, sin) of shape (L, head_dim/2) for ids (L, n_axes), or (B, 1, L, head_dim/2) for ids (B, L, n_axes),
    ready to broadcast over (B, H, L, head_dim/2). Computed from the ids on every call: nothing to store."""
    # Angles reach ~1e3 rad for 512 text tokens; fp64 keeps them exact (MPS has no fp64).
    dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = []
    for i, dim in enumerate(axes_dim):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=dtype, device=ids.device) / dim)
        angles.append(ids[..., i].to(dtype)[..., None] * freqs)
    angle = torch.cat(angles, dim=-1)
    if angle.ndim == 3:
        angle = angle[:, None]  # per-sample positions: broadcast over heads
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of x (B, H, L, D) in fp32; returns x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
