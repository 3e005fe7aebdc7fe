"""Which plugin claims which file: every layout kern reads, and the files it must refuse with a useful message."""

from __future__ import annotations

import types

import kern
import pytest
from kern.adapters.weights import detect
from kern.core.plugins import build_manager
from kern.errors import AdapterError

M = "double_blocks.0.img_attn.qkv"
Q = "transformer_blocks.0.attn.to_q"


def _lora(name, a="lora_down.weight", b="lora_up.weight", alpha=True):
    keys = {f"{name}.{a}", f"{name}.{b}"}
    return keys | ({f"{name}.alpha"} if alpha else set())


def _loha(name, alpha=True):
    return {f"{name}.hada_w1_a", f"{name}.hada_w1_b", f"{name}.hada_w2_a", f"{name}.hada_w2_b"} | (
        {f"{name}.alpha"} if alpha else set()
    )


POSITIVE = [
    ("kohya lora", _lora("lora_unet_" + M.replace(".", "_")), "lora", "kohya"),
    (
        "peft with transformer.",
        _lora(f"transformer.{Q}", "lora_A.weight", "lora_B.weight", alpha=False),
        "lora",
        "peft",
    ),
    ("peft without prefix", _lora(Q, "lora_A.weight", "lora_B.weight", alpha=False), "lora", "peft"),
    ("peft .default", _lora(Q, "lora_A.default.weight", "lora_B.default.weight", alpha=False), "lora", "peft"),
    ("comfyui folded", _lora(f"diffusion_model.{M}", "lora_A.weight", "lora_B.weight", alpha=False), "lora", "comfyui"),
    ("comfyui with alpha", _lora(f"diffusion_model.{M}", "lora_A.weight", "lora_B.weight"), "lora", "comfyui"),
    ("lycoris_ lora", _lora("lycoris_" + Q.replace(".", "_")), "lora", "lycoris"),
    ("onetrainer lora_transformer_", _lora("lora_transformer_" + Q.replace(".", "_")), "lora", "lycoris"),
    ("kohya loha", _loha("lora_unet_" + M.replace(".", "_")), "loha", "kohya"),
    ("comfyui loha", _loha(f"diffusion_model.{M}"), "loha", "comfyui"),
    ("lycoris_ loha", _loha("lycoris_" + Q.replace(".", "_")), "loha", "lycoris"),
    # DoRA was refused until issue 18; it is a LoRA with a magnitude, claimed by the lora plugin (note "DoRA ...").
    ("kohya dora", _lora("lora_unet_a") | {"lora_unet_a.dora_scale"}, "lora", "kohya"),
    (
        "peft dora",
        _lora(Q, "lora_A.weight", "lora_B.weight", alpha=False) | {f"{Q}.lora_magnitude_vector"},
        "lora",
        "peft",
    ),
    # LoKr was refused until issue 18; the lokr plugin claims it (tests/adapters/test_lokr.py has the maths).
    ("kohya lokr", {"lora_unet_x.lokr_w1", "lora_unet_x.lokr_w2", "lora_unet_x.alpha"}, "lokr", "kohya"),
    (
        "lycoris_ lokr",
        {f"lycoris_x.{s}" for s in ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")},
        "lokr",
        "lycoris",
    ),
    (
        "comfyui lokr",
        {f"diffusion_model.{M}.{s}" for s in ("lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha")},
        "lokr",
        "comfyui",
    ),
]


@pytest.mark.parametrize("label,keys,network,layout", POSITIVE, ids=[p[0] for p in POSITIVE])
def test_detects_layout(label, keys, network, layout):
    claim = detect(keys, {}, build_manager())
    assert (claim.network_type, claim.layout) == (network, layout)
    assert len(claim.modules) == 1
    (module_keys,) = claim.modules.values()
    assert set(module_keys) == keys
    assert claim.note.startswith("DoRA") == ("dora" in label)


NEGATIVE = [
    ("lokr + dora_scale", {"lora_unet_x.lokr_w1", "lora_unet_x.lokr_w2", "lora_unet_x.dora_scale"}, "DoRA"),
    ("full checkpoint", {f"{M}.weight", f"{M}.bias", "img_in.weight"}, "full model checkpoint"),
    ("mixed lora+loha", _lora("lora_unet_a") | _loha("lora_unet_b"), "mixed adapter file holding LoRA and LoHa"),
    ("lora + stray tensor", _lora("lora_unet_a") | {"img_in.weight"}, "mixed with 1 non-adapter tensors"),
    ("garbage", {"foo", "bar.baz", "qux"}, "not an adapter format kern knows"),
]


@pytest.mark.parametrize("label,keys,message", NEGATIVE, ids=[n[0] for n in NEGATIVE])
def test_refuses_with_a_clear_message(label, keys, message):
    with pytest.raises(AdapterError, match="some.safetensors") as info:
        detect(keys, {}, build_manager(), path="some.safetensors")
    assert message in str(info.value)
    if label == "garbage":
        assert "'bar.baz'" in str(info.value)  # shows example keys


def test_two_claims_name_both_plugins():
    greedy = types.ModuleType("greedy_plugin")

    @kern.hookimpl
    def detect_weights(keys, metadata):
        return kern.WeightsClaim(network_type="greedy", layout="kohya")

    greedy.detect_weights = detect_weights
    with pytest.raises(AdapterError, match="more than one network plugin") as info:
        detect(_lora("lora_unet_a"), {}, build_manager(extra=[("greedy", greedy)]))
    assert "greedy" in str(info.value) and "lora" in str(info.value)
