"""Small pieces of the Qwen-Image transformer: time embedding, RMSNorm, the GELU MLP, modulation, attention.

Module and parameter names are diffusers' (``linear_1``, ``net.0.proj``, ``weight``): they are the checkpoint keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kern.gpu.attention import attention as kern_attention
from torch import Tensor, nn

TIME_DIM = 256  # sinusoid width of the timestep embedding


def timestep_embedding(
    t: Tensor, dtype: torch.dtype, dim: int = TIME_DIM, max_period: float = 10000, scale: float = 1000.0
) -> Tensor:
    """Sinusoid [cos | sin] of ``scale * t`` for t (N,) in [0, 1], returned in ``dtype``.

    As diffusers does (the stack the checkpoints are run with), t is first rounded to the model dtype, so in bf16
    the time input keeps about three significant digits; the sinusoid itself is fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(dtype).float()[:, None] * freqs[None] * scale
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1).to(dtype)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(TIME_DIM, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """Time embedding, plus Layered's learnt ``addition_t_embedding`` of a 0/1 flag (the pipelines pass is_rgb = 0)."""

    def __init__(self, hidden_size: int, additional_t_cond: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(hidden_size)
        self.addition_t_embedding = nn.Embedding(2, hidden_size) if additional_t_cond else None

    def forward(self, t: Tensor, dtype: torch.dtype, additional_t_cond: Tensor | None = None) -> Tensor:
        emb = self.timestep_embedder(timestep_embedding(t, dtype))
        if self.addition_t_embedding is not None:
            emb = emb + self.addition_t_embedding(additional_t_cond).to(dtype)
        return emb


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # The mean square in fp32; the normalised value is cast to the weight's dtype before scaling (as diffusers).
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x.to(self.weight.dtype) * self.weight


class GELUProj(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear → GELU(tanh) → Linear; slot 1 of ``net`` is diffusers' dropout, kept so the keys are ``net.0`` / ``net.2``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(GELUProj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def modulation(dim: int) -> nn.Sequential:
    # SiLU inside a Sequential so the Linear's keys are `img_mod.1.*` / `txt_mod.1.*`.
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class NormOut(nn.Module):
    """Final adaptive LayerNorm; its Linear emits (scale, shift), in that order."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=eps)
        self.linear = nn.Linear(hidden_size, 2 * hidden_size)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(temb).to(x.dtype))[:, None].chunk(2, dim=-1)
        return modulate(self.norm(x), shift, scale)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Non-causal attention over (B, H, L, D) inputs; ``mask`` (B, 1, 1, L) bool marks the keys that may be attended.
    Returns (B, L, H*D). The one place every block attends through: ``kern.gpu.attention`` holds the backend
    ``train.attention`` chose."""
    return kern_attention(q, k, v, mask)
