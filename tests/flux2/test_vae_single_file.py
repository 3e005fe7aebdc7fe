"""FLUX.2 VAE single files: ComfyUI's ``flux2-vae.safetensors`` loads as BFL's ``ae.safetensors`` does.

ComfyUI's file (Comfy-Org/flux2-dev ``split_files/vae/``) is diffusers-named: top-level ``quant_conv`` /
``post_quant_conv``, ``encoder.down_blocks.N.resnets.M.*``, ``encoder.conv_norm_out`` (the keys musubi-tuner reports
as unexpected for it, musubi #873 / #883), with ``bn.*``. Built here from a tiny ``AutoencoderKLFlux2``'s own state
dict, it must load into the same weights as the BFL-layout file converted from it, bare or with a full checkpoint's
``vae.`` prefix.
"""

from __future__ import annotations

import pytest
import torch
from kern.core.io import save_file
from kern_flux2.loader import load_vae
from kern_flux2.vae_keys import diffusers_to_bfl_vae

pytest.importorskip("diffusers")
from tests.flux2.test_vae import tiny_diffusers_vae  # noqa: E402


def test_comfy_flux2_vae_file_loads_as_bfl_ae(tmp_path):
    ref = tiny_diffusers_vae()
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "quant_conv.weight" in sd and "encoder.down_blocks.0.resnets.0.conv1.weight" in sd
    assert "encoder.quant_conv.weight" not in sd  # what BFL's ae has and this file lacks (musubi #883)
    save_file(sd, tmp_path / "flux2-vae.safetensors")
    save_file({f"vae.{k}": v for k, v in sd.items()}, tmp_path / "checkpoint.safetensors")
    save_file(diffusers_to_bfl_vae(sd), tmp_path / "ae.safetensors")
    bfl = load_vae(tmp_path / "ae.safetensors", torch.float32, "cpu")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for name in ("flux2-vae.safetensors", "checkpoint.safetensors"):
        vae = load_vae(tmp_path / name, torch.float32, "cpu")
        a, b = vae.state_dict(), bfl.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        with torch.no_grad():
            assert torch.equal(vae.encode(x), bfl.encode(x))
