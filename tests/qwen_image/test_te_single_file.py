"""Qwen-Image's text encoder from ComfyUI single files (``qwen_2.5_vl_7b.safetensors``, ``…_fp8_scaled``).

The tiny Qwen2.5-VL of the demo bundle is written in ComfyUI's exact key layout (``model.*`` language model,
``visual.*``, ``lm_head``) and loaded from the file; its embeddings, text-only and with an image (Edit-Plus), must
equal those of the same weights loaded from the transformers folder bit for bit (fp32). The fp8-scaled file must equal
the file holding its dequantised values. Wrong files are named as what they are.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from kern.core.io import save_file
from kern.errors import ModelFileError
from kern.gpu.fp8 import Float8StorageLinear
from kern_qwen_image import te_files
from kern_qwen_image.text_encoder import load_text_encoder
from kern_qwen_image.tiny import PROMPTS, write_comfy_text_encoder
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def _copy(src, dst, names):
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def files(tiny_qwen, tmp_path_factory):
    """(transformers folder, ComfyUI file with tokenizer/ and processor/ folders beside it)."""
    folder = tiny_qwen["text_encoder"]
    root = tmp_path_factory.mktemp("comfy_qwen_vl") / "text_encoders"
    root.mkdir()
    path = write_comfy_text_encoder(folder, root / "qwen_2.5_vl_7b.safetensors")
    _copy(folder, root / "tokenizer", TOKENIZER_FILES)
    _copy(folder, root / "processor", (*TOKENIZER_FILES, "preprocessor_config.json"))
    return folder, path


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (96, 80, 3), dtype=np.uint8), "RGB")


def test_file_layout_is_comfyuis(files):
    keys = set(load_file(files[1]))
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.bias", "model.norm.weight"} <= keys
    assert "lm_head.weight" in keys and any(k.startswith("visual.blocks.0.") for k in keys)
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in keys)


def test_single_file_equals_folder_text_and_image(files):
    folder, path = files
    ref = load_text_encoder(folder, torch.float32, "cpu", need_vision=True)
    enc = load_text_encoder(path, torch.float32, "cpu", need_vision=True)  # tokenizer/, processor/ beside the file
    assert enc.has_vision and enc.model.lm_head is not None
    for a, b in (
        (enc(PROMPTS), ref(PROMPTS)),
        (enc(PROMPTS[:1], [[_image()]], "edit_plus"), ref(PROMPTS[:1], [[_image()]], "edit_plus")),
    ):
        torch.testing.assert_close(a["ctx"], b["ctx"], rtol=0, atol=0)
        assert torch.equal(a["mask"], b["mask"])
    # Text only: the vision tower and lm_head are neither built nor read.
    text = load_text_encoder(path, torch.float32, "cpu")
    assert not text.has_vision and text.model.lm_head is None and text.model.model.visual is None
    torch.testing.assert_close(text(PROMPTS)["ctx"], ref(PROMPTS)["ctx"], rtol=0, atol=0)


def test_file_without_lm_head_or_vision(files, tmp_path):
    folder, path = files
    no_head = write_comfy_text_encoder(folder, tmp_path / "no_head.safetensors", lm_head=False)
    enc = load_text_encoder(
        no_head, torch.float32, "cpu", need_vision=True, tokenizer_path=folder, processor_path=folder
    )
    assert enc.has_vision and enc.model.lm_head is None  # edit modes work; captioning says it needs the head
    # A 7B-shaped file without visual.* (the LLM alone) loads for text, not for the edit modes.
    text_only = {
        "model.layers.0.post_attention_layernorm.weight": (3584,),
        "model.layers.0.self_attn.k_proj.bias": (512,),
    }
    lone = _header_only(tmp_path / "text_only.safetensors", text_only)
    assert te_files.identify(text_only).what.endswith("without its vision tower")
    with pytest.raises(ModelFileError, match=r"no vision tower \(visual\.\*\), which the edit modes"):
        load_text_encoder(lone, torch.float32, "cpu", need_vision=True, tokenizer_path=folder, processor_path=folder)


def test_fp8_scaled_file_equals_its_dequantised_weights(files, tmp_path):
    folder, path = files
    state, meta = load_file(path), safe_open(str(path), "pt").metadata()
    fp8, deq = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, {}
    for k, v in state.items():
        if k.startswith("model.layers.") and k.endswith("_proj.weight"):
            scale = (v.abs().amax() / 448).to(torch.float32)
            q = (v / scale).to(torch.float8_e4m3fn)
            fp8[k], fp8[k.replace(".weight", ".scale_weight")] = q, scale
            deq[k] = q.to(torch.float32) * scale
        else:
            fp8[k] = deq[k] = v
    save_file(fp8, tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors", metadata=meta)
    save_file(deq, tmp_path / "dequantised.safetensors", metadata=meta)
    a = load_text_encoder(
        tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors", torch.float32, "cpu", tokenizer_path=folder
    )
    b = load_text_encoder(tmp_path / "dequantised.safetensors", torch.float32, "cpu", tokenizer_path=folder)
    torch.testing.assert_close(a(PROMPTS)["ctx"], b(PROMPTS)["ctx"], rtol=0, atol=0)
    # Kept fp8: the file's bytes and scales as they are, in the language model only.
    c = load_text_encoder(
        tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors", torch.bfloat16, "cpu", fp8=True, tokenizer_path=folder
    )
    lm = c.model.model.language_model
    layers = {n: m for n, m in lm.named_modules() if isinstance(m, Float8StorageLinear)}
    assert len(layers) == 2 * 7
    for name, m in layers.items():
        assert torch.equal(m.dequantized_weight(torch.float32), deq[f"model.{name}.weight"]), name


def test_tokenizer_from_the_hub_cache(files, hub_cache, no_network, tmp_path):
    folder, path = files
    lone = tmp_path / "lone" / "qwen_2.5_vl_7b.safetensors"
    lone.parent.mkdir()
    shutil.copy(path, lone)
    with pytest.raises(ModelFileError, match="Qwen/Qwen-Image"):
        load_text_encoder(lone, torch.float32, "cpu")
    hub_cache.add("Qwen/Qwen-Image", {"tokenizer": _copy(folder, tmp_path / "tok", TOKENIZER_FILES)})
    hub_cache.add(
        "Qwen/Qwen-Image-Edit",
        {"processor": _copy(folder, tmp_path / "proc", (*TOKENIZER_FILES, "preprocessor_config.json"))},
    )
    assert te_files.tokenizer_specs("qwen2.5-vl") == ("Qwen/Qwen-Image/tokenizer", "Qwen/Qwen-Image-Edit/processor")
    enc = load_text_encoder(lone, torch.float32, "cpu", need_vision=True)
    ref = load_text_encoder(folder, torch.float32, "cpu", need_vision=True)
    a, b = enc(PROMPTS[:1], [[_image(1)]], "edit_plus"), ref(PROMPTS[:1], [[_image(1)]], "edit_plus")
    torch.testing.assert_close(a["ctx"], b["ctx"], rtol=0, atol=0)
    assert no_network == []


def _header_only(path, tensors):
    save_file({k: torch.zeros(s) for k, s in tensors.items()}, path)
    return path


def test_wrong_files_are_named(tmp_path):
    qwen3 = {
        "model.layers.0.post_attention_layernorm.weight": (2560,),
        "model.layers.0.self_attn.q_norm.weight": (128,),
    }
    with pytest.raises(
        ModelFileError, match=r"this is a Qwen3 4B text encoder \(FLUX.2 klein 4B's\), not the Qwen2.5-VL"
    ):
        load_text_encoder(_header_only(tmp_path / "qwen_3_4b.safetensors", qwen3), torch.float32, "cpu")
    mistral = {"model.layers.0.post_attention_layernorm.weight": (5120,), "tekken_model": (16,)}
    with pytest.raises(ModelFileError, match=r"Mistral 3 Small text encoder \(FLUX.2 dev's\)"):
        load_text_encoder(_header_only(tmp_path / "mistral.safetensors", mistral), torch.float32, "cpu")
    clip = {"text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 8)}
    with pytest.raises(
        ModelFileError, match=r"a CLIP-L text encoder \(CLIP-L / T5 are FLUX.1 / SD3's.*not the Qwen2.5-VL"
    ):
        load_text_encoder(_header_only(tmp_path / "clip_l.safetensors", clip), torch.float32, "cpu")
    t5 = {"encoder.block.0.layer.0.SelfAttention.q.weight": (8, 4096)}
    with pytest.raises(ModelFileError, match=r"a T5-XXL text encoder"):
        load_text_encoder(_header_only(tmp_path / "t5xxl.safetensors", t5), torch.float32, "cpu")


def test_non_standard_size_needs_its_config(files, tmp_path):
    folder, path = files
    save_file(load_file(path), tmp_path / "odd.safetensors")  # no kern.config
    with pytest.raises(ModelFileError, match=r"hidden width 32, 2 layers, a size kern has no config for"):
        load_text_encoder(tmp_path / "odd.safetensors", torch.float32, "cpu", tokenizer_path=folder)


def test_identify():
    seven = {
        "model.layers.0.post_attention_layernorm.weight": (3584,),
        "model.layers.0.self_attn.k_proj.bias": (512,),
        "visual.blocks.0.norm1.weight": (1280,),
    }
    found = te_files.identify(seven)
    assert (found.kind, found.size, found.layout) == ("qwen2.5-vl", "7B", "single file")
    assert found.what == "the Qwen2.5-VL 7B text encoder (Qwen-Image's)" and "edit-2511" in found.variants
    prefixed = {f"text_encoders.qwen25_7b.transformer.{k}": v for k, v in seven.items()}
    assert te_files.identify(prefixed).size == "7B"
    folder = {
        k.replace("model.", "model.language_model.").replace("visual.", "model.visual."): v for k, v in seven.items()
    }
    assert te_files.identify(folder).layout == "transformers folder"
    assert te_files.identify({**seven, "model.layers.0.self_attn.q_norm.weight": (128,)}) is None
    assert te_files.identify({"encoder.conv1.weight": (8, 3, 3, 3, 3)}) is None


def test_known_config_builds_the_real_model():
    from kern.models import hf
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = hf.config_from_dict(te_files.QWEN25_VL_7B, "test", "config")
    model = hf.empty_model(Qwen2_5_VLForConditionalGeneration, config, torch.bfloat16)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sd["model.language_model.layers.0.self_attn.k_proj.bias"] == (512,)
    assert sd["model.language_model.embed_tokens.weight"] == (152064, 3584)
    assert sum(1 for k in sd if k.startswith("model.visual.blocks.") and k.endswith("norm1.weight")) == 32
    n = sum(v.numel() for v in model.parameters()) / 1e9
    assert abs(n - 8.29) < 0.01, n  # Qwen2.5-VL-7B-Instruct: 8.29 B parameters (LM 7.62 B + vision 0.67 B)
