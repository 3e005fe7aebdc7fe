"""DoRA files for other people's readers: ComfyUI (through the oracle written from its source) and diffusers.

ComfyUI normalises an ``[out, 1]`` ``dora_scale`` by the row norms of the base weight W (plus eps), PEFT and kern by
those of W + s·B·A, so ``kern convert --to comfyui --model BASE`` rescales the magnitudes from the base weights and
marks the file (``kern.dora_norm = "base"``). On a tiny FLUX.2 and a tiny Qwen-Image with a trained-looking DoRA
(random non-zero B, magnitudes away from the norms): ComfyUI's weight from the converted file == ``kern merge`` ==
PEFT's ``use_dora=True`` merged weight, at strength 1 and 0.5; kern reads the converted file back to the same
unmerged output and merge; without ``--model`` the conversion is refused (exit 2, nothing written). diffusers loads
kern's diffusers-layout DoRA (``lora_magnitude_vector``) and gives kern's unmerged output.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from kern.adapters.convert import convert
from kern.adapters.merge import merge
from kern.adapters.weights import apply_adapters
from kern.core.io import load_file, save_file
from kern.core.plugins import build_manager, get_manager
from kern.records import TargetSpec
from kern_lora.dora import NORM_KEY, row_norm

from tests.adapters import comfyui_oracle as comfy
from tests.adapters.test_comfyui_acceptance import EVERYTHING, FAMILY, options, tiny_model

pytest.importorskip("peft")

RANK, ALPHA = 3, 1.25
TOL = {"rtol": 1e-5, "atol": 1e-6}
ARCHS = ["flux2", "qwen-image"]


def fill_dora(net, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Trained-looking DoRA factors: A and B random, m = ‖W + s·BA‖ times a random factor in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for m in net.adapters.values():
            m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape, generator=g) * 0.2)
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.2)
            w = m.org.weight.detach().float()
            v = w + m.scale * m.lora_up.weight @ m.lora_down.weight
            m.dora_scale.copy_((row_norm(v) * (0.5 + torch.rand(v.shape[0], generator=g))).view(-1, 1))
            out[m.path] = (m.lora_down.weight.clone(), m.lora_up.weight.clone(), m.dora_scale.view(-1).clone())
    return out


def peft_merged(model, factors, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """PEFT's merged weights (``merge_and_unload``) of ``use_dora=True`` layers holding ``factors`` on a copy of ``model``."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(factors), use_dora=True, lora_dropout=0.0)
    peft = get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():
        for path, (a, b, m) in factors.items():
            layer = peft.base_model.model.get_submodule(path)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            layer.lora_magnitude_vector["default"].weight.copy_(m)
    merged = peft.merge_and_unload()
    return {f"{p}.weight": merged.get_submodule(p).weight.detach().clone() for p in factors}


@pytest.fixture(scope="module")
def dora(tmp_path_factory):
    """Per architecture: the tiny base model and its file, a kern DoRA on every Linear (kohya, as training saves it),
    its ComfyUI conversion with ``--model``, and PEFT's merged weights."""
    tmp = tmp_path_factory.mktemp("dora-comfyui")
    manager = get_manager()
    out = {}
    for arch in ARCHS:
        model = tiny_model(arch)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        base_file = tmp / f"{arch}-base.safetensors"
        save_file({f"diffusion_model.{k}": v for k, v in base.items()}, base_file)
        opts = options(manager, "lora", RANK, ALPHA) | {"dora": True}
        net = manager.hook.make_network(network_type="lora", model=model, targets=EVERYTHING, options=opts)
        factors = fill_dora(net, seed=11)
        kohya = net.save(tmp / f"{arch}-dora.safetensors")
        net.remove()
        comfy_file = tmp / f"{arch}-dora-comfyui.safetensors"
        convert(kohya, comfy_file, "comfyui", arch, manager=manager, model=base_file)
        out[arch] = dict(
            model=model,
            base=base,
            base_file=base_file,
            kohya=kohya,
            comfyui=comfy_file,
            peft=peft_merged(model, factors, RANK, ALPHA),
        )
    return dict(tmp=tmp, manager=manager, **out)


def kern_merged(dora, arch: str, adapter, strength: float) -> dict[str, torch.Tensor]:
    out = dora["tmp"] / f"merged-{arch}.safetensors"
    merge(dora[arch]["base_file"], [(adapter, strength)], out, out_dtype="float32", arch=arch, overwrite=True)
    merged, _ = load_file(out)
    return {k.removeprefix("diffusion_model."): v for k, v in merged.items()}


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("arch", ARCHS)
def test_comfyui_weight_of_the_converted_file_equals_kern_merge_and_peft(dora, arch, strength):
    d = dora[arch]
    tensors, metadata = load_file(d["comfyui"])
    assert metadata[NORM_KEY] == "base"
    scales = {k: v for k, v in tensors.items() if k.endswith(".dora_scale")}
    assert len(scales) == len(d["peft"]) and all(v.dtype == torch.float32 and v.shape[1] == 1 for v in scales.values())
    ours = comfy.patched_weights(tensors, d["base"], FAMILY[arch], strength)
    assert ours.keys() == d["peft"].keys()
    # kern's multiplier rule, ComfyUI's strength rule: W + s·(W' − W).
    expected = {k: d["base"][k] + strength * (w - d["base"][k]) for k, w in d["peft"].items()}
    merged = kern_merged(dora, arch, d["kohya"], strength)
    for k, w in expected.items():
        torch.testing.assert_close(ours[k], w, **TOL)
        torch.testing.assert_close(merged[k], w, **TOL)
    # The test means something: the magnitudes as PEFT means them (kern's kohya file) are off in ComfyUI.
    naive = comfy.patched_weights(load_file(d["kohya"])[0], d["base"], FAMILY[arch], strength)
    assert max(float((naive[k] - expected[k]).abs().max()) for k in expected) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_kern_reads_the_converted_file_back_unmerged_and_merged(dora, arch):
    d = dora[arch]
    models = {}
    for layout in ("kohya", "comfyui"):
        models[layout] = copy.deepcopy(d["model"])
        (net,) = apply_adapters(models[layout], [(d[layout], 1.0)], arch=arch)
        assert {type(m).__name__ for m in net.adapters.values()} == {"DoRAModule"}
        models[layout + "-net"] = net
    theirs = {m.path: m for m in models["comfyui-net"].adapters.values()}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in models["kohya-net"].adapters.values():
            torch.testing.assert_close(theirs[m.path].dora_scale, m.dora_scale, **TOL)
            layer = models["kohya"].get_submodule(m.path)
            x = torch.randn(2, 5, layer.in_features, generator=g)
            torch.testing.assert_close(models["comfyui"].get_submodule(m.path)(x), layer(x), **TOL)
    for strength in (1.0, 0.5):
        a = kern_merged(dora, arch, d["kohya"], strength)
        b = kern_merged(dora, arch, d["comfyui"], strength)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], **TOL)


@pytest.fixture
def kern_cli(capsys):
    """``kern ARGS`` in this process: (exit code, stderr); logging put back after."""
    from kern_cli.main import main

    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def call(*args) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in args])
        return exit_.value.code, capsys.readouterr().err

    yield call
    root.handlers[:], root.level = saved


def test_cli_needs_the_base_model_for_dora_and_comfyui(dora, kern_cli, tmp_path):
    d = dora["flux2"]
    out = tmp_path / "out.safetensors"
    convert_args = ["convert", "--arch", "flux2", "--out", out]
    # A DoRA for ComfyUI, or a file kern wrote for ComfyUI read back as kohya / diffusers: refused without --model.
    for src, layout in ((d["kohya"], "comfyui"), (d["comfyui"], "kohya"), (d["comfyui"], "diffusers")):
        code, err = kern_cli(*convert_args, src, "--to", layout)
        assert code == 2, err
        assert "--model" in err and "ComfyUI" in err and not out.exists()
    # With it: back to the magnitudes as trained (no mark), to round-off; α stays folded into the factors.
    code, err = kern_cli(*convert_args, d["comfyui"], "--to", "kohya", "--model", d["base_file"])
    assert code == 0, err
    back, metadata = load_file(out)
    original, _ = load_file(d["kohya"])
    assert NORM_KEY not in metadata and back.keys() == original.keys()
    for k, v in original.items():
        if k.endswith(".dora_scale"):
            torch.testing.assert_close(back[k], v, **TOL)
        elif k.endswith(".lora_up.weight"):
            down = k.replace(".lora_up.", ".lora_down.")
            alpha = {"a": original, "b": back}
            ba = {n: t[k] @ t[down] * (t[k.replace("lora_up.weight", "alpha")] / RANK) for n, t in alpha.items()}
            torch.testing.assert_close(ba["b"], ba["a"], **TOL)
    # A plain LoRA ignores --model (no warning, same file as without it); a missing --model file is exit 2.
    lora = {k: v for k, v in original.items() if not k.endswith(".dora_scale")}
    save_file(lora, tmp_path / "lora.safetensors")
    files = []
    for extra in ([], ["--model", d["base_file"]]):
        files.append(tmp_path / f"lora-{len(extra)}.safetensors")
        code, err = kern_cli(*convert_args[:-1], files[-1], tmp_path / "lora.safetensors", "--to", "comfyui", *extra)
        assert code == 0, err
    a, b = load_file(files[0])[0], load_file(files[1])[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out.unlink()
    code, err = kern_cli(*convert_args, d["kohya"], "--to", "comfyui", "--model", tmp_path / "nope.safetensors")
    assert code == 2 and "--model" in err and not out.exists()


# --------------------------------------------------------------------------- diffusers


def test_diffusers_flux2_loads_kern_dora_as_kern_runs_it(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import Flux2Pipeline

    from tests.adapters.helpers import diffusers_warnings
    from tests.adapters.test_interop_flux2 import (
        ARCH,
        TARGETS,
        arch_plugin,
        diffusers_model,
        inputs,
        kern_model,
        rel_err,
        run_diffusers,
    )

    manager = build_manager(extra=[(ARCH, arch_plugin())])
    model = kern_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = inputs()
    opts = options(manager, "lora", 4, 2.0) | {"dora": True}
    net = manager.hook.make_network(network_type="lora", model=model, targets=TARGETS, options=opts)
    fill_dora(net, seed=5)
    with torch.no_grad():
        expected = model(**x)
        net.remove()
        assert rel_err(expected, model(**x)) > 1e-2
    net.save(tmp_path / "kohya.safetensors")
    convert(tmp_path / "kohya.safetensors", tmp_path / "d.safetensors", "diffusers", ARCH, manager=manager)
    theirs = diffusers_model(base_state)
    with diffusers_warnings() as warnings:
        sd, metadata = Flux2Pipeline.lora_state_dict(str(tmp_path / "d.safetensors"), return_lora_metadata=True)
        theirs.load_lora_adapter(sd, prefix="transformer", metadata=metadata, adapter_name="kern")
    assert [r.getMessage() for r in warnings] == []
    assert all(layer.use_dora["kern"] for layer in _peft_layers(theirs)) and _peft_layers(theirs)
    with torch.no_grad():
        assert rel_err(run_diffusers(theirs, x), expected) < 1e-5


def test_diffusers_qwen_image_loads_kern_dora_as_kern_runs_it(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import QwenImagePipeline

    from tests.adapters.helpers import diffusers_warnings
    from tests.adapters.test_interop_qwen import qwen_inputs, qwen_plugin, tiny_qwen

    manager = build_manager(extra=[("tinyqwen", qwen_plugin())])
    model = tiny_qwen()
    opts = options(manager, "lora", 4, 2.0) | {"dora": True}
    net = manager.hook.make_network(network_type="lora", model=model, targets=TargetSpec(), options=opts)
    fill_dora(net, seed=7)
    with torch.no_grad():
        expected = model(**qwen_inputs())[0]
        net.remove()
        assert not torch.allclose(expected, model(**qwen_inputs())[0], atol=1e-3)
    net.save(tmp_path / "kohya.safetensors")
    convert(tmp_path / "kohya.safetensors", tmp_path / "d.safetensors", "diffusers", "tinyqwen", manager=manager)
    theirs = tiny_qwen()
    with diffusers_warnings() as warnings:
        sd, metadata = QwenImagePipeline.lora_state_dict(str(tmp_path / "d.safetensors"), return_lora_metadata=True)
        theirs.load_lora_adapter(sd, prefix="transformer", metadata=metadata, adapter_name="kern")
    assert [r.getMessage() for r in warnings] == []
    assert all(layer.use_dora["kern"] for layer in _peft_layers(theirs)) and _peft_layers(theirs)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**qwen_inputs())[0], expected, rtol=1e-5, atol=1e-5)


def _peft_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]
