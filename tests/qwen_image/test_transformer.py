"""kern's Qwen-Image transformer against diffusers' QwenImageTransformer2DModel, plus checkpoint-layout facts."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import QwenImageLayeredPipeline, QwenImagePipeline, QwenImageTransformer2DModel
from kern_qwen_image import geometry, rope
from kern_qwen_image.params import QWEN_IMAGE, QWEN_IMAGE_EDIT_2511, QWEN_IMAGE_LAYERED, QwenImageParams, tiny_params
from kern_qwen_image.transformer import QwenImageTransformer

from tests.helpers import init_qwen_image_random

TOL = 1e-5
L_TXT = 7


def diffusers_model(params: QwenImageParams) -> QwenImageTransformer2DModel:
    return QwenImageTransformer2DModel(
        patch_size=params.patch_size,
        in_channels=params.in_channels,
        out_channels=params.out_channels,
        num_layers=params.num_layers,
        attention_head_dim=params.head_dim,
        num_attention_heads=params.num_heads,
        joint_attention_dim=params.joint_attention_dim,
        axes_dims_rope=params.axes_dim,
        zero_cond_t=params.zero_cond_t,
        use_additional_t_cond=params.use_additional_t_cond,
        use_layer3d_rope=params.use_layer3d_rope,
    )


def pair(params: QwenImageParams, seed: int = 0):
    ours = init_qwen_image_random(QwenImageTransformer(params), seed).eval()
    theirs = diffusers_model(params).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same names: Qwen-Image's native naming is diffusers'
    return ours, theirs


def inputs(params: QwenImageParams, shapes, batch: int = 1, txt_mask=None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, sum(math.prod(s) for s in shapes), params.in_channels, generator=g)
    txt = torch.randn(batch, L_TXT, params.joint_attention_dim, generator=g)
    t = torch.rand(batch, generator=g)
    cond = torch.arange(batch) % 2 if params.use_additional_t_cond else None
    return {
        "img": img,
        "txt": txt,
        "txt_mask": txt_mask,
        "timesteps": t,
        "img_shapes": shapes,
        "additional_t_cond": cond,
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def run_both(ours, theirs, x):
    with torch.no_grad():
        a = ours(**x)
        b = theirs(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            encoder_hidden_states_mask=x["txt_mask"],
            timestep=x["timesteps"],
            img_shapes=[list(x["img_shapes"])] * x["img"].shape[0],
            additional_t_cond=x["additional_t_cond"],
            return_dict=False,
        )[0]
    return a, b


PAD_MASK = torch.tensor([[1] * L_TXT, [1] * 4 + [0] * (L_TXT - 4)])  # sample 1 has 4 real tokens, then padding
# Edit shapes: odd sizes exercise the centred grid; the reference (h = 6) sets the text offset, not the target.
EDIT = [(1, 3, 4), (1, 6, 2)]
LAYERED = [(1, 2, 3)] * 4 + [(1, 3, 2)]  # 3 layers + composite, then the condition at frame -1; text starts at 4
CASES = {  # name: (params, batch, img_shapes, txt_mask)
    "t2i": (tiny_params(), 1, [(1, 3, 4)], None),
    "t2i_batch2_mask": (tiny_params(), 2, [(1, 4, 3)], PAD_MASK),
    "edit_reference": (tiny_params(), 1, EDIT, None),
    "edit_2511_zero_cond_t": (tiny_params(zero_cond_t=True), 2, EDIT + [(1, 2, 2)], PAD_MASK),
    "layered": (tiny_params(use_additional_t_cond=True, use_layer3d_rope=True), 2, LAYERED, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(case):
    params, batch, shapes, mask = CASES[case]
    ours, theirs = pair(params)
    x = inputs(params, shapes, batch, mask)
    a, b = run_both(ours, theirs, x)
    assert a.shape == (batch, x["img"].shape[1], params.out_dim)
    # Every output row is compared: only text keys are masked and the output is image tokens only.
    assert rel_err(a, b) <= TOL


def test_text_mask_equals_truncation():
    """Padding after the real tokens leaves their RoPE positions alone, so a masked sample is the sample alone."""
    ours, _ = pair(tiny_params())
    x = inputs(tiny_params(), [(1, 4, 3)], batch=2, txt_mask=PAD_MASK)
    with torch.no_grad():
        masked = ours(**x)
        alone = ours(
            **{**x, "img": x["img"][1:], "txt": x["txt"][1:, :4], "txt_mask": None, "timesteps": x["timesteps"][1:]}
        )
        ones = ours(**{**x, "txt_mask": torch.ones(2, L_TXT, dtype=torch.bool)})
        unmasked = ours(**{**x, "txt_mask": None})
    assert rel_err(masked[1], alone[0]) <= TOL
    assert torch.equal(ones, unmasked) and torch.equal(masked[0], unmasked[0])
    assert rel_err(masked[1], unmasked[1]) > 1e-3


def test_zero_cond_t_modulates_references_at_t0():
    flat, _ = pair(tiny_params())
    zero, _ = pair(tiny_params(zero_cond_t=True))
    with torch.no_grad():
        t2i = inputs(tiny_params(), [(1, 3, 4)])
        assert torch.equal(zero(**t2i), flat(**t2i))  # no reference: nothing changes
        edit = inputs(tiny_params(), EDIT)
        assert rel_err(zero(**edit)[:, :12], flat(**edit)[:, :12]) > 1e-3
        # At t = 0 every token is modulated alike, so the flag changes nothing.
        at0 = {**edit, "timesteps": torch.zeros(1)}
        assert rel_err(zero(**at0), flat(**at0)) <= TOL


def test_rope_positions():
    assert rope.centred(4).tolist() == [-2, -1, 0, 1] and rope.centred(3).tolist() == [-2, -1, 0]
    pos = rope.image_positions([(1, 2, 3), (1, 1, 2)])
    assert pos[:6].tolist() == [[0, r, c] for r in (-1, 0) for c in (-2, -1, 0)]
    assert pos[6:].tolist() == [[1, -1, -1], [1, -1, 0]]
    assert rope.text_positions(2, EDIT).tolist() == [[3, 3, 3], [4, 4, 4]]
    layered = rope.image_positions(LAYERED, layered=True)
    assert layered[::6, 0].tolist() == [0, 1, 2, 3, -1]
    assert rope.text_start(LAYERED, layered=True) == 4 and rope.text_start(LAYERED) == 1


def test_geometry_matches_diffusers_packing():
    lat = torch.randn(2, 16, 6, 4)
    tokens = geometry.pack(lat)
    assert torch.equal(tokens, QwenImagePipeline._pack_latents(lat, 2, 16, 6, 4))
    assert torch.equal(geometry.unpack(tokens, 6, 4), lat)
    frames = torch.randn(2, 3, 16, 4, 6)  # Layered: (B, layers + 1, C, h, w)
    packed = geometry.pack(frames)
    assert torch.equal(packed, QwenImageLayeredPipeline._pack_latents(frames, 2, 16, 4, 6, 3))
    assert torch.equal(geometry.unpack(packed, 4, 6, frames=3), frames)
    tokens, shapes, n_target = geometry.prepare_tokens(lat, [torch.randn(16, 2, 8), torch.randn(1, 16, 4, 4)])
    assert shapes == [(1, 3, 2), (1, 1, 4), (1, 2, 2)] and n_target == 6 and tokens.shape == (2, 14, 64)
    assert geometry.layered_img_shapes((4, 6), layers=2, condition_hw=(8, 8)) == [(1, 2, 3)] * 3 + [(1, 4, 4)]
    with pytest.raises(ValueError, match="even"):
        geometry.pack(torch.zeros(1, 16, 3, 4))


def test_input_checks():
    ours, _ = pair(tiny_params())
    x = inputs(tiny_params(), [(1, 3, 4)])
    with pytest.raises(ValueError, match="tokens"):
        ours(**{**x, "img_shapes": [(1, 3, 3)]})
    with pytest.raises(ValueError, match="additional_t_cond"):
        ours(**{**x, "additional_t_cond": 0})
    layered, _ = pair(tiny_params(use_additional_t_cond=True, use_layer3d_rope=True))
    with pytest.raises(ValueError, match="additional_t_cond"):
        layered(**x)
    with torch.no_grad():  # an int flag is the same as a (B,) tensor of it
        assert torch.equal(
            layered(**{**x, "additional_t_cond": 1}),
            layered(**{**x, "additional_t_cond": torch.ones(1, dtype=torch.long)}),
        )


@pytest.mark.parametrize("params", [QWEN_IMAGE, QWEN_IMAGE_EDIT_2511, QWEN_IMAGE_LAYERED])
def test_real_size_on_meta_matches_diffusers(params):
    with torch.device("meta"):
        ours = QwenImageTransformer(params)
        theirs = diffusers_model(params)
    sd = ours.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    extra = 1 if params.use_additional_t_cond else 0  # addition_t_embedding.weight (2 x 3072)
    assert len(sd) == 1933 + extra
    assert sum(v.numel() for v in sd.values()) / 1e9 == pytest.approx(20.430, abs=0.001)
    assert list(ours.buffers()) == []
    blocks = ours.transformer_blocks
    assert sum(isinstance(m, torch.nn.Linear) for m in blocks.modules()) == 60 * 14
    assert all(m.bias is not None for m in ours.modules() if isinstance(m, torch.nn.Linear))
    assert sd["transformer_blocks.0.img_mod.1.weight"].shape == (18432, 3072)
    assert sd["transformer_blocks.59.img_mlp.net.0.proj.weight"].shape == (12288, 3072)
    assert (params.hidden_size, params.mlp_hidden, params.out_dim) == (3072, 12288, 64)


@pytest.mark.parametrize("train_mode", [False, True])
def test_gradient_checkpointing_same_gradients(train_mode):
    params = tiny_params(zero_cond_t=True)
    model, _ = pair(params)
    model.train(train_mode)  # kern trains adapters with the frozen base in eval mode: checkpointing must still apply
    x = inputs(params, EDIT, batch=2, txt_mask=PAD_MASK)
    x["img"].requires_grad_(True)

    def grads(checkpointing: bool):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        x["img"].grad = None
        model(**x).square().mean().backward()
        # The last block's text-only weights (txt_mlp, to_add_out) get none: the output is read from the image stream.
        return [x["img"].grad.clone()] + [p.grad.clone() if p.grad is not None else None for p in model.parameters()]

    plain, ckpt = grads(False), grads(True)
    assert sum(g is None for g in plain) == 6 and [g is None for g in plain] == [g is None for g in ckpt]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(plain, ckpt) if a is not None)

    calls = []
    hook = model.transformer_blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    model(**x).sum().backward()  # checkpointed: the block runs again during backward
    hook.remove()
    assert len(calls) == 2


def test_meta_model_loads_with_assign():
    params = tiny_params(use_additional_t_cond=True, use_layer3d_rope=True)
    ref = init_qwen_image_random(QwenImageTransformer(params))
    with torch.device("meta"):
        model = QwenImageTransformer(params)
    model.load_state_dict(ref.state_dict(), assign=True, strict=True)
    assert not any(p.is_meta for p in model.parameters())
    x = inputs(params, LAYERED)
    with torch.no_grad():
        assert torch.equal(model(**x), ref(**x))


@pytest.mark.parametrize("case", ["t2i_batch2_mask", "edit_2511_zero_cond_t", "layered"])
def test_bf16_bit_exact_to_diffusers(case):
    """Same dtype handling as diffusers (t rounded to bf16 before the sinusoid, norms' fp32 statistics, RoPE in fp32,
    contiguous matmul inputs): in bf16 the outputs are identical, not merely close."""
    params, batch, shapes, mask = CASES[case]
    ours, theirs = pair(params)
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    x = inputs(params, shapes, batch, mask)
    a, b = run_both(ours, theirs, {**x, "img": x["img"].bfloat16(), "txt": x["txt"].bfloat16()})
    assert a.dtype == torch.bfloat16
    assert torch.equal(a, b)
