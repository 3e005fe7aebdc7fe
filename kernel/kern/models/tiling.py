"""Tiled decoding for VAEs: decode overlapping latent windows one at a time and cross-fade them.

Activation memory is bounded by the tile, not the image. The result is not bit-equal to a whole
decode wherever the decoder looks beyond a pixel (normalisation statistics, attention, padding at tile
borders); linear ramps, normalised to sum to one, fade neighbouring tiles into each other so no hard
seam remains. Larger tiles shrink the difference; a larger overlap widens the cross-fade.
"""

from __future__ import annotations

from typing import Callable

import torch


def ramp(n_px: int, overlap_px: int, rise: bool, fall: bool) -> torch.Tensor:
    """Per-pixel weights along one side of a tile: linear 0 -> 1 over the overlap where a neighbour precedes
    (``rise``), 1 -> 0 where one follows (``fall``), 1 elsewhere. Half-pixel offsets keep every weight > 0."""
    w = torch.ones(n_px)
    if overlap_px:
        edge = (torch.arange(overlap_px) + 0.5) / overlap_px
        if rise:
            w[:overlap_px] = torch.minimum(w[:overlap_px], edge)
        if fall:
            w[-overlap_px:] = torch.minimum(w[-overlap_px:], edge.flip(0))
    return w


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of ``tile`` cells covering ``n``; the last one is flush with the end (overlapping more)."""
    if n <= tile:
        return [0]
    return list(range(0, n - tile, tile - overlap)) + [n - tile]


def wants_tiles(latents: torch.Tensor, tiled: bool | None, auto_above: int) -> bool:
    """``tiled`` as asked; ``None`` means automatic: tiles once the latent has more than ``auto_above`` cells."""
    if tiled is None:
        return latents.shape[-2] * latents.shape[-1] > auto_above
    return bool(tiled)


def decode_tiled(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    scale: int,
    tile: int,
    overlap: int,
    where: str = "decode_tiled",
) -> torch.Tensor:
    """``decode`` (latents (B, C, h, w) -> images (B, c, h*scale, w*scale)) applied to ``tile`` x ``tile``
    windows overlapping by ``overlap`` latent cells, blended; returns float32 images."""
    if not 0 <= overlap < tile:
        raise ValueError(f"{where}: need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    b, _, h, w = latents.shape
    s = scale
    out = weight = None
    for y in tile_starts(h, tile, overlap):
        for x in tile_starts(w, tile, overlap):
            window = latents[..., y : y + tile, x : x + tile]
            th, tw = window.shape[-2:]
            image = decode(window).float()
            if out is None:
                out = image.new_zeros(b, image.shape[1], h * s, w * s)
                weight = image.new_zeros(1, 1, h * s, w * s)
            mask = (
                ramp(th * s, overlap * s, rise=y > 0, fall=y + th < h)[:, None]
                * ramp(tw * s, overlap * s, rise=x > 0, fall=x + tw < w)[None, :]
            ).to(image.device)
            out[..., y * s : (y + th) * s, x * s : (x + tw) * s] += image * mask
            weight[..., y * s : (y + th) * s, x * s : (x + tw) * s] += mask
    return out / weight
