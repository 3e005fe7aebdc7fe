"""``(W1 ⊗ W2) x`` for a batch of tokens, keeping nothing for backward but its inputs.

With ``x`` viewed as ``X`` (…, b, d), ``(W1 ⊗ W2) x = vec(W1 · X · W2ᵀ)``: two small matmuls instead of one with the
(a·c × b·d) ΔW. Plain autograd through those matmuls would keep the intermediate ``H = X W2ᵀ`` (…, b, c), as large as
the layer's output when W1 is square, for every adapted layer until backward. :class:`KronLinear` keeps only
``X`` (the layer's input, which the base layer keeps anyway), ``W1`` and ``W2``, and recomputes ``H`` in backward:

    G = ∂L/∂Y (…, a, c),   ∂H = W1ᵀ G,   ∂X = ∂H · W2,   ∂W2 = Σ ∂Hᵀ X,   ∂W1 = Σ G Hᵀ  (H = X W2ᵀ, recomputed).
"""

from __future__ import annotations

import torch


class KronLinear(torch.autograd.Function):
    """``Y = W1 · X · W2ᵀ`` over the leading axes of ``X`` (…, b, d), with ``W1`` (a, b) and ``W2`` (c, d)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w1, w2)
        return torch.matmul(w1, torch.matmul(x, w2.T))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w1, w2 = ctx.saved_tensors
        b, d, c = x.shape[-2], x.shape[-1], w2.shape[0]
        gx = gw1 = gw2 = None
        gh = torch.matmul(w1.T, grad)  # (…, b, c)
        if ctx.needs_input_grad[0]:
            gx = torch.matmul(gh, w2)
        if ctx.needs_input_grad[2]:
            gw2 = gh.reshape(-1, c).T @ x.reshape(-1, d)
        del gh
        if ctx.needs_input_grad[1]:
            h = torch.matmul(x, w2.T)  # recomputed, (…, b, c)
            a = w1.shape[0]
            gw1 = (
                grad.reshape(-1, a, c).transpose(0, 1).reshape(a, -1)
                @ h.reshape(-1, b, c).transpose(0, 1).reshape(b, -1).T
            )
        return gx, gw1, gw2


def kron_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``(W1 ⊗ W2) x`` for ``x`` of shape (…, b·d); returns (…, a·c)."""
    (a, b), (c, d) = w1.shape, w2.shape
    lead = x.shape[:-1]
    y = KronLinear.apply(x.reshape(*lead, b, d), w1, w2)
    return y.reshape(*lead, a * c)


__all__ = ["KronLinear", "kron_linear"]
