"""The Qwen-Image MMDiT (T2I, Edit, Edit-Plus 2509 / 2511, Layered) with diffusers' module names, which are
Qwen-Image's own: ``state_dict()`` keys are the checkpoint's (no prefix).

Packed latent tokens and text embeddings (RMS-normed, then projected) run through ``num_layers`` double-stream
blocks; the image stream is normed and projected back to packed latent channels. The model holds no buffers
(RoPE tables are computed from ``img_shapes`` on each call), so it can be built on the meta device and filled
with ``load_state_dict(sd, assign=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from kern.models.blocks import run_block
from torch import Tensor, nn

from kern_qwen_image.blocks import QwenImageBlock
from kern_qwen_image.layers import NormOut, RMSNorm, TimeTextEmbed
from kern_qwen_image.params import QwenImageParams
from kern_qwen_image.rope import Shape, joint_rope


class QwenImageTransformer(nn.Module):
    block_lists = ("transformer_blocks",)  # the repeated blocks kern.gpu.accel checkpoints and compiles

    def __init__(self, params: QwenImageParams):
        super().__init__()
        self.params = params
        hidden = params.hidden_size
        self.img_in = nn.Linear(params.in_channels, hidden)
        self.txt_norm = RMSNorm(params.joint_attention_dim, params.eps)
        self.txt_in = nn.Linear(params.joint_attention_dim, hidden)
        self.time_text_embed = TimeTextEmbed(hidden, params.use_additional_t_cond)
        self.transformer_blocks = nn.ModuleList(
            QwenImageBlock(hidden, params.num_heads, params.mlp_hidden, params.eps) for _ in range(params.num_layers)
        )
        self.norm_out = NormOut(hidden, params.eps)
        self.proj_out = nn.Linear(hidden, params.out_dim)
        self.gradient_checkpointing = False

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        txt_mask: Tensor | None,
        timesteps: Tensor,
        img_shapes: Sequence[Shape],
        additional_t_cond: Tensor | int | None = None,
    ) -> Tensor:
        """img (B, L_img, 64): target tokens then reference tokens; txt (B, L_txt, 3584); txt_mask (B, L_txt) bool or
        0/1, True for real tokens (None: all real); timesteps (B,) in [0, 1]; img_shapes [(frames, h, w), ...] token
        grids of the target then each reference, shared by the whole batch; additional_t_cond (B,) or int, 0/1,
        Layered only (the pipelines pass 0). Returns (B, L_img, 64): the caller keeps the target's tokens."""
        p = self.params
        img_shapes = [tuple(int(n) for n in s) for s in img_shapes]
        if not img_shapes or any(len(s) != 3 for s in img_shapes):
            raise ValueError(
                f"img_shapes must list one (frames, h, w) per image, shared by the batch; got {img_shapes}"
            )
        if img.shape[1] != sum(math.prod(s) for s in img_shapes):
            raise ValueError(
                f"img has {img.shape[1]} tokens but img_shapes {img_shapes} describe {sum(math.prod(s) for s in img_shapes)}"
            )
        if (additional_t_cond is None) == p.use_additional_t_cond:
            raise ValueError(
                "additional_t_cond is required by Layered models (use_additional_t_cond) and accepted by no"
                f" other (additional_t_cond {'missing' if additional_t_cond is None else 'given'})"
            )
        batch = img.shape[0]
        if txt_mask is not None and tuple(txt_mask.shape) != tuple(txt.shape[:2]):
            raise ValueError(f"txt_mask {tuple(txt_mask.shape)} must be (batch, text length) {tuple(txt.shape[:2])}")
        if isinstance(additional_t_cond, int):
            additional_t_cond = torch.full((batch,), additional_t_cond, dtype=torch.long, device=img.device)

        img = self.img_in(img)
        dtype = img.dtype
        txt = self.txt_in(self.txt_norm(txt))

        # Edit-2511 embeds t = 0 too; every reference token is modulated with it.
        zero_cond = p.zero_cond_t and len(img_shapes) > 1
        t = torch.cat((timesteps, torch.zeros_like(timesteps))) if zero_cond else timesteps
        cond = None if additional_t_cond is None else additional_t_cond.repeat(2) if zero_cond else additional_t_cond
        temb = self.time_text_embed(t, dtype, cond).unflatten(0, (-1, batch))  # (K, B, D), temb[0] from t
        index = None
        if zero_cond:
            index = torch.ones(img.shape[1], dtype=torch.long, device=img.device)
            index[: math.prod(img_shapes[0])] = 0

        rope = joint_rope(img_shapes, txt.shape[1], p.axes_dim, p.theta, layered=p.use_layer3d_rope, device=img.device)
        mask = _joint_mask(txt_mask, img.shape[1])

        for block in self.transformer_blocks:
            img, txt = run_block(block, img, txt, temb, rope, mask, index, checkpointed=self.gradient_checkpointing)
        return self.proj_out(self.norm_out(img, temb[0]))


def _joint_mask(txt_mask: Tensor | None, img_len: int) -> Tensor | None:
    """(B, 1, 1, L_txt + L_img) bool key mask of the [txt, img] sequence, or None when nothing is masked.

    Only keys are masked: padded text queries still attend (their outputs are never read by image tokens), so
    nothing is NaN. An all-real mask is dropped, as the pipelines do, which keeps fused attention kernels usable."""
    if txt_mask is None:
        return None
    txt_mask = txt_mask.bool()
    if bool(txt_mask.all()):
        return None
    img_mask = txt_mask.new_ones(txt_mask.shape[0], img_len)
    return torch.cat((txt_mask, img_mask), dim=1)[:, None, None, :]
