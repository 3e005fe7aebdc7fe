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
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from kern.adapters.network import compute_dtype
from kern.errors import AdapterError
from torch import nn

from kern_lora.module import DORA, LoRAModule, lora_delta


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


def dora_weight(tensors: Mapping[str, torch.Tensor], base: torch.Tensor, where: str = "") -> torch.Tensor:
    """``W' = (m / ‖W + s·B·A‖) ⊙ (W + s·B·A)`` in float32 (PEFT's merged weight)."""
    w = base.to(torch.float32)
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

    def delta_weight(self) -> torch.Tensor:
        return dora_delta(self.kohya_tensors(), self.geometry["weight_shape"], base_weight(self.org), self.path)

    def _scale_and_lora(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m/n, s·B(A x))``: ``n`` from the current factors without gradient, in float32."""
        with torch.no_grad():
            w = base_weight(self.org, torch.float32)
            n = row_norm(w + lora_delta(self.kohya_tensors(), tuple(w.shape), self.path))
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
