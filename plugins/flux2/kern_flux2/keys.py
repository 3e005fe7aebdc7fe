"""FLUX.2 transformer state dicts: BFL (checkpoint / kern) naming ↔ diffusers naming.

Besides renames, three things change shape or order: fused qkv [3D, D] ↔ separate q, k, v [D, D] rows;
RMSNorm ``.scale`` ↔ ``.weight``; the final modulation's halves, (shift, scale) in BFL and (scale, shift) in
diffusers. Keys neither side knows pass through unchanged, so a caller's shape check can name them.
Works on meta tensors too (only cat / chunk are used).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

PREFIXES = ("model.diffusion_model.", "diffusion_model.")

TOP = {
    "img_in.weight": "x_embedder.weight",
    "txt_in.weight": "context_embedder.weight",
    "time_in.in_layer.weight": "time_guidance_embed.timestep_embedder.linear_1.weight",
    "time_in.out_layer.weight": "time_guidance_embed.timestep_embedder.linear_2.weight",
    "guidance_in.in_layer.weight": "time_guidance_embed.guidance_embedder.linear_1.weight",
    "guidance_in.out_layer.weight": "time_guidance_embed.guidance_embedder.linear_2.weight",
    "double_stream_modulation_img.lin.weight": "double_stream_modulation_img.linear.weight",
    "double_stream_modulation_txt.lin.weight": "double_stream_modulation_txt.linear.weight",
    "single_stream_modulation.lin.weight": "single_stream_modulation.linear.weight",
    "final_layer.linear.weight": "proj_out.weight",
}
FINAL_MOD = ("final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight")  # halves swapped

DOUBLE = {  # double_blocks.{i}.X -> transformer_blocks.{i}.Y
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "img_attn.proj.weight": "attn.to_out.0.weight",
    "img_mlp.0.weight": "ff.linear_in.weight",
    "img_mlp.2.weight": "ff.linear_out.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "txt_attn.proj.weight": "attn.to_add_out.weight",
    "txt_mlp.0.weight": "ff_context.linear_in.weight",
    "txt_mlp.2.weight": "ff_context.linear_out.weight",
}
DOUBLE_QKV = {  # fused BFL qkv -> diffusers q, k, v (rows in that order)
    "img_attn.qkv.weight": ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight"),
    "txt_attn.qkv.weight": ("attn.add_q_proj.weight", "attn.add_k_proj.weight", "attn.add_v_proj.weight"),
}
SINGLE = {  # single_blocks.{i}.X -> single_transformer_blocks.{i}.Y
    "linear1.weight": "attn.to_qkv_mlp_proj.weight",
    "linear2.weight": "attn.to_out.weight",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}

_BFL_BLOCK = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.(.+)")
_DIFFUSERS_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop a ComfyUI-style ``model.diffusion_model.`` or ``diffusion_model.`` key prefix."""
    out = {}
    for k, v in sd.items():
        for p in PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
                break
        out[k] = v
    return out


def _swap_halves(w: Tensor) -> Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat((b, a), dim=0)


def bfl_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A BFL-named transformer state dict (prefixed or not) in diffusers ``Flux2Transformer2DModel`` naming."""
    out: dict[str, Tensor] = {}
    for k, v in strip_prefix(sd).items():
        if k in TOP:
            out[TOP[k]] = v
        elif k == FINAL_MOD[0]:
            out[FINAL_MOD[1]] = _swap_halves(v)
        elif (m := _BFL_BLOCK.fullmatch(k)) and m[1] == "double_blocks" and m[3] in DOUBLE_QKV:
            for name, part in zip(DOUBLE_QKV[m[3]], v.chunk(3, dim=0)):
                out[f"transformer_blocks.{m[2]}.{name}"] = part
        elif m and m[1] == "double_blocks" and m[3] in DOUBLE:
            out[f"transformer_blocks.{m[2]}.{DOUBLE[m[3]]}"] = v
        elif m and m[1] == "single_blocks" and m[3] in SINGLE:
            out[f"single_transformer_blocks.{m[2]}.{SINGLE[m[3]]}"] = v
        else:
            out[k] = v
    return out


def diffusers_to_bfl(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers-named FLUX.2 transformer state dict in BFL (checkpoint) naming."""
    top = {d: b for b, d in TOP.items()}
    double = {d: b for b, d in DOUBLE.items()}
    single = {d: b for b, d in SINGLE.items()}
    qkv_part = {d: (b, j) for b, parts in DOUBLE_QKV.items() for j, d in enumerate(parts)}
    out: dict[str, Tensor] = {}
    pending: dict[str, list[Tensor | None]] = {}  # fused BFL key -> its q, k, v as they turn up
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
        elif k == FINAL_MOD[1]:
            out[FINAL_MOD[0]] = _swap_halves(v)
        elif (m := _DIFFUSERS_BLOCK.fullmatch(k)) and m[1] == "transformer_blocks" and m[3] in qkv_part:
            fused, j = qkv_part[m[3]]
            fused = f"double_blocks.{m[2]}.{fused}"
            out.setdefault(fused, None)  # holds the key's place, so the order follows the input
            pending.setdefault(fused, [None, None, None])[j] = v
        elif m and m[1] == "transformer_blocks" and m[3] in double:
            out[f"double_blocks.{m[2]}.{double[m[3]]}"] = v
        elif m and m[1] == "single_transformer_blocks" and m[3] in single:
            out[f"single_blocks.{m[2]}.{single[m[3]]}"] = v
        else:
            out[k] = v
    for fused, parts in pending.items():
        if any(p is None for p in parts):
            raise ValueError(f"{fused}: diffusers state dict has only some of its q / k / v projections")
        out[fused] = torch.cat(parts, dim=0)
    return out
