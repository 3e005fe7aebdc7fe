"""Adapter files: read them, find out what they are, apply them to a model unmerged.

* :func:`read_adapter` — tensors and metadata of a safetensors adapter, with errors that name the file.
* :func:`detect` — ask every network plugin (``detect_weights``) and return the single claim; when no plugin
  claims the file, say what it is if recognisable (LoKr, DoRA, a full model checkpoint, a file mixing adapter
  kinds) or show a few of its keys.
* :func:`apply_adapters` — apply several adapter files (any types mixed) with their multipliers to a model,
  unmerged; diffusers-named files are mapped onto the architecture's native module names through its
  ``adapter_module_map`` when ``arch`` is given. Parts of a fused layer whose type cannot fuse them into one adapter
  (LoKr's ``to_q`` / ``to_k`` / ``to_v`` of a fused ``qkv``) sit on row slices of it
  (``kern.adapters.network.names.RowSlice``): each adds into its own rows of the layer's output.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from kern.adapters.network import (
    CHECKPOINT_PREFIXES,
    ModuleMap,
    NameTable,
    Network,
    candidate_paths,
    group_by_module,
)
from kern.adapters.network.runtime import merge_networks
from kern.errors import AdapterError, KernError, PluginError, UsageError
from kern.log import get_logger
from kern.records import WeightsClaim

log = get_logger(__name__)

ADAPTER_MARKERS = ("lora_", "hada_", "lokr_", ".alpha", "dora_scale", "lora.")


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of the adapter file ``path``; ``AdapterError`` names the file on failure.

    Every path that reads an adapter (generate, merge, convert) comes here: a corrupt header, an empty file
    and a tensor holding NaN or infinite values are refused, naming the file (and the key).
    """
    from kern.core.io import describe_nonfinite, load_file

    p = Path(path)
    try:
        tensors, metadata = load_file(p)
    except KernError as exc:
        raise AdapterError(str(exc)) from None
    except Exception as exc:  # safetensors' own errors (bad dtype, overlapping offsets ...)
        raise AdapterError(f"{p}: unreadable safetensors file: {exc}") from None
    if not tensors:
        raise AdapterError(f"{p}: holds no tensors; not an adapter")
    for key, t in tensors.items():
        bad = describe_nonfinite(t)
        if bad:
            raise AdapterError(
                f"{p}: tensor {key!r} holds {bad}; the adapter is corrupt or its training diverged: "
                "use an earlier checkpoint of it or re-export it"
            )
    return tensors, dict(metadata or {})


def describe_unclaimed(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> str:
    """What a file no network plugin claimed looks like, in words (for the error message)."""
    keys = sorted(keys)
    sample = keys[:5]
    kinds = []
    if any("lora_down" in k or "lora_up" in k or ".lora_A" in k or ".lora_B" in k for k in keys):
        kinds.append("LoRA")
    if any(".hada_" in k for k in keys):
        kinds.append("LoHa")
    if any(".lokr_" in k for k in keys):
        kinds.append("LoKr")
    dora = [k for k in keys if k.endswith("dora_scale")]
    plain = [k for k in keys if not any(m in k for m in ADAPTER_MARKERS)]
    if len(kinds) > 1:
        return f"a mixed adapter file holding {' and '.join(kinds)} modules; kern applies one network type per file: split it"
    if dora:
        return (
            f"a DoRA adapter ({len(dora)} dora_scale keys, e.g. {dora[0]!r}) on modules no installed plugin reads "
            "with a magnitude (kern's lora plugin reads DoRA on LoRA modules)"
        )
    if kinds == ["LoKr"]:
        lk = [k for k in keys if ".lokr_" in k]
        return (
            f"a LoKr adapter (keys like {lk[0]!r}), but no loaded plugin claims it: install the lokr plugin "
            "(pip install -e plugins/lokr) or re-enable it (KERN_DISABLE_PLUGINS)"
        )
    if kinds and plain:
        return f"an adapter ({kinds[0]}) mixed with {len(plain)} non-adapter tensors such as {plain[:3]}; remove those"
    if plain and len(plain) == len(keys):
        w = [k for k in keys if k.endswith(".weight")]
        if w:
            return (
                f"a full model checkpoint ({len(keys)} tensors like {w[0]!r}), not an adapter; "
                "pass it as the base model (--model), not as adapter weights"
            )
    return f"not an adapter format kern knows ({len(keys)} keys, e.g. {sample})"


def detect(
    keys: Iterable[str], metadata: Mapping[str, str] | None = None, manager: Any = None, path: Any = None
) -> WeightsClaim:
    """The one network plugin's claim on an adapter file with these ``keys``; ``AdapterError`` otherwise."""
    from kern.core.plugins import get_manager

    manager = manager or get_manager()
    keys = frozenset(keys)
    metadata = dict(metadata or {})
    where = f"{path}: " if path is not None else ""
    claims: list[tuple[str, WeightsClaim]] = []
    for impl in manager.hook.detect_weights.get_hookimpls():
        try:
            claim = impl.function(keys=keys, metadata=metadata)
        except Exception as exc:
            raise PluginError(
                f"{where}plugin {impl.plugin_name!r} failed in detect_weights: {type(exc).__name__}: {exc}"
            ) from exc
        if claim is None:
            continue
        if not isinstance(claim, WeightsClaim):
            raise PluginError(
                f"plugin {impl.plugin_name!r}: detect_weights returned {type(claim).__name__}, expected kern.WeightsClaim"
            )
        claims.append((impl.plugin_name, claim))
    if not claims:
        raise AdapterError(f"{where}{describe_unclaimed(keys, metadata)}")
    if len(claims) > 1:
        who = ", ".join(f"{name} ({c.network_type}, {c.layout})" for name, c in claims)
        raise AdapterError(f"{where}claimed by more than one network plugin: {who}; disable one (KERN_DISABLE_PLUGINS)")
    return claims[0][1]


def module_map_for(manager: Any, arch: str, variant: str | None, layout: str = "diffusers") -> ModuleMap | None:
    """The architecture's ``adapter_module_map`` for ``variant`` (canonicalised), or ``None`` if it has none."""
    architecture, default_variant = manager.resolve_arch(arch)
    variant = architecture.variant(variant).name if variant else default_variant
    raw = manager.hook.adapter_module_map(arch=architecture.name, variant=variant, layout=layout)
    return None if raw is None else ModuleMap(raw, source=f"{architecture.name}/{variant} adapter_module_map")


def _largest_rows(tensors: Mapping[str, torch.Tensor]) -> int | None:
    """The most rows of a module's matrices: its output rows for a type without ``weight_shape`` whose up factor is
    ``[out, r]`` (the rank is below the output rows of any useful adapter)."""
    rows = [int(t.shape[0]) for t in tensors.values() if t.dim() >= 2]
    return max(rows) if rows else None


def module_rows(
    modules: Mapping[str, Mapping[str, torch.Tensor]], network_type: str, manager: Any
) -> dict[str, int | None]:
    """Each module's output rows as its file holds them, from its network type's ``weight_shape`` hook (a LoKr's are
    W1 rows × W2 rows); a type without the hook: the largest first dimension of its matrices."""
    out: dict[str, int | None] = {}
    for name, tensors in modules.items():
        shape = manager.hook.weight_shape(network_type=network_type, tensors=tensors)
        out[name] = int(shape[0]) if shape else _largest_rows(tensors)
    return out


def fit_rows(module_map: ModuleMap, rows: Mapping[str, int | None]) -> ModuleMap | None:
    """``module_map`` with its row slices scaled to the row counts the adapter's own modules have, or ``None``.

    A map's slices (a fused ``qkv`` of 3·hidden rows ↔ three modules of hidden rows) come from a real model's sizes;
    an adapter of a smaller or custom model of the same architecture has the same layout at other sizes. Each sliced
    module of the file (``rows``: name → output rows, :func:`module_rows`) gives a factor (its rows / the
    map's rows), all slices of that module scale by it; ``None`` when a name is not in the map, two modules of one
    fused module disagree, or a scaled slice is not whole rows.
    """
    from fractions import Fraction

    table = module_map.table()
    factor: dict[str, Fraction] = {}
    for name, have in rows.items():
        hit = table.resolve(name)
        if hit is None:
            return None
        naming, path = hit
        if have is None:
            continue
        if naming == "native" and path in module_map.native_rows:
            native, want = path, module_map.native_rows[path]
        elif naming == "other" and module_map.to_native[path][1] is not None:
            native, (start, stop) = module_map.to_native[path]
            want = stop - start
        else:
            continue
        f = Fraction(have, want)
        if factor.setdefault(native, f) != f:
            return None
    entries = []
    for native, others in module_map.to_other.items():
        f = factor.get(native)
        scaled = []
        for other, r in others:
            if f is not None and r is not None:
                start, stop = Fraction(r[0]) * f, Fraction(r[1]) * f
                if start.denominator != 1 or stop.denominator != 1:
                    return None
                r = (int(start), int(stop))
            scaled.append((other, r))
        entries.append((native, scaled))
    return ModuleMap(entries, source="adapter_module_map fitted to the file's rows")


def fitted_map(
    module_map: ModuleMap | list, tensors: Mapping[str, torch.Tensor], claim: WeightsClaim, manager: Any
) -> ModuleMap:
    """``module_map`` with its row slices read off the adapter's modules (:func:`fit_rows`), or as it is."""
    mm = module_map if isinstance(module_map, ModuleMap) else ModuleMap(module_map)
    return fit_rows(mm, module_rows(group_by_module(tensors, claim.modules), claim.network_type, manager)) or mm


def row_slices(names: Iterable[str], layers: Mapping[str, torch.nn.Module], module_map: ModuleMap) -> dict:
    """``{other path: RowSlice}`` for the module ``names`` (kohya naming, after :func:`to_kohya`) that are not layers
    of the model but row slices of one (``module_map``): parts of a fused layer their type could not fuse."""
    from kern.adapters.network.names import RowSlice

    table, other = NameTable(layers), module_map.table()
    out = {}
    for name in names:
        hit = None if table.resolve(name) is not None else other.resolve(name)
        if hit is None or hit[0] != "other":
            continue
        native, rows = module_map.to_native[hit[1]]
        if rows is not None and native in layers:
            out[hit[1]] = RowSlice(layers[native], *rows)
    return out


def to_kohya(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    claim: WeightsClaim,
    manager: Any,
    module_map: ModuleMap | list | None = None,
    base: Any = None,
) -> dict[str, torch.Tensor]:
    """The adapter rewritten in kohya naming by its plugin (``convert_weights``), mapped to native names if a map is
    given; the map's row slices are read off the file's tensors (:func:`fit_rows`), so adapters of smaller or custom
    models of the architecture map too. ``base``: the base weights by name, for types that need them
    (``convert_weights``; e.g. a DoRA file kern wrote for ComfyUI)."""
    raw = None
    if module_map is not None:
        raw = list(fitted_map(module_map, tensors, claim, manager).to_other.items())
    result = manager.hook.convert_weights(
        network_type=claim.network_type,
        state_dict=tensors,
        metadata=metadata,
        claim=claim,
        to_layout="kohya",
        module_map=raw,
        base=base,
    )
    if result is None:
        raise PluginError(f"no plugin converts {claim.network_type!r} adapters (convert_weights)")
    return dict(result[0])


def apply_adapters(
    model: torch.nn.Module,
    adapters: Sequence[tuple[str | os.PathLike, float]],
    arch: str | None = None,
    variant: str | None = None,
    manager: Any = None,
    merge: bool = False,
) -> list[Network]:
    """Apply adapter files to ``model`` unmerged, each with its multiplier; return the attached networks.

    With ``merge=True`` every network is then baked into the weights (``Network.merge_into_model``: "merged for
    speed" generation; the returned networks are detached and their multipliers fixed).

    Files may be of any type (LoRA, DoRA, LoHa, LoKr: any layout a plugin detects) and may target the same layers: their outputs add
    up. With ``arch`` set, a file whose module names are not the model's own (e.g. diffusers names on a
    natively named model) is first mapped through the architecture's module map. On any error the networks
    applied so far are removed again.
    """
    from kern.core.plugins import get_manager

    manager = manager or get_manager()
    adapters = [(path, check_multiplier(path, multiplier)) for path, multiplier in adapters]
    layers = candidate_paths(model)
    table = NameTable(layers)
    networks: list[Network] = []
    try:
        for path, multiplier in adapters:
            tensors, metadata = read_adapter(path)
            claim = detect(tensors.keys(), metadata, manager, path=path)
            foreign = [m for m in claim.modules if table.resolve(m) is None]
            host = model
            if foreign and arch is not None:
                mm = module_map_for(manager, arch, variant)
                if mm is not None:
                    mm = fitted_map(mm, tensors, claim, manager)
                    log.debug(
                        "mapping adapter names through the module map",
                        file=str(path),
                        arch=arch,
                        unmatched=len(foreign),
                    )
                    try:
                        tensors = to_kohya(tensors, metadata, claim, manager, mm)
                    except AdapterError as exc:
                        raise AdapterError(f"{path}: {exc}") from None
                    claim = detect(tensors.keys(), {}, manager, path=path)
                    metadata = {}
                    slices = row_slices(claim.modules, layers, mm)
                    if slices:  # parts of fused layers kept apart: each adapter goes into its rows of the layer
                        from kern.adapters.network.names import ModelWithSlices

                        host = ModelWithSlices(model, slices)
                        log.info("adapter modules on row slices of fused layers", file=str(path), count=len(slices))
            try:
                net = manager.hook.load_network(
                    network_type=claim.network_type,
                    model=host,
                    state_dict=tensors,
                    metadata=metadata,
                    claim=claim,
                    multiplier=float(multiplier),
                )
            except AdapterError as exc:
                hint = ""
                if arch is None and "match no layer" in str(exc):
                    hint = " (if the file uses another naming, e.g. diffusers names on a natively named model, give the architecture)"
                raise AdapterError(f"{path}: {exc}{hint}") from None
            if net is None:
                raise PluginError(f"{path}: no plugin loads {claim.network_type!r} adapters (load_network)")
            log.info(
                "applied adapter",
                file=str(path),
                network=claim.network_type,
                **({"note": claim.note} if claim.note else {}),  # e.g. DoRA on a LoRA claim
                layout=claim.layout,
                modules=len(net),
                multiplier=float(multiplier),
            )
            networks.append(net)
    except BaseException:
        for net in reversed(networks):
            net.remove()
        raise
    if merge:
        merge_networks(networks)  # every ΔW on the unmerged weights, as unmerged and as `kern merge`
        log.info("merged adapters into the model", count=len(networks))
    return networks


def parse_weights_arg(value: str, option: str = "--weights") -> tuple[str, float]:
    """``"file.safetensors:0.8"`` → ``("file.safetensors", 0.8)``; no ``:number`` suffix means multiplier 1.

    An existing file whose name contains colons is taken whole. The multiplier must be a finite number
    (``:nan``, ``:inf`` are refused) and the file must exist and not be a folder; otherwise ``UsageError``
    naming ``option`` and the item.
    """
    import math

    if os.path.isfile(value):
        return value, 1.0
    path, multiplier = value, 1.0
    head, sep, tail = value.rpartition(":")
    if sep:
        try:
            multiplier = float(tail)
        except ValueError:
            pass  # not a number: the colon belongs to the file name
        else:
            path = head
            if not math.isfinite(multiplier):
                raise UsageError(f"{option} {value}: multiplier {tail!r} is not a finite number; give e.g. {head}:0.8")
    if not path:
        raise UsageError(f"{option} {value!r}: give an adapter file, optionally with :multiplier")
    if os.path.isdir(path):
        raise UsageError(f"{option} {value}: {path} is a folder; give the adapter's .safetensors file")
    if not os.path.isfile(path):
        what = "no such file" if not os.path.lexists(path) else "not a regular file"
        raise UsageError(f"{option} {value}: {path}: {what}")
    return path, multiplier


def check_multiplier(path: Any, multiplier: Any) -> float:
    """``multiplier`` as a finite float; ``UsageError`` naming the adapter otherwise."""
    import math

    try:
        m = float(multiplier)
    except (TypeError, ValueError):
        raise UsageError(f"adapter {path}: multiplier {multiplier!r} is not a number") from None
    if not math.isfinite(m):
        raise UsageError(f"adapter {path}: multiplier {multiplier!r} is not a finite number")
    return m


def strip_checkpoint_prefix(key: str) -> str:
    for prefix in CHECKPOINT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key
