"""The FLUX.2 transformer (dev, klein 4B / 9B) with BFL's module names: ``state_dict()`` keys are the checkpoint's.

Text and image tokens are embedded, run through ``depth`` double-stream blocks (separate weights per stream, joint
attention), concatenated as [txt, img] for ``depth_single`` single-stream blocks, and the image part is projected
back to latent channels. The model holds no buffers (RoPE tables are computed from the ids on each call), so it
can be built on the meta device and filled with ``load_state_dict(sd, assign=True)``.
"""

from __future__ import annotations

import torch
from kern.models.blocks import run_block
from torch import Tensor, nn

from kern_flux2.blocks import DoubleStreamBlock, SingleStreamBlock
from kern_flux2.layers import MLPEmbedder, Modulation, timestep_embedding
from kern_flux2.params import Flux2Params
from kern_flux2.rope import rope_tables

TIME_DIM = 256  # sinusoid width of the timestep and guidance embeddings


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int, eps: float):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=eps)
        self.linear = nn.Linear(hidden_size, out_channels, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=False))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(
            2, dim=-1
        )  # BFL order; diffusers stores (scale, shift)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


class Flux2Transformer(nn.Module):
    block_lists = ("double_blocks", "single_blocks")  # the repeated blocks kern.gpu.accel checkpoints and compiles

    def __init__(self, params: Flux2Params):
        super().__init__()
        self.params = params
        hidden, heads, mlp_hidden, eps = params.hidden_size, params.num_heads, params.mlp_hidden, params.eps
        self.img_in = nn.Linear(params.in_channels, hidden, bias=False)
        self.txt_in = nn.Linear(params.context_in_dim, hidden, bias=False)
        self.time_in = MLPEmbedder(TIME_DIM, hidden)
        self.guidance_in = MLPEmbedder(TIME_DIM, hidden) if params.guidance_embed else None
        self.double_stream_modulation_img = Modulation(hidden, double=True)
        self.double_stream_modulation_txt = Modulation(hidden, double=True)
        self.single_stream_modulation = Modulation(hidden, double=False)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, heads, mlp_hidden, eps) for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, heads, mlp_hidden, eps) for _ in range(params.depth_single)
        )
        self.final_layer = LastLayer(hidden, params.in_channels, eps)
        self.gradient_checkpointing = False

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """img (B, L_img, in_channels) target tokens followed by any reference tokens, txt (B, L_txt, context_in_dim),
        ids (B, L, 4) or (L, 4) positions (t, h, w, l), timesteps (B,) in [0, 1], guidance (B,) scales (dev only).
        Returns (B, L_img, in_channels): the caller drops the reference tokens' outputs."""
        if (guidance is None) == self.params.guidance_embed:
            raise ValueError(
                "guidance is required by guidance-embedding (dev) models and accepted by no other"
                f" (guidance_embed={self.params.guidance_embed}, guidance {'missing' if guidance is None else 'given'})"
            )
        vec = self.time_in(timestep_embedding(timesteps, TIME_DIM).to(img.dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, TIME_DIM).to(img.dtype))
        img_mod = self.double_stream_modulation_img(vec)
        txt_mod = self.double_stream_modulation_txt(vec)
        (single_mod,) = self.single_stream_modulation(vec)

        img, txt = self.img_in(img), self.txt_in(txt)
        pe = rope_tables(_joint_ids(txt_ids, img_ids), self.params.axes_dim, self.params.theta)

        for block in self.double_blocks:
            img, txt = run_block(block, img, txt, pe, img_mod, txt_mod, checkpointed=self.gradient_checkpointing)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = run_block(block, x, pe, single_mod, checkpointed=self.gradient_checkpointing)
        return self.final_layer(x[:, txt.shape[1] :], vec)


def _joint_ids(txt_ids: Tensor, img_ids: Tensor) -> Tensor:
    """Positions of the [txt, img] sequence; a shared (L, 4) side is expanded if the other is per-sample."""
    if txt_ids.ndim != img_ids.ndim:
        batch = max(txt_ids, img_ids, key=lambda t: t.ndim).shape[0]
        txt_ids, img_ids = (t if t.ndim == 3 else t.expand(batch, *t.shape) for t in (txt_ids, img_ids))
    return torch.cat((txt_ids.to(img_ids.device), img_ids), dim=-2)
