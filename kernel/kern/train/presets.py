"""Presets per card (``kern train --preset NAME``) and the line a run logs about what it does.

A preset is a partial job TOML, one per architecture and memory budget, holding the memory modes measured to fit
that budget (``[train]``) and the architecture (``[model] arch``; the variant comes from the checkpoint). It names
no model file and no dataset: the user gives those. The presets ship as package data of kern (``kern/presets``,
a link to ``examples/presets`` in a checkout: one copy). ``measured.json`` beside them holds each preset's budget,
its measured peak and the measurement behind it, and the budgets not measured to fit yet;
tests/train/test_presets.py fails when a peak is not under its budget.

How a preset combines with the rest (``kern.core.config.load_job``): the preset's keys first, the job file's keys
over them, command-line options and ``--set`` over both. The run folder's ``config.toml`` records the resolved job
and the preset's name.
"""

from __future__ import annotations

import functools
import json
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from kern.errors import ConfigError
from kern.log import get_logger

log = get_logger(__name__)

TABLE = "measured.json"
_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*")


def folder() -> Path:
    """Where the presets are: ``kern/presets`` of the installed package."""
    return Path(str(resources.files("kern") / "presets"))


def names() -> list[str]:
    """Every preset's name, sorted."""
    return sorted(p.stem for p in folder().glob("*.toml"))


@functools.cache
def table() -> dict[str, Any]:
    """``measured.json``: ``presets`` (name → budget_gib, peak_gib, variants, measured) and ``not_measured``
    (name → why there is no such preset yet)."""
    return json.loads((folder() / TABLE).read_text(encoding="utf-8"))


def read_preset(name: str) -> dict[str, Any]:
    """The job keys of preset ``name`` as nested tables; ``ConfigError`` listing the presets when there is none."""
    path = folder() / f"{name}.toml"
    if not isinstance(name, str) or not _NAME.fullmatch(name) or not path.is_file():
        missing = table()["not_measured"].get(name) if isinstance(name, str) else None
        why = f" ({name} is not measured to fit yet: {missing})" if missing else ""
        raise ConfigError(
            f"preset {name!r} (--preset or the job's preset key): no such preset{why}; presets: {', '.join(names())}"
        )
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    if "preset" in data:
        raise ConfigError(f"{path}: a preset cannot name another preset; remove its preset key")
    return data


def summary(job: Any, variant: Any, base: Mapping[str, Any], applied: Mapping[str, Any]) -> dict[str, Any]:
    """What the run does, for its one start-of-training log line: the preset, the fp8 base (how many layers), blocks
    swapped, compile, checkpointing, attention backend, activation offload. ``base`` and ``applied`` are what
    ``kern.gpu.accel.prepare_base`` and ``accel.apply`` returned. Warns when the preset was measured for another
    variant (its memory modes then say nothing about this model's fit)."""
    t = job.train
    fp8_layers = int(base.get("fp8_layers", 0))
    checkpointing = applied.get("checkpointing", "off")
    if "selective_blocks" in applied:
        checkpointing = f"selective ({applied['selective_blocks']} of {applied.get('blocks', '?')} blocks)"
    out = {
        "preset": job.preset or "none",
        "variant": variant.name,
        "base": f"fp8 ({fp8_layers} layers)" if t.base_precision == "fp8" else "bf16",
        "blocks_swapped": f"{applied.get('blocks_swapped', 0)} of {applied.get('blocks', 0)}",
        "compile": applied.get("compile", "off"),
        "checkpointing": checkpointing,
        "attention": applied.get("attention", t.attention),
        "offload_activations": applied.get("activations") == "offloaded",
    }
    measured = table()["presets"].get(job.preset or "")
    if measured and variant.name not in measured["variants"]:
        log.warning(
            "the preset was measured for another model: its memory modes may not fit this one",
            preset=job.preset,
            measured_for=", ".join(measured["variants"]),
            variant=variant.name,
        )
    return out
