"""FLUX.2 text encoders from ComfyUI single files (``qwen_3_4b.safetensors``, ``mistral_3_small_flux2_bf16``, fp8).

Each tiny encoder is written in the exact ComfyUI key layout (``model.*`` decoder keys, no lm_head, no vision tower;
Mistral pruned to 30 layers without final norm, with ``tekken_model``) from the same weights as a transformers
folder, and the embeddings kern computes from the file must equal those from the folder bit for bit (fp32). The
fp8-scaled file (ComfyUI's ``scaled_fp8`` marker and per-layer ``scale_weight``) must equal the bf16 file holding
its dequantised values. Wrong files are named as what they are.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from kern.core.io import save_file
from kern.errors import ModelFileError
from kern.gpu.fp8 import Float8StorageLinear
from kern_flux2 import te_files
from kern_flux2.text_encoder import MistralEmbedder, Qwen3Embedder, load_text_encoder
from kern_flux2.tiny import write_comfy_text_encoder
from safetensors.torch import load_file

from tests.flux2.test_text_encoder import PROMPTS, _mistral_folder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def _tokenizer_copy(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def qwen3(tiny_bundle, tmp_path_factory):
    """(folder, ComfyUI models/ folder holding text_encoders/qwen_3_4b.safetensors and a tokenizer/ beside it)."""
    folder = tiny_bundle["text_encoder"]
    root = tmp_path_factory.mktemp("comfy_qwen3")
    path = write_comfy_text_encoder(
        folder, (root / "text_encoders").mkdir() or root / "text_encoders" / "qwen_3_4b.safetensors"
    )
    _tokenizer_copy(folder, root / "text_encoders" / "tokenizer")
    return folder, path


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    folder = _mistral_folder(tmp_path_factory.mktemp("mistral_folder"), "left", legacy_template=False)
    path = tmp_path_factory.mktemp("comfy_mistral") / "mistral_3_small_flux2_bf16.safetensors"
    return folder, write_comfy_text_encoder(folder, path, tekken=b'{"config": {}}')


def test_file_layout_is_comfyuis(qwen3, mistral):
    q = load_file(qwen3[1])
    assert (
        "model.embed_tokens.weight" in q and "model.layers.27.self_attn.q_norm.weight" in q and "model.norm.weight" in q
    )
    assert not any(k.startswith("lm_head") for k in q)
    m = load_file(mistral[1])
    assert "model.layers.29.mlp.down_proj.weight" in m and "model.layers.30.mlp.down_proj.weight" not in m
    assert "model.norm.weight" not in m and m["tekken_model"].dtype == torch.uint8
    assert not any(k.startswith(("lm_head", "model.vision_tower", "model.language_model")) for k in m)


@pytest.mark.parametrize("drop_unused_layers", [True, False])
def test_qwen3_single_file_equals_folder(qwen3, drop_unused_layers):
    folder, path = qwen3
    ref = load_text_encoder("qwen3", folder, torch.float32, "cpu", drop_unused_layers=drop_unused_layers)
    enc = load_text_encoder(
        None, path, torch.float32, "cpu", drop_unused_layers=drop_unused_layers
    )  # tokenizer/ beside
    assert isinstance(enc, Qwen3Embedder) and len(enc.backbone.layers) == len(ref.backbone.layers)
    torch.testing.assert_close(enc(PROMPTS)["ctx"], ref(PROMPTS)["ctx"], rtol=0, atol=0)


def test_mistral_single_file_equals_folder(mistral):
    folder, path = mistral
    ref = load_text_encoder("mistral3", folder, torch.float32, "cpu")
    enc = load_text_encoder("mistral3", path, torch.float32, "cpu", tokenizer_path=folder)
    assert isinstance(enc, MistralEmbedder) and len(enc.backbone.layers) == 30
    assert isinstance(enc.backbone.norm, torch.nn.Identity)  # hidden_states[30] is layer 30's raw output
    torch.testing.assert_close(enc(PROMPTS)["ctx"], ref(PROMPTS)["ctx"], rtol=0, atol=0)


def _scaled_fp8(src, dst):
    """``src`` as ComfyUI's legacy scaled fp8 file (marker, e4m3 Linear weights with a scalar ``scale_weight``), and
    the bf16-free reference: the same file with each weight replaced by its exact dequantised fp32 value."""
    state = load_file(src)
    fp8, deq = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, {}
    for k, v in state.items():
        if k.endswith("_proj.weight"):
            scale = (v.abs().amax() / 448).to(torch.float32)
            q = (v / scale).to(torch.float8_e4m3fn)
            fp8[k], fp8[k.replace(".weight", ".scale_weight")] = q, scale
            deq[k] = q.to(torch.float32) * scale
        else:
            fp8[k] = deq[k] = v
    meta = {"kern.config": __import__("safetensors").safe_open(str(src), "pt").metadata()["kern.config"]}
    save_file(fp8, dst / "qwen_3_4b_fp8_scaled.safetensors", metadata=meta)
    save_file(deq, dst / "qwen_3_4b_dequantised.safetensors", metadata=meta)
    return dst / "qwen_3_4b_fp8_scaled.safetensors", dst / "qwen_3_4b_dequantised.safetensors"


def test_fp8_scaled_file_equals_its_dequantised_weights(qwen3, tmp_path):
    folder, path = qwen3
    scaled, deq = _scaled_fp8(path, tmp_path)
    a = load_text_encoder("qwen3", scaled, torch.float32, "cpu", tokenizer_path=folder)
    b = load_text_encoder("qwen3", deq, torch.float32, "cpu", tokenizer_path=folder)
    torch.testing.assert_close(a(PROMPTS)["ctx"], b(PROMPTS)["ctx"], rtol=0, atol=0)
    # Kept fp8: every projection becomes an fp8 layer holding the file's bytes and scale, so its weight is exactly
    # the dequantised one (no bf16 round trip, no second quantisation).
    c = load_text_encoder("qwen3", scaled, torch.bfloat16, "cpu", fp8=True, tokenizer_path=folder)
    layers = {n: m for n, m in c.backbone.named_modules() if isinstance(m, Float8StorageLinear)}
    assert len(layers) == 27 * 7
    reference = load_file(deq)
    for name, m in layers.items():
        assert torch.equal(m.dequantized_weight(torch.float32), reference[f"model.{name}.weight"]), name
    assert c(PROMPTS[:1])["ctx"].dtype == torch.bfloat16


def test_tokenizer_from_the_hub_cache(qwen3, hub_cache, no_network, tmp_path):
    """Nothing beside the file: the tokenizer comes from the default repo, found in the offline Hugging Face cache."""
    folder, path = qwen3
    lone = tmp_path / "elsewhere" / "qwen_3_4b.safetensors"
    lone.parent.mkdir()
    shutil.copy(path, lone)
    with pytest.raises(ModelFileError, match="FLUX.2-klein-4B"):
        load_text_encoder("qwen3", lone, torch.float32, "cpu")
    (spec,) = te_files.tokenizer_specs("qwen3")
    repo, sub = spec.rsplit("/", 1)
    hub_cache.add(repo, {sub: _tokenizer_copy(folder, tmp_path / "tok")})
    enc = load_text_encoder("qwen3", lone, torch.float32, "cpu")
    ref = load_text_encoder("qwen3", folder, torch.float32, "cpu")
    torch.testing.assert_close(enc(PROMPTS[:2])["ctx"], ref(PROMPTS[:2])["ctx"], rtol=0, atol=0)
    assert no_network == []


def _header_only(path, tensors):
    save_file({k: torch.zeros(s) for k, s in tensors.items()}, path)
    return path


QWEN3_8B_KEYS = {
    "model.layers.0.post_attention_layernorm.weight": (4096,),
    "model.layers.0.self_attn.q_norm.weight": (128,),
}


def test_wrong_files_are_named(qwen3, mistral, tmp_path):
    _, qpath = qwen3
    _, mpath = mistral
    with pytest.raises(ModelFileError, match=r"Qwen3 text encoder of a non-standard size, not the Mistral 3 Small"):
        load_text_encoder("mistral3", qpath, torch.float32, "cpu")
    with pytest.raises(ModelFileError, match=r"Mistral 3 Small text encoder of a non-standard size, not the Qwen3"):
        load_text_encoder("qwen3", mpath, torch.float32, "cpu")
    big = _header_only(tmp_path / "qwen_3_8b.safetensors", QWEN3_8B_KEYS)
    with pytest.raises(
        ModelFileError,
        match=r"Qwen3 8B text encoder \(FLUX.2 klein 9B's\), which does not fit FLUX.2 "
        r"klein-4b; FLUX.2 klein-4b reads qwen_3_4b.safetensors",
    ):
        load_text_encoder("qwen3", big, torch.float32, "cpu", variant="klein-4b")
    clip = _header_only(
        tmp_path / "clip_l.safetensors", {"text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 8)}
    )
    with pytest.raises(ModelFileError, match=r"a CLIP-L text encoder \(CLIP-L / T5 are FLUX.1 / SD3's"):
        load_text_encoder("qwen3", clip, torch.float32, "cpu")
    t5 = _header_only(tmp_path / "t5xxl.safetensors", {"encoder.block.0.layer.0.SelfAttention.q.weight": (8, 4096)})
    with pytest.raises(ModelFileError, match=r"T5-XXL text encoder .*not the Mistral 3 Small"):
        load_text_encoder("mistral3", t5, torch.float32, "cpu")
    qwen_vl = {
        "model.layers.0.post_attention_layernorm.weight": (3584,),
        "model.layers.0.self_attn.k_proj.bias": (512,),
        "visual.blocks.0.norm1.weight": (1280,),
    }
    vl = _header_only(tmp_path / "qwen_2.5_vl_7b.safetensors", qwen_vl)
    with pytest.raises(ModelFileError, match=r"Qwen2.5-VL 7B text encoder \(Qwen-Image's\), not the Qwen3"):
        load_text_encoder("qwen3", vl, torch.float32, "cpu")


def test_non_standard_size_needs_its_config(qwen3, tmp_path):
    state = load_file(qwen3[1])
    save_file(state, tmp_path / "odd.safetensors")  # no kern.config
    with pytest.raises(ModelFileError, match=r"hidden width 16, 28 layers, a size kern has no config for"):
        load_text_encoder("qwen3", tmp_path / "odd.safetensors", torch.float32, "cpu", tokenizer_path=qwen3[0])


def test_identify():
    def shapes(width, prefix="", **extra):
        s = {f"{prefix}model.layers.{i}.post_attention_layernorm.weight": (width,) for i in range(2)}
        return {**s, **{prefix + k: v for k, v in extra.items()}}

    q4 = te_files.identify(shapes(2560, **{"model.layers.0.self_attn.q_norm.weight": (128,)}))
    assert (q4.kind, q4.size, q4.variants) == ("qwen3", "4B", ("klein-4b", "klein-base-4b"))
    assert q4.what == "a Qwen3 4B text encoder (FLUX.2 klein 4B's)"
    q8 = te_files.identify(
        shapes(4096, "text_encoders.qwen3_8b.transformer.", **{"model.layers.0.self_attn.q_norm.weight": (128,)})
    )
    assert (q8.kind, q8.size, q8.variants) == ("qwen3", "8B", ("klein-9b", "klein-base-9b"))
    m = te_files.identify(shapes(5120, tekken_model=(100,)))
    assert (m.kind, m.size, m.variants, m.layout) == ("mistral3", "24B", ("dev",), "single file")
    unpruned = te_files.identify(shapes(5120, **{"model.norm.weight": (5120,)}))  # keys alone: no ComfyUI sign
    assert (unpruned.kind, unpruned.layout) == ("mistral3", "transformers folder")
    t5_folder = {
        "model.language_model.layers.0.post_attention_layernorm.weight": (5120,),
        "model.language_model.norm.weight": (5120,),
    }
    assert te_files.identify(t5_folder).layout == "transformers folder"
    assert te_files.identify(shapes(3584, **{"model.layers.0.self_attn.k_proj.bias": (512,)})) is None
    assert te_files.identify({"encoder.conv_in.weight": (8, 3, 3, 3)}) is None
    assert te_files.tokenizer_specs("qwen3") == ("black-forest-labs/FLUX.2-klein-4B/tokenizer",)
    assert te_files.tokenizer_specs("mistral3") == ("black-forest-labs/FLUX.2-dev/tokenizer",)


@pytest.mark.parametrize("key", list(te_files.KNOWN_CONFIGS))
def test_known_configs_build_the_real_models(key):
    """Each stored config builds (on meta) a decoder whose shapes are those detection reads, at the real size."""
    from kern.models import hf
    from transformers import MistralModel, Qwen3Model

    kind, width = key
    label, values, _, _ = te_files.KNOWN_CONFIGS[key]
    config = hf.config_from_dict(values, "test", "config")
    model = hf.empty_model(Qwen3Model if kind == "qwen3" else MistralModel, config, torch.bfloat16)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sd["layers.0.post_attention_layernorm.weight"] == (width,)
    assert ("layers.0.self_attn.q_norm.weight" in sd) == (kind == "qwen3")
    n = sum(v.numel() for v in model.parameters()) / 1e9
    # Qwen3-4B: 4.02 B with its tied head; Qwen3-8B: 7.57 B without its 0.62 B head; Mistral Small: 30 of 40
    # layers of 0.556 B plus the 0.67 B embedding (the 40-layer LM with its head is 23.57 B, the rest is vision).
    expected = {"4B": 4.02, "8B": 7.57, "24B": 17.34}[label]
    assert abs(n - expected) < 0.02, n
