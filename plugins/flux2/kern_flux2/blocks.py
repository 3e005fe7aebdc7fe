"""FLUX.2 transformer blocks. Neither holds modulation weights: the shift/scale/gate triples come from the three
network-wide ``Modulation``s, so every block of a kind is modulated identically (unlike FLUX.1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kern_flux2.layers import QKNorm, SiLUGate, attention
from kern_flux2.rope import apply_rope

Mod = tuple[Tensor, Tensor, Tensor]  # (shift, scale, gate), each (B, 1, hidden_size)
Rope = tuple[Tensor, Tensor]  # (cos, sin) of the joint [txt, img] sequence


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*H*D) laid out [q | k | v], head-major within each → three (B, H, L, D)."""
    b, length, _ = qkv.shape
    q, k, v = qkv.reshape(b, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


class SelfAttention(nn.Module):
    """The per-stream projections of a double block; the attention itself is joint over both streams."""

    def __init__(self, hidden_size: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.norm = QKNorm(hidden_size // num_heads, eps)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


def layer_norm(hidden_size: int, eps: float) -> nn.LayerNorm:
    # Parameter-free: all scaling comes from the shared modulation.
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=eps)


def gated_mlp(hidden_size: int, mlp_hidden: int) -> nn.Sequential:
    # A Sequential so the checkpoint keys are `.0.` (in, gate and up fused) and `.2.` (out).
    return nn.Sequential(
        nn.Linear(hidden_size, 2 * mlp_hidden, bias=False), SiLUGate(), nn.Linear(mlp_hidden, hidden_size, bias=False)
    )


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, one joint attention over [txt, img]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, eps: float = 1e-6):
        super().__init__()
        self.img_norm1, self.img_norm2 = layer_norm(hidden_size, eps), layer_norm(hidden_size, eps)
        self.txt_norm1, self.txt_norm2 = layer_norm(hidden_size, eps), layer_norm(hidden_size, eps)
        self.img_attn = SelfAttention(hidden_size, num_heads, eps)
        self.txt_attn = SelfAttention(hidden_size, num_heads, eps)
        self.img_mlp = gated_mlp(hidden_size, mlp_hidden)
        self.txt_mlp = gated_mlp(hidden_size, mlp_hidden)

    def forward(
        self, img: Tensor, txt: Tensor, pe: Rope, img_mod: tuple[Mod, Mod], txt_mod: tuple[Mod, Mod]
    ) -> tuple[Tensor, Tensor]:
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = img_mod
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = txt_mod

        img_q, img_k, img_v = self.img_attn.qkv_heads((1 + img_scale1) * self.img_norm1(img) + img_shift1)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads((1 + txt_scale1) * self.txt_norm1(txt) + txt_shift1)
        q = apply_rope(torch.cat((txt_q, img_q), dim=2), *pe)
        k = apply_rope(torch.cat((txt_k, img_k), dim=2), *pe)
        attn = attention(q, k, torch.cat((txt_v, img_v), dim=2))
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp((1 + img_scale2) * self.img_norm2(img) + img_shift2)
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp((1 + txt_scale2) * self.txt_norm2(txt) + txt_shift2)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel block (ViT-22B): one Linear makes qkv and the MLP input, one Linear maps [attention | MLP] back."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.mlp_hidden = mlp_hidden
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + 2 * mlp_hidden, bias=False)  # [qkv | gate | up]
        self.linear2 = nn.Linear(hidden_size + mlp_hidden, hidden_size, bias=False)
        self.norm = QKNorm(hidden_size // num_heads, eps)
        self.pre_norm = layer_norm(hidden_size, eps)
        self.mlp_act = SiLUGate()

    def forward(self, x: Tensor, pe: Rope, mod: Mod) -> Tensor:
        shift, scale, gate = mod
        qkv, mlp = self.linear1((1 + scale) * self.pre_norm(x) + shift).split(
            (3 * self.hidden_size, 2 * self.mlp_hidden), dim=-1
        )
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(apply_rope(q, *pe), apply_rope(k, *pe), v)
        return x + gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=-1))
