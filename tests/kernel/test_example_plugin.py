"""The third-party example plugin, installed with pip like any other, is found and used by the kernel."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kern import plugins
from tests.conftest import REPO, plugins_json


@pytest.fixture(scope="module")
def toy_site(tmp_path_factory):
    """pip-install examples/plugins/kern-toy into a private folder (the test venv stays untouched)."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-q", "--target", str(target), str(REPO / "examples" / "plugins" / "kern-toy")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert list(target.glob("kern_toy-0.1.0.dist-info/entry_points.txt")), "pip did not install the entry point"
    return target


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
    model = hook.load_model(arch="toy", variant=None, part="transformer", path=None, dtype=torch.float32, device="cpu", options={})
    assert model.variant == "base"
    # Other architectures' hooks decline: the first answer comes from the toy plugin.
    text = hook.encode_text(arch="toy", variant="base", encoder=None, prompts=["a red cube", "a blue ball"], options={})
    assert text["ctx"].shape == (2, 8, 16)
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    latents = hook.encode_latents(arch="toy", variant="base", vae=None, images=images)
    assert latents.shape == (2, 4, 4, 6)
    v = hook.predict_velocity(arch="toy", variant="base", model=model, latents=latents, timesteps=torch.rand(2),
                              text=text, references=None, options={})
    assert v.shape == latents.shape
    sigmas = hook.generation_schedule(arch="toy", variant="base", steps=8, latent_shape=(4, 4, 6), options={})
    assert sigmas[0] == 1 and sigmas[-1] == 0 and len(sigmas) == 9
