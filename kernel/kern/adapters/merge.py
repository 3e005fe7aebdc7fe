"""The merge driver: bake adapters into a base checkpoint, streaming one tensor at a time.

``W' = W + Σ mᵢ · ΔWᵢ`` for every base weight some adapter module targets, where ``ΔWᵢ`` comes from the
``weight_delta`` hook of the adapter's network type (LoRA, LoHa, any plugin), computed in float32. Each base
tensor is read on its own (positional reads, no memory map), merged, cast and appended to the output
(:class:`kern.adapters.streaming.StreamingWriter`), so the peak memory is about one base tensor in float32 (times a
small constant: the read buffer, the float32 sum, one ΔW and the cast) plus the adapters, whatever the size of
the checkpoint.

* Base checkpoints may carry a ``model.diffusion_model.`` or ``diffusion_model.`` prefix; output keys are
  written exactly as in the input.
* Adapters may be in kohya, ComfyUI or PEFT/diffusers layouts; they are brought to kohya naming by their
  plugin (``convert_weights``) and matched against the base's own module paths. A diffusers-named adapter on
  a natively-named base (its reference implementation's names) needs ``arch``, whose ``adapter_module_map``
  maps the names (fusing q/k/v; parts a type cannot fuse, such as LoKr's, each add their ΔW into their rows).
* fp8 base tensors are upcast for the merge; without ``out_dtype`` they are written as bfloat16 (an fp8
  output would round most of ΔW away). Scaled-fp8 checkpoints (ComfyUI's ``scale_weight`` / ``weight_scale``
  layers) are dequantised exactly first (``kern.models.files.read_layout``); their scale and marker keys are not
  written, so the output is a plain checkpoint.
* Adapter modules that match no base weight are an error listing them (a warning with ``allow_unmatched``).
* The output is never one of the inputs (same inode: links count) and replaces an existing file only with
  ``overwrite``; NaN/Inf in the base, the adapters or the merged result stop the merge. Any error leaves no
  output file behind (and an existing one untouched).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from kern.adapters.convert import base_weights
from kern.adapters.network import NameTable
from kern.adapters.streaming import SafetensorsReader, StreamingWriter, aligned_order
from kern.adapters.weights import (
    check_multiplier,
    detect,
    fitted_map,
    module_map_for,
    read_adapter,
    strip_checkpoint_prefix,
    to_kohya,
)
from kern.core.io import check_output_file, describe_nonfinite
from kern.errors import AdapterError, KernError, ModelFileError, PluginError, UsageError
from kern.log import get_logger
from kern.models.files import dequantize, read_layout

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
    overwrite: bool = False,
) -> dict[str, Any]:
    """Merge ``adapters`` (``[(path, multiplier)]``) into the safetensors checkpoint ``model_path``; write ``out_path``.

    ``out_dtype`` casts every floating-point tensor (default: keep each tensor's dtype, fp8 → bfloat16).
    ``arch`` / ``variant`` enable the module-map mapping of adapters named in another naming. An existing
    ``out_path`` is replaced only with ``overwrite`` (never when it is one of the inputs). Returns a summary
    (``merged``: base weights changed, ``unmatched``: adapter modules left out, ``tensors``, ``out``).

    Checked before any tensor is read: the dtype, the multipliers, the output path, the architecture and
    variant, the base header; then the adapters (finite values, detection, shapes). While streaming, a base
    tensor holding NaN/Inf, or a merged tensor that becomes non-finite, stops the merge with nothing written.
    """
    from kern.core.plugins import get_manager

    manager = manager or get_manager()
    if not adapters:
        raise UsageError("merge needs at least one adapter (--weights FILE[:multiplier])")
    dtype = parse_dtype(out_dtype)
    adapters = [(Path(p), check_multiplier(p, m)) for p, m in adapters]
    model_path, out_path = Path(model_path), Path(out_path)
    check_output_file(
        out_path, [("base model", model_path), *(("adapter", p) for p, _ in adapters)], overwrite, "--out"
    )
    module_map = _module_map(manager, arch, variant)

    try:
        reader = SafetensorsReader(model_path)
        keys = reader.keys()
        for k in keys:
            reader.dtype(k)  # every dtype readable, before the adapters are read
    except KernError as exc:
        raise ModelFileError(str(exc)) from None
    quant = read_layout([model_path])  # scaled fp8: which tensor has which scale; nvfp4 & co refused here
    keys = [k for k in keys if k not in quant.dropped]
    adapter_like = [k for k in keys if any(m in k for m in (".lora_down.", ".lora_A.", ".hada_w1_a", ".lokr_w1"))]
    if adapter_like:
        raise ModelFileError(
            f"{model_path}: looks like an adapter (keys like {adapter_like[0]!r}), not a base model; pass it with --weights"
        )
    base = {
        strip_checkpoint_prefix(k)[: -len(".weight")]: k
        for k in keys
        if k.endswith(".weight") and len(reader.shape(k)) >= 2
    }
    if not base:
        raise ModelFileError(
            f"{model_path}: no 2-D (or conv) '.weight' tensors; is this a model checkpoint? keys like {keys[:4]}"
        )
    table = NameTable(base)
    weights_of = base_weights(model_path)  # for adapters whose kohya form depends on the base (convert_weights' base)

    contributions: dict[str, list[tuple[str, dict[str, torch.Tensor], float, str]]] = {}
    unmatched: list[str] = []
    unmatched_by_file: dict[str, list[str]] = {}
    for apath, multiplier in adapters:
        tensors, metadata = read_adapter(apath)
        claim = detect(tensors.keys(), metadata, manager, path=apath)
        foreign = any(table.resolve(m) is None for m in claim.modules)
        mm = fitted_map(module_map, tensors, claim, manager) if foreign and module_map is not None else None
        try:
            kohya = to_kohya(tensors, metadata, claim, manager, mm, weights_of)
        except AdapterError as exc:
            raise AdapterError(f"{apath}: {exc}") from None
        other = mm.table() if mm is not None else None
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in kohya.items():
            name, _, suffix = key.partition(".")
            grouped.setdefault(name, {})[suffix] = t
        for name, t in grouped.items():
            hit, rows = table.resolve(name), None
            if hit is None and other is not None:  # a part of a fused weight its type did not fuse: into its rows
                part = other.resolve(name)
                if part is not None and part[0] == "other":
                    native, rows = mm.to_native[part[1]]
                    hit = ("native", native) if rows is not None and native in base else None
            if hit is None:
                unmatched.append(f"{apath}: {name}")
                unmatched_by_file.setdefault(str(apath), []).append(name)
                continue
            contributions.setdefault(base[hit[1]], []).append(
                (claim.network_type, t, float(multiplier), f"{apath}: {name}", rows)
            )
        log.info(
            "adapter for merge",
            file=str(apath),
            network=claim.network_type,
            **({"note": claim.note} if claim.note else {}),  # e.g. DoRA on a LoRA claim
            layout=claim.layout,
            modules=len(grouped),
            multiplier=float(multiplier),
        )

    if unmatched:
        hint = (
            ""
            if arch
            else "; if the adapter uses another naming than the base (e.g. diffusers names on a natively named base), give the architecture (--arch)"
        )
        listed = "; ".join(
            f"{f}: {names[:12]}{' ...' if len(names) > 12 else ''}" for f, names in unmatched_by_file.items()
        )
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
            if quant.scales.get(key) and _is_fp8(dst):
                dst = torch.bfloat16  # a scaled weight's values are not e4m3 values: requantising is not a cast
        else:
            dst = src
        layout.append((key, dst, reader.shape(key)))
    if fp8_in and dtype is None:
        log.warning("fp8 base tensors are written as bfloat16 (pass an output dtype to choose)", model=str(model_path))
    layout = aligned_order(layout)
    metadata = {k: v for k, v in reader.metadata.items() if k != "_quantization_metadata"}
    metadata["kern.merged_adapters"] = json.dumps([{"file": Path(p).name, "multiplier": float(m)} for p, m in adapters])

    with reader, StreamingWriter(out_path, layout, metadata, overwrite=overwrite) as writer:
        for key, dst, shape in layout:
            t = reader.get(key)
            if quant.scales.get(key):
                t = dequantize(t, reader.get(quant.scales[key]), torch.float32)
            bad = describe_nonfinite(t)
            if bad:
                raise ModelFileError(
                    f"{model_path}: tensor {key!r} holds {bad}; the checkpoint is corrupt: re-download or re-export it. Nothing was written"
                )
            if key in contributions:
                t = merged_weight(t, contributions[key], shape, key, manager, out_path)
            out = _cast(t, dst)
            if out.dtype != t.dtype and out.is_floating_point() and not _is_fp8(out.dtype):
                bad = describe_nonfinite(out)
                if bad:
                    labels = [c[3] for c in contributions.get(key, [])]
                    cls, why = (AdapterError, f"merged with {labels}, ") if labels else (UsageError, "")
                    raise cls(
                        f"{out_path}: tensor {key!r}, {why}does not fit {str(dst).replace('torch.', '')} ({bad} after the cast); "
                        "choose --dtype float32 or bfloat16 or lower the multipliers. Nothing was written"
                    )
            writer.write(key, out)
            del t, out
    log.info("merged", out=str(out_path), weights=len(contributions), tensors=len(layout))
    return {"merged": len(contributions), "unmatched": unmatched, "tensors": len(layout), "out": str(out_path)}


def _module_map(manager: Any, arch: str | None, variant: str | None) -> Any:
    """The architecture's module map (``None`` without ``arch``); unknown names are a ``UsageError`` before any work."""
    if not arch:
        if variant:
            raise UsageError(f"--variant {variant} needs the architecture (--arch)")
        return None
    try:
        return module_map_for(manager, arch, variant)
    except KeyError as exc:  # Architecture.variant: no such variant
        raise UsageError(str(exc.args[0])) from None


def merged_weight(
    base: torch.Tensor, parts: list, shape: tuple[int, ...], key: str, manager: Any, out_path: Path
) -> torch.Tensor:
    """``base + Σ m · ΔW`` in float32; ``AdapterError`` when a ΔW does not fit or the sum is not finite."""
    base = base.to(torch.float32)
    acc = base.clone()  # every ΔW sees the unmerged base (a DoRA's depends on it), as PEFT merges in turn
    for network_type, tensors, multiplier, label, *rows in parts:
        # rows: a part of a fused weight (a type that cannot fuse its parts), its ΔW goes into those rows
        start, stop = (rows[0] if rows and rows[0] else None) or (0, shape[0])
        want = (stop - start, *shape[1:])
        if stop > shape[0]:
            raise AdapterError(f"{label}: rows [{start}, {stop}) do not fit {key!r} {tuple(shape)}")
        try:
            delta = manager.hook.weight_delta(
                network_type=network_type, tensors=tensors, base_shape=want, base=base[start:stop]
            )
        except AdapterError as exc:
            raise AdapterError(f"{label}: {exc}") from None
        if delta is None:
            raise PluginError(f"no plugin computes weight_delta for {network_type!r} adapters")
        if tuple(delta.shape) != want:
            raise AdapterError(f"{label}: ΔW shape {tuple(delta.shape)} does not fit {key!r} {want}")
        # multiply first: add_(alpha=m) refuses an m beyond float32 with a RuntimeError, this overflows to inf (reported below)
        acc[start:stop].add_(delta.to(torch.float32).mul_(multiplier))
        del delta
    bad = describe_nonfinite(acc)
    if bad:
        labels = [p[3] for p in parts]
        raise AdapterError(
            f"{out_path}: merging {labels} into {key!r} gives {bad} (float32 overflow: a multiplier or adapter far too large); "
            "lower the multipliers. Nothing was written"
        )
    return acc


def _cast(t: torch.Tensor, dst: torch.dtype) -> torch.Tensor:
    if _is_fp8(dst) and t.dtype != dst:
        limit = torch.finfo(dst).max
        return t.to(torch.float32).clamp_(-limit, limit).to(dst)  # fp8 has no inf: saturate instead of NaN
    return t.to(dst)
