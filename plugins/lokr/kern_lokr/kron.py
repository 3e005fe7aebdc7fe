"""``(W1 ⊗ W2) x`` for a batch of tokens, keeping nothing for backward but its inputs.

With ``x`` viewed as ``X`` (…, b, d), ``(W1 ⊗ W2) x = vec(W1 · X · W2ᵀ)``: two small matmuls instead of one with the
(a·c × b·d) ΔW. Plain autograd through those matmuls would keep the intermediate ``H = X W2ᵀ`` (…, b, c), as large as
the layer's output when W1 is square, for every adapted layer until backward. ``kern_lokr::kron_linear`` keeps only
``X`` (the layer's input, which the base layer keeps anyway), ``W1`` and ``W2``, and recomputes ``H`` in backward:

    G = ∂L/∂Y (…, a, c),   ∂H = W1ᵀ G,   ∂X = ∂H · W2,   ∂W2 = Σ ∂Hᵀ X,   ∂W1 = Σ G Hᵀ  (H = X W2ᵀ, recomputed).

It is a ``torch.library`` custom op, not an ``autograd.Function``: ``torch.compile`` (kern compiles the blocks) keeps
an op opaque and saves what its backward formula reads, where it would trace a Function's matmuls and re-decide what
to keep (on the GPU that doubled a compiled klein-4B step's peak memory, measured).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("kern_lokr::kron_linear", mutates_args=())
def kron_product(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """``Y = W1 · X · W2ᵀ`` over the leading axes of ``X`` (…, b, d), with ``W1`` (a, b) and ``W2`` (c, d)."""
    return torch.matmul(w1, torch.matmul(x, w2.T))


@kron_product.register_fake
def _(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-2], w1.shape[0], w2.shape[0]))


@torch.library.custom_op("kern_lokr::kron_linear_backward", mutates_args=())
def kron_product_backward(grad: Tensor, x: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(∂X, ∂W1, ∂W2)`` of :func:`kron_product` for ``grad`` = ∂L/∂Y."""
    a, b, c, d = w1.shape[0], x.shape[-2], w2.shape[0], x.shape[-1]
    gh = torch.matmul(w1.T, grad)  # (…, b, c)
    gx = torch.matmul(gh, w2)
    gw2 = gh.reshape(-1, c).T @ x.reshape(-1, d)
    del gh
    h = torch.matmul(x, w2.T).reshape(-1, b, c)  # recomputed
    gw1 = grad.reshape(-1, a, c).transpose(0, 1).reshape(a, -1) @ h.transpose(0, 1).reshape(b, -1).T
    return gx, gw1, gw2


@kron_product_backward.register_fake
def _(grad: Tensor, x: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: Tensor):
    x, w1, w2 = ctx.saved_tensors
    return kron_product_backward(grad.contiguous(), x, w1, w2)


kron_product.register_autograd(_backward, setup_context=_setup_context)


def kron_linear(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """``(W1 ⊗ W2) x`` for ``x`` of shape (…, b·d); returns (…, a·c). ``x``, ``w1`` and ``w2`` share one dtype."""
    (a, b), (c, d) = w1.shape, w2.shape
    lead = x.shape[:-1]
    y = kron_product(x.reshape(*lead, b, d), w1, w2)
    return y.reshape(*lead, a * c)


__all__ = ["kron_linear", "kron_product"]
