"""Names and module maps: how adapter files name the modules they adapt, and how those names become model paths.

:func:`kohya_name` (``"lora_unet_" + path.replace(".", "_")``), :class:`NameTable` (file module names in any known
layout → dotted module paths), :class:`ModuleMap` (an architecture's native ↔ diffusers module map, as the
``adapter_module_map`` hook returns it), :func:`resolve_modules` (rename, split or fuse an adapter's modules into
one naming), :class:`RowSlice` (rows of a fused layer standing in for a layer, for adapters named after one of its
parts that cannot be fused) and the helpers that group a file's keys into modules and tell its layout.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from kern.adapters.network.targets import is_linear
from kern.errors import AdapterError

KOHYA_PREFIX = "lora_unet_"

# Prefixes of module names in adapter files. Flattened ones have the dotted path's "." replaced by "_".
# The second element says which naming the rest is most likely in ("native" = the architecture's own module
# paths, as its reference implementation names them; "other" = diffusers); lookups fall back to the other naming.
FLAT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "native"),  # kohya / musubi
    ("lora_transformer_", "other"),  # OneTrainer, diffusers names
    ("lycoris_", "other"),  # LyCORIS standalone / SimpleTuner
)
DOTTED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "native"),
    ("diffusion_model.", "native"),  # ComfyUI / ai-toolkit / musubi "other"
    ("base_model.model.", "native"),  # PEFT save of a wrapped model
    ("transformer.", "other"),  # diffusers / PEFT
)
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def kohya_name(path: str) -> str:
    """The kohya / musubi module name of a dotted module path: ``"lora_unet_" + path.replace(".", "_")``."""
    return KOHYA_PREFIX + path.replace(".", "_")


# The layouts kern writes adapters in, and the prefix of a dotted module path in the prefixed ones.
LAYOUTS = ("kohya", "comfyui", "diffusers")
LAYOUT_PREFIXES = {"comfyui": "diffusion_model.", "diffusers": "transformer."}


class SlicePath(str):
    """A module path in the other (diffusers) naming whose module holds rows ``rows`` of the native module ``native``
    and stays an adapter of its own (:func:`resolve_modules`: its type cannot fuse it with its siblings).
    :func:`layout_name` spells it the way ComfyUI reads diffusers names on natively named models (``lycoris_`` +
    flattened path in kohya files, ``transformer.`` + path otherwise); kern maps it back through the module map."""

    native: str
    rows: tuple[int, int]

    def __new__(cls, path: str, native: str, rows: tuple[int, int]) -> SlicePath:
        self = super().__new__(cls, path)
        self.native, self.rows = native, (int(rows[0]), int(rows[1]))
        return self


def layout_name(path: str, layout: str) -> str:
    """The module name of dotted path ``path`` in ``layout``: kohya flattens it (:func:`kohya_name`), ComfyUI and
    diffusers prefix it (``diffusion_model.`` / ``transformer.``). A :class:`SlicePath` keeps its diffusers spelling."""
    if isinstance(path, SlicePath):
        return "lycoris_" + path.replace(".", "_") if layout == "kohya" else "transformer." + path
    return kohya_name(path) if layout == "kohya" else LAYOUT_PREFIXES[layout] + path


class NameTable:
    """Resolves module names as adapter files write them to dotted module paths.

    ``native`` are the architecture's own module paths (what kern's model and base checkpoints use), ``other``
    those of a second naming (diffusers). Flattened names (``lora_unet_a_b_c``) are un-flattened by lookup in
    these tables, since ``_`` inside names (``img_attn``, ``to_q``) makes the reverse ambiguous otherwise.
    """

    def __init__(self, native: Iterable[str] = (), other: Iterable[str] = ()) -> None:
        self.paths = {"native": set(native), "other": set(other)}
        self.flat: dict[str, dict[str, str | None]] = {}
        for naming, paths in self.paths.items():
            table: dict[str, str | None] = {}
            for p in paths:
                f = p.replace(".", "_")
                table[f] = None if (f in table and table[f] != p) else p  # None marks an ambiguous flat name
            self.flat[naming] = table

    def resolve(self, name: str) -> tuple[str, str] | None:
        """``(naming, dotted_path)`` for a module name from a file (``naming`` is ``"native"`` or ``"other"``), or None."""
        for prefix, hint in FLAT_PREFIXES:
            if name.startswith(prefix):
                flat = name[len(prefix) :]
                for naming in _order(hint):
                    path = self.flat[naming].get(flat)
                    if path is not None:
                        return naming, path
                return None
        rest, hint = name, "native"
        for prefix, h in DOTTED_PREFIXES:
            if name.startswith(prefix):
                rest, hint = name[len(prefix) :], h
                break
        for candidate in (
            (rest, name) if rest != name else (name,)
        ):  # a model may itself have a "transformer." submodule
            for naming in _order(hint):
                if candidate in self.paths[naming]:
                    return naming, candidate
        return None


def _order(hint: str) -> tuple[str, str]:
    return ("native", "other") if hint == "native" else ("other", "native")


def strip_layout_prefix(name: str) -> tuple[str, bool]:
    """A file module name without its layout prefix: ``(rest, flattened)``; bare names come back unchanged."""
    for prefix, _ in FLAT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :], True
    for prefix, _ in DOTTED_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :], False
    return name, False


Rows = tuple[int, int] | None


class ModuleMap:
    """An architecture's native ↔ other (diffusers) module map, from the ``adapter_module_map`` hook.

    Entries are ``(native_path, [(other_path, rows), ...])``: ``rows`` is the ``(start, stop)`` slice of the
    native module's output rows that ``other_path`` holds, or ``None`` for the whole module. An empty list
    means the native module exists but has no counterpart in the other naming (kohya ↔ ComfyUI conversions
    still know its name).
    """

    def __init__(self, entries: Iterable[Any], source: str = "adapter_module_map") -> None:
        self.to_other: dict[str, list[tuple[str, Rows]]] = {}
        self.to_native: dict[str, tuple[str, Rows]] = {}
        self.native_rows: dict[str, int] = {}
        for entry in entries:
            try:
                native, others = entry
                others = [(str(o), None if r is None else (int(r[0]), int(r[1]))) for o, r in others]
            except (TypeError, ValueError, IndexError):
                raise AdapterError(
                    f"{source}: malformed module map entry {entry!r}; want (native_path, [(other_path, rows)])"
                ) from None
            self.to_other[str(native)] = others
            sliced = [r for _, r in others if r is not None]
            if sliced:
                self.native_rows[str(native)] = max(r[1] for r in sliced)
            for other, rows in others:
                self.to_native[other] = (str(native), rows)

    def table(self) -> NameTable:
        return NameTable(self.to_other, self.to_native)

    def __len__(self) -> int:
        return len(self.to_other)


class RowSlice(nn.Linear):
    """Output rows ``[start, stop)`` of a linear ``layer``, standing in for a layer of its own.

    An adapter trained on one projection that the model computes fused (diffusers' ``to_q`` of a fused ``qkv``)
    sits on it when its type cannot fuse the parts into one adapter of the whole layer (a Kronecker product).
    Attaching an adapter to it adds that adapter's output into those rows of the layer's output
    (:class:`RowsAdapter`); merging adds its ΔW into those rows of the layer's weight (:func:`add_to_weight_`).
    It is a view: not part of the model, holding no tensors of its own.
    """

    def __init__(self, layer: nn.Module, start: int, stop: int) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: the weight is the layer's, not a new parameter
        if not is_linear(layer) or not 0 <= start < stop <= layer.out_features:
            raise AdapterError(f"rows [{start}, {stop}) are not a row slice of {type(layer).__name__} {layer}")
        self.__dict__["layer"] = layer  # not a submodule
        self.start, self.stop = int(start), int(stop)
        self.in_features, self.out_features = layer.in_features, self.stop - self.start

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.layer.weight[self.start : self.stop]

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        b = self.layer.bias
        return None if b is None else b[self.start : self.stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[..., self.start : self.stop]


class ModelWithSlices(nn.Module):
    """``model`` with row slices of its layers (``{path: RowSlice}``) as extra modules, for ``load_network``: an
    adapter file naming a fused layer's parts finds them at their own paths. Only ``named_modules`` (and what walks
    it) sees the slices; the model itself is not changed."""

    def __init__(self, model: nn.Module, slices: Mapping[str, RowSlice]) -> None:
        super().__init__()
        self.__dict__["model"], self.__dict__["slices"] = model, dict(slices)

    def named_modules(self, memo: Any = None, prefix: str = "", remove_duplicate: bool = True):  # type: ignore[override]
        yield from self.model.named_modules(memo, prefix, remove_duplicate)
        for path, m in self.slices.items():
            yield (f"{prefix}.{path}" if prefix else path), m


class FactorOps:
    """What :func:`resolve_modules` needs from a network type to move modules between namings.

    ``split(tensors, start, stop)`` returns the adapter of the output rows ``[start, stop)`` of a module;
    ``fuse(parts, total_rows)`` builds one module of ``total_rows`` output rows from
    ``[((start, stop), tensors), ...]`` (rows not covered stay zero), or returns ``None`` when these parts cannot be
    fused exactly: each then stays an adapter of its own rows (a :class:`SlicePath`), as for a type without ops.
    Both work on kohya-suffix tensors and must be exact.
    """

    def split(self, tensors: Mapping[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def fuse(
        self, parts: Sequence[tuple[tuple[int, int], Mapping[str, torch.Tensor]]], total_rows: int
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def resolve_modules(
    modules: Mapping[str, Mapping[str, torch.Tensor]],
    table: NameTable,
    *,
    want: str = "native",
    module_map: ModuleMap | None = None,
    ops: FactorOps | None = None,
    other_name: str = "diffusers",
) -> tuple[dict[str, dict[str, torch.Tensor]], list[tuple[str, str]]]:
    """Bring an adapter's modules (file module name → kohya-suffix tensors) into one naming.

    Returns ``({dotted path in the wanted naming: tensors}, [(file module name, why it was left out)])``.
    Modules named in the other naming are renamed through ``module_map``, fused (several other modules
    holding row slices of one native module, e.g. diffusers ``to_q/to_k/to_v`` → a fused ``qkv``) or split
    (the reverse) with ``ops``. Row slices a type cannot fuse (no ``ops``, or ``ops.fuse`` returns ``None``: a
    Kronecker product) stay modules of their own, keyed by a :class:`SlicePath` (their other path, knowing the native
    module and rows); kern applies and merges each into its rows. Two file modules landing on the same path raise
    ``AdapterError``.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    sources: dict[str, str] = {}
    parts: dict[str, list[tuple[tuple[int, int], Mapping[str, torch.Tensor], str, str]]] = {}
    unmatched: list[tuple[str, str]] = []

    def put(path: str, tensors: Mapping[str, torch.Tensor], name: str) -> None:
        if path in out:
            raise AdapterError(
                f"modules {sources[path]!r} and {name!r} both target {path!r}; the file holds the same module twice"
            )
        out[path] = dict(tensors)
        sources[path] = name

    for name, tensors in modules.items():
        hit = table.resolve(name)
        if hit is None:
            unmatched.append((name, "matches no module"))
            continue
        naming, path = hit
        if naming == want or module_map is None:
            put(path, tensors, name)
        elif want == "native":  # other → native
            native, rows = module_map.to_native[path]
            if rows is None:
                put(native, tensors, name)
            else:
                parts.setdefault(native, []).append((rows, tensors, name, path))
        else:  # native → other
            targets = module_map.to_other.get(path, [])
            if not targets:
                unmatched.append((name, f"{path!r} has no {other_name} equivalent"))
                continue
            for other, rows in targets:
                if rows is None:
                    put(other, tensors, name)
                else:
                    if ops is None:
                        raise AdapterError(f"{name!r}: splitting a module needs the network type's factor operations")
                    put(other, ops.split(tensors, rows[0], rows[1]), name)
    for native, group in parts.items():
        total = module_map.native_rows[native] if module_map else max(r[1] for r, _, _, _ in group)
        fused = None if ops is None else ops.fuse([(r, t) for r, t, _, _ in group], total)
        if fused is None:  # each part stays an adapter of its own rows of the native module
            for rows, t, name, path in group:
                put(SlicePath(path, native, rows), t, name)
        else:
            put(native, fused, "+".join(n for _, _, n, _ in group))
    return out, unmatched


def group_by_module(state_dict: Mapping[str, Any], modules: Mapping[str, Sequence[str]]) -> dict[str, dict[str, Any]]:
    """``{module name: {suffix: tensor}}`` from a state dict and a claim's ``modules`` (name → its keys)."""
    out: dict[str, dict[str, Any]] = {}
    for name, keys in modules.items():
        out[name] = {k[len(name) + 1 :]: state_dict[k] for k in keys}
    return out


def split_keys(keys: Iterable[str], suffixes: Iterable[str]) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """Group adapter keys into modules by known suffixes (longest first): ``({module: keys}, unparsed keys)``."""
    ordered = sorted(set(suffixes), key=len, reverse=True)
    modules: dict[str, list[str]] = {}
    rest = []
    for key in keys:
        for s in ordered:
            if key.endswith("." + s) and len(key) > len(s) + 1:
                modules.setdefault(key[: -len(s) - 1], []).append(key)
                break
        else:
            rest.append(key)
    return {m: tuple(sorted(k)) for m, k in modules.items()}, rest


def layout_of(module_names: Iterable[str]) -> str:
    """The layout most module names are written in: ``kohya``, ``comfyui``, ``lycoris`` or ``peft``."""
    votes: Counter[str] = Counter()
    for n in module_names:
        if n.startswith(KOHYA_PREFIX):
            votes["kohya"] += 1
        elif n.startswith(("diffusion_model.", "model.diffusion_model.")):
            votes["comfyui"] += 1
        elif n.startswith(("lycoris_", "lora_transformer_")):
            votes["lycoris"] += 1
        else:
            votes["peft"] += 1
    return votes.most_common(1)[0][0] if votes else "kohya"
