"""Qwen-Image generation schedule and true-CFG combination: pure functions.

Sigmas follow the official scheduler config: ``linspace(1, 1/N, N)``, the exponential shift with mu
from the target token count (0.5 at 256 tokens to 0.9 at 8192), then stretched so the last sigma is
exactly 0.02, then 0. Layered uses ``linspace(1, 0, N+1)[:-1]`` with mu = sqrt(condition tokens / 256).
"""

from __future__ import annotations

import math

import torch

BASE_SEQ, MAX_SEQ, BASE_SHIFT, MAX_SHIFT, SHIFT_TERMINAL = 256, 8192, 0.5, 0.9, 0.02


def mu_for_tokens(tokens: int) -> float:
    m = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ - BASE_SEQ)
    return m * tokens + (BASE_SHIFT - m * BASE_SEQ)


def _shift(mu: float, s: torch.Tensor) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))


def sigmas(num_steps: int, image_seq_len: int, shift: float | None = None) -> torch.Tensor:
    """``num_steps + 1`` sigmas from 1 to 0 (the last non-zero one is 0.02). ``shift`` fixes e^mu."""
    s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    shifted = _shift(math.log(shift) if shift else mu_for_tokens(image_seq_len), s)
    scale = (1.0 - shifted[-1]) / (1.0 - SHIFT_TERMINAL)
    stretched = 1.0 - (1.0 - shifted) / scale
    return torch.cat([stretched, torch.zeros(1, dtype=torch.float64)]).float()


def layered_sigmas(num_steps: int, condition_tokens: int) -> torch.Tensor:
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    shifted = _shift(math.sqrt(condition_tokens / 256.0), s)
    scale = (1.0 - shifted[-1]) / (1.0 - SHIFT_TERMINAL)
    stretched = 1.0 - (1.0 - shifted) / scale
    return torch.cat([stretched, torch.zeros(1, dtype=torch.float64)]).float()


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, normalize: bool = True) -> torch.Tensor:
    """``uncond + scale (cond - uncond)``, rescaled per token to the conditional velocity's norm.

    ``cond`` / ``uncond`` are latents (B, 16, h, w), or (B, frames, 16, h, w) for Layered; a token is a 2x2
    patch of all 16 channels of one frame (64 values), as in the transformer's packed layout, and the
    norm is taken over those 64 values.
    """
    comb = uncond + scale * (cond - uncond)
    if not normalize:
        return comb

    def token_norm(x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape[-3:]
        n = x[..., 0, 0, 0].numel()  # images: batch, or batch x frames
        patches = x.float().reshape(n, c, h // 2, 2, w // 2, 2).pow(2).sum(dim=(1, 3, 5), keepdim=True).sqrt()
        return patches.expand(n, 1, h // 2, 2, w // 2, 2).reshape(*x.shape[:-3], 1, h, w)

    return (comb.float() * (token_norm(cond) / token_norm(comb))).to(comb.dtype)
