"""Frozen ``nn.Linear`` weights held as float8 e4m3: two layers, one format.

Both layers keep the weight as ``float8_e4m3fn`` (1 byte per element) with one float32 scale per output row,
``weight ≈ q.float() * weight_scale[:, None]``, as the buffers ``<layer>.weight`` and ``<layer>.weight_scale`` (the
bias stays in the model dtype). Half the bytes of bf16, at the cost of e4m3's 3-bit mantissa (relative rounding
error of at most 2**-4 per weight element, about 2.5 % RMS over a row).

* :class:`Float8StorageLinear` (:func:`quantize_linears_`): storage only. A new module replaces each ``nn.Linear``
  of a frozen model that is only run (text encoders); every matmul dequantises the weight and runs in the compute
  dtype. Same memory saving, no speed-up.
* :class:`Float8MatmulLinear` (:func:`quantize_base`, undone by :func:`dequantize_base`): the frozen base of a
  transformer being trained through. The ``nn.Linear`` object itself is switched in place (its class changes), so
  its name and place stay and adapters find it by path and wrap its ``forward``. On a CUDA GPU of compute
  capability 8.9 or newer (Ada, Hopper, Blackwell) with a bf16 model, the activation is quantised per token (one
  fp32 scale per row, from the row's largest magnitude on every call) to e4m3 and multiplied with
  ``torch._scaled_mm`` (rowwise scales, bf16 output), about twice the matmul rate of bf16 on Hopper. Elsewhere
  (CPU, older GPUs, fp32/fp16 models) it dequantises like the storage layer, which is what the CPU tests exercise.

Backward, for both: the weight is frozen, so only the input gradient ``grad_x = grad_y @ W`` is computed. Default
(``backward="bf16"``): ``W`` is dequantised for that one matmul and freed; the gradient is exact for the fp8
weights and costs a matmul in the compute dtype plus one pass over the weight. ``backward="fp8"`` (matmul layer on
CUDA only): the per-channel weight scale is folded into ``grad_y`` (it sits on the contraction dimension), which is
quantised per row to e4m3 and multiplied with a transposed copy of the fp8 weight by ``_scaled_mm``: faster matmul,
another ~3 % rounding noise in the activation gradients. Saved for backward: the fp8 weight and its scales, which
are the layer's own buffers (no new memory); never the activation nor a dequantised copy, so LoRA training through
a frozen fp8 model keeps the memory saving.

Order with adapters: quantise **before** building the network (adapters capture the layer's ``forward`` when they
attach); :func:`quantize_base` refuses layers that already carry an adapter.

``torch.float8_e4m3fn`` is looked up when a function runs, never at import, so importing this module works on a
torch build without float8 types; only quantising then fails, with a clear error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kern.errors import UsageError
from kern.log import get_logger

log = get_logger(__name__)

__all__ = [
    "E4M3_MAX",
    "Float8MatmulLinear",
    "Float8StorageLinear",
    "dequantize_base",
    "float8_dtype",
    "fp8_matmul_supported",
    "quantize_base",
    "quantize_linears_",
    "quantize_rows",
    "quantize_weight",
    "to_float8_matmul",
]

# Largest finite float8_e4m3fn value. Casting a larger value to e4m3fn gives NaN (no saturation), hence the clamp.
E4M3_MAX = 448.0

_ADAPTERS_ATTR = "_kern_adapters"  # kern.adapters.network marks wrapped layers with this instance attribute
_SUPPORTED: dict[int, bool] = {}  # CUDA device index -> _scaled_mm with rowwise scales works there
_WHY_NOT: dict[int, str] = {}  # CUDA device index -> why not (the probe's error), for logs and benchmarks


# --------------------------------------------------------------------------- the format


def float8_dtype() -> torch.dtype:
    """Return ``torch.float8_e4m3fn``, or raise ``UsageError`` if this torch build lacks it."""
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        raise UsageError(
            f"fp8 weights need torch.float8_e4m3fn, which torch {torch.__version__} does not have; "
            "upgrade torch (2.1 or newer) or turn the fp8 option off"
        )
    return dtype


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D weight to (float8_e4m3fn values, float32 scale per output row).

    The scale maps each row's largest magnitude onto ``E4M3_MAX``, so every row uses the full e4m3 range;
    ``weight ≈ q.float() * scale[:, None]``.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    fp8 = float8_dtype()
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax(dim=1)
    # An all-zero row would give scale 0 and 0/0 = NaN; any positive scale stores it exactly.
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (w / scale.unsqueeze(1)).clamp_(-E4M3_MAX, E4M3_MAX).to(fp8)
    return q, scale


def quantize_rows(x: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D tensor per row to e4m3: ``(q, scale)`` with ``x ≈ q.float() * scale`` and ``scale`` (rows, 1) fp32.

    The multiplier is rounded to ``x``'s dtype first so the scaling is one pass in that dtype (no fp32 copy of
    ``x``); the scale handed to the matmul is its exact reciprocal. A row's largest magnitude then lands within
    0.4 % of 448, which e4m3 rounds to 448 (only 464 and above would overflow), so no clamp pass is needed.
    """
    dtype = dtype or float8_dtype()
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    inv = (E4M3_MAX / amax.clamp(min=1e-12)).to(x.dtype)
    q = (x * inv).to(dtype)
    return q, inv.float().reciprocal()


def _dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale · q`` in ``dtype``. Computed in ``dtype`` directly (e4m3 values are exact in bf16; the scale is
    rounded to bf16, 2⁻⁹ relative per row, far below e4m3's 2⁻⁴): 7 bytes of traffic per weight instead of 19
    through float32, which is what the backward pays for every layer. In float32 it is exact."""
    return q.to(dtype) * scale.to(dtype).unsqueeze(1)


# --------------------------------------------------------------------------- the matmuls


def fp8_matmul_supported(device: torch.device | str | int | None = None) -> bool:
    """Whether ``torch._scaled_mm`` with rowwise scales runs on this CUDA device (tried once per device, cached)."""
    if not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if dev.type != "cuda":
        return False
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index not in _SUPPORTED:
        ok = torch.cuda.get_device_capability(index) >= (8, 9)
        if ok:
            try:  # an odd row count on purpose: token counts are arbitrary
                a = torch.randn(17, 32, device=dev, dtype=torch.bfloat16)
                w, s = quantize_weight(torch.randn(48, 32, device=dev))
                y = _scaled_linear(a, w, s, None, torch.bfloat16)
                ok = bool(torch.isfinite(y).all()) and y.shape == (17, 48)
            except (RuntimeError, TypeError, ValueError) as exc:
                ok = False
                _WHY_NOT[index] = f"{type(exc).__name__}: {exc}"[:300]
        _SUPPORTED[index] = ok
    return _SUPPORTED[index]


def _scaled_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``x @ (scale · q)ᵀ + bias`` with e4m3 operands: x per-token quantised, q (out, in) used as a column-major
    (in, out) operand, which its row-major layout already is once transposed."""
    lead = x.shape[:-1]
    xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]))
    y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale.view(1, -1), out_dtype=dtype)
    if bias is not None:
        y = y + bias
    return y.view(*lead, -1)


def _scaled_grad_input(gy: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``gy @ (scale · q)`` in fp8: the per-output-channel weight scale lies on the contraction dimension here, so it
    is folded into ``gy`` before ``gy`` is quantised per row; ``q`` needs a column-major copy (out, in)."""
    lead = gy.shape[:-1]
    g = gy.reshape(-1, gy.shape[-1]) * scale.to(gy.dtype)
    gq, gs = quantize_rows(g)
    ones = torch.ones(1, q.shape[1], device=q.device, dtype=torch.float32)
    gx = torch._scaled_mm(gq, q.t().contiguous().t(), scale_a=gs, scale_b=ones, out_dtype=dtype)
    return gx.view(*lead, -1)


class _Float8LinearFn(torch.autograd.Function):
    """Saves only the fp8 weight and its scales (the layer's own buffers) for backward, never the activation."""

    @staticmethod
    def forward(ctx, x, q, scale, bias, dtype, fast, fp8_backward):
        ctx.save_for_backward(q, scale)
        ctx.dtype, ctx.x_dtype, ctx.fast, ctx.fp8_backward = dtype, x.dtype, fast, fp8_backward
        x = x.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        if fast and x.is_cuda:
            return _scaled_linear(x, q, scale, bias, dtype)
        return F.linear(x, _dequantize(q, scale, dtype), bias)

    @staticmethod
    def backward(ctx, gy):
        q, scale = ctx.saved_tensors
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gy_c = gy.to(ctx.dtype)
            if ctx.fast and ctx.fp8_backward and gy.is_cuda:
                gx = _scaled_grad_input(gy_c, q, scale, ctx.dtype)
            else:
                gx = gy_c.matmul(_dequantize(q, scale, ctx.dtype))
            gx = gx.to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, None, None, gb, None, None, None


# --------------------------------------------------------------------------- the layers


class _Float8Weight:
    """What both layers share: the ``weight`` (e4m3) and ``weight_scale`` (fp32) buffers and ``compute_dtype``."""

    compute_dtype: torch.dtype

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return _dequantize(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def _apply(self, fn, recurse=True):
        # nn.Module casts every floating-point tensor on .to(dtype)/.half(); float8 counts as one. Keep the fp8
        # weight and its fp32 scale out of the generic pass and only move them to wherever ``fn`` sends tensors.
        held = {name: self._buffers.pop(name) for name in ("weight", "weight_scale")}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in held.items():
                target = fn(torch.empty(0, device=t.device)).device
                self._buffers[name] = t if t.device == target else t.to(target)
        return self


class Float8StorageLinear(_Float8Weight, nn.Module):
    """Storage only: a frozen linear layer whose weight is float8_e4m3fn with a float32 scale per output row,
    dequantised for every matmul in ``compute_dtype``.

    ``weight`` and ``weight_scale`` are buffers (they are in the state dict, never trainable), and keep their
    dtypes through ``module.to(dtype)``, ``.half()`` etc.; only the bias follows such casts. The input is cast to
    ``compute_dtype`` for the matmul and the result is cast back to the input's dtype, as ``nn.Linear`` would
    return it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=float8_dtype(), device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> Float8StorageLinear:
        """Quantise ``linear`` (moved to ``device`` first, if given) into a new ``Float8StorageLinear``."""
        weight = linear.weight.detach()
        if device is not None:
            weight = weight.to(device)
        q, scale = quantize_weight(weight)
        # Build on the meta device so no throw-away zero weight is allocated, then attach the real tensors.
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype)
        new.weight, new.weight_scale = q, scale
        if linear.bias is not None:
            bias = linear.bias.detach()
            new.bias = nn.Parameter(bias if device is None else bias.to(device), requires_grad=False)
        return new

    @classmethod
    def from_quantized(
        cls, q: torch.Tensor, scale: torch.Tensor, bias: bool, compute_dtype: torch.dtype = torch.bfloat16
    ) -> Float8StorageLinear:
        """A layer holding ``q`` (e4m3, (out, in)) and ``scale`` (float32, one per output row or one for all) as they
        are, e.g. a checkpoint's fp8 weight; its bias (if any) is left on the meta device, for ``load_state_dict``
        with ``assign=True``."""
        out_features, in_features = q.shape
        with torch.device("meta"):
            new = cls(in_features, out_features, bias, compute_dtype)
        new.weight, new.weight_scale = _checked(q, scale, out_features, in_features)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The matmul layer's dequantising path: it saves the fp8 weight, not a dequantised copy, for backward.
        y = _Float8LinearFn.apply(x, self.weight, self.weight_scale, self.bias, self.compute_dtype, False, False)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight=float8_e4m3fn, compute_dtype={self.compute_dtype}"
        )


def quantize_linears_(
    module: nn.Module,
    exclude: Iterable[str] = (),
    compute_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
) -> int:
    """Replace every ``nn.Linear`` inside ``module`` by a ``Float8StorageLinear``, in place; return how many.

    ``exclude`` holds regular expressions searched (``re.search``) in each layer's qualified name, as given by
    ``module.named_modules()``; a match keeps that layer as it is. Only layers whose type is exactly
    ``nn.Linear`` are converted: subclasses (e.g. ``nn.MultiheadAttention``'s ``out_proj``, whose weight is read
    directly by its owner) and wrappers such as LoRA layers are left alone, as are embeddings and norms.
    With ``device`` set, each weight is moved there just before it is quantised, so a model loaded on the CPU
    can be quantised onto a GPU while holding only one layer's unquantised weight on the GPU at a time;
    the remaining (non-Linear) parts are not moved.
    """
    float8_dtype()  # fail before touching anything if this torch has no float8
    patterns = [re.compile(p) for p in exclude]
    targets = [
        (name, child)
        for name, child in module.named_modules()
        # The root itself cannot be replaced in place, hence ``name`` must be non-empty.
        if name and type(child) is nn.Linear and not any(p.search(name) for p in patterns)
    ]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, Float8StorageLinear.from_linear(linear, compute_dtype, device))
    return len(targets)


class Float8MatmulLinear(_Float8Weight, nn.Linear):
    """The frozen base of a trained transformer: an ``nn.Linear`` whose weight is float8_e4m3fn with a float32 scale
    per output channel, multiplied with fp8 matmuls where the GPU has them.

    Made by :func:`quantize_base` from an existing ``nn.Linear`` (the object's class is switched, so references to
    it stay valid); never constructed directly. ``compute_dtype`` is the original weight dtype: inputs are cast to it
    and outputs come in it, as the bf16 layer would give them. ``weight`` and ``weight_scale`` keep their dtypes
    through ``.to(dtype)`` / ``.half()``; only the bias follows such casts.
    """

    fast: bool  # _scaled_mm forward on CUDA
    fp8_backward: bool  # _scaled_mm for the input gradient too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Float8LinearFn.apply(
            x, self.weight, self.weight_scale, self.bias, self.compute_dtype, self.fast, self.fp8_backward
        )

    def extra_repr(self) -> str:
        mm = "scaled_mm" if self.fast else "dequantised"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight=float8_e4m3fn, compute_dtype={self.compute_dtype}, matmul={mm}, "
            f"backward={'fp8' if self.fp8_backward else 'bf16'}"
        )


def _checked(q: torch.Tensor, scale: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` in the layers' format: e4m3 (rows, cols) and float32 (rows,), a single scale broadcast."""
    if q.dtype != float8_dtype() or tuple(q.shape) != (rows, cols):
        raise ValueError(f"expected a float8_e4m3fn weight of shape {(rows, cols)}, got {q.dtype} {tuple(q.shape)}")
    scale = scale.to(device=q.device, dtype=torch.float32).reshape(-1)
    if scale.numel() == 1:
        scale = scale.expand(rows).contiguous()
    elif scale.numel() != rows:
        raise ValueError(f"expected one scale or {rows} (one per output row), got {scale.numel()}")
    return q, scale


def _set_matmul_flags(m: Float8MatmulLinear, backward: str, fast_on_cuda: bool) -> None:
    m.fast = fast_on_cuda and m.compute_dtype == torch.bfloat16
    m.fp8_backward = backward == "fp8"


def to_float8_matmul(
    linear: nn.Linear, q: torch.Tensor, scale: torch.Tensor, *, compute_dtype: torch.dtype, backward: str = "bf16"
) -> Float8MatmulLinear:
    """Switch ``linear`` in place into a :class:`Float8MatmulLinear` holding ``q`` (float8_e4m3fn, the Linear's
    shape) and ``scale`` (float32, one per output row, or one for the whole weight); its old weight is dropped
    (never read: it may be on the meta device), the bias kept and frozen. :func:`quantize_base` quantises a bf16
    weight and calls this; ``kern.models.quantized.load_into`` hands it a checkpoint's fp8 bytes."""
    q, scale = _checked(q, scale, linear.out_features, linear.in_features)
    del linear._parameters["weight"]
    linear.register_buffer("weight", q)
    linear.register_buffer("weight_scale", scale)
    if linear.bias is not None:
        linear.bias.requires_grad_(False)
    linear.__class__ = Float8MatmulLinear
    linear.compute_dtype = compute_dtype
    _set_matmul_flags(linear, backward, fp8_matmul_supported())
    return linear


def quantize_base(
    model: nn.Module, *, skip: Iterable[str] = (), backward: str = "bf16", device: torch.device | str | None = None
) -> int:
    """Turn the frozen ``nn.Linear`` layers of ``model`` into :class:`Float8MatmulLinear` in place; return how many
    fp8 layers the model then has (those converted plus those already fp8).

    A layer is left as it is when its path matches a ``skip`` regex (``re.search``; the architecture's
    ``keep_high_precision``, typically embedders, modulation, final layer), when its weight requires grad (it is trained, not base), when it is a
    subclass of ``nn.Linear`` (its owner may read the weight itself), or when its in or out features are not
    multiples of 16 (what ``_scaled_mm`` takes; such layers are tiny). ``backward`` is ``"bf16"`` (dequantised
    input-gradient matmul, the default) or ``"fp8"``. With ``device`` set, each weight is quantised there (a GPU is
    much faster than the CPU for a big model) and the result goes back where the weight was. Layers that are already
    :class:`Float8MatmulLinear` (loaded from an fp8 checkpoint) keep their weights and get the same matmul settings.
    """
    if backward not in ("bf16", "fp8"):
        raise UsageError(f"fp8 backward must be 'bf16' or 'fp8', not {backward!r}")
    float8_dtype()
    patterns = [re.compile(p) for p in skip]
    done = already = 0
    fast_on_cuda = fp8_matmul_supported()
    for name, m in model.named_modules():
        if type(m) is Float8MatmulLinear:
            _set_matmul_flags(m, backward, fast_on_cuda)
            already += 1
            continue
        if type(m) is not nn.Linear or not name or any(p.search(name) for p in patterns):
            continue
        if m.weight.requires_grad or m.in_features % 16 or m.out_features % 16:
            continue
        if _ADAPTERS_ATTR in m.__dict__:
            raise UsageError(
                f"layer {name!r} already carries an adapter: quantise the base before building the network"
            )
        w = m.weight.detach()
        home, dtype = w.device, w.dtype
        q, scale = quantize_weight(w if device is None else w.to(device))
        to_float8_matmul(m, q.to(home), scale.to(home), compute_dtype=dtype, backward=backward)
        done += 1
    if already:
        log.info("fp8 base", quantised=done, from_file=already, backward=backward)
    return done + already


def dequantize_base(model: nn.Module) -> int:
    """Turn every :class:`Float8MatmulLinear` back into a plain ``nn.Linear`` in its compute dtype (weights as
    rounded to fp8: the rounding is not undone); return how many. For merging adapters into the base, or exporting
    it."""
    done = 0
    for m in model.modules():
        if type(m) is not Float8MatmulLinear:
            continue
        w = m.dequantized_weight()
        del m._buffers["weight"], m._buffers["weight_scale"]
        for attr in ("compute_dtype", "fast", "fp8_backward"):
            m.__dict__.pop(attr, None)
        m.__class__ = nn.Linear
        m.weight = nn.Parameter(w, requires_grad=False)
        done += 1
    return done
