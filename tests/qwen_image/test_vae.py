"""Qwen-Image VAE: kern's ``QwenImageVAE`` equals diffusers' ``AutoencoderKLQwenImage`` plus the Qwen-Image
pipelines' latent steps (posterior mode, per-channel mean/std), in fp32, for RGB and RGBA (Layered) configs.

A tiny random diffusers VAE (widths 8..32, the real 8x downscale and 16 latent channels) loads into a meta-built
``QwenImageVAE`` with ``assign=True``; the references are the pipelines' own code paths on one-frame inputs.
"""

from __future__ import annotations

import functools
import types

import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    QwenImageEditPipeline,
    QwenImageLayeredPipeline,
)
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from kern.errors import ModelFileError
from kern.models.tiling import ramp
from kern.models.tiny import init_random_
from kern_qwen_image.vae import (
    QWEN_IMAGE_LAYERED_VAE,
    QWEN_IMAGE_VAE,
    QwenImageVAE,
    QwenImageVAEParams,
    tiny_vae_params,
)
from kern_qwen_image.vae_keys import (
    comfy_to_diffusers_vae,
    diffusers_to_comfy_vae,
    is_comfy_vae,
    vae_params_from_state_dict,
)

TOL = 1e-5
REAL_PARAMETERS = 126_892_531  # AutoencoderKLQwenImage() with its default (= Qwen-Image) config


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_vae(p: QwenImageVAEParams) -> AutoencoderKLQwenImage:
    return AutoencoderKLQwenImage(
        base_dim=p.base_dim,
        z_dim=p.z_dim,
        dim_mult=list(p.dim_mult),
        num_res_blocks=p.num_res_blocks,
        attn_scales=list(p.attn_scales),
        temperal_downsample=list(p.temperal_downsample),
        dropout=p.dropout,
        input_channels=p.input_channels,
        latents_mean=list(p.latents_mean),
        latents_std=list(p.latents_std),
    )


def tiny_diffusers_vae(p: QwenImageVAEParams, seed: int = 0) -> AutoencoderKLQwenImage:
    def draw(name, t):  # RMS-norm gains away from the identity, biases off zero, other weights as initialised
        if name.endswith("gamma"):
            return 1.0, 0.2
        return (0.0, 0.1) if name.endswith("bias") else None

    torch.manual_seed(seed)
    vae = init_random_(diffusers_vae(p), seed, draw, sorted_names=False)
    with torch.no_grad():
        # Outputs past [-1, 1] in places, so the decoder's clamp is exercised (RMS norms make the latent scale moot).
        vae.decoder.conv_out.weight.mul_(3.0)  # ~2-3 % of pixels clamped
    return vae.eval()


CONFIGS = {"rgb": tiny_vae_params(), "rgba": tiny_vae_params(input_channels=4, dim_mult=(1, 2, 2, 4))}


@functools.cache
def load_pair(kind: str) -> tuple[AutoencoderKLQwenImage, QwenImageVAE, str]:
    ref = tiny_diffusers_vae(CONFIGS[kind])
    sd = ref.state_dict()
    with torch.device("meta"):
        ours = QwenImageVAE(vae_params_from_state_dict(sd))
    ours.load_state_dict(sd, assign=True, strict=True)
    return ref, ours.eval(), kind


@pytest.fixture(params=list(CONFIGS))
def pair(request) -> tuple[AutoencoderKLQwenImage, QwenImageVAE, str]:
    return load_pair(request.param)


def pipeline_decode(vae: AutoencoderKLQwenImage, z: torch.Tensor) -> torch.Tensor:
    # QwenImagePipeline.__call__ after unpacking (B, 16, 1, h, w); the Layered pipeline does the same per frame.
    c = vae.config
    latents = z.unsqueeze(2).to(vae.dtype)
    latents_mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    latents_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    latents = latents / latents_std + latents_mean
    return vae.decode(latents, return_dict=False)[0][:, :, 0]


@torch.no_grad()
def test_encode_matches_diffusers_pipeline(pair):
    ref, ours, kind = pair
    c = ours.params.input_channels
    x = torch.rand(2, c, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # The pipelines' own method (posterior mode, then (z - mean) / std) on a stand-in self with what it reads.
    pipe = QwenImageLayeredPipeline if kind == "rgba" else QwenImageEditPipeline
    host = types.SimpleNamespace(vae=ref, latent_channels=ref.config.z_dim)
    expected = pipe._encode_vae_image(host, x.unsqueeze(2), generator=None)[:, :, 0]
    got = ours.encode(x)
    assert got.shape == (2, 16, 4, 6)
    assert rel_err(got, expected) <= TOL


@torch.no_grad()
def test_decode_matches_diffusers_pipeline(pair):
    ref, ours, _ = pair
    z = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(2))
    expected = pipeline_decode(ref, z)
    got = ours.decode(z)
    assert got.shape == (2, ours.params.input_channels, 32, 48)
    assert rel_err(got, expected) <= TOL
    assert expected.abs().eq(1).any() and got.abs().max() <= 1  # both clamp


def test_encode_rejects_bad_inputs(pair):
    _, ours, _ = pair
    c = ours.params.input_channels
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(torch.zeros(1, c, 36, 32))
    with pytest.raises(ValueError, match=f"want \\(B, {c}, H, W\\)"):
        ours.encode(torch.zeros(1, 7 - c, 32, 32))
    with pytest.raises(ValueError, match="want"):
        ours.encode(torch.zeros(1, c, 1, 32, 32))  # one-frame video layout: squeeze the frame axis first


@pytest.mark.parametrize("params", [QWEN_IMAGE_VAE, QWEN_IMAGE_LAYERED_VAE], ids=["qwen_image", "layered"])
def test_real_config_on_meta_matches_diffusers(params):
    with torch.device("meta"):
        ours = QwenImageVAE(params)
        ref = diffusers_vae(params)
    k_sd, d_sd = ours.state_dict(), ref.state_dict()
    assert k_sd.keys() == d_sd.keys() and all(k_sd[k].shape == d_sd[k].shape for k in k_sd)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    assert n == REAL_PARAMETERS + 2 * 96 * 27 * (params.input_channels - 3) + (params.input_channels - 3)
    assert k_sd["decoder.conv_in.weight"].shape == (384, 16, 3, 3, 3)  # 3-D shapes kept: checkpoints load as is
    assert k_sd["encoder.down_blocks.5.time_conv.weight"].shape == (192, 192, 3, 1, 1)
    assert k_sd["decoder.up_blocks.0.upsamplers.0.time_conv.weight"].shape == (768, 384, 3, 1, 1)
    assert ref.config.latents_mean == list(params.latents_mean) and ref.config.latents_std == list(params.latents_std)


def test_wan_layout_round_trip_and_diffusers_converter():
    with torch.device("meta"):
        sd = QwenImageVAE(QWEN_IMAGE_VAE).state_dict()
    wan = diffusers_to_comfy_vae(sd)
    assert is_comfy_vae(wan) and not is_comfy_vae(sd)
    # The reference's table: flat decoder.upsamples, upsamplers at 3, 7, 11 (time_conv at 3 and 7 only).
    assert {"conv1.bias", "conv2.weight", "encoder.conv1.weight", "decoder.head.2.weight"} <= wan.keys()
    assert {"decoder.upsamples.4.shortcut.weight", "decoder.middle.1.to_qkv.weight"} <= wan.keys()
    assert {"decoder.upsamples.7.time_conv.weight", "decoder.upsamples.11.resample.1.weight"} <= wan.keys()
    assert "decoder.upsamples.11.time_conv.weight" not in wan and "decoder.upsamples.15.residual.0.gamma" not in wan
    assert "encoder.downsamples.2.resample.1.weight" in wan and "encoder.downsamples.9.residual.6.weight" in wan
    # diffusers' own single-file converter (hard-wired to this layout) agrees with ours, key for key.
    assert convert_wan_vae_to_diffusers(dict(wan)).keys() == sd.keys()
    back = comfy_to_diffusers_vae(wan)
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)


def test_params_inferred_from_state_dict(pair):
    ref, ours, kind = pair
    assert vae_params_from_state_dict(ref.state_dict()) == CONFIGS[kind]
    tiny_wan = diffusers_to_comfy_vae(ours.state_dict())
    assert vae_params_from_state_dict(tiny_wan) == CONFIGS[kind]
    assert comfy_to_diffusers_vae(tiny_wan).keys() == ours.state_dict().keys()  # other level counts convert too
    for params in (QWEN_IMAGE_VAE, QWEN_IMAGE_LAYERED_VAE):
        with torch.device("meta"):
            real = QwenImageVAE(params).state_dict()
        # From shapes alone, as a loader reads them from a safetensors header; either naming.
        assert vae_params_from_state_dict({k: tuple(v.shape) for k, v in real.items()}) == params
        assert vae_params_from_state_dict(diffusers_to_comfy_vae(real)) == params
    with pytest.raises(ModelFileError, match="not a Qwen-Image"):
        vae_params_from_state_dict({"encoder.conv_in.weight": (96, 3, 3, 3, 3)})


@torch.no_grad()
def test_tiled_decode_is_close_to_untiled():
    _, ours, _ = load_pair("rgb")  # tiling does not depend on the channel count; one config keeps this quick
    z = torch.randn(1, 16, 20, 32, generator=torch.Generator().manual_seed(3))
    full = ours.decode(z, tiled=False)
    # A tile covering everything is exactly the untiled decode.
    assert torch.equal(ours.decode_tiled(z, tile=32, overlap=4), full)
    # 2 x 3 tiles of 16 cells overlapping by 6 (the last ones flush with the edge, overlapping more).
    tiled = ours.decode_tiled(z, tile=16, overlap=6)
    assert tiled.shape == full.shape and tiled.abs().max() <= 1
    # Not exact: each tile's mid-block attention sees only that tile, and its convs see zero padding at tile
    # borders (the RMS norms are per pixel, so they add nothing). This tiny random model is a harsh case (128 px
    # tiles, random attention weights): measured max / mean error 0.26 / 0.018 of the image's max |value|, against
    # 0.51 / 0.028 with 12-cell tiles and 0.22 / 0.014 with 20-cell ones, so the gap shrinks as tiles grow. The
    # real model's default tiles are 128 cells (1024 px).
    assert rel_err(tiled, full) < 0.35
    assert ((tiled - full).abs().mean() / full.abs().max()).item() < 0.025


@torch.no_grad()
def test_tiled_decode_blends_to_the_untiled_result_for_a_local_decoder(monkeypatch):
    # With a decoder that is pointwise per latent cell, tiles agree wherever they overlap, so a tile put in the
    # wrong place or a pixel left uncovered would show; the normalised blend must reproduce it exactly.
    vae = QwenImageVAE(tiny_vae_params())
    s = vae.params.downscale
    monkeypatch.setattr(vae, "decode", lambda z, tiled=None: torch.nn.functional.interpolate(z[:, :3], scale_factor=s))
    z = torch.randn(2, 16, 21, 38)
    expected = torch.nn.functional.interpolate(z[:, :3], scale_factor=s)
    for tile, overlap in ((8, 3), (12, 4), (16, 0), (38, 37)):
        assert torch.allclose(vae.decode_tiled(z, tile=tile, overlap=overlap), expected, rtol=0, atol=1e-6)
    rise, fall = ramp(64, 16, rise=True, fall=False), ramp(64, 16, rise=False, fall=True)
    assert torch.allclose(fall[-16:] + rise[:16], torch.ones(16))
    assert rise[0] < 0.05 and fall[-1] < 0.05 and rise[16:].eq(1).all()


def test_decode_tiles_automatically_only_when_large(pair, monkeypatch):
    _, ours, _ = pair
    calls = []
    monkeypatch.setattr(ours, "decode_tiled", lambda z, **kw: calls.append(z.shape) or z)
    ours.decode(torch.zeros(1, 16, 193, 192))
    assert calls == [(1, 16, 193, 192)]
    ours.decode(torch.zeros(1, 16, 2, 2))
    assert len(calls) == 1


def test_params_validation():
    with pytest.raises(ValueError, match="attn_scales"):
        QwenImageVAEParams(attn_scales=(1.0,))
    with pytest.raises(ValueError, match="temperal_downsample"):
        QwenImageVAEParams(temperal_downsample=(True,))
    with pytest.raises(ValueError, match="z_dim"):
        QwenImageVAEParams(z_dim=8)
    assert QWEN_IMAGE_VAE.downscale == 8 and QWEN_IMAGE_LAYERED_VAE.input_channels == 4
