"""The Qwen-Image MMDiT block: separate weights for image and text tokens, one joint attention over [txt, img].

Unlike FLUX.2, every block owns its modulation (``img_mod`` / ``txt_mod``: SiLU → Linear to 6 x hidden, read as
(shift, scale, gate) for the attention and then the MLP), and every Linear has a bias.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kern_qwen_image.layers import FeedForward, RMSNorm, attention, modulate, modulation
from kern_qwen_image.rope import apply_rope

Rope = tuple[Tensor, Tensor]  # (cos, sin) of the joint [txt, img] sequence


class JointAttention(nn.Module):
    """Image projections ``to_*``, text projections ``add_*_proj``, per-head RMSNorm on q and k of each stream."""

    def __init__(self, hidden_size: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(hidden_size, hidden_size) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(hidden_size, hidden_size) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.to_out = nn.ModuleList(
            [nn.Linear(hidden_size, hidden_size)]
        )  # diffusers' [Linear, Dropout]: key `to_out.0`
        self.to_add_out = nn.Linear(hidden_size, hidden_size)

    def _heads(self, x: Tensor, proj: nn.Linear, norm: nn.Module | None = None) -> Tensor:
        x = proj(x).unflatten(-1, (self.num_heads, -1))  # (B, L, H, D)
        return (norm(x) if norm is not None else x).transpose(1, 2)

    def forward(self, img: Tensor, txt: Tensor, rope: Rope, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        q = torch.cat(
            (self._heads(txt, self.add_q_proj, self.norm_added_q), self._heads(img, self.to_q, self.norm_q)), dim=2
        )
        k = torch.cat(
            (self._heads(txt, self.add_k_proj, self.norm_added_k), self._heads(img, self.to_k, self.norm_k)), dim=2
        )
        v = torch.cat((self._heads(txt, self.add_v_proj), self._heads(img, self.to_v)), dim=2)
        out = attention(apply_rope(q, *rope), apply_rope(k, *rope), v, mask)
        # Contiguous slices, as diffusers: a strided batch takes another matmul path (bf16 results differ in the last bit).
        txt_out, img_out = out[:, : txt.shape[1]].contiguous(), out[:, txt.shape[1] :].contiguous()
        return self.to_out[0](img_out), self.to_add_out(txt_out)


class QwenImageBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, eps: float = 1e-6):
        super().__init__()
        self.img_mod, self.txt_mod = modulation(hidden_size), modulation(hidden_size)
        self.img_norm1, self.img_norm2 = layer_norm(hidden_size, eps), layer_norm(hidden_size, eps)
        self.txt_norm1, self.txt_norm2 = layer_norm(hidden_size, eps), layer_norm(hidden_size, eps)
        self.attn = JointAttention(hidden_size, num_heads, eps)
        self.img_mlp = FeedForward(hidden_size, mlp_hidden)
        self.txt_mlp = FeedForward(hidden_size, mlp_hidden)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        temb: Tensor,
        rope: Rope,
        mask: Tensor | None = None,
        img_temb_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """img (B, L_img, D), txt (B, L_txt, D), temb (K, B, D) with temb[0] the real timestep's embedding.

        K = 1 normally. Edit-2511 (``zero_cond_t``) passes K = 2, [t, t = 0], and ``img_temb_index`` (L_img,) of 0/1
        picking each image token's row: reference tokens are modulated as clean. Text always uses temb[0]."""
        img_mod = self.img_mod(temb)  # (K, B, 6D)
        img_mod = img_mod.transpose(0, 1)[:, img_temb_index] if img_temb_index is not None else img_mod[0, :, None]
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = img_mod.chunk(6, dim=-1)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(temb[0])[:, None].chunk(
            6, dim=-1
        )

        img_attn, txt_attn = self.attn(
            modulate(self.img_norm1(img), img_shift1, img_scale1),
            modulate(self.txt_norm1(txt), txt_shift1, txt_scale1),
            rope,
            mask,
        )
        img = img + img_gate1 * img_attn
        txt = txt + txt_gate1 * txt_attn
        img = img + img_gate2 * self.img_mlp(modulate(self.img_norm2(img), img_shift2, img_scale2))
        txt = txt + txt_gate2 * self.txt_mlp(modulate(self.txt_norm2(txt), txt_shift2, txt_scale2))
        if img.dtype == torch.float16:  # as the reference: keep fp16 finite
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


def layer_norm(hidden_size: int, eps: float) -> nn.LayerNorm:
    # Parameter-free: all scaling comes from the block's modulation.
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=eps)
