"""Weight-only float8 storage for ``nn.Linear`` layers.

Each quantised layer keeps its weight as ``float8_e4m3fn`` (1 byte per element) plus one float32 scale per
output row, and dequantises to the compute dtype on the fly for every matmul. Activations, biases, embeddings
and norms are untouched. This halves the memory of a frozen bf16 model at the cost of e4m3's 3-bit mantissa
(relative rounding error of at most 2**-4 per weight element).

``torch.float8_e4m3fn`` is looked up when a function runs, never at import, so importing this module works on a
torch build without float8 types; only quantising then fails, with a clear error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from kern.errors import UsageError

__all__ = ["E4M3_MAX", "Float8Linear", "float8_dtype", "quantize_linears_", "quantize_weight"]

# Largest finite float8_e4m3fn value. Casting a larger value to e4m3fn gives NaN (no saturation), hence the clamp.
E4M3_MAX = 448.0


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


def _dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Multiply in float32 so the scale is applied at full precision; round once, to the compute dtype.
    return (q.to(torch.float32) * scale.unsqueeze(1)).to(dtype)


class Float8Linear(nn.Module):
    """A frozen linear layer whose weight is stored as float8_e4m3fn with a float32 scale per output row.

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
    ) -> Float8Linear:
        """Quantise ``linear`` (moved to ``device`` first, if given) into a new ``Float8Linear``."""
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

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return _dequantize(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The training base's fp8 matmul (kern.gpu.fp8_linear), dequantising path: it saves the fp8 weight, not a
        # dequantised copy, for backward, so LoRA training through a frozen fp8 encoder keeps the memory saving.
        from kern.gpu.fp8_linear import _FP8LinearFn

        y = _FP8LinearFn.apply(x, self.weight, self.weight_scale, self.bias, self.compute_dtype, False, False)
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # nn.Module casts every floating-point buffer on .to(dtype)/.half(); float8 counts as floating point,
        # so hold the fp8 weight and its scale out of the generic pass and only move them to the new device.
        held = {name: self._buffers.pop(name) for name in ("weight", "weight_scale")}
        try:
            super()._apply(fn, recurse)
        finally:
            probe = fn(torch.empty(0, device=held["weight"].device))
            for name, t in held.items():
                self._buffers[name] = t if t.device == probe.device else t.to(probe.device)
        return self

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
    """Replace every ``nn.Linear`` inside ``module`` by a ``Float8Linear``, in place; return how many.

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
        setattr(parent, attr, Float8Linear.from_linear(linear, compute_dtype, device))
    return len(targets)
