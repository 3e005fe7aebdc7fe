"""Qwen-Image adaptable Linear paths (diffusers naming, which is also Qwen-Image's native naming).

Qwen-Image has no separate "original" checkpoint format: kern's model, ComfyUI and musubi use the diffusers
module names, so the native ↔ diffusers module map is the identity. The list still matters: kohya files
flatten names (``lora_unet_transformer_blocks_0_img_mlp_net_0_proj``) and ``_`` inside names (``to_q``,
``add_q_proj``, ``img_mlp``) makes un-flattening ambiguous without a table.
"""

from __future__ import annotations

TOP_LEVEL = (
    "img_in",
    "txt_in",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "norm_out.linear",
    "proj_out",
)
PER_BLOCK = (
    "img_mod.1",
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mod.1",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)


def qwen_module_paths(num_layers: int = 60) -> list[str]:
    """Every adaptable Linear of a Qwen-Image transformer with ``num_layers`` blocks (14 per block + 6 top-level)."""
    paths = list(TOP_LEVEL)
    for i in range(num_layers):
        paths += [f"transformer_blocks.{i}.{p}" for p in PER_BLOCK]
    return paths


def qwen_module_map(num_layers: int = 60) -> list[tuple[str, list[tuple[str, None]]]]:
    """The identity native ↔ diffusers map in the ``adapter_module_map`` hook's format."""
    return [(p, [(p, None)]) for p in qwen_module_paths(num_layers)]
