"""Loading FLUX.2 checkpoints: BFL single files and diffusers folders, variant detection, clear errors.

Weights go straight into the target dtype on the target device: the model is built on the meta
device and each tensor is read, cast and assigned one at a time, so RAM never holds an fp32 copy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from kern.errors import ModelFileError, UsageError
from kern.models.files import (
    assign_checked,
    read_shapes,
    read_state,
    require_path,
    safetensors_files,
    strip_prefixes,
)

from kern_flux2 import keys
from kern_flux2.params import PARAMS_BY_VARIANT, Flux2Params

SIGNATURE = "double_blocks.0.img_attn.qkv.weight"  # present in every BFL FLUX.2 transformer
HIDDEN_TO_VARIANT = {6144: "dev", 4096: "klein-9b", 3072: "klein-4b"}


def _is_diffusers(shapes: dict[str, Any]) -> bool:
    return any(
        k.startswith("transformer_blocks.") or k.startswith("single_transformer_blocks.") for k in shapes
    ) and any(k.startswith("x_embedder") or k.startswith("context_embedder") for k in shapes)


def _bfl_shapes(shapes: dict[str, tuple[int, ...]], where: Path) -> dict[str, tuple[int, ...]]:
    """Shapes in BFL naming, prefix stripped; a file of another architecture is named as such."""
    if _is_diffusers(shapes):
        if "single_stream_modulation.linear.weight" not in shapes:
            raise ModelFileError(
                f"{where}: diffusers-style transformer without FLUX.2's single_stream_modulation; "
                f"this is not a FLUX.2 checkpoint (Qwen-Image or FLUX.1?). Pass it with the matching --arch."
            )
        return _diffusers_bfl_shapes(shapes)
    stripped = strip_prefixes(shapes)
    if SIGNATURE not in stripped or "single_stream_modulation.lin.weight" not in stripped:
        hint = _what_is_it(stripped)
        raise ModelFileError(f"{where}: not a FLUX.2 transformer checkpoint (no {SIGNATURE!r}){hint}")
    return stripped


def _diffusers_bfl_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """BFL shapes of a diffusers FLUX.2 transformer, via the key converter on empty stand-ins."""
    stand_ins = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    return {k: tuple(v.shape) for k, v in keys.diffusers_to_bfl(stand_ins).items()}


def _what_is_it(names: dict[str, Any]) -> str:
    if any(k.startswith("transformer_blocks.") and ".img_mod." in k for k in names):
        return "; it looks like Qwen-Image (transformer_blocks.*.img_mod): use --arch qwen-image"
    if any(".img_mod." in k for k in names) and any(k.startswith("double_blocks.") for k in names):
        return "; it looks like FLUX.1 (per-block img_mod), which kern does not support"
    if any(k.startswith(("encoder.", "decoder.")) for k in names):
        return "; it looks like a VAE: pass it as the VAE, not the transformer"
    if any("lora" in k or "hada_" in k for k in names):
        return "; it looks like an adapter: pass it with --weights"
    sample = ", ".join(sorted(names)[:3])
    return f"; first keys: {sample}"


def params_from_shapes(shapes: dict[str, tuple[int, ...]]) -> Flux2Params:
    """Hyper-parameters read off the BFL shapes, so tiny and custom sizes load too."""
    hidden = shapes["img_in.weight"][0]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    depth = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"double_blocks\.(\d+)\.", k)))
    singles = [int(m.group(1)) for k in shapes if (m := re.match(r"single_blocks\.(\d+)\.", k))]
    mlp_hidden = shapes["double_blocks.0.img_mlp.2.weight"][1]
    return Flux2Params(
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single=1 + max(singles) if singles else 0,
        mlp_ratio=mlp_hidden / hidden,
        in_channels=shapes["img_in.weight"][1],
        context_in_dim=shapes["txt_in.weight"][1],
        axes_dim=(head_dim // 4,) * 4,
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )


def detect_variant(path: str | Path) -> str:
    """The variant of a FLUX.2 transformer file or folder, from its header alone.

    dev / klein 9B / klein 4B are told apart by width; base and distilled klein share every shape,
    so "base" comes from the file name (as in the official file names) or the ``kern.variant``
    metadata, and otherwise the distilled variant is assumed (force it with --variant).
    """
    p = Path(path)
    shapes, metadata = read_shapes(safetensors_files(p, "transformer"))
    bfl = _bfl_shapes(shapes, p)
    if metadata.get("kern.variant") in PARAMS_BY_VARIANT:
        return metadata["kern.variant"]
    hidden = bfl["img_in.weight"][0]
    variant = HIDDEN_TO_VARIANT.get(hidden)
    if variant is None:  # a non-standard (e.g. tiny test) size: the guidance embedding decides the family
        variant = "dev" if "guidance_in.in_layer.weight" in bfl else "klein-4b"
    if variant.startswith("klein") and "base" in p.name.lower():
        variant = variant.replace("klein-", "klein-base-")
    return variant


def load_transformer(
    path: str | Path, variant: str | None, dtype: torch.dtype, device: Any, fp8: bool = False
) -> torch.nn.Module:
    """The transformer of a BFL / ComfyUI single file or diffusers folder, bf16 or fp8 (``kern.models.files``).

    With ``fp8`` (training with an fp8 base) the Linears a BFL-layout file holds in fp8 stay fp8, as the file's
    bytes (``kern.models.quantized.load_into``); every other weight is dequantised exactly into ``dtype``. A
    diffusers-layout fp8 file's q / k / v are fused from three tensors with their own scales, so those fused
    weights are dequantised (and quantised per row later by ``quantize_base``, like any bf16 layer).
    """
    from kern.models.quantized import load_into

    from kern_flux2.plugin import KEEP_HIGH_PRECISION
    from kern_flux2.transformer import Flux2Transformer

    p = Path(path)
    files = safetensors_files(p, "transformer")
    shapes, _ = read_shapes(files)
    bfl_shapes = _bfl_shapes(shapes, p)
    detected = detect_variant(p)
    variant = variant or detected
    params = params_from_shapes(bfl_shapes)
    if variant in PARAMS_BY_VARIANT and bfl_shapes["img_in.weight"][0] in HIDDEN_TO_VARIANT:
        params = PARAMS_BY_VARIANT[variant]  # a standard-size file is checked against the real shapes of the variant
    with torch.device("meta"):
        model = Flux2Transformer(params)
    load_into(
        model,
        files,
        dtype=dtype,
        device=device,
        fp8="matmul" if fp8 else None,
        keep=KEEP_HIGH_PRECISION,
        what=f"FLUX.2 {variant}",
        where=p,
        rename=keys.diffusers_to_bfl if _is_diffusers(shapes) else keys.strip_prefix,
    )
    model.variant = variant
    return model


def load_vae(path: str | Path, dtype: torch.dtype, device: Any) -> torch.nn.Module:
    from kern_flux2.vae import AutoEncoder
    from kern_flux2.vae_keys import diffusers_to_bfl_vae, vae_params_from_state_dict

    p = Path(path)
    # A full checkpoint's VAE keys carry a prefix; ComfyUI's flux2-vae.safetensors is diffusers-named (converted below).
    state = strip_prefixes(read_state(p, "vae"), ("vae.", "first_stage_model."))
    if not any(k.startswith(("encoder.", "decoder.")) for k in state):
        raise ModelFileError(
            f"{p}: not a VAE (no encoder.* / decoder.* keys); pass FLUX.2's ae.safetensors or its diffusers vae/ folder"
        )
    if any(".down_blocks." in k or k.startswith("quant_conv.") for k in state):
        state = diffusers_to_bfl_vae(state)
    state.pop("bn.num_batches_tracked", None)
    if "bn.running_mean" not in state:
        raise ModelFileError(
            f"{p}: VAE without bn.running_mean / bn.running_var: this is not the FLUX.2 VAE (FLUX.1's ae has none)"
        )
    with torch.device("meta"):
        vae = AutoEncoder(vae_params_from_state_dict(state))
    # BatchNorm's step counter is not needed (and not in every file).
    assign_checked(vae, state, "the FLUX.2 VAE", p, dtype, device, optional=lambda k: k.endswith("num_batches_tracked"))
    return vae.eval()


def text_encoder_kind(variant: str) -> str:
    return "mistral3" if variant == "dev" else "qwen3"


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def load_part(part: str, path: str, variant: str | None, dtype: torch.dtype, device: Any, fp8: bool = False) -> Any:
    """``load_model``'s answer: one model part from the file or folder the user named."""
    if part not in ("transformer", "vae", "text_encoder"):
        raise UsageError(f"FLUX.2 has no model part {part!r}")
    where = require_path(path, part, "FLUX.2")
    if part == "transformer":
        return load_transformer(where, variant, dtype, device, fp8=fp8)
    if part == "vae":
        return load_vae(where, dtype, device)
    if part == "text_encoder":
        from kern_flux2.text_encoder import load_text_encoder

        return load_text_encoder(
            text_encoder_kind(variant or "dev"), where, dtype=dtype, device=device, fp8=fp8, variant=variant
        )
