"""kern_lokr.kron: the Kronecker forward's gradients, and what it keeps for backward."""

from __future__ import annotations

import pytest
import torch
from kern_lokr.kron import kron_linear


def test_gradients_are_the_dense_products():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kron_linear, (x, w1, w2))
    y = kron_linear(x, w1, w2)
    assert torch.allclose(y, x @ torch.kron(w1, w2).T, atol=1e-12)


def saved_bytes(fn, *args) -> tuple[torch.Tensor, int]:
    """The output of ``fn`` and the bytes of distinct storages autograd keeps for its backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(storages.values())


@pytest.mark.parametrize("a,b,c,d", [(96, 96, 32, 32), (16, 16, 192, 192)])
def test_keeps_only_its_input_and_factors(a, b, c, d):
    """Plain autograd through W1·(X·W2ᵀ) keeps the (tokens, b, c) intermediate; kern_lokr::kron_linear keeps X, W1, W2 only."""
    tokens = 64
    x = torch.randn(tokens, b * d, requires_grad=True)
    w1 = torch.randn(a, b, requires_grad=True)
    w2 = torch.randn(c, d, requires_grad=True)
    ours, kept = saved_bytes(kron_linear, x, w1, w2)
    plain, kept_plain = saved_bytes(
        lambda x, w1, w2: torch.matmul(w1, torch.matmul(x.reshape(tokens, b, d), w2.T)).reshape(tokens, a * c),
        x,
        w1,
        w2,
    )
    inputs = sum(t.untyped_storage().nbytes() for t in (x, w1, w2))
    assert kept == inputs
    assert kept_plain >= inputs + tokens * b * c * 4
    assert torch.allclose(ours, plain, rtol=1e-5, atol=1e-4)
    ours.square().sum().backward()
    grads = [t.grad.clone() for t in (x, w1, w2)]
    for t in (x, w1, w2):
        t.grad = None
    plain.square().sum().backward()
    for g, t in zip(grads, (x, w1, w2)):
        assert torch.allclose(g, t.grad, rtol=1e-4, atol=1e-3)


def test_a_lokr_layer_under_autocast_keeps_the_autocast_dtype():
    """Under mixed precision the adapted layer's output is autocast's dtype, as the base Linear's: fp32 factors must not
    turn it (and every activation after it) into fp32. Gradients still reach the fp32 factors."""
    from kern.records import TargetSpec
    from kern_lokr.plugin import LOKR

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48)).requires_grad_(False)
    net = LOKR.make_network(model, TargetSpec(targets=("0",)), {"rank": 4, "factor": 4})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    x = torch.randn(2, 3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    params = list(net.parameters())
    assert params and all(p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    net.remove()
