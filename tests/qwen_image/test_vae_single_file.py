"""Qwen-Image VAE single files: ComfyUI's ``qwen_image_vae.safetensors`` (the Wan 2.1 layout: ``conv1``/``conv2``,
``encoder.downsamples.N.residual.{0,2,3,6}``, ``…middle.{0,1,2}``, ``decoder.upsamples.N``, ``head.{0,2}``, norms as
``gamma``) loads into the same weights as the diffusers-named file, bare or with a full checkpoint's ``vae.`` prefix."""

from __future__ import annotations

import torch
from kern.core.io import save_file
from kern_qwen_image.loader import load_vae
from kern_qwen_image.vae_keys import diffusers_to_comfy_vae
from safetensors.torch import load_file


def test_wan_layout_file_loads_as_the_diffusers_one(tiny_qwen, tmp_path):
    diffusers_named = tiny_qwen["vae"]
    wan = diffusers_to_comfy_vae(load_file(diffusers_named))
    assert "decoder.middle.0.residual.0.gamma" in wan and "conv2.weight" in wan  # what ComfyUI detects it by
    save_file(wan, tmp_path / "qwen_image_vae.safetensors")
    save_file({f"vae.{k}": v for k, v in wan.items()}, tmp_path / "checkpoint.safetensors")
    ref = load_vae(diffusers_named, torch.float32, "cpu")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for name in ("qwen_image_vae.safetensors", "checkpoint.safetensors"):
        vae = load_vae(tmp_path / name, torch.float32, "cpu")
        a, b = vae.state_dict(), ref.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        with torch.no_grad():
            assert torch.equal(vae.encode(x), ref.encode(x))
