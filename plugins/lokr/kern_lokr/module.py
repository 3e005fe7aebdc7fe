"""The LoKr layer (Kronecker product, LyCORIS), its factor plan and ΔW from file tensors.

Maths (LyCORIS' LoKr): ``ΔW = γ · W1 ⊗ W2`` with ``W1 = lokr_w1`` (a × b) or ``lokr_w1_a · lokr_w1_b`` and
``W2 = lokr_w2`` (c × d [× kh × kw]) or ``lokr_w2_a · lokr_w2_b``; out = a·c, in = b·d. ``γ = α / r`` (``α / √r``
with rsLoRA) where r is the rank of the low-rank branch; with both W1 and W2 full matrices there is no rank and
γ = 1 whatever α says (LyCORIS, ComfyUI). α unset or 0 means α = r.

The plan follows LyCORIS' ``LokrModule``: ``(a, c) = factorization(out, factor)``, ``(b, d) = factorization(in,
factor)`` (the smaller of each pair goes to W1); W1 is low rank only with ``decompose_both`` and ``r < max(a, b)/2``
(and not ``full_matrix``); W2 is a full matrix when ``r ≥ max(c, d)/2`` or ``full_matrix``, else low rank. Conv
layers keep the kernel in W2 (``lokr_w2`` c × d × kh × kw, or ``lokr_w2_b`` r × (d·kh·kw) flattened).

Initialisation as LyCORIS: W1 (or both its factors) Kaiming-uniform (a = √5); ``lokr_w2`` = 0, or ``lokr_w2_a``
Kaiming-uniform and ``lokr_w2_b = 0``: ΔW = 0 at step 0 and the W2 gradient is not.

Forward on a Linear never builds ΔW: with ``x`` viewed as (…, b, d), ``(W1 ⊗ W2) x = vec(W1 · X · W2ᵀ)``, two
small matmuls (``kern_lokr.kron``: a custom op whose backward keeps only x and the factors). Conv layers build ΔW
(out × in × kh × kw) and convolve with it.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import attrs
import torch
import torch.nn.functional as F
from kern.adapters.network import RankAdapterModule, compute_dtype, layer_device, layer_geometry
from kern.errors import AdapterError
from torch import nn

from kern_lokr.kron import kron_linear

W1, W1A, W1B, W2, W2A, W2B, T2, ALPHA = (
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
    "alpha",
)
SUFFIXES = (W1, W1A, W1B, W2, W2A, W2B, T2, ALPHA)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)``, ``m ≤ n``, ``m · n = dimension``: ``factor`` and its cofactor when ``factor`` divides it, else the
    most balanced split with ``m ≤ factor`` (any ``m`` for ``factor = -1``). LyCORIS' ``factorization``."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@attrs.frozen
class Plan:
    """The shapes of one LoKr: W1 is a × b, W2 is c × d (× ``kernel``); ``w1_low`` / ``w2_low``: that side is a
    rank-``rank`` product. ``rank`` is None when both sides are full matrices (γ = 1)."""

    a: int
    b: int
    c: int
    d: int
    w1_low: bool
    w2_low: bool
    kernel: tuple[int, ...] = ()
    rank: int | None = None


def plan_for(
    weight_shape: Sequence[int], rank: int, factor: int = -1, decompose_both: bool = False, full_matrix: bool = False
) -> Plan:
    """LyCORIS' choice of factor shapes for a layer weight of ``weight_shape`` (out, in [, kh, kw])."""
    out_dim, in_dim, *kernel = weight_shape
    a, c = factorization(out_dim, factor)
    b, d = factorization(in_dim, factor)
    w1_low = decompose_both and rank < max(a, b) / 2 and not full_matrix
    w2_low = rank < max(c, d) / 2 and not full_matrix
    return Plan(a, b, c, d, w1_low, w2_low, tuple(kernel), rank if (w1_low or w2_low) else None)


def plan_of(tensors: Mapping[str, torch.Tensor], weight_shape: Sequence[int], where: str = "") -> Plan:
    """The plan a module's file tensors follow, checked against the layer weight ``weight_shape``."""
    out_dim, in_dim, *kernel = weight_shape
    if W1 in tensors:
        a, b = tensors[W1].shape[:2]
    elif W1A in tensors and W1B in tensors:
        a, b = tensors[W1A].shape[0], tensors[W1B].shape[-1]
    else:
        raise AdapterError(f"{where}: LoKr module has neither {W1} nor {W1A} + {W1B}")
    if W2 in tensors:
        c = tensors[W2].shape[0]
    elif W2A in tensors and W2B in tensors:
        c = tensors[W2A].shape[1] if T2 in tensors else tensors[W2A].shape[0]
    else:
        raise AdapterError(f"{where}: LoKr module has neither {W2} nor {W2A} + {W2B}")
    if a * c != out_dim or b == 0 or in_dim % b != 0:
        raise AdapterError(
            f"{where}: LoKr factors (W1 {a} × {b}, W2 {c} rows) do not fit the base weight {tuple(weight_shape)}"
        )
    rank = None
    if W1A in tensors:
        rank = int(tensors[W1B].shape[0])
    elif W2B in tensors:
        rank = int(tensors[W2B].shape[0])
    return Plan(int(a), int(b), int(c), in_dim // int(b), W1 not in tensors, W2 not in tensors, tuple(kernel), rank)


def lokr_shape(tensors: Mapping[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The base weight's shape from a module's kohya tensors: (a·c, b·d [, kh, kw]) for W1 a × b and W2 c × d; a
    conv W2 stored flattened (``lokr_w2_b`` r × d·kh·kw) gives (out, in · kh · kw)."""
    if W1 in tensors:
        a, b = (int(s) for s in tensors[W1].shape[:2])
    elif W1A in tensors and W1B in tensors:
        a, b = int(tensors[W1A].shape[0]), int(tensors[W1B].shape[-1])
    else:
        return None
    if W2 in tensors:
        c, *rest = (int(s) for s in tensors[W2].shape)
        return (a * c, b * rest[0], *rest[1:]) if rest else None
    if W2A not in tensors or W2B not in tensors:
        return None
    if T2 in tensors:  # Tucker: w2_a is r × c, w2_b r × d, the kernel sits in t2 (r × r × kh × kw)
        c, d = int(tensors[W2A].shape[1]), int(tensors[W2B].shape[1])
        return (a * c, b * d, *(int(s) for s in tensors[T2].shape[2:]))
    w2b = tensors[W2B]
    c = int(tensors[W2A].shape[0])
    return (a * c, b * int(w2b.shape[1]), *(int(s) for s in w2b.shape[2:]))


def kron_delta(w1: torch.Tensor, w2: torch.Tensor, gamma: float) -> torch.Tensor:
    """``γ · w1 ⊗ w2``; a conv ``w2`` (c × d × kh × kw) keeps its kernel axes."""
    w1 = w1.reshape(*w1.shape, *(1,) * (w2.dim() - 2))
    delta = torch.kron(w1, w2.contiguous())  # kron views its operands: an einsum result may not allow it
    return delta * gamma if gamma != 1.0 else delta


def lokr_delta(tensors: Mapping[str, torch.Tensor], base_shape: Sequence[int], where: str = "") -> torch.Tensor:
    """ΔW in float32 with the layer weight's shape, from a module's kohya tensors (Tucker ``lokr_t2`` included)."""
    plan = plan_of(tensors, base_shape, where)
    f = {k: v.to(torch.float32) for k, v in tensors.items() if k != ALPHA}
    try:
        w1 = f[W1] if W1 in f else f[W1A] @ f[W1B]
        if W2 in f:
            w2 = f[W2]
        elif T2 in f:  # LyCORIS' rebuild_tucker: W2[p, r, ...] = Σ t2[i, j, ...] w2_a[i, p] w2_b[j, r]
            w2 = torch.einsum("i j ..., i p, j r -> p r ...", f[T2], f[W2A], f[W2B])
        else:
            w2 = f[W2A] @ f[W2B].reshape(f[W2B].shape[0], -1)
        w2 = w2.reshape(plan.c, plan.d, *plan.kernel)
        alpha = tensors.get(ALPHA)
        gamma = 1.0 if plan.rank is None or alpha is None else float(alpha) / plan.rank
        delta = kron_delta(w1.reshape(plan.a, plan.b), w2, gamma)
    except RuntimeError as exc:
        raise AdapterError(f"{where}: LoKr factors do not fit together: {exc}") from None
    if tuple(delta.shape) != tuple(base_shape):
        raise AdapterError(
            f"{where}: LoKr ΔW of shape {tuple(delta.shape)} does not fit the base weight {tuple(base_shape)}"
        )
    return delta


class LoKrModule(RankAdapterModule):
    """A LoKr on one ``nn.Linear`` / ``Float8StorageLinear`` / ``nn.Conv2d``."""

    label = "LoKr"
    rank_factor = W1B  # unused: file_rank reads the rank off whichever side is low rank
    reshape_loaded = True  # conv lokr_w2_b may come flattened (LyCORIS' module) or not (its functional API)
    weight_delta = staticmethod(lokr_delta)
    weight_shape = staticmethod(lokr_shape)

    def __init__(
        self,
        name: str,
        path: str,
        org: nn.Module,
        rank: int,
        alpha: float | None = None,
        *,
        factor: int = -1,
        decompose_both: bool = False,
        full_matrix: bool = False,
        plan: Plan | None = None,
        **kwargs,
    ) -> None:
        # make_factors runs inside RankAdapterModule.__init__ and needs these; plain attributes are safe before it.
        self.__dict__["_lokr_args"] = (int(factor), bool(decompose_both), bool(full_matrix), plan)
        super().__init__(name, path, org, rank, alpha, **kwargs)
        if self.plan.rank is None:  # both sides full: no rank, γ = 1 (LyCORIS writes α = r then)
            self.scale = 1.0
            self.alpha.fill_(float(rank))

    def make_factors(self, rank: int, *, dtype: torch.dtype, device: torch.device | str | None) -> None:
        factor, decompose_both, full_matrix, plan = self._lokr_args
        shape = self.geometry["weight_shape"]
        self.plan = plan or plan_for(shape, rank, factor, decompose_both, full_matrix)
        p, kw = self.plan, {"dtype": dtype, "device": device}
        if p.w1_low:
            self.lokr_w1_a = nn.Parameter(torch.empty(p.a, rank, **kw))
            self.lokr_w1_b = nn.Parameter(torch.empty(rank, p.b, **kw))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(p.a, p.b, **kw))
        if p.w2_low:
            self.lokr_w2_a = nn.Parameter(torch.empty(p.c, rank, **kw))
            self.lokr_w2_b = nn.Parameter(torch.empty(rank, p.d * math.prod(p.kernel), **kw))
        else:
            self.lokr_w2 = nn.Parameter(torch.empty(p.c, p.d, *p.kernel, **kw))

    def reset_factors(self) -> None:
        for w in (W1A, W1B, W1, W2A):
            if hasattr(self, w):
                nn.init.kaiming_uniform_(getattr(self, w), a=math.sqrt(5))
        nn.init.zeros_(self.lokr_w2_b if self.plan.w2_low else self.lokr_w2)

    def factors(self) -> dict[str, torch.Tensor]:
        return {s: getattr(self, s) for s in (W1, W1A, W1B, W2, W2A, W2B) if s in self._parameters}

    @classmethod
    def file_rank(cls, tensors: Mapping[str, torch.Tensor]) -> int | None:
        """The low-rank side's rank (``lokr_w1_b`` or ``lokr_w2_b`` rows); None when W1 and W2 are full matrices."""
        low = tensors.get(W1B, tensors.get(W2B))
        return None if low is None else int(low.shape[0])

    @classmethod
    def from_tensors(cls, name: str, path: str, org: nn.Module, tensors: Mapping[str, torch.Tensor]) -> LoKrModule:
        if T2 in tensors:
            raise AdapterError(f"{name}: Tucker LoKr (lokr_t2) can be merged (`kern merge`) but not applied unmerged")
        plan = plan_of(tensors, layer_geometry(org)["weight_shape"], where=name)
        first = next(t for s, t in tensors.items() if s != ALPHA)
        m = cls(name, path, org, plan.rank or 1, plan=plan, dtype=first.dtype, device=layer_device(org), init=False)
        m.load_kohya_tensors(tensors)
        return m

    @torch.no_grad()
    def load_kohya_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().load_kohya_tensors(tensors)
        if self.plan.rank is None:
            self.scale = 1.0

    def w1(self) -> torch.Tensor:
        return self.lokr_w1 if not self.plan.w1_low else self.lokr_w1_a @ self.lokr_w1_b

    def w2(self) -> torch.Tensor:
        p = self.plan
        w2 = self.lokr_w2 if not p.w2_low else self.lokr_w2_a @ self.lokr_w2_b
        return w2.reshape(p.c, p.d, *p.kernel)

    def delta(self) -> torch.Tensor:
        """ΔW (γ applied, no multiplier) in the adapter dtype, with autograd."""
        return kron_delta(self.w1(), self.w2(), self.scale)

    def kron_linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x · (γ W1 ⊗ W2)ᵀ`` as ``W1 · X · W2ᵀ`` on ``x`` viewed as (…, b, d): ΔW is never built, and backward
        keeps only ``x`` and the factors (``kern_lokr.kron``; a low-rank W2 is built first, c × d is small)."""
        # The factors in x's dtype (adapter_forward chose it: autocast's under mixed precision), as a Linear's weight
        # is under autocast: a custom autograd.Function is not autocast, and fp32 factors would make y fp32 and with
        # it the rest of the block (twice the activation memory on the GPU, measured).
        y = kron_linear(x, self.w1().to(x.dtype), self.w2().to(x.dtype))
        return y * self.scale if self.scale != 1.0 else y

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x, next(iter(self.factors().values())).dtype))
        conv = self.geometry["kind"] == "conv2d"
        y = self.org._conv_forward(x, self.delta(), None) if conv else self.kron_linear(x)
        if self.training:
            if self.rank_dropout > 0:  # LyCORIS: masks output rows of ΔW, i.e. output channels
                rows = self.geometry["weight_shape"][0]
                keep = (torch.rand(rows, device=y.device) > self.rank_dropout).to(y.dtype) / (1.0 - self.rank_dropout)
                y = y * (keep.view(1, -1, 1, 1) if conv else keep)
            if self.dropout > 0:
                y = F.dropout(y, p=self.dropout)
        return y


def normalise(
    state_dict: Mapping[str, torch.Tensor], modules: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name as written: {suffix: tensor}}``, each with ``alpha`` (α = r, i.e. γ = 1, when absent)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, keys in modules.items():
        t = {key[len(name) + 1 :]: state_dict[key] for key in keys}
        problems = []
        if W1 not in t and not (W1A in t and W1B in t):
            problems.append(f"{W1} or {W1A} + {W1B}")
        if W2 not in t and not (W2A in t and W2B in t):
            problems.append(f"{W2} or {W2A} + {W2B}")
        if problems:
            raise AdapterError(f"LoKr module {name!r} is incomplete: no {' / '.join(problems)} (keys: {list(keys)})")
        rank = t[W1B].shape[0] if W1B in t else t[W2B].shape[0] if W2B in t else None
        if ALPHA in t:
            t[ALPHA] = t[ALPHA].detach().to(torch.float32).reshape(())
        else:
            t[ALPHA] = torch.tensor(float(rank or 1))
        out[name] = t
    return out


__all__ = [
    "LoKrModule",
    "Plan",
    "factorization",
    "kron_delta",
    "lokr_delta",
    "lokr_shape",
    "normalise",
    "plan_for",
    "plan_of",
]
