"""Loading Qwen-Image transformers: ComfyUI / diffusers single files and diffusers folders.

Qwen-Image's own naming is the diffusers naming, so both layouts carry the same keys (ComfyUI's
single files may add a ``model.diffusion_model.`` prefix). The weights say whether the model is
Layered (it has ``addition_t_embedding``); T2I, Edit 2508, Edit-Plus 2509 and Edit 2511 share every
shape, so the variant comes from the ``kern.variant`` metadata, the file name (as the official files
are named) or ``--variant``.
"""

from __future__ import annotations

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

from kern_qwen_image.params import QwenImageParams

SIGNATURE = "transformer_blocks.0.img_mod.1.weight"
LAYERED_KEY = "time_text_embed.addition_t_embedding.weight"
REAL_HEAD_DIM, REAL_AXES = 128, (16, 56, 56)
VARIANTS = ("t2i", "edit", "edit-2509", "edit-2511", "layered")


# ComfyUI's Edit 2511 files carry this empty tensor (it selects the "index_timestep_zero" reference method, which
# is the variant's zero_cond_t); no weight, so it is dropped on load.
EDIT_2511_MARKER = "__index_timestep_zero__"


def _native_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], list[Path]]:
    files = safetensors_files(path, "transformer")
    shapes, metadata = read_shapes(files)
    shapes = strip_prefixes(shapes)
    if SIGNATURE not in shapes or "txt_norm.weight" not in shapes:
        hint = ""
        if any(k.startswith(("double_blocks.", "single_blocks.")) for k in shapes):
            hint = "; it looks like FLUX (double_blocks / single_blocks): use --arch flux2"
        elif any(k.startswith(("encoder.", "decoder.")) for k in shapes):
            hint = "; it looks like a VAE: pass it as the VAE"
        elif any("lora" in k or "hada_" in k for k in shapes):
            hint = "; it looks like an adapter: pass it with --weights"
        raise ModelFileError(f"{path}: not a Qwen-Image transformer checkpoint (no {SIGNATURE!r}){hint}")
    return shapes, metadata, files


def _native_names(state: dict[str, Any]) -> dict[str, Any]:
    """A file's state in the model's names: prefix stripped, the Edit 2511 marker dropped."""
    return {k: v for k, v in strip_prefixes(state).items() if k != EDIT_2511_MARKER}


def detect_variant(path: str | Path) -> str:
    p = Path(path)
    shapes, metadata, _ = _native_shapes(p)
    if metadata.get("kern.variant") in VARIANTS:
        return metadata["kern.variant"]
    if LAYERED_KEY in shapes:
        return "layered"
    if EDIT_2511_MARKER in shapes:
        return "edit-2511"
    name = p.name.lower() if p.is_file() else str(p).lower()
    if re.search(r"2511", name):
        return "edit-2511"
    if re.search(r"2509|edit[_-]?plus", name):
        return "edit-2509"
    if "edit" in name:
        return "edit"
    return "t2i"


def params_from_shapes(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], variant: str) -> QwenImageParams:
    """Hyper-parameters read off the shapes; the RoPE split of head_dim is the real one at head_dim 128,
    and otherwise comes from the file's ``kern.axes_dim`` metadata (tiny test models write it)."""
    hidden = shapes["img_in.weight"][0]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    if "kern.axes_dim" in metadata:
        axes = tuple(int(x) for x in metadata["kern.axes_dim"].split(","))
    elif head_dim == REAL_HEAD_DIM:
        axes = REAL_AXES
    else:
        raise ModelFileError(f"head_dim {head_dim} is not Qwen-Image's 128 and the file has no kern.axes_dim metadata")
    layered = LAYERED_KEY in shapes
    return QwenImageParams(
        num_layers=1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))),
        num_heads=hidden // head_dim,
        head_dim=head_dim,
        in_channels=shapes["img_in.weight"][1],
        out_channels=shapes["proj_out.weight"][0] // 4,
        joint_attention_dim=shapes["txt_in.weight"][1],
        axes_dim=axes,
        mlp_ratio=shapes["transformer_blocks.0.img_mlp.net.0.proj.weight"][0] / hidden,
        zero_cond_t=variant == "edit-2511",
        use_additional_t_cond=layered,
        use_layer3d_rope=layered,
    )


def load_transformer(
    path: str | Path, variant: str | None, dtype: torch.dtype, device: Any, fp8: bool = False
) -> torch.nn.Module:
    """The transformer of a diffusers / ComfyUI file or folder, bf16 or fp8 (plain, scaled or mixed): with ``fp8``
    (an fp8 base being trained) the Linears held in fp8 keep the file's bytes, everything else is dequantised
    exactly into ``dtype`` (``kern.models.quantized.load_into``)."""
    from kern.models.quantized import load_into

    from kern_qwen_image.plugin import KEEP_HIGH_PRECISION
    from kern_qwen_image.transformer import QwenImageTransformer

    p = Path(path)
    shapes, metadata, files = _native_shapes(p)
    variant = variant or detect_variant(p)
    if (variant == "layered") != (LAYERED_KEY in shapes):
        raise ModelFileError(
            f"{p}: variant {variant!r} does not fit this file (layered weights: {LAYERED_KEY in shapes})"
        )
    params = params_from_shapes(shapes, metadata, variant)
    with torch.device("meta"):
        model = QwenImageTransformer(params)
    what, mode = f"Qwen-Image {variant}", "matmul" if fp8 else None
    load_into(
        model,
        files,
        dtype=dtype,
        device=device,
        fp8=mode,
        keep=KEEP_HIGH_PRECISION,
        what=what,
        where=p,
        rename=_native_names,
    )
    model.variant = variant
    return model


def load_vae(path: str | Path, dtype: torch.dtype, device: Any) -> torch.nn.Module:
    """The Qwen-Image VAE from a diffusers file or folder (``vae/``) or a Wan / ComfyUI single file."""
    from kern_qwen_image.vae import QwenImageVAE
    from kern_qwen_image.vae_keys import comfy_to_diffusers_vae, is_comfy_vae, vae_params_from_state_dict

    p = Path(path)
    state = strip_prefixes(read_state(p, "vae"), ("vae.", "first_stage_model."))
    if not any(k.startswith(("encoder.", "decoder.", "conv1.")) for k in state):
        raise ModelFileError(
            f"{p}: not a VAE (no encoder.* / decoder.* keys); pass Qwen-Image's vae or qwen_image_vae.safetensors"
        )
    if is_comfy_vae(state):
        state = comfy_to_diffusers_vae(state)
    with torch.device("meta"):
        vae = QwenImageVAE(vae_params_from_state_dict(state))
    assign_checked(vae, state, "the Qwen-Image VAE", p, dtype, device)
    return vae.eval()


def load_part(
    part: str,
    path: str,
    variant: str | None,
    dtype: torch.dtype,
    device: Any,
    fp8: bool = False,
    need_vision: bool = False,
) -> Any:
    """``load_model``'s answer: one model part from the file or folder the user named."""
    if part not in ("transformer", "vae", "text_encoder"):
        raise UsageError(f"Qwen-Image has no model part {part!r}")
    where = require_path(path, part, "Qwen-Image")
    if part == "text_encoder":
        from kern_qwen_image.text_encoder import load_text_encoder

        return load_text_encoder(where, dtype=dtype, device=device, fp8=fp8, need_vision=need_vision)
    if part == "vae":
        return load_vae(where, dtype, device)
    return load_transformer(where, variant, dtype, device, fp8=fp8)
