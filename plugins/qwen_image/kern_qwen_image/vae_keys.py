"""Qwen-Image VAE state dicts: the original Wan / ComfyUI single-file naming (``qwen_image_vae.safetensors``) <->
diffusers' ``AutoencoderKLQwenImage`` naming (kern's), and the ``QwenImageVAEParams`` a state dict implies.

Pure key renames (values and shapes are the same in both layouts), so meta tensors work and a header's worth of
stand-ins converts for free. The Wan layout numbers a residual block's ``nn.Sequential`` (``residual.0/2/3/6``
= norm1, conv1, norm2, conv2) and keeps the decoder's res blocks and upsamplers in one flat ``upsamples`` list;
diffusers groups them per level. Unknown keys pass through unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from kern.errors import ModelFileError
from kern.models.files import shape_reader

from kern_qwen_image.vae import QwenImageVAEParams

__all__ = ["comfy_to_diffusers_vae", "diffusers_to_comfy_vae", "is_comfy_vae", "vae_params_from_state_dict"]

# (Wan, diffusers) prefixes after "encoder." / "decoder."; decoder.upsamples.{n} is mapped separately.
_SIDE = (
    ("conv1.", "conv_in."),
    ("head.0.", "norm_out."),
    ("head.2.", "conv_out."),
    ("middle.0.", "mid_block.resnets.0."),
    ("middle.1.", "mid_block.attentions.0."),
    ("middle.2.", "mid_block.resnets.1."),
    ("downsamples.", "down_blocks."),
)
_TOP = (("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."))
# Inside a residual block: the Sequential (norm, SiLU, conv, norm, SiLU, dropout, conv) by index.
_INNER = (
    (".residual.0.", ".norm1."),
    (".residual.2.", ".conv1."),
    (".residual.3.", ".norm2."),
    (".residual.6.", ".conv2."),
    (".shortcut.", ".conv_shortcut."),
)
_UP_WAN = re.compile(r"decoder\.upsamples\.(\d+)\.")
_UP_DIFFUSERS = re.compile(r"decoder\.up_blocks\.(\d+)\.(resnets\.\d+|upsamplers\.0)\.")


def _swap(key: str, pairs, reverse: bool) -> str:
    for a, b in pairs:
        src, dst = (b, a) if reverse else (a, b)
        if key.startswith(src):
            return dst + key[len(src) :]
    return key


def _replace_inner(key: str, reverse: bool) -> str:
    for a, b in _INNER:
        key = key.replace(*((b, a) if reverse else (a, b)))
    return key


def is_comfy_vae(sd: Mapping[str, Any]) -> bool:
    """Wan / ComfyUI layout: top-level ``conv1`` (diffusers' ``quant_conv``), as musubi detects it."""
    return "conv1.bias" in sd or "conv1.weight" in sd


def comfy_to_diffusers_vae(sd: Mapping[str, Any]) -> dict[str, Any]:
    """A Wan / ComfyUI Qwen-Image VAE state dict in ``AutoencoderKLQwenImage`` (kern) naming."""
    # decoder.upsamples is flat: each level's res blocks, then its upsampler (the one with a ``resample``).
    flat = sorted({int(m.group(1)) for k in sd if (m := _UP_WAN.match(k))})
    ups = {n for n in flat if any(k.startswith(f"decoder.upsamples.{n}.resample.") for k in sd)}
    up_map, level, j = {}, 0, 0
    for n in flat:
        if n in ups:
            up_map[n], level, j = f"decoder.up_blocks.{level}.upsamplers.0.", level + 1, 0
        else:
            up_map[n], j = f"decoder.up_blocks.{level}.resnets.{j}.", j + 1
    out = {}
    for key, value in sd.items():
        if m := _UP_WAN.match(key):
            key = up_map[int(m.group(1))] + key[m.end() :]
        elif key.startswith(("encoder.", "decoder.")):
            side, rest = key.split(".", 1)
            key = f"{side}.{_swap(rest, _SIDE, reverse=False)}"
        else:
            key = _swap(key, _TOP, reverse=False)
        out[_replace_inner(key, reverse=False)] = value
    return out


def diffusers_to_comfy_vae(sd: Mapping[str, Any]) -> dict[str, Any]:
    """An ``AutoencoderKLQwenImage`` (kern) state dict in Wan / ComfyUI naming."""
    blocks = sorted({(int(m.group(1)), m.group(2)) for k in sd if (m := _UP_DIFFUSERS.match(k))})
    # Number levels in order, each's res blocks before its upsampler ("resnets" sorts before "upsamplers").
    blocks.sort(key=lambda b: (b[0], b[1].startswith("upsamplers"), int(b[1].split(".")[1])))
    up_map = {f"decoder.up_blocks.{i}.{name}.": f"decoder.upsamples.{n}." for n, (i, name) in enumerate(blocks)}
    out = {}
    for key, value in sd.items():
        key = _replace_inner(key, reverse=True)  # first: "conv1." is also a Wan block name
        if m := _UP_DIFFUSERS.match(key):
            key = up_map[m.group(0)] + key[m.end() :]
        elif key.startswith(("encoder.", "decoder.")):
            side, rest = key.split(".", 1)
            key = f"{side}.{_swap(rest, _SIDE, reverse=True)}"
        else:
            key = _swap(key, _TOP, reverse=True)
        out[key] = value
    return out


def vae_params_from_state_dict(sd: Mapping[str, Any], where: str = "VAE state dict") -> QwenImageVAEParams:
    """The ``QwenImageVAEParams`` that build a model for ``sd`` (diffusers or Wan / ComfyUI naming; values may be
    tensors or plain shapes, e.g. from a safetensors header). 3 input channels for Qwen-Image, 4 (RGBA) for the
    Layered VAE. ``latents_mean`` / ``latents_std`` and ``dropout`` are not in the weights and keep the defaults."""
    if is_comfy_vae(sd):
        sd = comfy_to_diffusers_vae(sd)

    shape = shape_reader(sd, where, "this is not a Qwen-Image (Wan-style) VAE")
    base_dim, input_channels = shape("encoder.conv_in.weight")[:2]
    z_dim = shape("decoder.conv_in.weight")[1]
    if shape("quant_conv.weight")[0] != 2 * z_dim:
        raise ModelFileError(f"{where}: quant_conv has {shape('quant_conv.weight')[0]} channels, want 2 x {z_dim}")
    if shape("decoder.conv_out.weight")[0] != input_channels:
        raise ModelFileError(
            f"{where}: the decoder emits {shape('decoder.conv_out.weight')[0]} channels, "
            f"the encoder takes {input_channels}"
        )
    # encoder.down_blocks is flat: res blocks (conv1), with a downsample (resample.1) closing each level but the last.
    rx = re.compile(r"encoder\.down_blocks\.(\d+)\.")
    widths, res_counts, temporal, count = [], [], [], 0
    for n in sorted({int(m.group(1)) for k in sd if (m := rx.match(k))}):
        if f"encoder.down_blocks.{n}.to_qkv.weight" in sd:
            raise ModelFileError(f"{where}: attention in encoder.down_blocks.{n} (attn_scales) is not supported")
        if f"encoder.down_blocks.{n}.resample.1.weight" in sd:
            temporal.append(f"encoder.down_blocks.{n}.time_conv.weight" in sd)
            res_counts.append(count)
            count = 0
        else:
            count += 1
            width = shape(f"encoder.down_blocks.{n}.conv2.weight")[0]
            if count == 1:
                widths.append(width)
    res_counts.append(count)
    if not widths or len(set(res_counts)) != 1 or any(w % base_dim for w in widths):
        raise ModelFileError(
            f"{where}: encoder levels {widths} with {res_counts} res blocks do not fit the "
            f"Qwen-Image VAE layout (equal res blocks per level, widths multiples of {base_dim})"
        )
    return QwenImageVAEParams(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=tuple(w // base_dim for w in widths),
        num_res_blocks=res_counts[0],
        temperal_downsample=tuple(temporal),
        input_channels=input_channels,
    )
