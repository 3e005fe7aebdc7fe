"""diffusers interop on a tiny FLUX.2: kern's LoRA on kern's BFL-named FLUX.2, saved as kohya and converted to
ComfyUI and diffusers layouts, loads into diffusers' ``Flux2Transformer2DModel`` (holding the same base weights,
converted with ``bfl_to_diffusers``) with no leftover or missing keys and gives kern's outputs. kern reads every
layout back (diffusers names fused back into BFL ``qkv``), and a LoHa round-trips through the ComfyUI layout.
"""

from __future__ import annotations

import types

import kern
import pytest
import torch
from kern.adapters.convert import convert
from kern.adapters.weights import apply_adapters
from kern.core.plugins import build_manager
from kern.records import TargetSpec
from kern_flux2 import geometry, keys
from kern_flux2.adapter_map import flux2_module_map
from kern_flux2.params import tiny_params
from kern_flux2.transformer import Flux2Transformer

from tests.adapters.helpers import diffusers_warnings
from tests.helpers import flux2_diffusers_model, init_flux2_random

PARAMS = tiny_params(False, depth=2, depth_single=2)
ARCH = "tinyflux2"
# Everything diffusers' kohya FLUX.2 converter knows: blocks, img_in, txt_in, time_in, final_layer.linear.
TARGETS = TargetSpec(
    targets=(r"(double|single)_blocks\..*", "img_in", "txt_in", r"time_in\..*", r"final_layer\.linear")
)


def kern_model(seed=0):
    return init_flux2_random(Flux2Transformer(PARAMS), seed).eval()


def diffusers_model(base_state):
    model = flux2_diffusers_model(PARAMS)
    model.load_state_dict(keys.bfl_to_diffusers(base_state), strict=True)
    return model.eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    img, img_ids, _ = geometry.prepare_tokens(torch.randn(2, PARAMS.in_channels, 3, 4, generator=g))
    txt = torch.randn(2, 6, PARAMS.context_in_dim, generator=g)
    return dict(img=img, img_ids=img_ids, txt=txt, txt_ids=geometry.text_ids(6), timesteps=torch.tensor([0.3, 0.8]))


def run_diffusers(model, x):
    return model(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        timestep=x["timesteps"],
        img_ids=x["img_ids"],
        txt_ids=x["txt_ids"],
        guidance=None,
        return_dict=False,
    )[0]


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def arch_plugin():
    mod = types.ModuleType("tinyflux2_plugin")

    @kern.hookimpl
    def register_architectures(register):
        register(kern.Architecture(name=ARCH, variants=(kern.Variant(name="tiny"),)))

    @kern.hookimpl
    def adapter_module_map(arch, variant, layout):
        return flux2_module_map(PARAMS.depth, PARAMS.depth_single, PARAMS.hidden_size) if arch == ARCH else None

    mod.register_architectures, mod.adapter_module_map = register_architectures, adapter_module_map
    return mod


def diffusers_paths(native_paths):
    """The diffusers modules a set of BFL modules becomes (qkv → three)."""
    table = dict(flux2_module_map(PARAMS.depth, PARAMS.depth_single, PARAMS.hidden_size))
    return {o for p in native_paths for o, _ in table[p]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux2")
    manager = build_manager(extra=[(ARCH, arch_plugin())])
    model = kern_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = inputs()
    with torch.no_grad():
        base_out = model(**x)
        assert rel_err(run_diffusers(diffusers_model(base_state), x), base_out) < 1e-5  # same base model

    options = {o.name: o.default for o in manager.resolve_network("lora").options} | {"rank": 4, "alpha": 2.0}
    net = manager.hook.make_network(network_type="lora", model=model, targets=TARGETS, options=options)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        expected = model(**x)
    net.remove()
    assert rel_err(expected, base_out) > 1e-2
    files = {"kohya": net.save(tmp / "kohya.safetensors")}
    for layout in ("comfyui", "diffusers"):
        files[layout] = tmp / f"{layout}.safetensors"
        convert(files["kohya"], files[layout], layout, ARCH, manager=manager)
    return dict(
        manager=manager,
        base_state=base_state,
        x=x,
        expected=expected,
        files=files,
        paths={m.path for m in net.adapters.values()},
        tmp=tmp,
    )


@pytest.mark.parametrize("layout", ["kohya", "comfyui", "diffusers"])
def test_diffusers_flux2_loads_kern_lora(trained, layout):
    from diffusers import Flux2Pipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = diffusers_model(trained["base_state"])
    with diffusers_warnings() as warnings:
        sd, metadata = Flux2Pipeline.lora_state_dict(str(trained["files"][layout]), return_lora_metadata=True)
        model.load_lora_adapter(sd, prefix="transformer", metadata=metadata, adapter_name="kern")
    assert [r.getMessage() for r in warnings] == []
    adapted = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert adapted == diffusers_paths(trained["paths"])
    with torch.no_grad():
        got = run_diffusers(model, trained["x"])
    assert rel_err(got, trained["expected"]) < 1e-5


@pytest.mark.parametrize("layout", ["kohya", "comfyui", "diffusers"])
def test_kern_flux2_reads_every_layout(trained, layout):
    model = kern_model()
    (net,) = apply_adapters(model, [(trained["files"][layout], 1.0)], arch=ARCH, manager=trained["manager"])
    assert {m.path for m in net.adapters.values()} == trained["paths"]
    with torch.no_grad():
        assert rel_err(model(**trained["x"]), trained["expected"]) < 1e-5


def test_kern_flux2_loha_through_comfyui_layout(trained):
    manager, tmp, x = trained["manager"], trained["tmp"], trained["x"]
    model = kern_model()
    options = {o.name: o.default for o in manager.resolve_network("loha").options} | {"rank": 2, "alpha": 1.0}
    net = manager.hook.make_network(network_type="loha", model=model, targets=TARGETS, options=options)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        expected = model(**x)
    net.remove()
    net.save(tmp / "loha.safetensors")
    convert(tmp / "loha.safetensors", tmp / "loha_comfy.safetensors", "comfyui", ARCH, manager=manager)
    (loaded,) = apply_adapters(model, [(tmp / "loha_comfy.safetensors", 1.0)], manager=manager)
    assert loaded.network_type == "loha"
    with torch.no_grad():
        assert rel_err(model(**x), expected) < 1e-5
