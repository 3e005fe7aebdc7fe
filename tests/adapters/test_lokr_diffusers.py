"""diffusers (0.42+) loads a kern LoKr for FLUX.2 from the ComfyUI layout (``diffusion_model.<BFL path>.lokr_*``), as
it loads ai-toolkit's: ``Flux2LoraLoaderMixin.lora_state_dict`` maps BFL names onto its fused ``to_qkv`` projections
(``_convert_non_diffusers_flux2_lokr_to_diffusers``) and ``load_lora_adapter`` fuses the model's q/k/v first."""

from __future__ import annotations

import pytest
import torch
from kern.adapters.convert import convert
from kern.core.plugins import build_manager

from tests.adapters.test_comfyui_acceptance import options, save_random

pytest.importorskip("diffusers")
pytest.importorskip("peft")


@pytest.mark.parametrize("factor,rank", [(-1, 4), (4, 2)])
def test_diffusers_flux2_loads_kern_lokr_comfyui_layout_as_kern_runs_it(tmp_path, factor, rank):
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
    opts = options(manager, "lokr", rank, rank / 2) | {"factor": factor}
    net = manager.hook.make_network(network_type="lokr", model=model, targets=TARGETS, options=opts)
    save_random(net, tmp_path / "kohya.safetensors", seed=3, scale=0.2)
    with torch.no_grad():
        expected = model(**x)
        net.remove()
        assert rel_err(expected, model(**x)) > 1e-2  # the adapter does something
    convert(tmp_path / "kohya.safetensors", tmp_path / "comfy.safetensors", "comfyui", ARCH, manager=manager)
    theirs = diffusers_model(base_state)
    with diffusers_warnings() as warnings:
        sd, metadata = Flux2Pipeline.lora_state_dict(str(tmp_path / "comfy.safetensors"), return_lora_metadata=True)
        theirs.load_lora_adapter(sd, prefix="transformer", metadata=metadata, adapter_name="kern")
    assert [r.getMessage() for r in warnings] == []
    with torch.no_grad():
        assert rel_err(run_diffusers(theirs, x), expected) < 1e-5
