"""FLUX.2 VAE state dicts: BFL ``ae.safetensors`` naming <-> diffusers ``AutoencoderKLFlux2`` naming, and the
``AutoEncoderParams`` a state dict implies.

Pure functions on mappings; values are only reshaped (attention 1x1 conv [C, C, 1, 1] <-> Linear [C, C]), so
meta tensors work and a header's worth of stand-ins converts for free. Keys neither side renames (``conv_in``,
``conv_out``, ``bn.*`` including ``bn.num_batches_tracked``) and unknown keys pass through unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from kern.errors import ModelFileError
from kern.models.files import shape_reader

from kern_flux2.vae import AutoEncoderParams

__all__ = ["bfl_to_diffusers_vae", "diffusers_to_bfl_vae", "is_diffusers_vae", "vae_params_from_state_dict"]

# (diffusers, BFL) key prefixes. {i}, {j} copy across; {u} is a decoder level, counted from the coarsest level in
# diffusers and from the finest in BFL, so it maps to n_levels - 1 - u. More specific prefixes come first.
_PAIRS = (
    ("quant_conv.", "encoder.quant_conv."),
    ("post_quant_conv.", "decoder.post_quant_conv."),
    ("{side}.conv_norm_out.", "{side}.norm_out."),
    ("encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.", "encoder.down.{i}.block.{j}.nin_shortcut."),
    ("encoder.down_blocks.{i}.resnets.{j}.", "encoder.down.{i}.block.{j}."),
    ("encoder.down_blocks.{i}.downsamplers.0.", "encoder.down.{i}.downsample."),
    ("decoder.up_blocks.{u}.resnets.{j}.conv_shortcut.", "decoder.up.{u}.block.{j}.nin_shortcut."),
    ("decoder.up_blocks.{u}.resnets.{j}.", "decoder.up.{u}.block.{j}."),
    ("decoder.up_blocks.{u}.upsamplers.0.", "decoder.up.{u}.upsample."),
    ("{side}.mid_block.resnets.0.", "{side}.mid.block_1."),
    ("{side}.mid_block.resnets.1.", "{side}.mid.block_2."),
    ("{side}.mid_block.attentions.0.group_norm.", "{side}.mid.attn_1.norm."),
    ("{side}.mid_block.attentions.0.to_q.", "{side}.mid.attn_1.q."),
    ("{side}.mid_block.attentions.0.to_k.", "{side}.mid.attn_1.k."),
    ("{side}.mid_block.attentions.0.to_v.", "{side}.mid.attn_1.v."),
    ("{side}.mid_block.attentions.0.to_out.0.", "{side}.mid.attn_1.proj_out."),
)
_FIELD = {"side": r"(?P<side>encoder|decoder)", "i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "u": r"(?P<u>\d+)"}
_ATTN_BFL = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_UP_DIFFUSERS = re.compile(r"decoder\.up_blocks\.(\d+)\.")
_UP_BFL = re.compile(r"decoder\.up\.(\d+)\.")


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("".join(_FIELD[p] if k % 2 else re.escape(p) for k, p in enumerate(parts)))


_TO_BFL = tuple((_compile(d), b) for d, b in _PAIRS)
_TO_DIFFUSERS = tuple((_compile(b), d) for d, b in _PAIRS)


def _n_levels(keys, up: re.Pattern[str]) -> int:
    return 1 + max((int(m.group(1)) for k in keys if (m := up.match(k))), default=-1)


def _rename(key: str, rules, n_levels: int) -> str:
    for pattern, template in rules:
        if m := pattern.match(key):
            fields = m.groupdict()
            if "u" in fields:
                fields["u"] = str(n_levels - 1 - int(fields["u"]))
            return template.format(**fields) + key[m.end() :]
    return key


def is_diffusers_vae(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd)


def diffusers_to_bfl_vae(sd: Mapping[str, Any]) -> dict[str, Any]:
    """An ``AutoencoderKLFlux2`` state dict in BFL ``ae.safetensors`` naming."""
    n = _n_levels(sd, _UP_DIFFUSERS)
    out = {}
    for key, value in sd.items():
        key = _rename(key, _TO_BFL, n)
        if _ATTN_BFL.match(key) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[key] = value
    return out


def bfl_to_diffusers_vae(sd: Mapping[str, Any]) -> dict[str, Any]:
    """A BFL ``ae.safetensors`` state dict in ``AutoencoderKLFlux2`` naming."""
    n = _n_levels(sd, _UP_BFL)
    out = {}
    for key, value in sd.items():
        if _ATTN_BFL.match(key) and value.ndim == 4:
            value = value.reshape(value.shape[0], value.shape[1])
        out[_rename(key, _TO_DIFFUSERS, n)] = value
    return out


def vae_params_from_state_dict(sd: Mapping[str, Any], where: str = "VAE state dict") -> AutoEncoderParams:
    """The ``AutoEncoderParams`` that build a model for ``sd`` (BFL or diffusers naming; values may be tensors
    or plain shapes, e.g. from a safetensors header). ``resolution`` and ``bn_eps`` are not stored in the
    weights and keep their defaults."""
    if is_diffusers_vae(sd):
        n = _n_levels(sd, _UP_DIFFUSERS)
        sd = {_rename(k, _TO_BFL, n): v for k, v in sd.items()}

    shape = shape_reader(sd, where, "this is not a FLUX.2 autoencoder in BFL or diffusers naming")

    def count(pattern: str) -> int:
        rx = re.compile(pattern)
        return len({m.group(1) for k in sd if (m := rx.match(k))})

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = count(r"encoder\.down\.(\d+)\.")
    widths = [shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in range(levels)]
    if any(w % ch for w in widths):
        raise ModelFileError(f"{where}: level widths {widths} are not multiples of conv_in's {ch} channels")
    z_channels = shape("decoder.conv_in.weight")[1]
    if "bn.running_mean" not in sd:
        raise ModelFileError(
            f"{where}: no 'bn.running_mean'; a FLUX.1 autoencoder? FLUX.2's carries its latent BatchNorm"
        )
    if shape("bn.running_mean")[0] != 4 * z_channels:
        raise ModelFileError(
            f"{where}: bn.running_mean has {shape('bn.running_mean')[0]} channels, want 4 x {z_channels}"
        )
    decoder_widths = tuple(shape(f"decoder.up.{i}.block.0.conv2.weight")[0] for i in range(levels))
    return AutoEncoderParams(
        in_channels=in_channels,
        ch=ch,
        out_ch=shape("decoder.conv_out.weight")[0],
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=count(r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=z_channels,
        decoder_num_res_blocks=count(r"decoder\.up\.0\.block\.(\d+)\."),
        decoder_channels=None if decoder_widths == tuple(widths) else decoder_widths,
    )
