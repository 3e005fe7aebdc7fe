"""FLUX.2 VAE: kern's BFL-layout ``AutoEncoder`` equals diffusers' ``AutoencoderKLFlux2`` plus the FLUX.2 pipeline's
latent steps (posterior mean, 2x2 patchify, BatchNorm running statistics), in fp32.

A tiny random diffusers VAE (2 levels, width 32/64) is converted to BFL naming with ``diffusers_to_bfl_vae`` and
loaded into a meta-built ``AutoEncoder`` with ``assign=True``; the references are the pipeline's own code paths.
"""

from __future__ import annotations

import types

import pytest
import torch
from kern.models.tiling import ramp
from kern.models.tiny import init_random_

pytest.importorskip("diffusers")
from diffusers import AutoencoderKLFlux2, Flux2Pipeline  # noqa: E402
from kern.errors import ModelFileError  # noqa: E402
from kern_flux2.vae import FLUX2_AE, AutoEncoder, AutoEncoderParams, tiny_ae_params  # noqa: E402
from kern_flux2.vae_keys import (  # noqa: E402
    bfl_to_diffusers_vae,
    diffusers_to_bfl_vae,
    vae_params_from_state_dict,
)

TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny_diffusers_vae() -> AutoencoderKLFlux2:
    def draw(name, t):  # GroupNorm affine away from the identity, biases off zero, other weights as initialised
        if "norm" in name and name.endswith("weight"):
            return 1.0, 0.2
        return (0.0, 0.1) if name.endswith("bias") else None

    p = tiny_ae_params()
    levels = len(p.ch_mult)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=p.encoder_widths,
        layers_per_block=p.num_res_blocks,
        latent_channels=p.z_channels,
        norm_num_groups=32,
        patch_size=(2, 2),
        batch_norm_eps=p.bn_eps,
    )
    g = torch.Generator().manual_seed(0)
    init_random_(vae, g, draw, sorted_names=False)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.running_mean.shape, generator=g))
        vae.bn.running_var.copy_(0.2 + torch.rand(vae.bn.running_var.shape, generator=g))
        vae.bn.num_batches_tracked.fill_(1000)
    return vae.eval()


@pytest.fixture(scope="module")
def pair() -> tuple[AutoencoderKLFlux2, AutoEncoder]:
    torch.manual_seed(0)
    ref = tiny_diffusers_vae()
    sd = diffusers_to_bfl_vae(ref.state_dict())
    assert "bn.num_batches_tracked" in sd  # a strict load must tolerate BatchNorm's step counter
    with torch.device("meta"):
        ours = AutoEncoder(vae_params_from_state_dict(sd))
    ours.load_state_dict(sd, assign=True, strict=True)
    return ref, ours.eval()


def bn_stats(vae: AutoencoderKLFlux2) -> tuple[torch.Tensor, torch.Tensor]:
    # As Flux2Pipeline before vae.decode.
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


@torch.no_grad()
def test_encode_matches_diffusers_pipeline(pair):
    ref, ours = pair
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    # The pipeline's own method, on a stand-in self that has what it reads: the VAE and the patchify helper.
    host = types.SimpleNamespace(vae=ref, _patchify_latents=Flux2Pipeline._patchify_latents)
    expected = Flux2Pipeline._encode_vae_image(host, x, generator=None)
    got = ours.encode(x)
    assert got.shape == (2, tiny_ae_params().latent_channels, 8, 12)
    assert rel_err(got, expected) <= TOL


@torch.no_grad()
def test_decode_matches_diffusers_pipeline(pair):
    ref, ours = pair
    z = torch.randn(2, tiny_ae_params().latent_channels, 8, 12)
    mean, std = bn_stats(ref)
    expected = ref.decode(Flux2Pipeline._unpatchify_latents(z * std + mean), return_dict=False)[0]
    got = ours.decode(z)
    assert got.shape == (2, 3, 32, 48)
    assert rel_err(got, expected) <= TOL


@torch.no_grad()
def test_latent_norm_stays_in_eval_semantics_under_train(pair):
    _, ours = pair
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    before = ours.bn.running_mean.clone()
    ours.train()
    try:
        assert torch.equal(ours.encode(x), ours.eval().encode(x))
    finally:
        ours.eval()
    assert torch.equal(ours.bn.running_mean, before)


def test_encode_rejects_sizes_off_the_grid(pair):
    with pytest.raises(ValueError, match="multiples of 4"):
        pair[1].encode(torch.zeros(1, 3, 30, 32))


def test_key_round_trip_both_ways(pair):
    ref, ours = pair
    d_sd, k_sd = ref.state_dict(), ours.state_dict()
    back = bfl_to_diffusers_vae(diffusers_to_bfl_vae(d_sd))
    assert back.keys() == d_sd.keys() and all(torch.equal(back[k], d_sd[k]) for k in d_sd)
    there = diffusers_to_bfl_vae(bfl_to_diffusers_vae(k_sd))
    assert there.keys() == k_sd.keys() and all(torch.equal(there[k], k_sd[k]) for k in k_sd)
    # kern's keys are exactly the converted diffusers keys, minus BatchNorm's step counter.
    assert set(diffusers_to_bfl_vae(d_sd)) - {"bn.num_batches_tracked"} == set(k_sd)


def test_real_layout_matches_diffusers_default_config():
    # 4 levels: the decoder order flip must follow the level count, not a hard-coded one.
    with torch.device("meta"):
        ours = AutoEncoder(FLUX2_AE)
        ref = AutoencoderKLFlux2()
    d_sd, k_sd = ref.state_dict(), ours.state_dict()
    converted = bfl_to_diffusers_vae(k_sd)
    assert set(converted) == set(d_sd) - {"bn.num_batches_tracked"}
    assert all(converted[k].shape == d_sd[k].shape for k in converted)
    assert k_sd["decoder.up.0.block.0.conv1.weight"].shape == (128, 256, 3, 3)  # BFL: up.0 is full resolution
    assert "decoder.up.3.upsample.conv.weight" in k_sd and "decoder.up.0.upsample.conv.weight" not in k_sd


def test_params_inferred_from_state_dict(pair):
    ref, _ = pair
    assert vae_params_from_state_dict(diffusers_to_bfl_vae(ref.state_dict())) == tiny_ae_params()
    assert vae_params_from_state_dict(ref.state_dict()) == tiny_ae_params()  # diffusers naming too
    with torch.device("meta"):
        real = AutoEncoder(FLUX2_AE).state_dict()
    assert vae_params_from_state_dict(real) == FLUX2_AE
    # From shapes alone, as a loader reads them from a safetensors header.
    assert vae_params_from_state_dict({k: tuple(v.shape) for k, v in real.items()}) == FLUX2_AE
    small = AutoEncoderParams(decoder_channels=(96, 192, 384, 384))
    with torch.device("meta"):
        assert vae_params_from_state_dict(AutoEncoder(small).state_dict()) == small
    no_bn = {k: v for k, v in real.items() if not k.startswith("bn.")}
    with pytest.raises(ModelFileError, match="FLUX.1"):
        vae_params_from_state_dict(no_bn)


@torch.no_grad()
def test_tiled_decode_is_close_to_untiled(pair):
    _, ours = pair
    z = torch.randn(1, tiny_ae_params().latent_channels, 24, 40, generator=torch.Generator().manual_seed(1))
    full = ours.decode(z, tiled=False)
    # A tile covering everything is exactly the untiled decode.
    assert torch.equal(ours.decode_tiled(z, tile=40, overlap=4), full)
    # 3 x 5 tiles of 12 cells overlapping by 4 (the last ones flush with the edge, overlapping more).
    tiled = ours.decode_tiled(z, tile=12, overlap=4)
    assert tiled.shape == full.shape
    # Not exact, and the gap is spread over whole tiles rather than concentrated at seams: each tile has its
    # own GroupNorm statistics and its own mid-block attention context (plus zero-padded borders). This tiny
    # random model is a harsh case (32 groups of 32 channels = per-channel statistics, 48 px tiles): measured
    # max error 0.19 and mean error 0.023 of the image's max |value|. Larger tiles shrink it (20/8: 0.07, 0.009).
    assert rel_err(tiled, full) < 0.25
    assert ((tiled - full).abs().mean() / full.abs().max()).item() < 0.04


@torch.no_grad()
def test_tiled_decode_blends_to_the_untiled_result_for_a_local_decoder(monkeypatch):
    # With a decoder that is pointwise per latent cell, tiles agree wherever they overlap, so a tile put in the
    # wrong place or a pixel left uncovered would show; the normalised blend must reproduce it exactly.
    ae = AutoEncoder(tiny_ae_params())
    s = ae.params.downscale
    monkeypatch.setattr(ae, "decode", lambda z, tiled=None: torch.nn.functional.interpolate(z[:, :3], scale_factor=s))
    z = torch.randn(2, ae.params.latent_channels, 21, 38)
    expected = torch.nn.functional.interpolate(z[:, :3], scale_factor=s)
    for tile, overlap in ((8, 3), (12, 4), (16, 0), (38, 37)):
        assert torch.allclose(ae.decode_tiled(z, tile=tile, overlap=overlap), expected, rtol=0, atol=1e-6)
    # Where tiles disagree, the ramps hand over from one to the next: complementary over an aligned overlap,
    # and near zero at a tile's edge, so neither tile's border shows.
    rise, fall = ramp(64, 16, rise=True, fall=False), ramp(64, 16, rise=False, fall=True)
    assert torch.allclose(fall[-16:] + rise[:16], torch.ones(16))
    assert rise[0] < 0.05 and fall[-1] < 0.05 and rise[16:].eq(1).all()


def test_real_autoencoder_builds_on_meta_with_84m_parameters():
    with torch.device("meta"):
        ae = AutoEncoder(FLUX2_AE)
    n = sum(p.numel() for p in ae.parameters())
    assert n == 84_046_115 and round(n / 1e6, 1) == 84.0
    assert sum(p.numel() for p in ae.encoder.parameters()) == 34_425_856  # reference: ~34.43 M
    assert sum(p.numel() for p in ae.decoder.parameters()) == 49_620_259  # reference: ~49.62 M
    assert FLUX2_AE.latent_channels == 128 and FLUX2_AE.downscale == 16 and FLUX2_AE.decoder_num_res_blocks == 3
