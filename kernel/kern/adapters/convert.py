"""Convert an adapter file between layouts: ``kohya``, ``comfyui`` and ``diffusers``.

===========  ===============================================================  =====================================
layout       keys                                                             alpha
===========  ===============================================================  =====================================
kohya        ``lora_unet_<native path, . → _>.lora_down/lora_up.weight``      ``.alpha`` scalar per module
             (LoHa: ``.hada_w1_a`` ...)
comfyui      ``diffusion_model.<native path>.lora_A/lora_B.weight``           folded in (√(α/r) into each factor),
             (LoHa: ``diffusion_model.<native path>.hada_*`` + ``.alpha``)    no ``.alpha`` keys (LoRA)
diffusers    ``transformer.<diffusers path>.lora_A/lora_B.weight``            folded in; ``lora_adapter_metadata``
                                                                              (PEFT LoraConfig, α = r) in the header
===========  ===============================================================  =====================================

The network plugin does the rewrite (``convert_weights``) with the architecture's module map
(``adapter_module_map``): e.g. a fused ``attn.qkv`` ↔ diffusers ``to_q/to_k/to_v`` (A duplicated, B
chunked; back as one rank-3r module with a block-diagonal B, or rank r when the three A are equal — exact
both ways). LoHa cannot be written for diffusers (it has no LoHa loader); that is an ``AdapterError``.

``variant`` may be left out: the variants of the architecture are tried in order and the first whose module
map holds every module of the file with fitting row counts is used. When none has the file's row counts (an
adapter of a tiny or custom model of the architecture), the row slices of fused modules are read off the file
(``kern.adapters.weights.fit_rows``: e.g. a fused qkv of 3h rows splits into three of h), so any shape converts.

``model`` (``kern convert --model``) is the base checkpoint, for types whose files in some layout depend on the base
weights (``convert_weights``' ``base``: a DoRA bound for ComfyUI, or one kern wrote for it); read only if the type
asks, so other conversions ignore it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from kern.adapters.network import ModuleMap, NameTable, group_by_module
from kern.adapters.network.metadata import safetensors_hashes
from kern.adapters.weights import detect, fit_rows, module_rows, read_adapter
from kern.core.io import check_output_file, describe_nonfinite, save_file
from kern.errors import AdapterError, KernError, ModelFileError, PluginError, UsageError
from kern.log import get_logger

log = get_logger(__name__)

LAYOUTS = ("kohya", "comfyui", "diffusers")


def _fits(module_map: ModuleMap, rows: dict[str, int | None]) -> tuple[bool, str]:
    """Whether every module resolves in the map and row-sliced modules have that many output rows (``rows``: module
    name → its output rows, ``kern.adapters.weights.module_rows``)."""
    table = module_map.table()
    hits = {name: table.resolve(name) for name in sorted(rows)}
    missing = [name for name, hit in hits.items() if hit is None]
    if missing:  # names first: a name no row count can fix is the reason to report
        return False, f"{missing[0]!r} is not in the module map"
    for name, have in rows.items():
        naming, path = hits[name]
        want = None
        if naming == "native" and path in module_map.native_rows:
            want = module_map.native_rows[path]
        elif naming == "other" and module_map.to_native.get(path, (None, None))[1] is not None:
            start, stop = module_map.to_native[path][1]
            want = stop - start
        if want is not None and have != want:
            return False, f"{name!r} does not have {want} output rows ({have})"
    return True, ""


def convert(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    to_layout: str,
    arch: str,
    variant: str | None = None,
    manager: Any = None,
    overwrite: bool = False,
    model: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Rewrite the adapter ``in_path`` in ``to_layout`` for ``arch`` (and ``variant``) and write ``out_path`` atomically.
    ``model``: the base checkpoint, for a type that needs its weights (:func:`base_weights`; its header is checked first).

    Before the adapter is read: the layout, the architecture and variant, and the output path (never the
    input, links included; an existing file is replaced only with ``overwrite``). The input's tensors must be
    finite (``read_adapter``) and so must the converted ones, or nothing is written.
    Returns a summary (``network_type``, ``from_layout``, ``to_layout``, ``variant``, ``tensors``, ``out``).
    """
    from kern.core.plugins import get_manager

    manager = manager or get_manager()
    if to_layout not in LAYOUTS:
        raise UsageError(f"unknown layout {to_layout!r}; choose one of {list(LAYOUTS)}")
    if not arch:
        raise UsageError("convert needs the architecture (--arch) for its module names")
    in_path, out_path = Path(in_path), Path(out_path)
    architecture, alias_variant = manager.resolve_arch(arch)
    named_by_alias = arch not in (architecture.name, *architecture.aliases)
    if variant:
        try:
            candidates = [architecture.variant(variant).name]
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None
    elif named_by_alias:
        candidates = [alias_variant]
    else:
        candidates = [v.name for v in architecture.variants]
    inputs = [("input", in_path)] + ([("base model", Path(model))] if model else [])
    check_output_file(out_path, inputs, overwrite, "--out")
    base = base_weights(model) if model else None

    tensors, metadata = read_adapter(in_path)
    claim = detect(tensors.keys(), metadata, manager, path=in_path)
    rows = module_rows(group_by_module(tensors, claim.modules), claim.network_type, manager)
    chosen, raw, reasons, maps = None, None, [], {}
    for v in candidates:
        entries = manager.hook.adapter_module_map(arch=architecture.name, variant=v, layout="diffusers")
        if entries is None:
            reasons.append(f"{v}: no module map")
            continue
        maps[v] = ModuleMap(entries)
        ok, why = _fits(maps[v], rows)
        if ok:
            chosen, raw = v, entries
            break
        reasons.append(f"{v}: {why}")
    if chosen is None:
        # No variant has the file's row counts (a tiny or custom model): read the fused modules' rows off the file.
        for v, mm in maps.items():
            fitted = fit_rows(mm, rows)
            if fitted is not None and _fits(fitted, rows)[0]:
                chosen, raw = v, list(fitted.to_other.items())
                log.info("module map rows read from the adapter", file=str(in_path), variant=v)
                break
    if chosen is None:
        if all(r.endswith("no module map") for r in reasons):
            raise PluginError(
                f"architecture {architecture.name!r} provides no adapter module map (adapter_module_map hook)"
            )
        raise AdapterError(
            f"{in_path}: does not fit {architecture.name} ({'; '.join(reasons)}); check --arch / --variant"
        )
    try:
        result = manager.hook.convert_weights(
            network_type=claim.network_type,
            state_dict=tensors,
            metadata=metadata,
            claim=claim,
            to_layout=to_layout,
            module_map=raw,
            base=base,
        )
    except AdapterError as exc:  # keeps the class: a refused layout is a usage error (exit code 2)
        raise type(exc)(f"{in_path}: {exc}") from None
    if result is None:
        raise PluginError(f"no plugin converts {claim.network_type!r} adapters (convert_weights)")
    out_tensors, out_metadata = result
    out_metadata = {str(k): str(v) for k, v in dict(out_metadata or {}).items()}
    out_metadata["kern.converted_from"] = claim.layout
    for key, t in out_tensors.items():
        bad = describe_nonfinite(t)
        if bad:
            raise AdapterError(
                f"{in_path}: converting gives {bad} in {key!r} (the adapter's values overflow {t.dtype}); nothing was written"
            )
    # The converted tensors are another file: Civitai / A1111 read its own hashes (as kohya computes them).
    out_metadata.update(safetensors_hashes(out_tensors, out_metadata))
    save_file(out_tensors, out_path, out_metadata, overwrite=overwrite)
    log.info(
        "converted adapter",
        file=str(in_path),
        out=str(out_path),
        network=claim.network_type,
        **({"note": claim.note} if claim.note else {}),  # e.g. DoRA on a LoRA claim
        from_layout=claim.layout,
        to_layout=to_layout,
        variant=chosen,
    )
    return {
        "network_type": claim.network_type,
        "from_layout": claim.layout,
        "to_layout": to_layout,
        "variant": chosen,
        "tensors": len(out_tensors),
        "out": str(out_path),
    }


ADAPTER_MARKS = (".lora_down.", ".lora_A.", ".hada_w1_a", ".lokr_w1")


def base_weights(path: str | os.PathLike) -> Callable[[str], torch.Tensor]:
    """The weights of a base checkpoint (a file, or the transformer shards of a diffusers folder) by module name, as
    ``kern merge`` reads them: one tensor per call, scaled fp8 dequantised exactly, float32, checked finite.

    ``weights(name)`` takes a native module path or a name as adapter files write it (layout prefix, kohya
    flattening); a name the base lacks is a ``ModelFileError``. The headers are read and checked here, before any work.
    """
    from kern.adapters.streaming import SafetensorsReader
    from kern.adapters.weights import strip_checkpoint_prefix
    from kern.models.files import dequantize, read_layout, safetensors_files

    files = safetensors_files(path, "transformer")
    quant = read_layout(files)  # nvfp4 & co refused here, naming the layer
    where: dict[str, tuple[Any, str]] = {}
    for f in files:
        try:
            reader = SafetensorsReader(f)
        except KernError as exc:
            raise ModelFileError(str(exc)) from None
        for key in reader.keys():
            if any(m in key for m in ADAPTER_MARKS):
                raise ModelFileError(f"{f}: looks like an adapter (keys like {key!r}), not a base model")
            if key.endswith(".weight") and key not in quant.dropped and len(reader.shape(key)) >= 2:
                where[strip_checkpoint_prefix(key)[: -len(".weight")]] = (reader, key)
    if not where:
        raise ModelFileError(f"{path}: no 2-D (or conv) '.weight' tensors; is this a model checkpoint?")
    table = NameTable(where)

    def weights(name: str) -> torch.Tensor:
        hit = table.resolve(name)
        if hit is None:
            raise ModelFileError(
                f"{path}: no base weight for module {name!r}; give the checkpoint the adapter was trained on "
                "(a single file in the architecture's own naming, as kern merge reads)"
            )
        reader, key = where[hit[1]]
        try:
            t, scale = reader.get(key), quant.scales.get(key)
            t = dequantize(t, reader.get(scale), torch.float32) if scale else t.to(torch.float32)
        except KernError as exc:
            raise ModelFileError(str(exc)) from None
        bad = describe_nonfinite(t)
        if bad:
            raise ModelFileError(f"{path}: tensor {key!r} holds {bad}; the checkpoint is corrupt: re-download it")
        return t

    return weights
