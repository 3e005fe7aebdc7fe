"""The attention call of the architectures: ``attention(q, k, v, mask)``, (B, H, L, D) in, (B, L, H·D) out.

Every block of every architecture attends through this one function, so the backend is chosen in one place,
once per process (``train.attention``, applied by ``kern.gpu.accel.set_attention``):

* PyTorch's ``F.scaled_dot_product_attention`` (the default), whose own backend (cuDNN, flash, memory-efficient,
  math) ``kern.gpu.accel`` picks process-wide;
* a flash-attention package when ``train.attention = "flash_attn"``: ``flash_attn_interface`` (FlashAttention-3,
  Hopper) when installed, else ``flash_attn`` (FlashAttention-2). It takes (B, L, H, D), which is the layout the
  heads are merged from anyway, so it saves the output transpose. Calls it cannot take (a key mask, fp32 inputs,
  the CPU) go to SDPA, so a CPU test run or a batch with padded (masked) text still works.

Third-party architectures call this function too and get the same choice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["attention", "flash_attn_package", "use_flash_attn"]

_flash: Callable | None = None  # the package's flash_attn_func while "flash_attn" is chosen
_FLASH_DEVICES = ("cuda",)  # where the package runs (tests widen this to check the layout on the CPU)
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_attn_package() -> tuple[str, Callable] | None:
    """``(name, flash_attn_func)`` of the installed flash-attention package, FlashAttention-3 first; None if none."""
    try:  # FlashAttention-3 (Hopper build)
        from flash_attn_interface import flash_attn_func

        return "flash_attn_interface", flash_attn_func
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func  # FlashAttention-2

        return "flash_attn", flash_attn_func
    except ImportError:
        return None


def use_flash_attn(fn: Callable | None) -> None:
    """Route attention through ``fn`` (a ``flash_attn_func``) from now on, or back to SDPA with None."""
    global _flash
    _flash = fn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal attention over (B, H, L, D) inputs; ``mask`` (broadcastable to (B, H, Lq, Lk), bool: True = may
    attend) or None. Returns (B, Lq, H·D), the heads merged for the output projection."""
    if _flash is not None and mask is None and q.device.type in _FLASH_DEVICES and q.dtype in _FLASH_DTYPES:
        out = _flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        if isinstance(out, tuple):  # some FlashAttention-3 releases also return the log-sum-exp
            out = out[0]
        b, length, h, d = out.shape
        return out.reshape(b, length, h * d)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)
