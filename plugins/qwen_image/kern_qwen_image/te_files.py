"""Qwen-Image's text encoder as a ComfyUI single file: Qwen2.5-VL 7B, told by its keys.

The files (Comfy-Org ``Qwen-Image_ComfyUI`` ``split_files/text_encoders/``): ``qwen_2.5_vl_7b.safetensors`` (bf16) and
``qwen_2.5_vl_7b_fp8_scaled.safetensors``. Keys: the language model under ``model.`` (``model.embed_tokens``,
``model.layers.{0..27}.*`` with q/k/v biases, ``model.norm``), the vision tower under ``visual.`` and ``lm_head``:
the names of transformers 4.x's ``Qwen2_5_VLForConditionalGeneration``, which transformers 5 calls
``model.language_model.*`` and ``model.visual.*`` (musubi-tuner's ``qwen_image_utils`` renames them so). Full ComfyUI
checkpoints hold them under ``text_encoders.<name>.transformer.``. Detection follows ComfyUI's ``detect_te_model``: a
``self_attn.k_proj.bias`` of 512 rows (4 KV heads of 128) is Qwen2.5 7B.

A file has no config, so the model is built from the config of the real model, kept here as a plain dict (Qwen/
Qwen-Image ``text_encoder/config.json``, = Qwen2.5-VL-7B-Instruct's), on the meta device, and filled tensor by
tensor (``kern.models.quantized.load_into``: an fp8-scaled file is dequantised exactly, or kept fp8 with ``fp8``).
Without ``need_vision`` the vision tower and lm_head are neither built nor read. A file of another size (the tiny
test files) must carry its transformers config as ``kern.config`` metadata (JSON).

Tokenizer and processor. The file holds neither, and the plugin ships neither: tokenizer files are licensed with
the models and weigh several MB, so they come from a Hugging Face repo through ``kern.models.hub.resolve``, a
one-time fetch cached for offline use (``HF_HUB_OFFLINE``). Order: ``tokenizer_path`` / ``processor_path`` if given;
a ``tokenizer/`` / ``processor/`` folder beside the file or in its parent folder (a diffusers folder's own);
else the default repos (:data:`TOKENIZER_SPEC`, and :data:`PROCESSOR_SPEC` for the edit modes and captioning).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from kern.errors import ModelFileError
from kern.models import hf
from kern.models.files import read_shapes
from torch import nn

__all__ = [
    "QWEN25_VL_7B",
    "TextEncoderFile",
    "companion_specs",
    "describe",
    "identify",
    "load_model",
    "processor_folder",
    "tokenizer_folder",
    "tokenizer_specs",
]


TextEncoderFile = hf.TextEncoderFile
SINGLE_FILE, FOLDER = hf.SINGLE_FILE, hf.FOLDER
KIND = "qwen2.5-vl"
VARIANTS = ("t2i", "edit", "edit-2509", "edit-2511", "layered")

# Qwen/Qwen-Image text_encoder/config.json (Qwen2.5-VL-7B-Instruct).
QWEN25_VL_7B = {
    "model_type": "qwen2_5_vl",
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "image_token_id": 151655,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "use_cache": True,
    "use_sliding_window": False,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "vocab_size": 152064,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}
WIDTH_7B = 3584

TOKENIZER_SPEC = "Qwen/Qwen-Image/tokenizer"
PROCESSOR_SPEC = "Qwen/Qwen-Image-Edit/processor"  # the edit variants' and Layered captioning's image processor


def tokenizer_specs(kind: str) -> tuple[str, ...]:
    """The hub specs a single file of ``kind`` needs (tokenizer, and the processor of the edit modes) when none
    lies beside it."""
    return (TOKENIZER_SPEC, PROCESSOR_SPEC) if kind == KIND else ()


def companion_specs(found: TextEncoderFile, path: str | Path, shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, ...]:
    """The hub specs the loader will fetch for the text encoder at ``path``: :data:`TOKENIZER_SPEC` for a single file
    with no ``tokenizer/`` folder beside it; nothing for a folder. The processor (:data:`PROCESSOR_SPEC`) is left to
    the load: only the edit variants and captioning need it, and a text-to-image job must not fail for lack of it."""
    path = Path(path)
    if not path.is_file() or hf.companion_dir(path, "tokenizer") is not None:
        return ()
    return (TOKENIZER_SPEC,)


def _bare(shapes: Mapping[str, object]) -> tuple[dict[str, object], bool]:
    """Keys in ComfyUI's naming (``model.*`` language model, ``visual.*``, ``lm_head``), a full checkpoint's prefix
    and transformers 5's ``model.language_model.`` / ``model.visual.`` removed; and whether the latter were seen."""
    out: dict[str, object] = {}
    folder = False
    for k, v in shapes.items():
        k = hf.CHECKPOINT_PREFIX.sub("", k)
        if k.startswith("model.language_model."):
            k, folder = "model." + k[len("model.language_model.") :], True
        elif k.startswith("model.visual."):
            k, folder = k[len("model.") :], True
        out[k] = v
    return out, folder


def identify(shapes: Mapping[str, tuple[int, ...]]) -> TextEncoderFile | None:
    """Qwen-Image's Qwen2.5-VL text encoder from its keys and shapes (single file or transformers folder); None for
    anything else (another family's text encoder is :func:`describe`'s business). A file without ``visual.*`` is
    taken as the same model without its vision tower (the edit modes then refuse it)."""
    s, folder = _bare(shapes)
    norm = s.get("model.layers.0.post_attention_layernorm.weight")
    bias = s.get("model.layers.0.self_attn.k_proj.bias")
    if norm is None or bias is None or "model.layers.0.self_attn.q_norm.weight" in s:
        return None
    width = norm[0]
    vision = any(k.startswith("visual.") for k in s)
    layout = FOLDER if folder else SINGLE_FILE
    if width == WIDTH_7B and bias[0] == 512:
        what = "the Qwen2.5-VL 7B text encoder (Qwen-Image's)" + ("" if vision else " without its vision tower")
        return TextEncoderFile(KIND, "7B", VARIANTS, what, layout)
    if not vision:
        return None  # a plain Qwen2.5 LLM (3B: OmniGen2's ...): describe() names it
    return TextEncoderFile(
        KIND, f"non-standard (hidden {width})", VARIANTS, "a Qwen2.5-VL text encoder of a non-standard size", layout
    )


def describe(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """What a checkpoint is in words, for errors, including the FLUX.2 text encoders; None if unknown."""
    found = identify(shapes)
    if found is not None:
        return found.what
    s, _ = _bare(shapes)
    norm = s.get("model.layers.0.post_attention_layernorm.weight")
    if norm is not None:
        width = norm[0]
        if "model.layers.0.self_attn.q_norm.weight" in s:
            size = {2560: "4B", 4096: "8B"}.get(width)
            whose = {2560: " (FLUX.2 klein 4B's)", 4096: " (FLUX.2 klein 9B's)"}.get(width, "")
            return f"a Qwen3 {size or f'(hidden {width})'} text encoder{whose}"
        if "model.layers.0.self_attn.k_proj.bias" in s:
            return f"a Qwen2.5 LLM (hidden {width}, k_proj {s['model.layers.0.self_attn.k_proj.bias'][0]} rows)"
        if "tekken_model" in s or width == 5120:
            return "the Mistral 3 Small text encoder (FLUX.2 dev's)"
        return f"a Llama-family LLM (hidden {width})"
    return hf.other_family(shapes, "(CLIP-L / T5 are FLUX.1 / SD3's text encoders)")


EXPECTED = "the Qwen2.5-VL 7B text encoder Qwen-Image reads (qwen_2.5_vl_7b.safetensors)"


def check_file(path: Path):
    """(what the file is, its shapes, its metadata), or a ``ModelFileError`` naming what it is instead."""
    shapes, metadata = read_shapes([path])
    found = identify(shapes)
    if found is None:
        what = describe(shapes)
        raise ModelFileError(
            f"{path}: {'this is ' + what if what else 'not a text encoder kern knows'}, not {EXPECTED}"
        )
    return found, shapes, metadata


def _config(found: TextEncoderFile, s: Mapping, metadata: Mapping[str, str], where: Path):
    """The transformers config of the file: its ``kern.config`` metadata, else Qwen2.5-VL 7B's."""
    config = hf.metadata_config(dict(metadata), where)
    if config is not None:
        return config
    if found.size != "7B":
        width = s["model.layers.0.post_attention_layernorm.weight"][0]
        raise hf.unknown_size(where, found.what, width, hf.count_layers(s), f"Qwen2.5-VL 7B (hidden {WIDTH_7B})")
    return hf.config_from_dict(QWEN25_VL_7B, where, "the known config")


def _rename(need_vision: bool):
    """ComfyUI names -> ``Qwen2_5_VLForConditionalGeneration``'s (transformers 5); without ``need_vision`` the vision
    tower and lm_head are skipped (the model has none)."""

    def rename(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        bare, _ = _bare(state)
        out = {}
        for k, v in bare.items():
            if k.startswith("model."):
                out["model.language_model." + k[len("model.") :]] = v
            elif k.startswith("visual."):
                if need_vision:
                    out["model." + k] = v
            elif k.startswith("lm_head."):
                if need_vision:
                    out[k] = v
            else:
                out[k] = v  # not Qwen2.5-VL's: reported as unexpected
        return out

    return rename


def load_model(path: Path, dtype: torch.dtype, device, fp8: bool, need_vision: bool) -> nn.Module:
    """``Qwen2_5_VLForConditionalGeneration`` from the single file ``path``: checked, built on meta from its config,
    filled, buffers set. Without ``need_vision`` its ``model.visual`` and ``lm_head`` are None; with it, a file without
    lm_head (captioning needs it) still loads, with ``lm_head`` None."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    found, shapes, metadata = check_file(path)
    s, _ = _bare(shapes)
    if need_vision and not any(k.startswith("visual.") for k in s):
        raise ModelFileError(
            f"{path}: {found.what}: no vision tower (visual.*), which the edit modes and captioning need; use "
            "qwen_2.5_vl_7b.safetensors"
        )
    config = _config(found, s, metadata, path)
    model = hf.empty_model(Qwen2_5_VLForConditionalGeneration, config, dtype)
    if not need_vision:  # text only: neither the vision tower nor the 152k-row lm_head is ever run
        model.model.visual = None
    if not need_vision or "lm_head.weight" not in s:  # a file without lm_head: no captioning
        model.lm_head = None
    # As for a folder: only the language model is stored fp8.
    keep = (r"^model\.visual\.", r"^lm_head$")
    hf.fill_single_file(model, path, found.what, dtype, device, fp8, _rename(need_vision), keep)
    return model


def tokenizer_folder(path: Path, given: str | Path | None) -> Path:
    """The tokenizer for the single file ``path``: ``given``, a ``tokenizer/`` folder beside the file or in its parent
    folder, else :data:`TOKENIZER_SPEC` from the Hugging Face cache (fetched once)."""
    return hf.companion(path, "tokenizer", given, TOKENIZER_SPEC)


def processor_folder(path: Path, given: str | Path | None) -> Path:
    """The image processor for the single file ``path``: ``given``, a ``processor/`` folder (with
    ``preprocessor_config.json``) beside the file or in its parent folder, else :data:`PROCESSOR_SPEC`."""
    return hf.companion(path, "processor", given, PROCESSOR_SPEC, "preprocessor_config.json")
