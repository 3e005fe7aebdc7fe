"""Qwen-Image latent geometry: 2x2 patchify of 16-channel latents into 64-channel tokens, and the ``img_shapes``
the transformer reads its RoPE positions from.

A latent (B, 16, h, w) (h, w = H/8, W/8, even) becomes (h/2)(w/2) row-major tokens whose 64 channels are ordered
(c, pi, pj). ``img_shapes`` lists (frames, h/2, w/2) per image in token order: the target first, then each
reference; references are told apart only by their RoPE frame index (1, 2, ...), not by an offset grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kern_qwen_image.rope import Shape


def pack(latents: Tensor) -> Tensor:
    """(B, C, h, w) → (B, (h/2)(w/2), 4C); (B, F, C, h, w) → (B, F (h/2)(w/2), 4C), frame-major (Layered)."""
    c, h, w = latents.shape[-3:]
    if h % 2 or w % 2:
        raise ValueError(f"latent size {h}x{w} must be even (images a multiple of 16 pixels)")
    x = latents.reshape(-1, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(latents.shape[0], -1, 4 * c)


def unpack(tokens: Tensor, h: int, w: int, frames: int | None = None) -> Tensor:
    """Inverse of ``pack`` for latent size (h, w): (B, C, h, w), or (B, frames, C, h, w) when ``frames`` is given."""
    b, _, c4 = tokens.shape
    x = tokens.reshape(b * (frames or 1), h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    x = x.reshape(b, frames or 1, c4 // 4, h, w)
    return x if frames else x[:, 0]


def image_shape(h: int, w: int, frames: int = 1) -> Shape:
    """The token grid of a latent of size (h, w)."""
    return (frames, h // 2, w // 2)


def img_shapes(target_hw: tuple[int, int], reference_hws: Sequence[tuple[int, int]] = ()) -> list[Shape]:
    """Target then references, from latent sizes (h, w)."""
    return [image_shape(*target_hw)] + [image_shape(*hw) for hw in reference_hws]


def layered_img_shapes(hw: tuple[int, int], layers: int, condition_hw: tuple[int, int] | None = None) -> list[Shape]:
    """Layered: ``layers + 1`` output frames (composite first), each its own image, then the condition image
    (last, so the 3D RoPE puts it at frame -1)."""
    return [image_shape(*hw)] * (layers + 1) + [image_shape(*(condition_hw or hw))]


def prepare_tokens(target_latents: Tensor, references: Sequence[Tensor] = ()) -> tuple[Tensor, list[Shape], int]:
    """The transformer's image input: target tokens, then each reference's (clean) tokens.

    target_latents (B, C, h, w); references (B or 1, C, h_i, w_i) or (C, h_i, w_i), any sizes.
    Returns (tokens (B, L, 4C), img_shapes, n_target): the outputs past ``n_target`` belong to references."""
    b, _, h, w = target_latents.shape
    refs = [r if r.ndim == 4 else r[None] for r in references]
    tokens = [pack(target_latents)] + [pack(r).expand(b, -1, -1) for r in refs]
    shapes = img_shapes((h, w), [tuple(r.shape[-2:]) for r in refs])
    return torch.cat(tokens, dim=1), shapes, (h // 2) * (w // 2)


def calculate_dimensions(target_area: float, ratio: float) -> tuple[int, int]:
    """(width, height) of about ``target_area`` pixels with aspect ``ratio`` = w/h, each a multiple of 32.

    The pipelines' arithmetic: ``w = sqrt(area·ratio)``, ``h = w/ratio``, each rounded to the nearest multiple
    of 32 with Python's ``round`` (ties to even). Edit and Edit-Plus size their VAE references (and the
    default output) at 1024² area, Layered its input image and output at ``resolution``² (640 or 1024).
    """
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32
