"""FLUX.2 on CUDA in bf16: kern against diffusers, both measured against an fp32 reference.

Runs on the device machine (a GPU); on a machine without CUDA it is skipped with that reason.
bf16 keeps 8 bits of mantissa, so outputs carry errors of about 1e-2 relative (METHOD.md's range
for bf16 operands is 1e-3..1e-2); kern must land in that range and no further from the fp32
reference than diffusers' own bf16 run.
"""

from __future__ import annotations

import pytest
import torch
from kern_flux2 import geometry
from kern_flux2.params import Flux2Params
from kern_flux2.vae import AutoEncoder, AutoEncoderParams

from tests.flux2.test_transformer import pair
from tests.helpers import init_flux2_random

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on the device machine")

# Real head geometry (128 = 4 x 32 RoPE axes), small width and depth; 1024 image + 512 text tokens.
PARAMS = Flux2Params(hidden_size=512, num_heads=4, depth=2, depth_single=4, context_in_dim=768, guidance_embed=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run(model, x, diffusers: bool):
    with torch.no_grad():
        if not diffusers:
            return model(**x)
        return model(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            guidance=x["guidance"],
            return_dict=False,
        )[0]


@pytest.mark.parametrize("refs", [0, 1])
def test_transformer_bf16_on_cuda(refs, capsys):
    ours, theirs = pair(PARAMS, seed=3)
    ours, theirs = ours.cuda(), theirs.cuda()
    g = torch.Generator().manual_seed(0)
    target = torch.randn(1, 128, 32, 32, generator=g)
    ref_list = [torch.randn(1, 128, 16, 24, generator=g) for _ in range(refs)]
    img, ids, n = geometry.prepare_tokens(target, ref_list)
    x = dict(
        img=img,
        img_ids=ids,
        txt=torch.randn(1, 512, 768, generator=g),
        txt_ids=geometry.text_ids(512),
        # 0.75 and 4.0 are exact in bf16: both implementations round t to the model dtype before x1000,
        # so a t like 0.7 would measure that rounding (0.69921875) rather than the arithmetic.
        timesteps=torch.tensor([0.75]),
        guidance=torch.tensor([4.0]),
    )
    x32 = {k: v.cuda() for k, v in x.items()}
    reference = run(ours, x32, False)[:, :n]
    assert rel(run(theirs, x32, True)[:, :n], reference) < 1e-4  # fp32 on CUDA (TF32 off by default) agrees
    ours16, theirs16 = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    x16 = {
        k: (v.to(torch.bfloat16) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v)
        for k, v in x32.items()
    }
    err_ours = rel(run(ours16, x16, False)[:, :n], reference)
    err_theirs = rel(run(theirs16, x16, True)[:, :n], reference)
    with capsys.disabled():
        print(
            f"\nFLUX.2 transformer bf16 CUDA, refs={refs}: kern {err_ours:.2e}, diffusers {err_theirs:.2e} (vs fp32)",
            flush=True,
        )
    assert err_ours < 2e-2
    assert err_ours <= 1.25 * err_theirs + 1e-3


def test_vae_bf16_on_cuda(capsys):
    vae = AutoEncoder(AutoEncoderParams(ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=1))
    vae = init_flux2_random(vae, seed=5).cuda().eval()
    images = (torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1).cuda()
    with torch.no_grad():
        latents = vae.encode(images)
        decoded = vae.decode(latents)
        vae16 = vae.to(torch.bfloat16)
        err_enc = rel(vae16.encode(images.bfloat16()), latents)
        err_dec = rel(vae16.decode(latents.bfloat16()), decoded)
    with capsys.disabled():
        print(f"\nFLUX.2 VAE bf16 CUDA: encode {err_enc:.2e}, decode {err_dec:.2e} (vs fp32)", flush=True)
    assert err_enc < 3e-2 and err_dec < 3e-2
