"""Adapter metadata: every ``ss_*`` (kohya) and ``modelspec.*`` (SAI model spec) key kern writes into an adapter's
safetensors header is computed here, and nowhere else.

:func:`adapter_metadata` builds the header from the network's type and resolved options, plus, when given, the
model-spec keys (:func:`modelspec_metadata`) and the facts of the training run (:class:`TrainingFacts`).
``Network.save`` and the training driver both call it, so an adapter describes its network the same way whoever
saved it. :func:`safetensors_hashes` adds ``sshs_*`` when the file is written. Readers: kohya's sd-scripts and
sd-webui-additional-networks (``ss_*``, ``sshs_*``), musubi-tuner and ComfyUI (``modelspec.*``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import time
from typing import Any, Mapping, Sequence

import attrs
import torch


def adapter_metadata(
    network_type: str,
    options: Mapping[str, Any],
    *,
    modelspec: Mapping[str, str] | None = None,
    training: TrainingFacts | None = None,
) -> dict[str, str]:
    """The metadata of an adapter of ``network_type`` made with resolved ``options``: the ``modelspec`` keys (as
    :func:`modelspec_metadata` returns them), the training run's keys and the ``ss_network_*`` keys. All values are
    strings. The hashes of the tensors are not included: :func:`safetensors_hashes` needs the tensors."""
    md = dict(modelspec or {})
    if training is not None:
        md.update(training.metadata())
    md.update(network_metadata(network_type, options))
    return md


def network_metadata(network_type: str, options: Mapping[str, Any]) -> dict[str, str]:
    """kohya's ``ss_network_*`` keys for a network of ``network_type`` made with resolved ``options``.

    ``ss_network_module`` is the network type (``lora``, ``loha``); ``ss_network_dim`` and ``ss_network_alpha`` are
    the ``rank`` and ``alpha`` options (an unset or zero α is written as r, the α it means: readers parse a number;
    empty for a type without the option); ``ss_network_dropout`` the ``dropout`` option (``"0"`` when unset); ``ss_network_args`` the
    other options as JSON, in the type's option order.
    """
    return {
        "ss_network_module": network_type,
        "ss_network_dim": str(options.get("rank", "")),
        "ss_network_alpha": _alpha(options),
        "ss_network_dropout": str(options.get("dropout") or 0),
        "ss_network_args": json.dumps({k: v for k, v in options.items() if k not in ("rank", "alpha")}, default=str),
    }


@attrs.frozen(kw_only=True)
class TrainingFacts:
    """What a training run records about itself in the adapters it saves (kohya's ``ss_*`` training keys, plus
    ``kern.arch`` / ``kern.variant``, which kern reads back to pick the architecture of a file)."""

    arch: str
    variant: str
    learning_rate: float
    lr_scheduler: str
    warmup_steps: int
    max_train_steps: int
    steps: int  # steps done when the file was saved
    seed: int
    optimizer: str
    mixed_precision: str
    gradient_checkpointing: bool
    gradient_accumulation_steps: int
    max_grad_norm: float
    timestep_sampling: str
    started_at: float  # time.time() when the run started
    output_name: str

    def metadata(self) -> dict[str, str]:
        return {
            "kern.arch": self.arch,
            "kern.variant": self.variant,
            "ss_base_model_version": f"{self.arch}_{self.variant}".replace("-", "_"),
            "ss_learning_rate": str(self.learning_rate),
            "ss_lr_scheduler": str(self.lr_scheduler),
            "ss_lr_warmup_steps": str(self.warmup_steps),
            "ss_max_train_steps": str(self.max_train_steps),
            "ss_steps": str(self.steps),
            "ss_seed": str(self.seed),
            "ss_optimizer": str(self.optimizer),
            "ss_mixed_precision": str(self.mixed_precision),
            "ss_gradient_checkpointing": str(self.gradient_checkpointing),
            "ss_gradient_accumulation_steps": str(self.gradient_accumulation_steps),
            "ss_max_grad_norm": str(self.max_grad_norm),
            "ss_timestep_sampling": str(self.timestep_sampling),
            "ss_training_started_at": str(self.started_at),
            "ss_output_name": str(self.output_name),
        }


def modelspec_metadata(
    *,
    architecture: str,
    implementation: str,
    title: str | None = None,
    resolution: str | tuple[int, int] | None = None,
    adapter: str = "lora",
    date: _dt.datetime | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | Sequence[str] | None = None,
    merged_from: str | Sequence[str] | None = None,
    timestep_range: tuple[int, int] | None = None,
) -> dict[str, str]:
    """SAI model-spec keys as musubi-tuner writes them (adapters.md §11.1).

    ``architecture`` is the model-spec name without the suffix (the variant's ``modelspec``);
    ``modelspec.architecture`` becomes ``"<architecture>/<adapter>"`` (``/lora`` for every adapter type, as
    musubi does). ``resolution`` defaults to musubi's fallback ``1280x720``; ``title`` to ``LoRA@<unix time>``;
    ``date`` to now (ISO 8601, local time, no timezone).
    """
    if resolution is None:
        resolution = "1280x720"
    elif not isinstance(resolution, str):
        resolution = f"{int(resolution[0])}x{int(resolution[1])}"
    date = date or _dt.datetime.now()
    md = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/{adapter}",
        "modelspec.implementation": implementation,
        "modelspec.title": title or f"LoRA@{int(time.time())}",
        "modelspec.resolution": resolution,
        "modelspec.date": date.replace(microsecond=0, tzinfo=None).isoformat(),
    }
    optional = {
        "modelspec.author": author,
        "modelspec.description": description,
        "modelspec.license": license,
        "modelspec.tags": tags if tags is None or isinstance(tags, str) else ",".join(tags),
        "modelspec.merged_from": merged_from
        if merged_from is None or isinstance(merged_from, str)
        else ",".join(merged_from),
        "modelspec.timestep_range": None if timestep_range is None else f"{timestep_range[0]},{timestep_range[1]}",
    }
    md.update({k: v for k, v in optional.items() if v is not None})
    return md


def ss_metadata(values: Mapping[str, Any]) -> dict[str, str]:
    """kohya training keys: ``{"learning_rate": 1e-4, "datasets": [...]}`` → ``{"ss_learning_rate": "0.0001", ...}``.

    Strings stay as they are, dicts/lists become JSON, ``None`` becomes ``"None"`` (as sd-scripts writes it).
    """
    out = {}
    for k, v in values.items():
        key = k if k.startswith("ss_") else f"ss_{k}"
        if isinstance(v, str):
            out[key] = v
        elif isinstance(v, (dict, list, tuple)):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = str(v)
    return out


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``sshs_model_hash`` / ``sshs_legacy_hash`` as sd-scripts precomputes them for sd-webui-additional-networks:
    the file is serialised with only the ``ss_*`` metadata; the model hash is the SHA-256 of everything after the
    header, the legacy hash the first 8 hex digits of the SHA-256 of bytes 0x100000..0x110000."""
    from safetensors.torch import save as _save

    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = _save({k: v.contiguous() for k, v in tensors.items()}, metadata=ss or None)
    b = io.BytesIO(blob)
    n = int.from_bytes(b.read(8), "little")
    model_hash = hashlib.sha256(blob[8 + n :]).hexdigest()
    legacy = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}


def _alpha(options: Mapping[str, Any]) -> str:
    if "alpha" not in options:
        return ""
    alpha, rank = options["alpha"], options.get("rank")
    if (alpha is None or float(alpha) == 0) and rank:
        alpha = float(rank)
    return str(alpha)
