"""FLUX.2 latent geometry: latents (B, 128, h, w) ↔ row-major tokens, and the 4-axis position ids (t, h, w, l).

Text token j sits at (0, 0, 0, j), target token (r, c) at (0, r, c, 0), and token (r, c) of reference i
(0-based) at (10 * (i + 1), r, c, 0): references restart their grids and are told apart by the time axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

REFERENCE_T_STEP = 10  # reference i sits at t = 10 (i + 1), not i + 1 as one might guess


def pack(latents: Tensor) -> Tensor:
    """(B, C, h, w) → (B, h*w, C), row-major (h outer, w inner)."""
    return latents.flatten(2).transpose(1, 2)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, h*w, C) → (B, C, h, w)."""
    return tokens.transpose(1, 2).unflatten(2, (h, w))


def image_ids(h: int, w: int, t: int = 0, device: torch.device | str | None = None) -> Tensor:
    """(h*w, 4) int64 ids (t, row, col, 0) in ``pack`` order."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ids = torch.zeros(h * w, 4, dtype=torch.long, device=device)
    ids[:, 0], ids[:, 1], ids[:, 2] = t, rows.flatten(), cols.flatten()
    return ids


def text_ids(length: int, device: torch.device | str | None = None) -> Tensor:
    """(length, 4) int64 ids (0, 0, 0, j)."""
    ids = torch.zeros(length, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


def reference_ids(shapes: Sequence[tuple[int, int]], device: torch.device | str | None = None) -> Tensor:
    """Ids of any number of references with latent sizes ``shapes`` [(h, w), ...], concatenated in order."""
    ids = [image_ids(h, w, t=REFERENCE_T_STEP * (i + 1), device=device) for i, (h, w) in enumerate(shapes)]
    return torch.cat(ids) if ids else torch.zeros(0, 4, dtype=torch.long, device=device)


def prepare_tokens(target_latents: Tensor, references: Sequence[Tensor] = ()) -> tuple[Tensor, Tensor, int]:
    """The transformer's image input: target tokens, then each reference's (clean) tokens.

    target_latents (B, C, h, w); references (B or 1, C, h_i, w_i) or (C, h_i, w_i), any sizes.
    Returns (tokens (B, L, C), ids (L, 4), n_target): the outputs past ``n_target`` belong to references."""
    b, _, h, w = target_latents.shape
    device = target_latents.device
    refs = [r if r.ndim == 4 else r[None] for r in references]
    tokens = [pack(target_latents)] + [pack(r).expand(b, -1, -1) for r in refs]
    ids = torch.cat((image_ids(h, w, device=device), reference_ids([tuple(r.shape[-2:]) for r in refs], device=device)))
    return torch.cat(tokens, dim=1), ids, h * w
