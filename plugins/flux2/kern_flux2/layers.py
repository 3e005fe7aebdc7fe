"""Small pieces shared by the FLUX.2 blocks: embeddings, modulation, QK norm, the gated MLP activation, attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kern.gpu.attention import attention as kern_attention
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding [cos | sin] of ``time_factor * t`` (t in [0, 1]), computed in fp32.

    A floating ``t`` gets its dtype back, as in BFL; pass fp32 ``t`` to keep the full precision."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t.float())[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.to(t.dtype) if t.is_floating_point() else emb


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_size, bias=False)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """One of the three network-wide modulations: ``silu(vec)`` → (shift, scale, gate) per set, broadcast over tokens."""

    def __init__(self, hidden_size: int, double: bool):
        super().__init__()
        self.sets = 2 if double else 1  # double blocks modulate attention and MLP separately
        self.lin = nn.Linear(hidden_size, 3 * self.sets * hidden_size, bias=False)

    def forward(self, vec: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], ...]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.sets, dim=-1)
        return tuple(tuple(out[3 * i : 3 * i + 3]) for i in range(self.sets))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # The RMS in fp32 (as BFL): bf16 squares lose too much for head_dim 128.
        rrms = torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x.float() * rrms).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.query_norm = RMSNorm(head_dim, eps)
        self.key_norm = RMSNorm(head_dim, eps)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SiLUGate(nn.Module):
    """SwiGLU without its projection (fused into the Linear before it): ``silu(first half) * second half``."""

    def forward(self, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Full (unmasked, non-causal) attention over (B, H, L, D) inputs; returns (B, L, H*D).

    The one place every block attends through: ``kern.gpu.attention`` holds the backend ``train.attention`` chose."""
    return kern_attention(q, k, v)
