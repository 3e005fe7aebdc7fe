"""kern.gpu.fp8: weight-only float8_e4m3fn storage for nn.Linear, dequantised on the fly.

Tolerances come from the format: e4m3 keeps 3 mantissa bits, so rounding a weight in the normal range moves it by
at most half a step, 2**-4 of its magnitude; for weights spread over a row (Gaussian) the RMS relative error is
about 2.5 %. A matmul sums many such independent errors, so its output is off by about the same 2.5 % (RMS,
relative to the output's norm), far from what a wrong scale, layout or dtype would give (tens of percent or more).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kern.errors import UsageError
from kern.gpu.fp8 import E4M3_MAX, Float8Linear, quantize_linears_, quantize_weight

FP8 = getattr(torch, "float8_e4m3fn", None)
pytestmark = pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


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
    f8 = Float8Linear.from_linear(lin)
    x = torch.randn(3, 5, 48, dtype=torch.bfloat16)
    assert torch.equal(f8.dequantized_weight(), lin.weight)
    assert torch.equal(f8(x), F.linear(x, lin.weight, lin.bias))


def test_matches_bf16_linear_within_e4m3_rounding():
    torch.manual_seed(2)
    lin = nn.Linear(256, 192)
    x = torch.randn(4, 16, 256, dtype=torch.bfloat16)
    ref = F.linear(x, lin.weight.to(torch.bfloat16), lin.bias.to(torch.bfloat16))
    out = Float8Linear.from_linear(lin, compute_dtype=torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    # See the module docstring: expected ≈ 2.5 %; 5 % bound.
    assert _rel(out, ref) < 0.05
    # fp32 input: computed in bf16, returned as fp32 like nn.Linear would.
    assert Float8Linear.from_linear(lin)(x.float()).dtype == torch.float32


def test_backward_saves_fp8_weight_only():
    torch.manual_seed(3)
    lin = nn.Linear(40, 24)
    f8 = Float8Linear.from_linear(lin, compute_dtype=torch.float32)
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
    assert isinstance(net.blocks[0], Float8Linear) and isinstance(net.blocks[3], Float8Linear)
    assert type(net.head) is nn.Linear and not isinstance(net.attn.out_proj, Float8Linear)
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
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
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
