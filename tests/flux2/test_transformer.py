"""kern's FLUX.2 transformer against diffusers' Flux2Transformer2DModel, plus checkpoint-layout facts."""

from __future__ import annotations

import pytest
import torch
from kern_flux2 import geometry, keys
from kern_flux2.params import FLUX2_DEV, FLUX2_KLEIN_4B, FLUX2_KLEIN_9B, PARAMS_BY_VARIANT, Flux2Params, tiny_params
from kern_flux2.transformer import Flux2Transformer

from tests.helpers import flux2_diffusers_model, init_flux2_random

TOL = 1e-5
L_TXT = 7


def pair(params: Flux2Params, seed: int = 0):
    ours = init_flux2_random(Flux2Transformer(params), seed).eval()
    theirs = flux2_diffusers_model(params).eval()
    theirs.load_state_dict(keys.bfl_to_diffusers(ours.state_dict()), strict=True)
    return ours, theirs


def inputs(params: Flux2Params, batch: int = 1, ref_shapes=(), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(batch, params.in_channels, 3, 4, generator=g)
    refs = [torch.randn(batch, params.in_channels, h, w, generator=g) for h, w in ref_shapes]
    img, img_ids, n_target = geometry.prepare_tokens(target, refs)
    txt = torch.randn(batch, L_TXT, params.context_in_dim, generator=g)
    t = torch.rand(batch, generator=g)
    guidance = 1.0 + 4.0 * torch.rand(batch, generator=g) if params.guidance_embed else None
    return dict(
        img=img, img_ids=img_ids, txt=txt, txt_ids=geometry.text_ids(L_TXT), timesteps=t, guidance=guidance
    ), n_target


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def run_both(ours, theirs, x):
    with torch.no_grad():
        a = ours(**x)
        b = theirs(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            guidance=x["guidance"],
            return_dict=False,
        )[0]
    return a, b


CASES = {  # name: (params, batch, reference latent sizes)
    "klein_t2i": (tiny_params(False, depth=2, depth_single=3), 1, ()),
    "klein_refs": (tiny_params(False, depth=1, depth_single=2), 1, ((2, 3), (4, 2))),
    "dev_guidance": (tiny_params(True, depth=2, depth_single=2), 1, ()),
    "dev_refs_batch2": (tiny_params(True, depth=3, depth_single=1), 2, ((2, 2), (3, 1))),
    "klein_batch2": (tiny_params(False, depth=2, depth_single=2), 2, ()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(case):
    params, batch, ref_shapes = CASES[case]
    ours, theirs = pair(params)
    x, n_target = inputs(params, batch, ref_shapes)
    a, b = run_both(ours, theirs, x)
    assert a.shape == (batch, x["img"].shape[1], params.in_channels)
    assert rel_err(a, b) <= TOL
    if ref_shapes:  # the references must actually reach the target tokens
        without, _ = inputs(params, batch, ())
        assert rel_err(ours(**without)[:, :n_target], a[:, :n_target]) > 1e-3


def test_reference_ids_use_time_offsets_of_ten():
    _, ids, n_target = geometry.prepare_tokens(
        torch.zeros(1, 128, 2, 3), [torch.zeros(1, 128, 1, 2), torch.zeros(128, 2, 1)]
    )
    assert n_target == 6 and ids.shape == (10, 4)
    assert ids[:6].tolist() == [[0, r, c, 0] for r in range(2) for c in range(3)]
    assert ids[6:8].tolist() == [[10, 0, 0, 0], [10, 0, 1, 0]]
    assert ids[8:].tolist() == [[20, 0, 0, 0], [20, 1, 0, 0]]
    assert geometry.text_ids(3).tolist() == [[0, 0, 0, j] for j in range(3)]
    lat = torch.randn(2, 5, 3, 4)
    assert torch.equal(geometry.unpack(geometry.pack(lat), 3, 4), lat)
    assert torch.equal(geometry.pack(lat)[:, 5], lat[:, :, 1, 1])  # row-major: token r * w + c


def test_guidance_matters_and_is_checked():
    params = tiny_params(True)
    ours, _ = pair(params)
    x, _ = inputs(params)
    with torch.no_grad():
        a = ours(**x)
        b = ours(**{**x, "guidance": x["guidance"] + 1.0})
    assert rel_err(a, b) > 1e-4
    with pytest.raises(ValueError, match="guidance"):
        ours(**{**x, "guidance": None})
    klein, _ = pair(tiny_params(False))
    with pytest.raises(ValueError, match="guidance"):
        klein(**{**inputs(tiny_params(False))[0], "guidance": torch.ones(1)})


def test_batched_ids_equal_shared_ids():
    params = tiny_params(False)
    ours, _ = pair(params)
    x, _ = inputs(params, batch=2, ref_shapes=((2, 2),))
    with torch.no_grad():
        shared = ours(**x)
        batched = ours(
            **{**x, "img_ids": x["img_ids"].expand(2, -1, -1).float(), "txt_ids": x["txt_ids"].expand(2, -1, -1)}
        )
    assert rel_err(batched, shared) <= 1e-6


def test_key_round_trip_and_prefixes():
    for params in (tiny_params(True), tiny_params(False, depth=3, depth_single=1)):
        sd = init_flux2_random(Flux2Transformer(params)).state_dict()
        back = keys.diffusers_to_bfl(keys.bfl_to_diffusers(sd))
        assert list(back) == list(sd)
        assert all(torch.equal(back[k], sd[k]) for k in sd)
        prefixed = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
        assert list(keys.strip_prefix(prefixed)) == list(sd)
        assert keys.bfl_to_diffusers(prefixed).keys() == keys.bfl_to_diffusers(sd).keys()
    # the final modulation halves are swapped: BFL (shift, scale) -> diffusers (scale, shift)
    w = sd["final_layer.adaLN_modulation.1.weight"]
    d = keys.bfl_to_diffusers(sd)["norm_out.linear.weight"]
    assert torch.equal(d[: len(w) // 2], w[len(w) // 2 :])


@pytest.mark.parametrize(
    ("params", "n_keys", "billions", "n_linear"),
    [(FLUX2_DEV, 299, 32.22, 160), (FLUX2_KLEIN_9B, 201, 9.08, 112), (FLUX2_KLEIN_4B, 149, 3.88, 80)],
)
def test_real_sizes_on_meta(params, n_keys, billions, n_linear):
    with torch.device("meta"):
        model = Flux2Transformer(params)
    sd = model.state_dict()
    assert len(sd) == n_keys
    assert sum(v.numel() for v in sd.values()) / 1e9 == pytest.approx(billions, abs=0.01)
    blocks = [*model.double_blocks.modules(), *model.single_blocks.modules()]
    assert sum(isinstance(m, torch.nn.Linear) for m in blocks) == n_linear
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert list(model.buffers()) == []
    assert sd["double_blocks.0.img_attn.qkv.weight"].shape == (3 * params.hidden_size, params.hidden_size)
    assert sd["single_blocks.0.linear1.weight"].shape == (9 * params.hidden_size, params.hidden_size)
    assert sd["single_blocks.0.linear2.weight"].shape == (params.hidden_size, 4 * params.hidden_size)


def test_real_klein_4b_keys_match_diffusers_on_meta():
    with torch.device("meta"):
        ours = Flux2Transformer(FLUX2_KLEIN_4B)
        theirs = flux2_diffusers_model(FLUX2_KLEIN_4B)
    converted = {k: tuple(v.shape) for k, v in keys.bfl_to_diffusers(ours.state_dict()).items()}
    assert converted == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_variants_table():
    assert PARAMS_BY_VARIANT["klein-base-4b"] == PARAMS_BY_VARIANT["klein-4b"] == FLUX2_KLEIN_4B
    assert PARAMS_BY_VARIANT["klein-base-9b"] == FLUX2_KLEIN_9B
    assert FLUX2_DEV.guidance_embed and not FLUX2_KLEIN_9B.guidance_embed
    assert (FLUX2_DEV.head_dim, FLUX2_DEV.mlp_hidden) == (128, 18432)


@pytest.mark.parametrize("train_mode", [False, True])
def test_gradient_checkpointing_same_gradients(train_mode):
    params = tiny_params(True, depth=2, depth_single=2)
    model, _ = pair(params)
    model.train(train_mode)  # kern trains adapters with the frozen base in eval mode: checkpointing must still apply
    x, _ = inputs(params, batch=2, ref_shapes=((2, 2),))
    x["img"].requires_grad_(True)

    def grads(checkpointing: bool):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        x["img"].grad = None
        model(**x).square().mean().backward()
        return [x["img"].grad.clone()] + [p.grad.clone() for p in model.parameters()]

    plain, ckpt = grads(False), grads(True)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(plain, ckpt))

    calls = []
    hook = model.single_blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    model(**x).sum().backward()  # checkpointed: the block runs again during backward
    hook.remove()
    assert len(calls) == 2


def test_meta_model_loads_with_assign():
    params = tiny_params(False)
    ref = init_flux2_random(Flux2Transformer(params))
    with torch.device("meta"):
        model = Flux2Transformer(params)
    model.load_state_dict(ref.state_dict(), assign=True, strict=True)
    assert not any(p.is_meta for p in model.parameters())
    x, _ = inputs(params, ref_shapes=((1, 2),))
    with torch.no_grad():
        assert torch.equal(model(**x), ref(**x))


def test_bf16_runs_and_stays_close():
    params = tiny_params(True)
    model, _ = pair(params)
    x, _ = inputs(params, ref_shapes=((2, 2),))
    with torch.no_grad():
        full = model(**x)
        half = model.to(torch.bfloat16)(**{**x, "img": x["img"].bfloat16(), "txt": x["txt"].bfloat16()})
    assert half.dtype == torch.bfloat16
    assert rel_err(half.float(), full) < 5e-2
