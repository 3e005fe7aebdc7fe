"""MSRoPE: Qwen-Image's 3-axis (frame, height, width) rotary embedding.

Axis i gets ``axes_dim[i]`` channels of head_dim ((16, 56, 56) in the real model), i.e. ``axes_dim[i] / 2``
frequencies ``theta ** (-2k / axes_dim[i])``; the axes' tables are concatenated in (frame, h, w) order and
channels (2k, 2k+1) are rotated as a pair.

Positions (``img_shapes`` lists (frames, h, w) token grids, target first):
  - image ``idx`` has frames ``idx .. idx + frames - 1`` and *centred* rows ``-(h - h//2) .. h//2 - 1``
    (columns likewise), row-major;
  - text token j sits at ``start + j`` on all three axes, ``start = max over images of max(h//2, w//2)``,
    so the text offset depends on every image's size, references included;
  - layered (``use_layer3d_rope``): the last image, the condition, is at frame -1 and
    ``start = max(start, len(img_shapes) - 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Shape = tuple[int, int, int]  # (frames, h, w) in tokens


def centred(n: int, device: torch.device | str | None = None) -> Tensor:
    return torch.arange(n, device=device) - (n - n // 2)


def image_positions(
    img_shapes: Sequence[Shape], layered: bool = False, device: torch.device | str | None = None
) -> Tensor:
    """(L_img, 3) int64 (frame, row, col) of every image token, images in order."""
    out = []
    for idx, (f, h, w) in enumerate(img_shapes):
        frame0 = -1 if layered and idx == len(img_shapes) - 1 else idx
        grid = torch.meshgrid(
            torch.arange(f, device=device) + frame0, centred(h, device), centred(w, device), indexing="ij"
        )
        out.append(torch.stack(grid, dim=-1).reshape(-1, 3))
    return torch.cat(out)


def text_start(img_shapes: Sequence[Shape], layered: bool = False) -> int:
    start = max(max(h // 2, w // 2) for _, h, w in img_shapes)
    return max(start, len(img_shapes) - 1) if layered else start


def text_positions(
    length: int, img_shapes: Sequence[Shape], layered: bool = False, device: torch.device | str | None = None
) -> Tensor:
    """(length, 3) int64: the diagonal ``start + j`` on every axis."""
    return (torch.arange(length, device=device) + text_start(img_shapes, layered))[:, None].expand(length, 3)


def rope_tables(positions: Tensor, axes_dim: Sequence[int], theta: float) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (L, head_dim/2) fp32, for positions (L, 3); broadcasts over (B, H, L, head_dim/2).

    Angles are ``position * theta**(-2k/d)`` in fp32, the same products diffusers tabulates; computed per call
    from the positions, so there is nothing to store."""
    angles = []
    for i, dim in enumerate(axes_dim):
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, device=positions.device).float().div(dim))
        angles.append(positions[:, i].float()[:, None] * inv_freq[None])
    angle = torch.cat(angles, dim=-1)
    return angle.cos(), angle.sin()


def joint_rope(
    img_shapes: Sequence[Shape],
    txt_len: int,
    axes_dim: Sequence[int],
    theta: float,
    layered: bool = False,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Tables of the joint [txt, img] sequence the blocks attend over."""
    pos = torch.cat(
        (text_positions(txt_len, img_shapes, layered, device), image_positions(img_shapes, layered, device))
    )
    return rope_tables(pos, axes_dim, theta)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of x (B, H, L, D) in fp32 (complex multiplication); returns x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)
