"""The LoHa layer (Hadamard-product low rank, FedPara / LyCORIS), its memory-saving autograd function and factor algebra.

Maths (LyCORIS' LoHa): ``ΔW = γ · (W1a · W1b) ⊙ (W2a · W2b)`` with ``hada_w1_a``, ``hada_w2_a`` (out × r),
``hada_w1_b``, ``hada_w2_b`` (r × in) and ``γ = α / r`` (``α / √r`` with rsLoRA); α unset or 0 means α = r.
rank(ΔW) ≤ r², with 2·r·(in + out) parameters (twice a LoRA of the same r). Conv2d layers are supported the
LyCORIS way: the factors act on the flattened kernel (``in · kh · kw`` columns), no Tucker decomposition.

Initialisation as LyCORIS / musubi: ``w1_a ~ N(0, 0.1²)``, ``w1_b ~ N(0, 1)``, ``w2_b ~ N(0, 1)`` and
**``hada_w2_a = 0``**, so ΔW = 0 at step 0 while ``∂L/∂W2a = (G ⊙ T1) W2bᵀ`` is non-zero and training can start.

Forward: ``y = W x + m · drop(F.linear(x, ΔW))``: ΔW is materialised (out × in) each step, which is why LoHa
needs more memory than LoRA. :class:`HadaWeight` keeps that cost to **one** ΔW-sized tensor (the one
``F.linear`` saves): it saves only the four factors and recomputes ``T1 = W1a·W1b`` and ``T2 = W2a·W2b`` in
backward, where plain autograd would also keep T1 and T2 alive (two more out × in tensors per layer).

Dropout kinds for LoHa (training only):

* ``dropout`` — inverted dropout on the adapter's **output** ``ΔW x`` (LyCORIS' documented bypass semantics
  ``Wx + drop(ΔW x)``; musubi accepts the option but does not apply it, LyCORIS prints "not implemented").
* ``rank_dropout`` — despite the name, masks **output rows** of ΔW (``rand(out) > p``, rescaled by
  ``1/(1 − p)``), as musubi and LyCORIS do; applied to the output channels of ``ΔW x``, which is the same.
* ``module_dropout`` — skip the whole adapter of a layer for one forward with probability ``p``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from kern.adapters.network import FactorOps, RankAdapterModule, compute_dtype
from kern.errors import AdapterError
from torch import nn

W1A, W1B, W2A, W2B, T1, T2, ALPHA = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"
SUFFIXES = (W1A, W1B, W2A, W2B, T1, T2, ALPHA)
FACTORS = (W1A, W1B, W2A, W2B)


class HadaWeight(torch.autograd.Function):
    """``ΔW = γ · (W1a W1b) ⊙ (W2a W2b)`` that saves only the four factors for backward.

    With ``G' = γ · ∂L/∂ΔW``: ``∂W1a = (G' ⊙ T2) W1bᵀ``, ``∂W1b = W1aᵀ (G' ⊙ T2)``, ``∂W2a = (G' ⊙ T1) W2bᵀ``,
    ``∂W2b = W2aᵀ (G' ⊙ T1)``, recomputing ``T1 = W1a W1b`` and ``T2 = W2a W2b`` (one rank-r matmul each).
    """

    @staticmethod
    def forward(
        ctx, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, gamma: float
    ) -> torch.Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.gamma = gamma
        return (w1a @ w1b) * (w2a @ w2b) * gamma

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        g = grad * ctx.gamma
        g1a = g1b = g2a = g2b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            tmp = g * (w2a @ w2b)
            g1a = tmp @ w1b.T if ctx.needs_input_grad[0] else None
            g1b = w1a.T @ tmp if ctx.needs_input_grad[1] else None
            del tmp
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            tmp = g * (w1a @ w1b)
            g2a = tmp @ w2b.T if ctx.needs_input_grad[2] else None
            g2b = w2a.T @ tmp if ctx.needs_input_grad[3] else None
        return g1a, g1b, g2a, g2b, None


def hada_weight(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, gamma: float
) -> torch.Tensor:
    return HadaWeight.apply(w1a, w1b, w2a, w2b, gamma)


def loha_delta(tensors: Mapping[str, torch.Tensor], base_shape: Sequence[int], where: str = "") -> torch.Tensor:
    """ΔW in float32 with the layer weight's shape, plain or Tucker (``hada_t1/t2``, ComfyUI's einsum)."""
    try:
        w1a, w1b, w2a, w2b = (tensors[s].to(torch.float32) for s in FACTORS)
    except KeyError as exc:
        raise AdapterError(f"{where}: LoHa module lacks {exc.args[0]}") from None
    rank = w1b.shape[0]
    alpha = tensors.get(ALPHA)
    gamma = (float(alpha) if alpha is not None else float(rank)) / rank
    try:
        if T1 in tensors and T2 in tensors:
            t1, t2 = tensors[T1].to(torch.float32), tensors[T2].to(torch.float32)
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
            delta = m1 * m2 * gamma
        else:
            delta = w1a.reshape(w1a.shape[0], -1) @ w1b.reshape(rank, -1)
            delta.mul_(w2a.reshape(w2a.shape[0], -1) @ w2b.reshape(w2b.shape[0], -1))
            if gamma != 1.0:
                delta.mul_(gamma)
    except RuntimeError as exc:
        raise AdapterError(f"{where}: LoHa factors do not fit together: {exc}") from None
    if delta.numel() != math.prod(base_shape) or delta.shape[0] != base_shape[0]:
        raise AdapterError(
            f"{where}: LoHa of ΔW shape {tuple(delta.shape)} (hada_w1_a {tuple(w1a.shape)}, hada_w1_b {tuple(w1b.shape)}) "
            f"does not fit the base weight {tuple(base_shape)}"
        )
    return delta.reshape(tuple(base_shape))


def loha_shape(tensors: Mapping[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The base weight's shape from a module's kohya tensors: hada_w1_a's rows × hada_w1_b's columns (× the Tucker
    core's kernel); a conv stored flattened gives (out, in · kh · kw)."""
    if W1A not in tensors or W1B not in tensors:
        return None
    out, w1b = int(tensors[W1A].shape[0]), tensors[W1B]
    if T1 in tensors:  # Tucker: w1_b is r × in, the kernel sits in t1 (r × r × kh × kw)
        return (out, int(w1b.shape[-1]), *(int(s) for s in tensors[T1].shape[2:]))
    return (out, *(int(s) for s in w1b.shape[1:]))


class LoHaModule(RankAdapterModule):
    """A LoHa on one ``nn.Linear`` / ``Float8StorageLinear`` / ``nn.Conv2d`` (flattened kernel)."""

    label = "LoHa"
    rank_factor = W1B
    reshape_loaded = True  # conv factors may come flattened or not
    weight_delta = staticmethod(loha_delta)
    weight_shape = staticmethod(loha_shape)

    def make_factors(self, rank: int, *, dtype: torch.dtype, device: torch.device | str | None) -> None:
        shape = self.geometry["weight_shape"]
        out_f, in_f = shape[0], math.prod(shape[1:])
        kw = {"dtype": dtype, "device": device}
        self.hada_w1_a = nn.Parameter(torch.empty(out_f, rank, **kw))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_f, **kw))
        self.hada_w2_a = nn.Parameter(torch.empty(out_f, rank, **kw))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_f, **kw))

    def reset_factors(self) -> None:
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)

    def factors(self) -> dict[str, torch.Tensor]:
        return {s: getattr(self, s) for s in FACTORS}

    @classmethod
    def from_tensors(cls, name: str, path: str, org: nn.Module, tensors: Mapping[str, torch.Tensor]) -> LoHaModule:
        if T1 in tensors or T2 in tensors:
            raise AdapterError(
                f"{name}: Tucker LoHa (hada_t1/hada_t2) can be merged (`kern merge`) but not applied unmerged"
            )
        return super().from_tensors(name, path, org, tensors)

    def delta(self) -> torch.Tensor:
        """ΔW (γ applied, no multiplier) in the adapter dtype, with autograd through :class:`HadaWeight`."""
        dw = hada_weight(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale)
        return dw.reshape(self.geometry["weight_shape"])

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x, self.hada_w1_a.dtype))
        dw = self.delta()
        if self.geometry["kind"] == "conv2d":
            y = self.org._conv_forward(x, dw, None)
        else:
            y = F.linear(x, dw)
        if self.training:
            if self.rank_dropout > 0:
                keep = (torch.rand(dw.shape[0], device=y.device) > self.rank_dropout).to(y.dtype) / (
                    1.0 - self.rank_dropout
                )
                y = y * (keep.view(1, -1, 1, 1) if self.geometry["kind"] == "conv2d" else keep)
            if self.dropout > 0:
                y = F.dropout(y, p=self.dropout)
        return y


class LoHaOps(FactorOps):
    """Exact split / fuse of LoHa modules along output rows.

    Split: rows of ``T1`` and ``T2`` are rows of ``W1a`` / ``W2a``, so those are sliced and ``W1b`` / ``W2b``
    kept. Fuse: ``W1a`` and ``W2a`` become block-diagonal (rank Σr) and ``W1b`` / ``W2b`` are stacked, so each
    row block of ``T1 ⊙ T2`` is that part's own ``T1 ⊙ T2``; each part's γ is folded into its ``W1a`` block
    and α = Σr (γ = 1).
    """

    def split(self, tensors: Mapping[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
        if T1 in tensors:
            raise AdapterError("splitting a Tucker LoHa is not supported")
        out = {W1A: tensors[W1A][start:stop].contiguous(), W2A: tensors[W2A][start:stop].contiguous()}
        out[W1B] = tensors[W1B].clone()
        out[W2B] = tensors[W2B].clone()
        out[ALPHA] = torch.tensor(float(tensors[ALPHA]) if ALPHA in tensors else float(tensors[W1B].shape[0]))
        return out

    def fuse(
        self, parts: Sequence[tuple[tuple[int, int], Mapping[str, torch.Tensor]]], total_rows: int
    ) -> dict[str, torch.Tensor]:
        parts = sorted(parts, key=lambda p: p[0][0])
        if any(T1 in t for _, t in parts):
            raise AdapterError("fusing Tucker LoHa modules is not supported")
        gammas = [(float(t[ALPHA]) if ALPHA in t else float(t[W1B].shape[0])) / t[W1B].shape[0] for _, t in parts]
        contiguous = (
            parts[0][0][0] == 0
            and parts[-1][0][1] == total_rows
            and all(parts[i][0][1] == parts[i + 1][0][0] for i in range(len(parts) - 1))
        )
        first = parts[0][1]
        shared = all(
            t[W1B].shape == first[W1B].shape and torch.equal(t[W1B], first[W1B]) and torch.equal(t[W2B], first[W2B])
            for _, t in parts[1:]
        )
        if contiguous and shared and len(set(gammas)) == 1:
            return {
                W1A: torch.cat([t[W1A] for _, t in parts], dim=0),
                W1B: first[W1B].clone(),
                W2A: torch.cat([t[W2A] for _, t in parts], dim=0),
                W2B: first[W2B].clone(),
                ALPHA: torch.tensor(gammas[0] * first[W1B].shape[0]),
            }
        dtype = first[W1A].dtype
        total_rank = sum(t[W1B].shape[0] for _, t in parts)
        w1a = torch.zeros(total_rows, total_rank, dtype=dtype)
        w2a = torch.zeros(total_rows, total_rank, dtype=dtype)
        col = 0
        for ((start, stop), t), g in zip(parts, gammas):
            r = t[W1B].shape[0]
            w1a[start:stop, col : col + r] = t[W1A].to(torch.float32).mul(g).to(dtype)
            w2a[start:stop, col : col + r] = t[W2A]
            col += r
        return {
            W1A: w1a,
            W1B: torch.cat([t[W1B] for _, t in parts], dim=0),
            W2A: w2a,
            W2B: torch.cat([t[W2B] for _, t in parts], dim=0),
            ALPHA: torch.tensor(float(total_rank)),
        }


def normalise(
    state_dict: Mapping[str, torch.Tensor], modules: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name as written: {suffix: tensor}}`` with ``alpha`` always present (α = r when absent)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, keys in modules.items():
        t = {key[len(name) + 1 :]: state_dict[key] for key in keys}
        missing = [s for s in FACTORS if s not in t]
        if missing:
            raise AdapterError(f"LoHa module {name!r} is incomplete: no {' / '.join(missing)} (keys: {list(keys)})")
        rank = t[W1B].shape[0]
        t[ALPHA] = t[ALPHA].detach().to(torch.float32).reshape(()) if ALPHA in t else torch.tensor(float(rank))
        out[name] = t
    return out
