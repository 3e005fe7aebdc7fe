"""DoRA (weight-decomposed LoRA, Liu et al. 2024; PEFT ``LoraConfig(use_dora=True)``): ``network.dora = true``.

Maths, as PEFT's ``tuners/lora/dora.py`` / ``variants.py`` (0.21): with ``V = W + s·B·A`` (the plain LoRA update on the
base weight ``W``, dequantised for an fp8 base) and ``n = ‖V‖`` the L2 norm of each **output row**,

    W' = (m / n) ⊙ V,        ΔW = W' − W,

where ``m`` (one value per output row) is trained, initialised to ``‖W‖`` so that ``W' = W`` at step 0 (B = 0).
The forward never forms W': ``y = W x + [(m/n − 1)·(W x) + (m/n)·s·B(A x)]``, with ``n`` computed without
gradient (the DoRA paper, §4.3: ‖V + ΔV‖ is treated as a constant; PEFT detaches it too). The user multiplier
scales the bracket, so unmerged output and merged weight agree: ``W + mult·(W' − W)`` (ComfyUI's rule too).

Files: the magnitude is ``dora_scale`` of shape ``[out, 1]`` (LyCORIS ``wd_on_out=True``, which ComfyUI reads by
its first dimension) in kohya / ComfyUI layouts and ``lora_magnitude_vector`` of shape ``[out]`` in the PEFT /
diffusers layout. LyCORIS's older per-input-column magnitude (``dora_scale`` ``[1, in]``) is refused.

ComfyUI (``comfy/weight_adapter/base.py::weight_decompose``) divides an ``[out, 1]`` ``dora_scale`` by the row norms of
the weight *before* the patch plus ``eps`` (``torch.finfo(float32).eps``, it patches in float32), not by ``‖V‖``:
``W_c = V · dora_scale / (‖W‖ + eps)``. So ``kern convert --to comfyui --model BASE`` writes
``dora_scale' = m · (‖W‖ + eps) / ‖V‖`` (ComfyUI then gives exactly PEFT's ``W'``) and marks the file with the
metadata ``kern.dora_norm = "base"``; kern reads such a file back to ``m`` with the base weight it has at hand
(the layer's weight when applied, ``base`` in ``weight_delta`` / ``convert_weights``). Files without the mark
(LyCORIS, OneTrainer, ai-toolkit, PEFT, kern's own kohya files) hold ``m``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from kern.adapters.network import compute_dtype
from kern.errors import AdapterError, UsageError
from torch import nn

from kern_lora.module import DORA, UP, LoRAModule, lora_delta

NORM_KEY, NORM_BASE = "kern.dora_norm", "base"  # metadata of a file whose magnitudes are divided by ‖W‖ + eps
DORA_BASE = "dora_scale.base_norm"  # in memory only: such a magnitude, until the base weight turns it into m
EPS = torch.finfo(torch.float32).eps  # ComfyUI's, for the float32 weight it patches


class NeedsBase(AdapterError, UsageError):
    """A DoRA conversion that needs the base model's weights and was given none: the user passes them (exit 2)."""


def base_normed(metadata: Mapping[str, str] | None) -> bool:
    """Whether a file's DoRA magnitudes are ComfyUI-normalised (``kern.dora_norm = "base"``)."""
    return bool(metadata) and metadata.get(NORM_KEY) == NORM_BASE


def row_norm(w: torch.Tensor) -> torch.Tensor:
    """The L2 norm of every output row of ``w`` (PEFT: ``torch.linalg.norm(weight, dim=1)``), shape ``[out]``."""
    return torch.linalg.norm(w.reshape(w.shape[0], -1), dim=1)


def magnitude(t: torch.Tensor, rows: int, where: str = "") -> torch.Tensor:
    """A file's magnitude as a float32 vector of ``rows``; ``AdapterError`` for a per-input-column one."""
    if t.numel() != rows or (t.dim() > 0 and t.shape[0] != rows):
        raise AdapterError(
            f"{where}: DoRA magnitude of shape {tuple(t.shape)} does not hold one value per output row ({rows}); "
            "kern reads per-output-row magnitudes (PEFT, LyCORIS wd_on_out=True), not LyCORIS's per-input-column "
            "ones ([1, in]): retrain or re-export the adapter with wd_on_out=True"
        )
    return t.detach().to(torch.float32).reshape(rows)


def comfy_factor(tensors: Mapping[str, torch.Tensor], base: torch.Tensor, where: str = "") -> torch.Tensor:
    """``(‖W‖ + eps) / ‖W + s·B·A‖`` per output row (float32): ComfyUI's ``dora_scale`` is ``m`` times this."""
    w = base.to(torch.float32)
    if w.shape[0] != tensors[UP].shape[0]:
        raise AdapterError(
            f"{where}: base weight {tuple(w.shape)} does not have the adapter's {tensors[UP].shape[0]} rows"
        )
    return (row_norm(w) + EPS) / row_norm(w + lora_delta(tensors, tuple(w.shape), where))


def from_base_normed(tensors: Mapping[str, torch.Tensor], base: torch.Tensor, where: str = "") -> dict[str, Any]:
    """A module read from a ``kern.dora_norm = "base"`` file (magnitude under ``DORA_BASE``) with ``m`` instead."""
    out = {k: v for k, v in tensors.items() if k != DORA_BASE}
    rows = tensors[UP].shape[0]
    out[DORA] = (magnitude(tensors[DORA_BASE], rows, where) / comfy_factor(tensors, base, where)).view(-1, 1)
    return out


def to_base_normed(tensors: Mapping[str, torch.Tensor], base: torch.Tensor, where: str = "") -> dict[str, Any]:
    """A module for ComfyUI: ``dora_scale = m · (‖W‖ + eps) / ‖W + s·B·A‖`` (float32, ``[out, 1]``)."""
    rows = tensors[UP].shape[0]
    return {**tensors, DORA: (magnitude(tensors[DORA], rows, where) * comfy_factor(tensors, base, where)).view(-1, 1)}


def needs_base(why: str) -> NeedsBase:
    return NeedsBase(
        f"{why}: ComfyUI divides a DoRA magnitude (dora_scale) by the row norms of the base weight W, where PEFT "
        "and kern divide by those of W + s·B·A, so kern converts it exactly only with the base model's weights: "
        "pass the base checkpoint the adapter was trained on (kern convert --model BASE)"
    )


def convert_modules(
    modules: Mapping[str, Mapping[str, torch.Tensor]],
    base: Callable[[str], torch.Tensor] | None,
    *,
    read: bool,
    why: str,
) -> dict[str, dict[str, torch.Tensor]]:
    """Every module through :func:`from_base_normed` (``read``) or :func:`to_base_normed`, the base weight of each
    from ``base(name)``; :class:`NeedsBase` (saying ``why``) before any work when ``base`` is None."""
    if base is None:
        raise needs_base(why)
    step = from_base_normed if read else to_base_normed
    return {name: step(t, base(name), name) for name, t in modules.items()}


def dora_weight(tensors: Mapping[str, torch.Tensor], base: torch.Tensor, where: str = "") -> torch.Tensor:
    """``W' = (m / ‖W + s·B·A‖) ⊙ (W + s·B·A)`` in float32 (PEFT's merged weight)."""
    w = base.to(torch.float32)
    if DORA_BASE in tensors:
        tensors = from_base_normed(tensors, w, where)
    v = w + lora_delta(tensors, tuple(w.shape), where)
    m = magnitude(tensors[DORA], w.shape[0], where)
    factor = m / row_norm(v)
    return v.mul_(factor.view(-1, *([1] * (v.dim() - 1))))


def dora_delta(
    tensors: Mapping[str, torch.Tensor], base_shape: Sequence[int], base: torch.Tensor | None, where: str = ""
) -> torch.Tensor:
    """``ΔW = W' − W`` (float32, ``base_shape``); a DoRA's update depends on the base weight, so ``base`` is needed."""
    if base is None:
        raise AdapterError(f"{where}: a DoRA module's ΔW depends on the base weight, and none was given")
    if tuple(base.shape) != tuple(base_shape):
        raise AdapterError(f"{where}: base weight {tuple(base.shape)} is not of shape {tuple(base_shape)}")
    return dora_weight(tensors, base, where).sub_(base.to(torch.float32))


def base_weight(org: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's weight as numbers: dequantised for fp8 layers (``kern.gpu.fp8``), else the weight itself."""
    if hasattr(org, "dequantized_weight") and hasattr(org, "weight_scale"):
        return org.dequantized_weight(dtype or torch.float32)
    w = org.weight
    return w if dtype is None else w.to(dtype)


class DoRAModule(LoRAModule):
    """A LoRA with a trained magnitude per output row (Linear layers only)."""

    label = "DoRA"
    reshape_loaded = True  # files hold the magnitude as [out], [out, 1] or [out, 1, 1, 1]

    def make_factors(self, rank: int, *, dtype: torch.dtype, device: torch.device | str | None) -> None:
        if self.geometry["kind"] != "linear":
            raise AdapterError(f"{self.path}: DoRA is supported on Linear layers only, not {type(self.org).__name__}")
        super().make_factors(rank, dtype=dtype, device=device)
        out = self.geometry["out_features"]
        self.dora_scale = nn.Parameter(torch.ones(out, 1, dtype=dtype, device=device))

    def reset_factors(self) -> None:
        super().reset_factors()
        # m = ‖W + s·B·A‖ = ‖W‖ (B = 0): the model starts as the base model.
        self.dora_scale.copy_(row_norm(base_weight(self.org, torch.float32)).view(-1, 1))

    def factors(self) -> dict[str, torch.Tensor]:
        return {**super().factors(), DORA: self.dora_scale}

    @torch.no_grad()
    def load_kohya_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if DORA_BASE in tensors:  # a ComfyUI-normalised file: m from this layer's own base weight
            tensors = from_base_normed(tensors, base_weight(self.org, torch.float32), self.path)
        elif DORA not in tensors:  # a plain LoRA (a DoRA job started from one): m = ‖W + s·B·A‖, so W' = W + s·B·A
            w = base_weight(self.org, torch.float32)
            tensors = {**tensors, DORA: row_norm(w + lora_delta(tensors, tuple(w.shape), self.path)).view(-1, 1)}
        super().load_kohya_tensors(tensors)

    def delta_weight(self) -> torch.Tensor:
        # A swapped-out block's weight sits in CPU memory, away from the factors (block swap): bring it to them.
        base = base_weight(self.org).to(self.lora_down.weight.device)
        return dora_delta(self.kohya_tensors(), self.geometry["weight_shape"], base, self.path)

    def _scale_and_lora(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m/n, s·B(A x))``: ``n`` from the current factors without gradient, in float32."""
        with torch.no_grad():  # s is the module's float scale: reading the alpha tensor would break torch.compile
            w = base_weight(self.org, torch.float32).reshape(self.lora_up.weight.shape[0], -1)
            b = self.lora_up.weight.to(torch.float32).reshape(w.shape[0], -1)
            n = row_norm(
                torch.addmm(w, b, self.lora_down.weight.to(torch.float32).reshape(b.shape[1], -1), alpha=self.scale)
            )
        factor = self.dora_scale.reshape(-1).to(torch.float32) / n
        return factor, super().adapter_forward(x)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        factor, lora = self._scale_and_lora(x)
        dtype = compute_dtype(x, self.lora_down.weight.dtype)
        base = F.linear(x.to(dtype), base_weight(self.org, dtype))
        return (factor - 1).to(lora.dtype) * base + factor.to(lora.dtype) * lora

    def add_to(self, out: torch.Tensor, x: torch.Tensor, multiplier: float) -> torch.Tensor:
        """As :meth:`adapter_forward`, with ``W x`` read off the layer's output (less its bias) instead of a second
        matmul; PEFT does the same when dropout is off."""
        factor, lora = self._scale_and_lora(x)
        bias = getattr(self.org, "bias", None)
        base = out if bias is None else out - bias
        y = (factor - 1).to(lora.dtype) * base.to(lora.dtype) + factor.to(lora.dtype) * lora
        if multiplier != 1.0:
            y = y * multiplier
        return (out + y).to(out.dtype)
