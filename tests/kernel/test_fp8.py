"""kern.gpu.fp8: frozen nn.Linear weights as float8_e4m3fn with per-row scales: the storage-only layer
(``Float8StorageLinear``, dequantised on the fly) and the training base (``Float8MatmulLinear``, fp8 matmuls on CUDA).

Tolerances come from the format: e4m3 keeps 3 mantissa bits, so rounding a weight in the normal range moves it by
at most half a step, 2**-4 of its magnitude; for weights spread over a row (Gaussian) the RMS relative error is
about 2.5 %. A matmul sums many such independent errors, so its output is off by about the same 2.5 % (RMS,
relative to the output's norm); with both operands rounded (the CUDA path also quantises the activation) about
√2 times that. A wrong scale, layout, transpose or dtype gives tens of percent or more.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from kern.errors import UsageError
from kern.gpu.fp8 import (
    E4M3_MAX,
    Float8MatmulLinear,
    Float8StorageLinear,
    dequantize_base,
    fp8_matmul_supported,
    quantize_base,
    quantize_linears_,
    quantize_rows,
    quantize_weight,
)
from kern.records import TargetSpec
from torch import nn

FP8 = getattr(torch, "float8_e4m3fn", None)
pytestmark = pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- storage only: Float8StorageLinear


def test_quantize_weight_error_bounds():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.logspace(-3, 1, 64).unsqueeze(1)  # rows of very different magnitude
    w[5] = 0.0
    q, scale = quantize_weight(w)
    assert q.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (64,)
    assert torch.equal(scale[5], torch.tensor(1.0)) and not q.float().isnan().any()
    # Every row uses the full e4m3 range: its largest magnitude maps to 448.
    assert torch.allclose(q.float().abs().amax(1)[w.abs().amax(1) > 0], torch.tensor(E4M3_MAX))
    deq = q.float() * scale.unsqueeze(1)
    normal = (w / scale.unsqueeze(1)).abs() >= 2.0**-6  # e4m3's smallest normal
    err = (deq - w).abs()
    assert (err[normal] <= 2.0**-4 * w.abs()[normal] * (1 + 1e-6)).all()
    # Subnormals are spaced 2**-9 apart: half a step of absolute error at most.
    assert (err[~normal] <= 2.0**-10 * scale.unsqueeze(1).expand_as(w)[~normal] * (1 + 1e-6)).all()


def test_exact_when_weights_are_on_the_e4m3_grid():
    """Weights that e4m3 represents exactly (grid values times a power-of-two row scale, row max 448·s) are
    stored losslessly, so the layer equals bf16 F.linear bit for bit."""
    torch.manual_seed(1)
    grid = torch.randn(32, 48).mul(100).clamp(-E4M3_MAX, E4M3_MAX).to(FP8).float()
    grid[:, 0] = E4M3_MAX
    w = grid * (2.0 ** torch.randint(-12, -4, (32, 1))).float()
    lin = nn.Linear(48, 32).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
    f8 = Float8StorageLinear.from_linear(lin)
    x = torch.randn(3, 5, 48, dtype=torch.bfloat16)
    assert torch.equal(f8.dequantized_weight(), lin.weight)
    assert torch.equal(f8(x), F.linear(x, lin.weight, lin.bias))


def test_matches_bf16_linear_within_e4m3_rounding():
    torch.manual_seed(2)
    lin = nn.Linear(256, 192)
    x = torch.randn(4, 16, 256, dtype=torch.bfloat16)
    ref = F.linear(x, lin.weight.to(torch.bfloat16), lin.bias.to(torch.bfloat16))
    out = Float8StorageLinear.from_linear(lin, compute_dtype=torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    # See the module docstring: expected ≈ 2.5 %; 5 % bound.
    assert _rel(out, ref) < 0.05
    # fp32 input: computed in bf16, returned as fp32 like nn.Linear would.
    assert Float8StorageLinear.from_linear(lin)(x.float()).dtype == torch.float32


def test_backward_saves_fp8_weight_only():
    torch.manual_seed(3)
    lin = nn.Linear(40, 24)
    f8 = Float8StorageLinear.from_linear(lin, compute_dtype=torch.float32)
    f8.bias.requires_grad_(True)
    x = torch.randn(6, 40, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = f8(x)
    # No compute-dtype copy of the weight is kept alive for backward, only the fp8 tensor and its scale.
    assert (torch.float32, (24, 40)) not in saved
    assert (FP8, (24, 40)) in saved
    g = torch.randn_like(y)
    y.backward(g)

    w = f8.dequantized_weight(torch.float32)
    x2 = x.detach().clone().requires_grad_(True)
    b2 = f8.bias.detach().clone().requires_grad_(True)
    F.linear(x2, w, b2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f8.bias.grad, b2.grad, rtol=1e-6, atol=1e-6)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.blocks = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 16))
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        h = self.blocks(self.emb(ids))
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(h)


def test_quantize_linears_replaces_only_plain_linears():
    torch.manual_seed(4)
    net = _Net()
    ids = torch.randint(0, 10, (2, 7))
    ref = net(ids)
    n = quantize_linears_(net, exclude=(r"^head$",), compute_dtype=torch.float32)
    # blocks.0 and blocks.3; the head is excluded, MHA's out_proj is a Linear subclass its owner reads directly.
    assert n == 2
    assert isinstance(net.blocks[0], Float8StorageLinear) and isinstance(net.blocks[3], Float8StorageLinear)
    assert type(net.head) is nn.Linear and not isinstance(net.attn.out_proj, Float8StorageLinear)
    assert type(net.emb) is nn.Embedding and type(net.blocks[2]) is nn.LayerNorm
    assert _rel(net(ids), ref) < 0.05
    sd = net.state_dict()
    assert sd["blocks.0.weight"].dtype == FP8 and sd["blocks.0.weight_scale"].dtype == torch.float32

    # Dtype casts move the bias only; the fp8 weight and its fp32 scale keep their dtypes.
    net.to(torch.float16)
    assert net.blocks[0].weight.dtype == FP8 and net.blocks[0].weight_scale.dtype == torch.float32
    assert net.blocks[0].bias.dtype == torch.float16
    assert quantize_linears_(nn.Linear(4, 4)) == 0  # a bare root cannot be replaced in place


def test_tiny_qwen3_quantised_stays_close_to_bf16():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(5)
    ref = transformers.Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()
    q = transformers.Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()
    q.load_state_dict(ref.state_dict())
    # The tied lm_head shares the embedding matrix, so it stays as it is.
    assert quantize_linears_(q, exclude=(r"lm_head",)) == 8 * 7
    assert q.dtype == torch.bfloat16  # parameters (embeddings, norms) decide the model dtype, not fp8 buffers
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        a = ref(ids, output_hidden_states=True).hidden_states
        b = q(ids, output_hidden_states=True).hidden_states
    # Each layer adds its own ≈2.5 % matmul error and the residual stream carries the sum; over 8 layers at
    # the default init this stays a few percent. 10 % leaves headroom; a wrong scale or layout is far above.
    for k in (2, 5, 8):
        assert _rel(b[k], a[k]) < 0.10, (k, _rel(b[k], a[k]))


def test_import_does_not_touch_float8(tmp_path):
    """kern.gpu.fp8 (and the FLUX.2 text encoder that imports it) import on a torch without float8_e4m3fn;
    using it then fails with a clear UsageError."""
    code = textwrap.dedent(
        """
        import torch
        if hasattr(torch, "float8_e4m3fn"):
            del torch.float8_e4m3fn
        import importlib.util
        import kern.gpu.fp8 as fp8
        if importlib.util.find_spec("kern_flux2") is not None:  # the plugin, when installed, imports kern.gpu.fp8
            import kern_flux2.text_encoder  # noqa: F401
        try:
            fp8.quantize_weight(torch.ones(2, 2))
        except fp8.UsageError as e:
            assert "float8_e4m3fn" in str(e), e
            print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERN_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"


def test_quantize_without_float8_raises(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(UsageError, match="float8_e4m3fn"):
        quantize_linears_(nn.Sequential(nn.Linear(2, 2)))


# --------------------------------------------------------------------------- training base: Float8MatmulLinear


# What an architecture would declare as its keep_high_precision for Tiny's names (the kernel itself keeps none).
KEEP = (r"(^|\.)img_in(\.|$)", r"(^|\.)\w*_mod(\.|$)", r"(^|\.)final_layer(\.|$)")


class Tiny(nn.Module):
    """Named like a transformer: an embedder, two blocks of linears, modulation and a final layer."""

    def __init__(self, d: int = 64, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.img_in = nn.Linear(16, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "qkv": nn.Linear(d, 3 * d),
                    "proj": nn.Linear(d, d, bias=False),
                    "img_mod": nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d)),
                    "odd": nn.Linear(d, 20),
                }
            )
            for _ in range(2)
        )
        self.final_layer = nn.Linear(d, 16)
        self.to(dtype)
        self.requires_grad_(False)

    def forward(self, x):
        h = self.img_in(x)
        for b in self.blocks:
            q, k, v = b["qkv"](h).chunk(3, dim=-1)
            h = h + b["proj"](torch.tanh(q) * k + v)
        return self.final_layer(h)


def test_quantize_rows_error_and_range():
    torch.manual_seed(0)
    x = torch.randn(37, 128) * torch.logspace(-4, 3, 37).unsqueeze(1)
    x[3] = 0.0
    q, s = quantize_rows(x)
    assert q.dtype == FP8 and s.dtype == torch.float32 and s.shape == (37, 1)
    assert torch.isfinite(q.float()).all()
    # Each row's largest magnitude maps (within bf16/fp32 rounding of the multiplier) onto e4m3's 448.
    amax = q.float().abs().amax(1)
    assert torch.allclose(amax[x.abs().amax(1) > 0], torch.tensor(448.0))
    assert _rel(q.float() * s, x) < 0.04
    xb = x.bfloat16()
    qb, sb = quantize_rows(xb)  # bf16 input: multiplier rounded to bf16, scale is its exact reciprocal
    assert _rel(qb.float() * sb, x) < 0.04


def test_quantize_base_selects_layers_and_keeps_modules():
    model = Tiny()
    qkv = model.blocks[0]["qkv"]
    n = quantize_base(model, skip=KEEP)
    # Quantised: qkv and proj of both blocks. Skipped: img_in (embedder), img_mod (modulation), final_layer,
    # odd (20 output features: not a multiple of 16).
    assert n == 4
    assert model.blocks[0]["qkv"] is qkv and type(qkv) is Float8MatmulLinear and isinstance(qkv, nn.Linear)
    assert type(model.img_in) is nn.Linear and type(model.final_layer) is nn.Linear
    assert type(model.blocks[1]["img_mod"][1]) is nn.Linear and type(model.blocks[1]["odd"]) is nn.Linear
    sd = model.state_dict()
    assert sd["blocks.0.qkv.weight"].dtype == FP8 and sd["blocks.0.qkv.weight_scale"].dtype == torch.float32
    assert sd["blocks.0.qkv.weight_scale"].shape == (192,) and sd["blocks.0.qkv.bias"].dtype == torch.float32
    assert "blocks.0.proj.bias" not in sd
    # Casting the model keeps the fp8 weight and its scale; only the bias follows.
    model.to(torch.bfloat16)
    assert qkv.weight.dtype == FP8 and qkv.weight_scale.dtype == torch.float32 and qkv.bias.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())


def test_trainable_and_wrapped_layers():
    model = Tiny()
    model.blocks[0]["qkv"].weight.requires_grad_(True)  # trained, not base: left alone
    assert quantize_base(model, skip=KEEP) == 3
    assert type(model.blocks[0]["qkv"]) is nn.Linear
    with pytest.raises(UsageError):
        quantize_base(model, skip=KEEP, backward="fp16")


def test_forward_error_and_input_gradient_match_the_dequantised_reference():
    torch.manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        model = Tiny(dtype=dtype)
        lin = model.blocks[0]["qkv"]
        w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
        quantize_base(model, skip=KEEP)
        x = torch.randn(2, 9, 64, dtype=dtype, requires_grad=True)
        y = lin(x)
        assert y.dtype == dtype
        assert _rel(y, F.linear(x.double(), w.double(), b.double())) < 0.05  # weight rounding only, on the CPU
        gy = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, gy)
        # Reference: the same maths with the dequantised weight, through plain autograd.
        x2 = x.detach().clone().requires_grad_(True)
        y2 = F.linear(x2, lin.dequantized_weight(), lin.bias)
        (gx2,) = torch.autograd.grad(y2, x2, gy)
        tol = 0 if dtype == torch.float32 else 1e-2
        assert torch.allclose(y, y2, atol=tol, rtol=tol) and torch.allclose(gx, gx2, atol=tol, rtol=tol)
        assert _rel(gx, gy.double() @ w.double()) < 0.05


def test_saves_only_the_layer_buffers_for_backward():
    model = Tiny()
    quantize_base(model, skip=KEEP)
    lin = model.blocks[0]["qkv"]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 128, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lin(x)
    ptrs = {t.data_ptr() for t in saved}
    assert ptrs == {lin.weight.data_ptr(), lin.weight_scale.data_ptr()}  # no activation, no dequantised copy
    assert sum(t.numel() * t.element_size() for t in saved) == 192 * 64 + 192 * 4
    y.sum().backward()
    assert x.grad is not None and lin.weight.grad is None


def test_lora_on_fp8_base_trains_tiny_flux2():
    from kern.adapters.network import build_network
    from kern_flux2 import geometry
    from kern_flux2.params import tiny_params
    from kern_flux2.plugin import DEFAULT_TARGETS, KEEP_HIGH_PRECISION
    from kern_flux2.transformer import Flux2Transformer
    from kern_lora.module import LoRAModule

    torch.manual_seed(0)
    p = tiny_params(guidance_embed=False)
    model = Flux2Transformer(p).requires_grad_(False).eval()
    n = quantize_base(model, skip=KEEP_HIGH_PRECISION)
    assert n == 2 * 8 + 2 * 2  # double blocks: qkv, proj, mlp.0, mlp.2 per stream; single: linear1, linear2
    assert type(model.final_layer.linear) is nn.Linear and type(model.img_in) is nn.Linear
    assert type(model.double_stream_modulation_img.lin) is nn.Linear
    network = build_network("lora", model, TargetSpec(targets=DEFAULT_TARGETS), {"rank": 4}, LoRAModule)
    assert len(network.adapters) == n and all(type(a.org) is Float8MatmulLinear for a in network.adapters.values())
    network.train()
    opt = torch.optim.Adam(network.parameters(), lr=1e-2)
    img = geometry.pack(torch.randn(1, p.in_channels, 4, 4))
    ids = geometry.image_ids(4, 4)
    txt, txt_ids = torch.randn(1, 8, p.context_in_dim), geometry.text_ids(8)
    t, target = torch.tensor([0.5]), torch.randn(1, 16, p.in_channels)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    losses = []
    for _ in range(8):
        loss = (model(img, ids, txt, txt_ids, t) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        assert all(q.grad is not None for q in network.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())  # the base never moves


def test_quantise_after_the_network_is_refused():
    from kern.adapters.network import build_network
    from kern_lora.module import LoRAModule

    model = Tiny()
    build_network("lora", model, TargetSpec(targets=(r"blocks\.\d+\.qkv",)), {"rank": 4}, LoRAModule)
    with pytest.raises(UsageError, match="before building the network"):
        quantize_base(model, skip=KEEP)


def test_dequantize_base_round_trip():
    torch.manual_seed(2)
    model = Tiny()
    x = torch.randn(3, 16)
    quantize_base(model, skip=KEEP)
    with torch.no_grad():
        y = model(x)
    assert dequantize_base(model) == 4
    assert all(type(m) is not Float8MatmulLinear for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), y, atol=1e-6)
    assert (
        model.blocks[0]["qkv"].weight.dtype == torch.float32 and "weight_scale" not in model.blocks[0]["qkv"]._buffers
    )


def test_qwen_image_default_skips():
    from kern_qwen_image.params import tiny_params
    from kern_qwen_image.plugin import KEEP_HIGH_PRECISION
    from kern_qwen_image.transformer import QwenImageTransformer

    model = QwenImageTransformer(tiny_params()).requires_grad_(False)
    n = quantize_base(model, skip=KEEP_HIGH_PRECISION)
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    fp8 = sorted(k for k, v in kinds.items() if v is Float8MatmulLinear)
    assert n == len(fp8) == 2 * 12  # per block: 8 attention projections + 2 x 2 feed-forward linears
    assert all(".attn." in k or "_mlp." in k for k in fp8)
    for kept in (
        "img_in",
        "txt_in",
        "proj_out",
        "norm_out.linear",
        "transformer_blocks.0.img_mod.1",
        "transformer_blocks.1.txt_mod.1",
    ):
        assert kinds[kept] is nn.Linear, kept


def test_scaled_mm_maths_on_cpu():
    """The _scaled_mm call itself (layouts, rowwise scales, folded backward scale), where this torch runs it on the
    CPU; on CUDA it is what the layer uses."""
    from kern.gpu.fp8 import _scaled_grad_input, _scaled_linear

    torch.manual_seed(3)
    x = torch.randn(2, 33, 64, dtype=torch.bfloat16)
    w = torch.randn(48, 64) * torch.linspace(0.1, 3, 48).unsqueeze(1)
    q, s = quantize_weight(w)
    try:
        y = _scaled_linear(x, q, s, None, torch.bfloat16)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"this torch has no CPU _scaled_mm: {exc}")
    assert y.shape == (2, 33, 48) and y.dtype == torch.bfloat16
    assert _rel(y, x.double() @ w.double().T) < 0.06
    gy = torch.randn(2, 33, 48, dtype=torch.bfloat16)
    gx = _scaled_grad_input(gy, q, s, torch.bfloat16)
    assert gx.shape == (2, 33, 64) and _rel(gx, gy.double() @ w.double()) < 0.06


@pytest.mark.skipif(not fp8_matmul_supported(), reason="needs a CUDA GPU with fp8 matmuls (compute capability 8.9+)")
@pytest.mark.parametrize("backward", ["bf16", "fp8"])
def test_cuda_fast_path(backward):
    torch.manual_seed(4)
    model = Tiny(d=256, dtype=torch.bfloat16).cuda()
    lin = model.blocks[0]["qkv"]
    w = lin.weight.detach().double().clone()
    quantize_base(model, skip=KEEP, backward=backward)
    assert lin.fast
    x = torch.randn(3, 1000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = lin(x)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ w.T + lin.bias.double()
    assert _rel(y, ref) < 0.06
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    assert _rel(gx, gy.double() @ w) < (0.06 if backward == "fp8" else 0.04)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert lin(x.float()).dtype == torch.bfloat16


def test_merging_an_adapter_into_an_fp8_base_layer_keeps_its_scale():
    """``Network.merge`` adds ΔW into an Float8MatmulLinear through its scale (dequantise, add, re-quantise), not into the
    raw e4m3 codes."""
    from kern.adapters.network import add_to_weight_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48))
    model.requires_grad_(False)
    quantize_base(model, skip=())
    layer = model[0]
    before = layer.dequantized_weight(torch.float32)
    delta = 0.01 * torch.randn(48, 32)
    add_to_weight_(layer, delta)
    after = layer.dequantized_weight(torch.float32)
    assert torch.allclose(after, before + delta, atol=0.07 * before.abs().max().item())
    assert (after - before - delta).abs().mean() < 0.1 * delta.abs().mean() + 0.02 * before.abs().mean()


def test_storage_and_matmul_layers_share_one_format():
    """Both layers hold the same e4m3 codes and scales for a weight, dequantise it the same way and, where the
    matmul layer makes no fp8 matmul (a CPU input, on any machine), compute the same output."""
    torch.manual_seed(5)
    lin = nn.Linear(64, 32).to(torch.bfloat16).requires_grad_(False)
    storage = Float8StorageLinear.from_linear(lin)
    model = nn.Sequential(lin)
    assert quantize_base(model, skip=()) == 1
    base = model[0]
    assert type(base) is Float8MatmulLinear  # base.fast says what CUDA inputs get; x below is on the CPU
    assert torch.equal(storage.weight.float(), base.weight.float())
    assert torch.equal(storage.weight_scale, base.weight_scale)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(storage.dequantized_weight(dtype), base.dequantized_weight(dtype))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(storage(x), base(x))
