"""Target selection: which layers of a model an adapter wraps.

:func:`select_targets` picks the ``nn.Linear`` (and kern's ``Float8StorageLinear``; with ``conv=True`` also
``nn.Conv2d``) modules of a model whose dotted path ``re.fullmatch``-es a :class:`kern.TargetSpec`; ``include``
overrides ``exclude`` (musubi-tuner semantics).
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from kern.errors import UsageError
from kern.records import TargetSpec


def _float8_linear_type() -> type | None:
    try:
        from kern.gpu.fp8 import Float8StorageLinear
    except Exception:  # pragma: no cover - fp8 support is optional
        return None
    return Float8StorageLinear


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or kern's weight-only fp8 ``Float8StorageLinear`` (a frozen linear with an fp8 weight buffer)."""
    if isinstance(module, nn.Linear):
        return True
    f8 = _float8_linear_type()
    return f8 is not None and isinstance(module, f8)


def _compile(patterns: Iterable[str], what: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise UsageError(f"network {what} pattern {p!r} is not a valid regular expression: {exc}") from None
    return out


def select_targets(model: nn.Module, spec: TargetSpec, conv: bool = False) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` an adapter should wrap, as ``[(dotted_path, module)]`` in model order.

    Candidates are linear layers (``nn.Linear``, ``kern.gpu.fp8.Float8StorageLinear``) and, with ``conv=True``,
    ``nn.Conv2d`` with ``groups == 1``. A candidate is selected when its dotted path from the model root
    ``re.fullmatch``-es one of ``spec.targets`` and none of ``spec.exclude`` — unless it also fullmatches one of
    ``spec.include``, which overrides ``exclude``.
    """
    targets = _compile(spec.targets, "target")
    exclude = _compile(spec.exclude, "exclude")
    include = _compile(spec.include, "include")
    out = []
    for name, module in model.named_modules():
        if not name:
            continue
        if not (is_linear(module) or (conv and isinstance(module, nn.Conv2d) and module.groups == 1)):
            continue
        if not any(p.fullmatch(name) for p in targets):
            continue
        if any(p.fullmatch(name) for p in exclude) and not any(p.fullmatch(name) for p in include):
            continue
        out.append((name, module))
    return out


def candidate_paths(model: nn.Module, conv: bool = True) -> dict[str, nn.Module]:
    """Every module of ``model`` an adapter could sit on (what :func:`select_targets` considers), by path."""
    return {
        name: m
        for name, m in model.named_modules()
        if name and (is_linear(m) or (conv and isinstance(m, nn.Conv2d) and m.groups == 1))
    }
