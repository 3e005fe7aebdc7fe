"""Optimisers and learning-rate schedules: ``train.optimizer``, ``train.lr_scheduler`` and ``train.warmup_steps``."""

from __future__ import annotations

from typing import Any, Callable

import torch

from kern.errors import ConfigError, UsageError

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")


def check_optimizer(name: str, source: str = "") -> None:
    """``train.optimizer`` names a known optimizer whose package is installed (checked before any work)."""
    key = name.lower().replace("-", "").replace("_", "")
    where = f"{source}: " if source else ""
    if key not in OPTIMIZERS:
        raise ConfigError(f"{where}unknown train.optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    import importlib.util

    needs = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}.get(key)
    if needs and importlib.util.find_spec(needs) is None:
        raise ConfigError(f"{where}train.optimizer = {name!r} needs {needs}: pip install {needs}")


def make_optimizer(name: str, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """AdamW, AdamW 8-bit (bitsandbytes), Adafactor (transformers) or Prodigy (prodigyopt).

    AdamW is torch's fused kernel when every parameter is on a GPU (one launch for all adapter tensors instead
    of several per tensor), the default implementation otherwise (the CPU, whose runs the tests pin bit-exactly)."""
    name = name.lower().replace("-", "").replace("_", "")
    if name == "adamw":
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.is_cuda and p.dtype == torch.float32 for p in params)
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, **({"fused": True} if fused else {}))
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UsageError("train.optimizer = 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=0.01)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise UsageError("train.optimizer = 'prodigy' needs prodigyopt: pip install prodigyopt") from None
        return Prodigy(groups, lr=lr, weight_decay=0.01)
    raise UsageError(f"unknown train.optimizer {name!r}; known: adamw, adamw8bit, adafactor, prodigy")


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step ``s`` (from 0): a linear warmup over ``warmup`` steps, then
    ``kind`` (``constant``, ``linear`` or ``cosine``) down to the end of ``total`` steps, where it stays.

    The curves are ``transformers.get_scheduler``'s, read kern's way. Its warmup begins at 0 (a first step that
    learns nothing), kern's at ``1 / warmup``: during warmup kern reads the curve one step ahead, so the last
    warmup step reaches the full LR. Past ``total`` (data-parallel runs step the schedule once per process) it
    holds the value at ``total``. The decay has at least one step, so a warmup as long as the run ends at the
    full LR. ``linear`` is transformers' polynomial decay with power 1, which computes ``1 - progress`` as kern
    always did (its ``linear`` rounds the same line differently in the last bit)."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup" if warmup else "constant", "linear": "polynomial"}.get(kind, kind)
    extra = {"power": 1.0, "lr_end": 0.0} if kind == "linear" else None
    end = max(total, warmup + 1)
    # Only the curve is wanted: built against a stand-in optimizer at LR 1 (polynomial divides by the base LR).
    probe = torch.optim.SGD([torch.zeros(1)], lr=1.0)
    curve = get_scheduler(
        name, probe, num_warmup_steps=warmup, num_training_steps=end, scheduler_specific_kwargs=extra
    ).lr_lambdas[0]

    def f(s: int) -> float:
        return float(curve(s + 1 if s < warmup else min(s, end)))

    return f


def make_scheduler(optimizer: torch.optim.Optimizer, train: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of ``train`` (a ``TrainConfig``) over ``optimizer``.

    A plain function as the lambda: ``LambdaLR.state_dict()`` then holds only counters and LRs, which a checkpoint
    stores without pickle, and a resumed run restores exactly."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train.lr_scheduler, train.warmup_steps, train.steps))
