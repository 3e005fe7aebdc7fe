"""FLUX.2 text encoders as ComfyUI single files: Qwen3 4B / 8B (klein) and Mistral 3 Small (dev), told by their keys.

The files (Comfy-Org ``split_files/text_encoders/``): ``qwen_3_4b.safetensors`` (klein 4B), ``qwen_3_8b.safetensors``
and ``qwen_3_8b_fp8mixed.safetensors`` (klein 9B), ``mistral_3_small_flux2_bf16.safetensors`` / ``…_fp8…`` (dev).
Keys are transformers' decoder names under ``model.`` (``model.embed_tokens``, ``model.layers.N.*``, ``model.norm``;
Qwen3 has ``self_attn.{q,k}_norm``), no vision tower; the Mistral file is pruned to the 30 layers FLUX.2 reads
(no final norm, no lm_head) and carries its Tekken tokenizer as a uint8 tensor ``tekken_model``. Full ComfyUI
checkpoints hold the same keys under ``text_encoders.<name>.transformer.``. Detection follows ComfyUI's
``detect_te_model``: ``self_attn.q_norm`` plus the width of ``post_attention_layernorm`` (2560 ⇒ Qwen3-4B,
4096 ⇒ Qwen3-8B); width 5120 without it ⇒ Mistral 3 Small.

A file has no config, so the model is built from the config of the real model, kept here as plain dicts (the
``config.json`` of Qwen/Qwen3-4B, Qwen/Qwen3-8B and the ``text_config`` of FLUX.2-dev's ``text_encoder``), on the
meta device, and filled tensor by tensor (``kern.models.quantized.load_into``: fp8 files are dequantised exactly, or
kept fp8 with ``fp8``). Only the decoder is built (``Qwen3Model`` / ``MistralModel``, as ``get_decoder()`` of the
folder's model), so the encoder equals the one loaded from the Hugging Face folder of the same weights. A file of
another size (the tiny test files) must carry its transformers config as ``kern.config`` metadata (JSON).

Tokenizers. The files hold no tokenizer (Mistral's ``tekken_model`` aside), and the plugin ships none: tokenizer
files are licensed with the models and weigh several MB each, so they come from a Hugging Face repo through
``kern.models.hub.resolve``, the one-time fetch then cached and usable offline (``HF_HUB_OFFLINE``). Order:
``tokenizer_path`` if given; a ``tokenizer/`` folder beside the file or in its parent folder (a diffusers
folder's own tokenizer); the default repo (:data:`TOKENIZER_SPECS`). The embedded ``tekken_model`` is not used:
transformers can turn a Tekken file into a tokenizer offline (``convert_tekken_tokenizer``), but that tokenizer has
no chat template and no padding side of its own, and neither BFL's template nor its padding side can be checked
here, so embeddings from it could silently differ from the official pipeline's; the FLUX.2-dev tokenizer folder
is the reference (note: FLUX.2-dev is a gated repo: accept its licence and log in once).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from kern.errors import ModelFileError, UsageError
from kern.models import hf
from kern.models.files import read_shapes
from torch import nn

__all__ = [
    "KNOWN_CONFIGS",
    "TOKENIZER_SPECS",
    "TextEncoderFile",
    "describe",
    "identify",
    "check_file",
    "companion_specs",
    "load_decoder",
    "tokenizer_folder",
    "tokenizer_specs",
]


SINGLE_FILE, FOLDER = hf.SINGLE_FILE, hf.FOLDER
TextEncoderFile = hf.TextEncoderFile

# Qwen/Qwen3-4B config.json (FLUX.2 klein 4B's text encoder).
QWEN3_4B = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 9728,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
# Qwen/Qwen3-8B config.json (FLUX.2 klein 9B's): wider, untied lm_head.
QWEN3_8B = {**QWEN3_4B, "hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False}
# text_config of black-forest-labs/FLUX.2-dev text_encoder/config.json (Mistral3ForConditionalGeneration, = Mistral
# Small 3.1 24B's), with the 30 layers of ComfyUI's pruned file (the official model has 40; FLUX.2 reads up to 30).
MISTRAL_SMALL_3_FLUX2 = {
    "model_type": "mistral",
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "initializer_range": 0.02,
    "intermediate_size": 32768,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_hidden_layers": 30,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000000.0,
    "sliding_window": None,
    "use_cache": True,
    "vocab_size": 131072,
}

# (kind, width) -> (size label, config, variants it fits, who uses it)
KNOWN_CONFIGS: dict[tuple[str, int], tuple[str, dict, tuple[str, ...], str]] = {
    ("qwen3", 2560): ("4B", QWEN3_4B, ("klein-4b", "klein-base-4b"), "FLUX.2 klein 4B's"),
    ("qwen3", 4096): ("8B", QWEN3_8B, ("klein-9b", "klein-base-9b"), "FLUX.2 klein 9B's"),
    ("mistral3", 5120): ("24B", MISTRAL_SMALL_3_FLUX2, ("dev",), "FLUX.2 dev's"),
}
KLEIN = ("klein-4b", "klein-base-4b", "klein-9b", "klein-base-9b")
NAMES = {"qwen3": "Qwen3", "mistral3": "Mistral 3 Small"}
FILE_NAMES = {
    "4B": "qwen_3_4b.safetensors",
    "8B": "qwen_3_8b.safetensors",
    "24B": "mistral_3_small_flux2_bf16.safetensors",
}

# Where a single file's tokenizer comes from when none is given or found beside it (kern.models.hub specs).
# Qwen3 4B and 8B share one tokenizer.
TOKENIZER_SPECS = {
    "qwen3": ("black-forest-labs/FLUX.2-klein-4B/tokenizer",),
    "mistral3": ("black-forest-labs/FLUX.2-dev/tokenizer",),
}
_FOLDER_PREFIXES = ("model.language_model.", "language_model.model.")  # transformers 5 / 4.x multimodal folders
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")  # a decoder layer's keys


def tokenizer_specs(kind: str) -> tuple[str, ...]:
    """The hub specs a single file of ``kind`` needs for its tokenizer when none lies beside it."""
    return TOKENIZER_SPECS.get(kind, ())


def companion_specs(found: TextEncoderFile, path: str | Path, shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, ...]:
    """The hub specs the loader will fetch for the text encoder at ``path``: the default tokenizer repo of a single
    file with no ``tokenizer/`` folder beside it; nothing for a folder (it holds or sits beside its tokenizer)."""
    path = Path(path)
    if not path.is_file() or hf.companion_dir(path, "tokenizer") is not None:
        return ()
    return tokenizer_specs(found.kind)


def _bare(shapes: Mapping[str, object]) -> tuple[dict[str, object], bool]:
    """Keys with a full checkpoint's ``text_encoders.<name>.transformer.`` and a multimodal folder's language-model
    prefix removed (to ComfyUI's ``model.``), and whether such a folder prefix was seen."""
    out: dict[str, object] = {}
    folder = False
    for k, v in shapes.items():
        k = hf.CHECKPOINT_PREFIX.sub("", k)
        for p in _FOLDER_PREFIXES:
            if k.startswith(p):
                k, folder = "model." + k[len(p) :], True
                break
        out[k] = v
    return out, folder


def _family(s: Mapping[str, tuple[int, ...]]) -> tuple[str, int] | None:
    """(kind, width) of a decoder-only LLM's keys, as ComfyUI's ``detect_te_model`` tells them apart."""
    norm = s.get("model.layers.0.post_attention_layernorm.weight")
    if norm is None:
        return None
    width = norm[0]
    if "model.layers.0.self_attn.k_proj.bias" in s:
        return "qwen2.5-vl" if any(k.startswith(("visual.", "model.visual.")) for k in s) else "qwen2.5", width
    if "model.layers.0.self_attn.q_norm.weight" in s:
        return "qwen3", width
    if "tekken_model" in s or width == 5120:
        return "mistral3", width
    return "llama", width


def identify(shapes: Mapping[str, tuple[int, ...]]) -> TextEncoderFile | None:
    """A FLUX.2 text encoder (Qwen3, Mistral 3 Small) from its keys and shapes, single file or transformers folder;
    None for anything else (another family's text encoder is :func:`describe`'s business).

    ``layout``: keys alone cannot tell a Qwen3 single file from a Qwen3 folder (the same names), so "single file"
    is said only where the keys show ComfyUI's packaging (Mistral's ``tekken_model`` or its missing final norm);
    decide from the path where you have it."""
    s, folder = _bare(shapes)
    fam = _family(s)
    if fam is None or fam[0] not in ("qwen3", "mistral3"):
        return None
    kind, width = fam
    known = KNOWN_CONFIGS.get((kind, width))
    comfy = "tekken_model" in s or (kind == "mistral3" and "model.norm.weight" not in s)
    layout = FOLDER if folder or not comfy else SINGLE_FILE
    if known is None:
        size, variants = f"non-standard (hidden {width})", KLEIN if kind == "qwen3" else ("dev",)
        return TextEncoderFile(kind, size, variants, f"a {NAMES[kind]} text encoder of a non-standard size", layout)
    size, _, variants, whose = known
    name = NAMES[kind] if kind == "mistral3" else f"{NAMES[kind]} {size}"
    return TextEncoderFile(kind, size, variants, f"a {name} text encoder ({whose})", layout)


def describe(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """What a checkpoint is in words, for errors, including text encoders of other families; None if unknown."""
    found = identify(shapes)
    if found is not None:
        return found.what
    s, _ = _bare(shapes)
    fam = _family(s)
    if fam is not None:
        kind, width = fam
        if kind == "qwen2.5-vl":
            size = "7B" if s.get("model.layers.0.self_attn.k_proj.bias", (0,))[0] == 512 else f"hidden {width}"
            return f"a Qwen2.5-VL {size} text encoder (Qwen-Image's)"
        return {"qwen2.5": "a Qwen2.5 LLM", "llama": f"a Llama-family LLM (hidden {width})"}.get(kind)
    return hf.other_family(shapes, "(CLIP-L / T5 are FLUX.1 / SD3's text encoders)")


def _expected(kind: str | None) -> str:
    if kind == "mistral3":
        return "the Mistral 3 Small text encoder FLUX.2 dev reads (mistral_3_small_flux2_bf16.safetensors)"
    if kind == "qwen3":
        return "the Qwen3 text encoder FLUX.2 klein reads (qwen_3_4b / qwen_3_8b.safetensors)"
    return "a FLUX.2 text encoder (Qwen3 for klein, Mistral 3 Small for dev)"


def _config(found: TextEncoderFile, s: Mapping, metadata: Mapping[str, str], width: int, where: Path):
    """The transformers (text) config of the file: its ``kern.config`` metadata, else the known one for its size."""
    config = hf.metadata_config(dict(metadata), where)
    if config is not None:
        return config.get_text_config()
    known = KNOWN_CONFIGS.get((found.kind, width))
    if known is None:
        sizes = ", ".join(f"{NAMES[k]} {lab} (hidden {w})" for (k, w), (lab, *_) in KNOWN_CONFIGS.items())
        raise hf.unknown_size(where, found.what, width, hf.count_layers(s), sizes)
    return hf.config_from_dict(known[1], where, "the known config")


def _rename(n_layers: int, keep_norm: bool):
    """The file's keys -> ``Qwen3Model`` / ``MistralModel`` names; layers past ``n_layers``, the final norm unless
    ``keep_norm``, lm_head and the Tekken blob are dropped."""

    def rename(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        bare, _ = _bare(state)
        out = {}
        for k, v in bare.items():
            if (m := _LAYER.match(k)) and int(m.group(1)) >= n_layers:
                continue
            if k == "tekken_model" or k.startswith("lm_head.") or (k.startswith("model.norm.") and not keep_norm):
                continue
            out[k[len("model.") :] if k.startswith("model.") else k] = v
        return out

    return rename


def check_file(path: Path, kind: str | None, variant: str | None = None):
    """(what the file is, its shapes, its metadata): a FLUX.2 text encoder of ``kind`` (None: either) fitting
    ``variant``, else a ``ModelFileError`` naming what it is instead."""
    shapes, metadata = read_shapes([path])
    found = identify(shapes)
    if found is None:
        what = describe(shapes)
        raise ModelFileError(
            f"{path}: {'this is ' + what if what else 'not a text encoder kern knows'}, not {_expected(kind)}"
        )
    if kind not in (None, "auto", found.kind):
        if kind not in NAMES:
            raise UsageError(f"unknown text encoder kind {kind!r}; expected one of {sorted(NAMES)}")
        raise ModelFileError(f"{path}: this is {found.what}, not {_expected(kind)}")
    if variant and found.variants and variant not in found.variants:
        right = next(
            (lab for (k, _), (lab, _, vs, _) in KNOWN_CONFIGS.items() if k == found.kind and variant in vs), ""
        )
        hint = f"; FLUX.2 {variant} reads {FILE_NAMES[right]}" if right else ""
        raise ModelFileError(f"{path}: this is {found.what}, which does not fit FLUX.2 {variant}{hint}")
    return found, shapes, metadata


def load_decoder(
    path: Path,
    found: TextEncoderFile,
    shapes: Mapping[str, tuple[int, ...]],
    metadata: Mapping[str, str],
    dtype: torch.dtype,
    device,
    fp8: bool,
    *,
    out_layers: tuple[int, ...],
    drop_unused_layers: bool,
) -> nn.Module:
    """The decoder (``Qwen3Model`` / ``MistralModel``) of the single file ``path`` (checked by :func:`check_file`):
    built on meta from its config, filled, buffers set. With ``drop_unused_layers`` it has exactly the layers FLUX.2
    reads and no final norm (``hidden_states[deepest]`` must be that layer's raw output)."""
    from transformers import MistralModel, Qwen3Model

    s, _ = _bare(shapes)
    width = s["model.layers.0.post_attention_layernorm.weight"][0]
    config = _config(found, s, metadata, width, path)
    file_layers = hf.count_layers(s)
    deepest = max(out_layers)
    if file_layers < deepest:
        raise ModelFileError(
            f"{path}: {found.what} with {file_layers} layers; FLUX.2 reads its hidden states {out_layers}"
        )
    n = deepest if drop_unused_layers else file_layers
    config.num_hidden_layers = n
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:n]
    model = hf.empty_model(Qwen3Model if found.kind == "qwen3" else MistralModel, config, dtype)
    keep_norm = n > deepest  # transformers norms the last hidden state; the deepest one read must stay raw
    if not keep_norm:
        model.norm = nn.Identity()
    hf.fill_single_file(model, path, found.what, dtype, device, fp8, _rename(n, keep_norm))
    return model


def tokenizer_folder(kind: str, path: Path, given: str | Path | None) -> Path:
    """The tokenizer folder for the single file ``path``: ``given``, a ``tokenizer/`` folder beside the file or in its
    parent folder, else the default repo of ``kind`` from the Hugging Face cache (fetched once)."""
    return hf.companion(path, "tokenizer", given, TOKENIZER_SPECS[kind][0])
