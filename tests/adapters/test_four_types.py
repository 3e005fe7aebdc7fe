"""Issue 18's acceptance: one file of each of the four adapter types, each written by another tool in its own layout,
merged in one `kern merge` call with no type flag, equals the base plus the sum of the four ΔW the reference
libraries compute; applied unmerged together (and with merge=True) they give the merged model's output.

* LoRA and DoRA: PEFT (``get_peft_model_state_dict``, saved with diffusers' ``transformer.`` prefix and its
  ``lora_adapter_metadata``); ΔW = PEFT's ``merge_and_unload`` weight − W (DoRA's relative to the unmerged base).
* LoHa and LoKr: LyCORIS (``create_lycoris`` + ``save_weights``, ``lycoris_*`` names); ΔW = its module's
  ``get_weight`` (γ applied once, as its forward and ComfyUI do; see tests/adapters/test_lokr.py).

On kern's tiny native FLUX.2 model (BFL names, plain ``nn.Linear`` layers, so no fused-layer mapping is involved)
and the tiny Qwen-Image model (whose names are diffusers' too). The four overlap: the attention projections carry
all four, the MLPs three.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from kern.adapters.weights import apply_adapters, detect
from kern.core.io import load_file, save_file
from kern.core.plugins import build_manager
from torch import nn

pytest.importorskip("lycoris")
pytest.importorskip("peft")

TOL = {"rtol": 1e-5, "atol": 1e-5}
RANK = 4


def flux2_model() -> tuple[nn.Module, dict, dict]:
    from kern_flux2 import geometry
    from kern_flux2.params import tiny_params
    from kern_flux2.transformer import Flux2Transformer

    from tests.helpers import init_flux2_random

    p = tiny_params(guidance_embed=False, depth=1, depth_single=1)
    model = init_flux2_random(Flux2Transformer(p)).eval()
    g = torch.Generator().manual_seed(1)
    x = {
        "img": geometry.pack(torch.randn(1, p.in_channels, 4, 4, generator=g)),
        "img_ids": geometry.image_ids(4, 4),
        "txt": torch.randn(1, 6, p.context_in_dim, generator=g),
        "txt_ids": geometry.text_ids(6),
        "timesteps": torch.tensor([0.4]),
    }
    targets = {
        "lora": ["img_attn.qkv", "txt_attn.qkv", "linear1"],
        "dora": ["img_attn.qkv", "img_attn.proj", "img_mlp.0", "linear2"],
    }
    return model, x, targets


def qwen_model() -> tuple[nn.Module, dict, dict]:
    from kern_qwen_image.params import tiny_params
    from kern_qwen_image.transformer import QwenImageTransformer

    from tests.helpers import init_qwen_image_random

    p = tiny_params(num_layers=2)
    model = init_qwen_image_random(QwenImageTransformer(p)).eval()
    g = torch.Generator().manual_seed(1)
    x = {
        "img": torch.randn(1, 16, p.in_channels, generator=g),
        "txt": torch.randn(1, 5, p.joint_attention_dim, generator=g),
        "txt_mask": None,
        "timesteps": torch.tensor([0.4]),
        "img_shapes": [(1, 4, 4)],
    }
    targets = {"lora": ["to_q", "to_k", "add_k_proj", "img_mlp.net.2"], "dora": ["to_q", "to_v", "txt_mlp.net.0.proj"]}
    return model, x, targets


def randomise_(params, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def peft_file(model, targets, path, *, dora: bool, seed: int) -> dict[str, torch.Tensor]:
    """A PEFT LoRA / DoRA on a copy of ``model`` with random factors, saved as diffusers saves it; its ΔW per weight."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    cfg = {"r": RANK, "lora_alpha": 2.0 * RANK if dora else RANK / 2, "target_modules": targets, "use_dora": dora}
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(**cfg, lora_dropout=0.0))
    randomise_([p for n, p in peft.named_parameters() if "lora_A" in n or "lora_B" in n], seed, 0.1)
    if dora:  # m away from ‖W + s·BA‖, so that the magnitude matters
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(torch.rand(p.shape, generator=g) + 0.5)
    state = get_peft_model_state_dict(peft)
    assert state and (not dora or any(k.endswith("lora_magnitude_vector") for k in state))
    state = {"transformer." + k.removeprefix("base_model.model."): v.detach().contiguous() for k, v in state.items()}
    save_file(state, path, {"lora_adapter_metadata": json.dumps(cfg)})
    base = model.state_dict()
    merged = peft.merge_and_unload().state_dict()
    return {k: merged[k] - base[k] for k in base if k.endswith(".weight") and not torch.equal(merged[k], base[k])}


def lycoris_file(model, path, algo: str, seed: int, **kw) -> dict[str, torch.Tensor]:
    """A LyCORIS LoHa / LoKr on every Linear of a copy of ``model``, random factors, saved by LyCORIS; ΔW per weight."""
    from lycoris import create_lycoris

    copy_ = copy.deepcopy(model)
    paths = {id(m): n for n, m in copy_.named_modules()}
    net = create_lycoris(copy_, 1.0, linear_dim=RANK, linear_alpha=RANK / 2, algo=algo, **kw)
    net.apply_to()
    randomise_(list(net.parameters()), seed, 0.2 if algo == "loha" else 0.1)
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    deltas = {}
    with torch.no_grad():
        for lm in net.loras:
            org = lm.org_module[0]
            deltas[paths[id(org)] + ".weight"] = lm.get_weight(tuple(org.weight.shape)).detach().float()
    return deltas


@pytest.fixture(scope="module", params=["flux2", "qwen-image"])
def four(request, tmp_path_factory):
    """The base file, the four adapter files (DoRA last: its ΔW must still be taken on the unmerged base), the
    expected merged weights, the model and its inputs."""
    torch.manual_seed(0)
    model, x, targets = {"flux2": flux2_model, "qwen-image": qwen_model}[request.param]()
    tmp = tmp_path_factory.mktemp(f"four-{request.param}")
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(base, tmp / "base.safetensors", {})
    files = {
        "lora": tmp / "peft_lora.safetensors",
        "loha": tmp / "lycoris_loha.safetensors",
        "lokr": tmp / "lycoris_lokr.safetensors",
        "dora": tmp / "peft_dora.safetensors",
    }
    deltas = [
        peft_file(model, targets["lora"], files["lora"], dora=False, seed=1),
        lycoris_file(model, files["loha"], "loha", seed=2),
        lycoris_file(model, files["lokr"], "lokr", seed=3, factor=4, decompose_both=True),
        peft_file(model, targets["dora"], files["dora"], dora=True, seed=4),
    ]
    expected = {k: v.clone() for k, v in base.items()}
    for d in deltas:
        for k, v in d.items():
            expected[k] = expected[k] + v
    # The four overlap: some weights get all four updates.
    assert any(all(k in d for d in deltas) for k in deltas[3])
    return {"tmp": tmp, "files": files, "expected": expected, "base": base, "model": model, "x": x}


def test_each_file_is_detected_as_its_type(four):
    manager = build_manager()
    seen = {}
    for kind, path in four["files"].items():
        tensors, meta = load_file(path)
        claim = detect(tensors.keys(), meta, manager)
        seen[kind] = (claim.network_type, claim.layout, claim.note.startswith("DoRA"))
    assert seen["lora"][0] == "lora" and not seen["lora"][2]
    assert seen["dora"][0] == "lora" and seen["dora"][2]
    assert seen["loha"][:2] == ("loha", "lycoris") and seen["lokr"][:2] == ("lokr", "lycoris")


def test_kern_merge_of_the_four_is_the_sum_of_their_deltas(four):
    from click.testing import CliRunner
    from kern_cli.commands.merge import command

    out = four["tmp"] / "merged.safetensors"
    args = ["--model", str(four["tmp"] / "base.safetensors")]
    for path in four["files"].values():
        args += ["--weights", str(path)]
    result = CliRunner().invoke(command, [*args, "--out", str(out), "--dtype", "float32"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    merged, _ = load_file(out)
    assert merged.keys() == four["expected"].keys()
    changed = 0
    for key, value in four["expected"].items():
        torch.testing.assert_close(merged[key], value, **TOL, msg=key)
        changed += not torch.equal(value, four["base"][key])
    assert changed > 10


def run(model, x):
    with torch.no_grad():
        return model(**x)


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merge=True"])
def test_the_four_applied_together_give_the_merged_models_output(four, merge):
    reference = copy.deepcopy(four["model"])
    reference.load_state_dict(four["expected"])
    expected = run(reference, four["x"])
    model = copy.deepcopy(four["model"])
    base_out = run(model, four["x"])
    networks = apply_adapters(model, [(str(p), 1.0) for p in four["files"].values()], merge=merge)
    assert len(networks) == 4
    out = run(model, four["x"])
    assert (expected - base_out).abs().max() > 1e-2
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
