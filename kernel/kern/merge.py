"""The merge driver: bake adapters into a base checkpoint, streaming one tensor at a time.

``W' = W + Σ mᵢ · ΔWᵢ`` for every base weight some adapter module targets, where ``ΔWᵢ`` comes from the
``weight_delta`` hook of the adapter's network type (LoRA, LoHa, any plugin), computed in float32. Each base
tensor is read on its own (positional reads, no memory map), merged, cast and appended to the output
(:class:`kern.streaming.StreamingWriter`), so the peak memory is about one base tensor in float32 (times a
small constant: the read buffer, the float32 sum, one ΔW and the cast) plus the adapters, whatever the size of
the checkpoint.

* Base checkpoints may carry a ``model.diffusion_model.`` or ``diffusion_model.`` prefix; output keys are
  written exactly as in the input.
* Adapters may be in kohya, ComfyUI or PEFT/diffusers layouts; they are brought to kohya naming by their
  plugin (``convert_weights``) and matched against the base's own module paths. A diffusers-named adapter on
  a natively-named base (FLUX.2) needs ``arch``, whose ``adapter_module_map`` maps the names (fusing q/k/v).
* fp8 base tensors are upcast for the merge; without ``out_dtype`` they are written as bfloat16 (an fp8
  output would round most of ΔW away). Scaled-fp8 checkpoints (per-tensor scale keys) are refused.
* Adapter modules that match no base weight are an error listing them (a warning with ``allow_unmatched``).
  Any error leaves no output file behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from kern.errors import AdapterError, KernError, ModelFileError, PluginError, UsageError
from kern.log import get_logger
from kern.network import NameTable
from kern.streaming import SafetensorsReader, StreamingWriter, aligned_order
from kern.weights import detect, module_map_for, read_adapter, strip_checkpoint_prefix, to_kohya

log = get_logger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.update({"float8_e4m3fn": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn})

SCALED_FP8_MARKERS = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale")


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` → ``torch.bfloat16``; ``None`` stays ``None``."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise UsageError(f"unknown dtype {value!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[key]


def _is_fp8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and torch.empty((), dtype=dtype).element_size() == 1


def merge(
    model_path: str | os.PathLike,
    adapters: Sequence[tuple[str | os.PathLike, float]],
    out_path: str | os.PathLike,
    out_dtype: str | torch.dtype | None = None,
    allow_unmatched: bool = False,
    arch: str | None = None,
    variant: str | None = None,
    manager: Any = None,
) -> dict[str, Any]:
    """Merge ``adapters`` (``[(path, multiplier)]``) into the safetensors checkpoint ``model_path``; write ``out_path``.

    ``out_dtype`` casts every floating-point tensor (default: keep each tensor's dtype, fp8 → bfloat16).
    ``arch`` / ``variant`` enable the module-map mapping of adapters named in another naming. Returns a
    summary (``merged``: base weights changed, ``unmatched``: adapter modules left out, ``tensors``, ``out``).
    """
    from kern.plugins import get_manager

    manager = manager or get_manager()
    if not adapters:
        raise UsageError("merge needs at least one adapter (--weights FILE[:multiplier])")
    model_path, out_path = Path(model_path), Path(out_path)
    if out_path.exists() and out_path.resolve() == model_path.resolve():
        raise UsageError(f"{out_path}: the output would overwrite the base model; choose another --out")
    dtype = parse_dtype(out_dtype)

    try:
        reader = SafetensorsReader(model_path)
    except KernError as exc:
        raise ModelFileError(str(exc)) from None
    keys = reader.keys()
    scaled = [k for k in keys if k.endswith(SCALED_FP8_MARKERS) or k.endswith("scaled_fp8")]
    if scaled:
        raise ModelFileError(
            f"{model_path}: a scaled-fp8 checkpoint ({len(scaled)} scale tensors like {scaled[0]!r}); "
            "merge into the bf16 original and quantise afterwards"
        )
    adapter_like = [k for k in keys if any(m in k for m in (".lora_down.", ".lora_A.", ".hada_w1_a", ".lokr_w1"))]
    if adapter_like:
        raise ModelFileError(f"{model_path}: looks like an adapter (keys like {adapter_like[0]!r}), not a base model; pass it with --weights")
    base = {strip_checkpoint_prefix(k)[: -len(".weight")]: k for k in keys if k.endswith(".weight") and len(reader.shape(k)) >= 2}
    if not base:
        raise ModelFileError(f"{model_path}: no 2-D (or conv) '.weight' tensors; is this a model checkpoint? keys like {keys[:4]}")
    table = NameTable(base)
    module_map = module_map_for(manager, arch, variant) if arch else None

    contributions: dict[str, list[tuple[str, dict[str, torch.Tensor], float, str]]] = {}
    unmatched: list[str] = []
    unmatched_by_file: dict[str, list[str]] = {}
    for apath, multiplier in adapters:
        tensors, metadata = read_adapter(apath)
        claim = detect(tensors.keys(), metadata, manager, path=apath)
        foreign = any(table.resolve(m) is None for m in claim.modules)
        try:
            kohya = to_kohya(tensors, metadata, claim, manager, module_map if foreign else None)
        except AdapterError as exc:
            raise AdapterError(f"{apath}: {exc}") from None
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in kohya.items():
            name, _, suffix = key.partition(".")
            grouped.setdefault(name, {})[suffix] = t
        for name, t in grouped.items():
            hit = table.resolve(name)
            if hit is None:
                unmatched.append(f"{apath}: {name}")
                unmatched_by_file.setdefault(str(apath), []).append(name)
                continue
            contributions.setdefault(base[hit[1]], []).append((claim.network_type, t, float(multiplier), f"{apath}: {name}"))
        log.info("adapter for merge", file=str(apath), network=claim.network_type, layout=claim.layout, modules=len(grouped), multiplier=float(multiplier))

    if unmatched:
        hint = "" if arch else "; if the adapter uses another naming than the base (e.g. diffusers names on a BFL FLUX.2 file), give the architecture (--arch)"
        listed = "; ".join(f"{f}: {names[:12]}{' ...' if len(names) > 12 else ''}" for f, names in unmatched_by_file.items())
        msg = f"{len(unmatched)} adapter modules match no weight of {model_path}: {listed}{hint}"
        if not allow_unmatched:
            raise AdapterError(msg + "; --allow-unmatched merges the rest")
        log.warning("adapter modules left out of the merge", count=len(unmatched), modules=unmatched[:12])
    if not contributions:
        raise AdapterError(f"no adapter module matches a weight of {model_path}; nothing to merge")

    layout = []
    fp8_in = False
    for key in keys:
        src = reader.dtype(key)
        if src.is_floating_point:
            fp8_in = fp8_in or _is_fp8(src)
            dst = dtype or (torch.bfloat16 if _is_fp8(src) else src)
        else:
            dst = src
        layout.append((key, dst, reader.shape(key)))
    if fp8_in and dtype is None:
        log.warning("fp8 base tensors are written as bfloat16 (pass an output dtype to choose)", model=str(model_path))
    layout = aligned_order(layout)
    metadata = dict(reader.metadata)
    metadata["kern.merged_adapters"] = json.dumps([{"file": Path(p).name, "multiplier": float(m)} for p, m in adapters])

    with reader, StreamingWriter(out_path, layout, metadata) as writer:
        for key, dst, shape in layout:
            t = reader.get(key)
            if key in contributions:
                acc = t.to(torch.float32)
                del t
                for network_type, tensors, multiplier, label in contributions[key]:
                    try:
                        delta = manager.hook.weight_delta(network_type=network_type, tensors=tensors, base_shape=shape)
                    except AdapterError as exc:
                        raise AdapterError(f"{label}: {exc}") from None
                    if delta is None:
                        raise PluginError(f"no plugin computes weight_delta for {network_type!r} adapters")
                    if tuple(delta.shape) != tuple(shape):
                        raise AdapterError(f"{label}: ΔW shape {tuple(delta.shape)} does not fit {key!r} {tuple(shape)}")
                    acc.add_(delta.to(torch.float32), alpha=multiplier)
                    del delta
                t = acc
            if _is_fp8(dst):
                limit = torch.finfo(dst).max
                t = t.to(torch.float32).clamp_(-limit, limit)
            writer.write(key, t.to(dst))
            del t
    log.info("merged", out=str(out_path), weights=len(contributions), tensors=len(layout))
    return {"merged": len(contributions), "unmatched": unmatched, "tensors": len(layout), "out": str(out_path)}
