"""LoRA and LoHa maths against independent implementations (PEFT, LyCORIS) and plain autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kern.adapters.network import Network
from kern_loha.module import HadaWeight, LoHaModule, loha_delta
from kern_lora.module import LoRAModule
from torch import nn


def _seeded(*shape, seed=0, scale=0.5, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


# --------------------------------------------------------------------------- LoRA vs PEFT


class OneLayer(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_lora_delta_and_forward_equal_peft(kind, use_rslora):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    layer = nn.Linear(12, 10) if kind == "linear" else nn.Conv2d(6, 5, 3, padding=1, stride=2)
    rank, alpha = 4, 3.0
    ref = OneLayer(layer)
    peft_model = OneLayer(nn.Linear(12, 10) if kind == "linear" else nn.Conv2d(6, 5, 3, padding=1, stride=2))
    peft_model.load_state_dict(ref.state_dict())
    peft_model = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"], use_rslora=use_rslora), peft_model
    )

    kern_mod = LoRAModule("lora_unet_proj", "proj", ref.proj, rank, alpha, use_rslora=use_rslora)
    with torch.no_grad():
        kern_mod.lora_down.weight.copy_(_seeded(*kern_mod.lora_down.weight.shape, seed=1))
        kern_mod.lora_up.weight.copy_(_seeded(*kern_mod.lora_up.weight.shape, seed=2))
        peft_model.proj.lora_A["default"].weight.copy_(kern_mod.lora_down.weight)
        peft_model.proj.lora_B["default"].weight.copy_(kern_mod.lora_up.weight)
    net = Network("lora", [kern_mod]).attach()

    assert torch.allclose(kern_mod.delta_weight(), peft_model.proj.get_delta_weight("default"), atol=1e-6)
    x = _seeded(2, 7, 12, seed=3) if kind == "linear" else _seeded(2, 6, 9, 9, seed=3)
    assert torch.allclose(ref(x), peft_model(x), atol=1e-5)
    # The saved alpha is kohya-equivalent: alpha / rank reproduces PEFT's scale (α/√r with rsLoRA).
    expected = alpha / (math.sqrt(rank) if use_rslora else rank)
    assert float(kern_mod.alpha) / rank == pytest.approx(expected)
    net.remove()


def test_lora_forward_is_no_op_at_init_and_b_is_the_zero_factor():
    layer = nn.Linear(8, 6)
    m = LoRAModule("n", "p", layer, 4, 4.0)
    assert torch.count_nonzero(m.lora_up.weight) == 0 and torch.count_nonzero(m.lora_down.weight) > 0
    x = torch.randn(3, 8)
    y0 = layer(x)
    Network("lora", [m]).attach()
    assert torch.equal(layer(x), y0)


def test_fp32_adapter_on_bf16_layer_computes_in_fp32_and_rounds_once():
    torch.manual_seed(0)
    layer = nn.Linear(16, 16).to(torch.bfloat16)
    m = LoRAModule("n", "p", layer, 4, 4.0)  # fp32 adapter
    with torch.no_grad():
        m.lora_up.weight.normal_()
    Network("lora", [m]).attach()
    x = torch.randn(2, 16).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    base = F.linear(x, layer.weight, layer.bias)
    expected = (base.float() + m.lora_up(m.lora_down(x.float())) * m.scale).to(torch.bfloat16)
    assert torch.equal(y, expected)


# --------------------------------------------------------------------------- LoHa vs LyCORIS / PEFT


def _loha_factors(out_f, in_f, rank, seed=0, dtype=torch.float32):
    return {
        "hada_w1_a": _seeded(out_f, rank, seed=seed, dtype=dtype),
        "hada_w1_b": _seeded(rank, in_f, seed=seed + 1, dtype=dtype),
        "hada_w2_a": _seeded(out_f, rank, seed=seed + 2, dtype=dtype),
        "hada_w2_b": _seeded(rank, in_f, seed=seed + 3, dtype=dtype),
    }


@pytest.mark.parametrize("alpha", [None, 2.0, 5.0])
def test_loha_delta_equals_lycoris(alpha):
    from lycoris.functional.loha import diff_weight
    from lycoris.modules.loha import LohaModule

    out_f, in_f, rank = 10, 12, 4
    f = _loha_factors(out_f, in_f, rank)
    gamma = (alpha or rank) / rank
    tensors = dict(f, alpha=torch.tensor(float(alpha or rank)))
    ours = loha_delta(tensors, (out_f, in_f))

    ref = diff_weight(
        f["hada_w1_b"], f["hada_w1_a"], f["hada_w2_b"], f["hada_w2_a"], None, None, gamma=gamma, backend="torch"
    )
    assert torch.allclose(ours, ref, atol=1e-6)

    ly = LohaModule("lora_unet_x", nn.Linear(in_f, out_f), lora_dim=rank, alpha=alpha or 0)
    with torch.no_grad():
        for k, v in f.items():
            getattr(ly, k).copy_(v)
    assert torch.allclose(ours, ly.get_weight((out_f, in_f)), atol=1e-6)
    # Our module computes the same ΔW (through the custom autograd function).
    mod = LoHaModule("n", "p", nn.Linear(in_f, out_f), rank, alpha)
    mod.load_kohya_tensors(tensors)
    assert torch.allclose(mod.delta().detach(), ours, atol=1e-6)
    assert torch.allclose(mod.delta_weight(), ours, atol=1e-6)


def test_lycoris_get_diff_weight_applies_gamma_twice():
    """Documents the suspected LyCORIS merge bug at runtime: get_diff_weight = γ² · (T1 ⊙ T2).

    kern's merge uses γ once, like every forward (LyCORIS' included); this test pins the upstream behaviour.
    """
    from lycoris.modules.loha import LohaModule

    out_f, in_f, rank, alpha = 6, 5, 2, 1.0
    f = _loha_factors(out_f, in_f, rank, seed=4)
    ly = LohaModule("lora_unet_x", nn.Linear(in_f, out_f), lora_dim=rank, alpha=alpha)
    with torch.no_grad():
        for k, v in f.items():
            getattr(ly, k).copy_(v)
    ours = loha_delta(dict(f, alpha=torch.tensor(alpha)), (out_f, in_f))
    gamma = alpha / rank
    assert torch.allclose(ly.get_diff_weight()[0], ours * gamma, atol=1e-6)


def test_loha_delta_equals_peft():
    from peft import LoHaConfig, inject_adapter_in_model

    out_f, in_f, rank, alpha = 9, 7, 3, 2.0
    f = _loha_factors(out_f, in_f, rank, seed=7)
    model = inject_adapter_in_model(
        LoHaConfig(r=rank, alpha=alpha, target_modules=["proj"]), OneLayer(nn.Linear(in_f, out_f))
    )
    with torch.no_grad():
        for k, v in f.items():
            getattr(model.proj, k)["default"].copy_(v)
    ours = loha_delta(dict(f, alpha=torch.tensor(alpha)), (out_f, in_f))
    assert torch.allclose(ours, model.proj.get_delta_weight("default"), atol=1e-6)


def test_loha_init_zero_factor_is_w2_a():
    m = LoHaModule("n", "p", nn.Linear(8, 6), 4)
    assert torch.count_nonzero(m.hada_w2_a) == 0
    assert all(torch.count_nonzero(getattr(m, k)) > 0 for k in ("hada_w1_a", "hada_w1_b", "hada_w2_b"))
    assert torch.count_nonzero(m.delta_weight()) == 0


# --------------------------------------------------------------------------- custom backward


def test_hada_weight_gradcheck():
    f = _loha_factors(5, 4, 2, seed=11, dtype=torch.float64)
    args = tuple(v.requires_grad_() for v in f.values())
    assert torch.autograd.gradcheck(lambda a, b, c, d: HadaWeight.apply(a, b, c, d, 0.7), args)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_loha_custom_backward_equals_plain_autograd(kind):
    torch.manual_seed(0)
    layer = nn.Linear(12, 10) if kind == "linear" else nn.Conv2d(4, 6, 3, padding=1)
    m = LoHaModule("n", "p", layer, 3, 1.5)
    with torch.no_grad():
        m.hada_w2_a.normal_()
    x = torch.randn(2, 5, 12) if kind == "linear" else torch.randn(2, 4, 7, 7)
    g = torch.randn_like(m.adapter_forward(x))

    (m.adapter_forward(x) * g).sum().backward()
    ours = {k: getattr(m, k).grad.clone() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}

    params = {k: getattr(m, k).detach().clone().requires_grad_() for k in ours}
    dw = ((params["hada_w1_a"] @ params["hada_w1_b"]) * (params["hada_w2_a"] @ params["hada_w2_b"]) * m.scale).reshape(
        layer.weight.shape
    )
    y = F.linear(x, dw) if kind == "linear" else F.conv2d(x, dw, padding=1)
    (y * g).sum().backward()
    for k in ours:
        assert torch.allclose(ours[k], params[k].grad, atol=1e-5, rtol=1e-5), k


def test_loha_custom_backward_saves_less_memory():
    """Bytes autograd keeps for backward, counted with saved_tensors_hooks: custom function vs plain autograd.

    Plain autograd keeps T1 = W1a·W1b and T2 = W2a·W2b (out × in each) for the Hadamard product's backward;
    HadaWeight keeps only the four rank-r factors. Both keep ΔW and x for F.linear.
    """
    out_f, in_f, rank = 256, 192, 4
    m = LoHaModule("n", "p", nn.Linear(in_f, out_f), rank, 2.0)
    x = torch.randn(2, 3, in_f)

    def saved_bytes(fn):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fn()
        return total, y

    custom, y1 = saved_bytes(lambda: m.adapter_forward(x))

    def plain():
        dw = (m.hada_w1_a @ m.hada_w1_b) * (m.hada_w2_a @ m.hada_w2_b) * m.scale
        return F.linear(x, dw)

    reference, y2 = saved_bytes(plain)
    assert torch.allclose(y1, y2, atol=1e-5)
    full = out_f * in_f * 4
    factors = 2 * rank * (out_f + in_f) * 4
    # custom: the four factors, plus x and ΔW for F.linear
    assert custom <= factors + full + x.numel() * 4 + 64
    # plain autograd keeps at least T1 and T2 on top of that
    assert reference - custom >= 2 * full
    print(f"\nLoHa {out_f}x{in_f} r={rank}: saved for backward {custom} B (custom) vs {reference} B (plain autograd)")


def test_rank_dropout_and_module_dropout_only_in_training():
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    m = LoRAModule("n", "p", layer, 4, 4.0, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    with torch.no_grad():
        m.lora_up.weight.normal_()
    net = Network("lora", [m]).attach()
    x = torch.randn(4, 3, 8)
    net.eval()
    assert torch.equal(layer(x), layer(x))
    net.train()
    outs = {tuple(layer(x).flatten()[:4].tolist()) for _ in range(8)}
    assert len(outs) > 1
