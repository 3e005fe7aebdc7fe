"""The third-party example plugin, installed with pip like any other, is found and used by the kernel."""

from __future__ import annotations

import torch
from kern.core import plugins

from tests.conftest import plugins_json


def test_kern_plugins_lists_the_installed_example(toy_site):
    data = plugins_json(pythonpath=[toy_site])
    toy = {p["name"]: p for p in data["plugins"]}["toy"]
    assert toy["distribution"] == "kern-toy" and toy["version"] == "0.1.0" and toy["status"] == "loaded"
    assert toy["architectures"] == ["toy"]
    assert {"load_model", "encode_text", "encode_latents", "decode_latents", "predict_velocity"} <= set(toy["hooks"])
    assert data["architectures"]["toy"]["aliases"] == ["toy-dit"]


def test_the_kernel_flows_drive_the_example(toy_site, monkeypatch):
    monkeypatch.syspath_prepend(str(toy_site))
    manager = plugins.build_manager()
    arch, variant = manager.resolve_arch("toy-dit")
    assert arch.name == "toy" and variant is None and arch.variant(variant).name == "base"
    hook = manager.hook
    model = hook.load_model(
        arch="toy", variant=None, part="transformer", path=None, dtype=torch.float32, device="cpu", options={}
    )
    assert model.variant == "base"
    # Other architectures' hooks decline: the first answer comes from the toy plugin.
    text = hook.encode_text(arch="toy", variant="base", encoder=None, prompts=["a red cube", "a blue ball"], options={})
    assert text["ctx"].shape == (2, 8, 16)
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    latents = hook.encode_latents(arch="toy", variant="base", vae=None, images=images)
    assert latents.shape == (2, 4, 4, 6)
    v = hook.predict_velocity(
        arch="toy",
        variant="base",
        model=model,
        latents=latents,
        timesteps=torch.rand(2),
        text=text,
        references=None,
        options={},
    )
    assert v.shape == latents.shape
    sigmas = hook.generation_schedule(arch="toy", variant="base", steps=8, latent_shape=(4, 4, 6), options={})
    assert sigmas[0] == 1 and sigmas[-1] == 0 and len(sigmas) == 9
