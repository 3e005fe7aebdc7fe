"""diffusers interop on a tiny Qwen-Image transformer: a LoRA trained-shape by kern loads in diffusers in every
layout diffusers should accept (kohya with alpha, ComfyUI with alpha folded, diffusers), with no leftover or
missing keys, and gives the same outputs as kern's own application.

Qwen-Image's native module names are the diffusers names, so kern's network wraps ``QwenImageTransformer2DModel``
directly.
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
from kern_qwen_image.adapter_map import qwen_module_map, qwen_module_paths

from tests.adapters.helpers import diffusers_warnings

pytest.importorskip("diffusers")
pytest.importorskip("peft")

LAYERS = 2


def tiny_qwen(seed=0):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=LAYERS,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def qwen_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    b, h, w, t = 2, 4, 4, 5
    return dict(
        hidden_states=torch.randn(b, h * w, 16, generator=g),
        encoder_hidden_states=torch.randn(b, t, 12, generator=g),
        encoder_hidden_states_mask=torch.ones(b, t, dtype=torch.long),
        timestep=torch.tensor([0.5, 0.3]),
        img_shapes=[(1, h, w)] * b,
        return_dict=False,
    )


def qwen_plugin():
    mod = types.ModuleType("tinyqwen_plugin")

    @kern.hookimpl
    def register_architectures(register):
        register(kern.Architecture(name="tinyqwen", variants=(kern.Variant(name="t2i"),)))

    @kern.hookimpl
    def adapter_module_map(arch, variant, layout):
        return qwen_module_map(LAYERS) if arch == "tinyqwen" else None

    mod.register_architectures, mod.adapter_module_map = register_architectures, adapter_module_map
    return mod


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A kern LoRA (rank 4, α 2, random non-zero factors) on every Linear of a tiny Qwen-Image, saved in 3 layouts."""
    tmp = tmp_path_factory.mktemp("qwen")
    manager = build_manager(extra=[("tinyqwen", qwen_plugin())])
    model = tiny_qwen()
    options = {o.name: o.default for o in manager.resolve_network("lora").options} | {"rank": 4, "alpha": 2.0}
    net = manager.hook.make_network(network_type="lora", model=model, targets=TargetSpec(), options=options)
    assert {m.path for m in net.adapters.values()} == set(qwen_module_paths(LAYERS))  # the map lists every Linear
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        expected = model(**qwen_inputs())[0]
        net.remove()
        base = model(**qwen_inputs())[0]
    assert not torch.allclose(expected, base, atol=1e-3)
    files = {"kohya": net.save(tmp / "kohya.safetensors")}
    for layout in ("comfyui", "diffusers"):
        files[layout] = tmp / f"{layout}.safetensors"
        convert(files["kohya"], files[layout], layout, "tinyqwen", manager=manager)
    return {"files": files, "expected": expected, "paths": {m.path for m in net.adapters.values()}, "manager": manager}


@pytest.mark.parametrize("layout", ["kohya", "comfyui", "diffusers"])
def test_diffusers_loads_kern_lora(trained, layout):
    from diffusers import QwenImagePipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = tiny_qwen()
    with diffusers_warnings() as warnings:
        sd, metadata = QwenImagePipeline.lora_state_dict(str(trained["files"][layout]), return_lora_metadata=True)
        model.load_lora_adapter(sd, prefix="transformer", metadata=metadata, adapter_name="kern")
    assert [r.getMessage() for r in warnings] == []
    adapted = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert adapted == trained["paths"]  # nothing missing, nothing extra
    with torch.no_grad():
        got = model(**qwen_inputs())[0]
    assert torch.allclose(got, trained["expected"], atol=1e-5), float((got - trained["expected"]).abs().max())


@pytest.mark.parametrize("layout", ["kohya", "comfyui", "diffusers"])
def test_kern_loads_every_layout_back(trained, layout):
    model = tiny_qwen()
    (net,) = apply_adapters(model, [(trained["files"][layout], 1.0)], manager=trained["manager"])
    assert {m.path for m in net.adapters.values()} == trained["paths"]
    with torch.no_grad():
        got = model(**qwen_inputs())[0]
    assert torch.allclose(got, trained["expected"], atol=1e-5)
