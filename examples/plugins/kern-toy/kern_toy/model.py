"""A tiny diffusion transformer: enough structure for adapters, training and generation to be real."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kern.gpu.attention import attention
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"), nn.Linear(4 * hidden, hidden)
        )
        self.mod = nn.Linear(hidden, 4 * hidden)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift1, scale1, shift2, scale2 = self.mod(F.silu(cond))[:, None].chunk(4, dim=-1)
        h = (1 + scale1) * self.norm1(x) + shift1
        b, n, _ = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v)  # kern's one attention call: the job's train.attention choice applies
        x = x + self.proj(a)
        return x + self.mlp((1 + scale2) * self.norm2(x) + shift2)


class ToyTransformer(nn.Module):
    """Latents (B, C, h, w) → velocity (B, C, h, w), conditioned on a pooled text vector."""

    block_lists = ("blocks",)  # the repeated blocks: kern checkpoints, compiles, swaps and shards by them

    def __init__(self, channels: int = 4, hidden: int = 32, heads: int = 2, depth: int = 2, text_dim: int = 16) -> None:
        super().__init__()
        self.hidden = hidden
        self.img_in = nn.Linear(channels, hidden)
        self.txt_in = nn.Linear(text_dim, hidden)
        self.time_in = nn.Linear(hidden, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(depth))
        self.out = nn.Linear(hidden, channels)

    def forward(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        x = self.img_in(latents.flatten(2).transpose(1, 2))
        cond = self.time_in(timestep_embedding(t, self.hidden).to(x.dtype)) + self.txt_in(text.mean(dim=1))
        for block in self.blocks:
            x = block(x, cond)
        return self.out(x).transpose(1, 2).reshape(b, c, h, w)
