"""Architecture-free adapter machinery that every network plugin (LoRA, LoHa, third-party ones) builds on.

What lives here:

* **Target selection** — :func:`select_targets` picks the ``nn.Linear`` (and kern's ``Float8Linear``; with
  ``conv=True`` also ``nn.Conv2d``) modules of a model whose dotted path ``re.fullmatch``-es a
  :class:`kern.TargetSpec`; ``include`` overrides ``exclude`` (musubi-tuner semantics).
* **Naming** — :func:`kohya_name` (``"lora_unet_" + path.replace(".", "_")``), :class:`NameTable` (file
  module names in any known layout → dotted module paths), :class:`ModuleMap` (an architecture's
  native ↔ diffusers module map, as the ``adapter_module_map`` hook returns it) and
  :func:`resolve_modules` (rename, split or fuse an adapter's modules into one naming).
* **The runtime** — :class:`AdapterModule` (one adapter on one layer; plugins subclass it) and
  :class:`Network` (a set of them: wrapping, multiplier, enable/disable, LoRA+ parameter groups, save in
  kohya naming, merge into the model).
* **Metadata** — :func:`modelspec_metadata` and :func:`ss_metadata` build the SAI model-spec and kohya
  ``ss_*`` keys that tools read from an adapter's safetensors header.

How wrapping works: the target layer is **not replaced**. Its ``forward`` is swapped (an instance attribute)
for a function that calls the original ``forward`` and adds the outputs of the adapters attached to it, so
the layer keeps its weights and type, and several adapters (LoRA and LoHa mixed, from several networks) can
sit on one layer. ``Network.remove()`` detaches; when the last adapter leaves a layer, its original
``forward`` is restored.

Precision: each adapter casts the layer's input to its own dtype (an fp32 adapter on a bf16 model computes in
fp32), or under autocast to the autocast dtype its matmuls run in anyway (:func:`compute_dtype`); the adapter outputs are summed and added to the layer's output with type promotion, then rounded
**once** to the layer's output dtype.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from kern.errors import AdapterError, UsageError
from kern.log import get_logger
from kern.records import TargetSpec

log = get_logger(__name__)

KOHYA_PREFIX = "lora_unet_"

# Prefixes of module names in adapter files. Flattened ones have the dotted path's "." replaced by "_".
# The second element says which naming the rest is most likely in ("native" = the architecture's own module
# paths, e.g. BFL for FLUX.2; "other" = diffusers); lookups fall back to the other naming.
FLAT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "native"),  # kohya / musubi
    ("lora_transformer_", "other"),  # OneTrainer diffusers-flux
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


# --------------------------------------------------------------------------- target selection


def _float8_linear_type() -> type | None:
    try:
        from kern.gpu.fp8 import Float8Linear
    except Exception:  # pragma: no cover - fp8 support is optional
        return None
    return Float8Linear


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or kern's weight-only fp8 ``Float8Linear`` (a frozen linear with an fp8 weight buffer)."""
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

    Candidates are linear layers (``nn.Linear``, ``kern.gpu.fp8.Float8Linear``) and, with ``conv=True``,
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


# --------------------------------------------------------------------------- names and module maps


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
                flat = name[len(prefix):]
                for naming in _order(hint):
                    path = self.flat[naming].get(flat)
                    if path is not None:
                        return naming, path
                return None
        rest, hint = name, "native"
        for prefix, h in DOTTED_PREFIXES:
            if name.startswith(prefix):
                rest, hint = name[len(prefix):], h
                break
        for candidate in (rest, name) if rest != name else (name,):  # a model may itself have a "transformer." submodule
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
            return name[len(prefix):], True
    for prefix, _ in DOTTED_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):], False
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
                raise AdapterError(f"{source}: malformed module map entry {entry!r}; want (native_path, [(other_path, rows)])") from None
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


class FactorOps:
    """What :func:`resolve_modules` needs from a network type to move modules between namings.

    ``split(tensors, start, stop)`` returns the adapter of the output rows ``[start, stop)`` of a module;
    ``fuse(parts, total_rows)`` builds one module of ``total_rows`` output rows from
    ``[((start, stop), tensors), ...]`` (rows not covered stay zero). Both work on kohya-suffix tensors and
    must be exact.
    """

    def split(self, tensors: Mapping[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def fuse(self, parts: Sequence[tuple[tuple[int, int], Mapping[str, torch.Tensor]]], total_rows: int) -> dict[str, torch.Tensor]:
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
    holding row slices of one native module, e.g. diffusers ``to_q/to_k/to_v`` → BFL ``qkv``) or split
    (the reverse) with ``ops``. Two file modules landing on the same path raise ``AdapterError``.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    sources: dict[str, str] = {}
    parts: dict[str, list[tuple[tuple[int, int], Mapping[str, torch.Tensor], str]]] = {}
    unmatched: list[tuple[str, str]] = []

    def put(path: str, tensors: Mapping[str, torch.Tensor], name: str) -> None:
        if path in out:
            raise AdapterError(f"modules {sources[path]!r} and {name!r} both target {path!r}; the file holds the same module twice")
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
                parts.setdefault(native, []).append((rows, tensors, name))
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
        if ops is None:
            raise AdapterError(f"{native!r}: fusing modules needs the network type's factor operations")
        total = module_map.native_rows[native] if module_map else max(r[1] for r, _, _ in group)
        put(native, ops.fuse([(r, t) for r, t, _ in group], total), "+".join(n for _, _, n in group))
    return out, unmatched


def group_by_module(state_dict: Mapping[str, Any], modules: Mapping[str, Sequence[str]]) -> dict[str, dict[str, Any]]:
    """``{module name: {suffix: tensor}}`` from a state dict and a claim's ``modules`` (name → its keys)."""
    out: dict[str, dict[str, Any]] = {}
    for name, keys in modules.items():
        out[name] = {k[len(name) + 1:]: state_dict[k] for k in keys}
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


# --------------------------------------------------------------------------- runtime: adapters and networks


def layer_geometry(org: nn.Module) -> dict[str, Any]:
    """``kind`` (``linear`` / ``conv2d``), ``in_features``, ``out_features``, ``weight_shape`` of a target layer."""
    if isinstance(org, nn.Conv2d):
        return {
            "kind": "conv2d",
            "in_features": org.in_channels,
            "out_features": org.out_channels,
            "weight_shape": tuple(org.weight.shape),
        }
    if is_linear(org):
        return {
            "kind": "linear",
            "in_features": org.in_features,
            "out_features": org.out_features,
            "weight_shape": (org.out_features, org.in_features),
        }
    raise AdapterError(f"cannot put an adapter on a {type(org).__name__}; only Linear and Conv2d layers")


def compute_dtype(x: torch.Tensor, adapter_dtype: torch.dtype) -> torch.dtype:
    """The dtype an adapter casts its input to: autocast's while autocast is on (its matmuls run there anyway,
    so a cast to an fp32 adapter's dtype would only copy the activation to fp32 and back: same numbers, twice
    the traffic), else the adapter's own dtype. The parameters stay fp32 masters either way."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return adapter_dtype


def layer_device(org: nn.Module) -> torch.device:
    w = getattr(org, "weight", None)
    return w.device if isinstance(w, torch.Tensor) else torch.device("cpu")


class AdapterModule(nn.Module):
    """One adapter on one target layer. Network plugins subclass it.

    The target layer is held as ``self.org`` but **not registered as a submodule**, so the adapter's
    ``state_dict``, ``parameters()`` and ``.to()`` cover only the adapter's own tensors. Subclasses implement:

    * ``adapter_forward(x)`` — the adapter's contribution to the layer output for input ``x`` (already scaled
      by α/r, dropout applied in training), **without** the user multiplier, in the adapter's dtype;
    * ``delta_weight()`` — the full-size ``ΔW`` (float32, the layer's weight shape), without the multiplier;
    * ``kohya_tensors()`` / ``load_kohya_tensors(tensors)`` — the module's tensors by kohya suffix
      (``lora_down.weight``, ``hada_w1_a``, ``alpha`` ...).

    ``up_param_names`` lists parameter-name prefixes that LoRA+ trains at ``lr × loraplus_lr_ratio``.
    """

    up_param_names: tuple[str, ...] = ()

    def __init__(self, name: str, path: str, org: nn.Module, module_dropout: float = 0.0) -> None:
        super().__init__()
        self.name = name
        self.path = path
        self.__dict__["org"] = org  # deliberately not a submodule
        self.geometry = layer_geometry(org)
        self.multiplier = 1.0
        self.enabled = True
        self.module_dropout = float(module_dropout or 0.0)

    def active(self) -> bool:
        """Whether this adapter contributes to this forward (enabled, non-zero multiplier, not module-dropped)."""
        if not self.enabled or self.multiplier == 0:
            return False
        if self.training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout:
            return False
        return True

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_to(self, out: torch.Tensor, x: torch.Tensor, multiplier: float) -> torch.Tensor:
        """``out + multiplier · adapter_forward(x)``, rounded once to ``out``'s dtype: the layer's output when this is
        its only active adapter. Subclasses may fuse the addition into their last matmul (LoRA does)."""
        y = self.adapter_forward(x)
        if multiplier != 1.0:
            y = y * multiplier
        return (out + y).to(out.dtype)

    def kohya_tensors(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_kohya_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.path}"


_ATTACHED = "_kern_adapters"
_PREVIOUS = "_kern_previous_forward"


def _attach(org: nn.Module, adapter: AdapterModule) -> None:
    d = org.__dict__
    if _ATTACHED not in d:
        adapters: list[AdapterModule] = []
        original = org.forward  # the class's bound forward, or an earlier instance-level replacement

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return _add_adapter_outputs(original(x, *args, **kwargs), x, adapters)

        d[_PREVIOUS] = d.get("forward")
        d[_ATTACHED] = adapters
        d["forward"] = forward
    if adapter not in d[_ATTACHED]:
        d[_ATTACHED].append(adapter)


def _detach(org: nn.Module, adapter: AdapterModule) -> None:
    d = org.__dict__
    adapters = d.get(_ATTACHED)
    if adapters is None:
        return
    if adapter in adapters:
        adapters.remove(adapter)
    if not adapters:
        previous = d.pop(_PREVIOUS, None)
        d.pop(_ATTACHED, None)
        if previous is None:
            d.pop("forward", None)
        else:
            d["forward"] = previous


def _add_adapter_outputs(out: torch.Tensor, x: torch.Tensor, adapters: Sequence[AdapterModule]) -> torch.Tensor:
    active = [a for a in adapters if a.active()]
    if len(active) == 1:  # the training case: the adapter may fuse its addition into its own last matmul
        return active[0].add_to(out, x, active[0].multiplier)
    total = None
    for a in active:
        y = a.adapter_forward(x)
        if a.multiplier != 1.0:
            y = y * a.multiplier
        total = y if total is None else total + y
    if total is None:
        return out
    # Type promotion does the sum in the wider dtype (an fp32 adapter on a bf16 layer adds in fp32), then one rounding.
    return (out + total).to(out.dtype)


def attached_adapters(org: nn.Module) -> list[AdapterModule]:
    """The adapters currently attached to layer ``org`` (in attach order)."""
    return list(org.__dict__.get(_ATTACHED, ()))


class Network(nn.Module):
    """A set of adapter modules of one network type on one model.

    ``adapters`` is an ``nn.ModuleDict`` keyed by kohya module name, so ``network.parameters()`` are the
    trainable adapter tensors and ``network.to(...)``, ``.train()``, ``.eval()`` act on them only.
    """

    def __init__(
        self,
        network_type: str,
        modules: Iterable[AdapterModule],
        *,
        multiplier: float = 1.0,
        loraplus_lr_ratio: float | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.network_type = network_type
        self.adapters = nn.ModuleDict()
        for m in modules:
            if m.name in self.adapters:
                raise AdapterError(f"two adapter modules are called {m.name!r} (paths {self.adapters[m.name].path!r} and {m.path!r})")
            self.adapters[m.name] = m
        self.options = dict(options or {})
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.attached = False
        self.merged = False
        self._enabled = True
        self._multiplier = 1.0
        self.multiplier = multiplier

    # ------------------------------------------------------------------ state

    @property
    def multiplier(self) -> float:
        """The user strength ``m`` in ``y = W x + m · ΔW x``; settable at any time (also during inference)."""
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        if self.merged:
            log.warning("network already merged into the model; changing its multiplier has no effect", network=self.network_type)
        self._multiplier = float(value)
        for m in self.adapters.values():
            m.multiplier = self._multiplier

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        for m in self.adapters.values():
            m.enabled = self._enabled

    def __len__(self) -> int:
        return len(self.adapters)

    def modules_by_path(self) -> dict[str, AdapterModule]:
        return {m.path: m for m in self.adapters.values()}

    # ------------------------------------------------------------------ wrapping

    def apply(self, fn: Callable[[nn.Module], None] | None = None) -> Network:  # type: ignore[override]
        """Attach every adapter to its layer (idempotent); returns ``self``.

        ``apply(fn)`` keeps ``nn.Module.apply``'s meaning (call ``fn`` on every submodule), so generic code
        that walks modules is not surprised.
        """
        if fn is not None:
            return super().apply(fn)
        return self.attach()

    def attach(self) -> Network:
        """Attach every adapter to its layer (idempotent); returns ``self``."""
        if self.merged:
            raise AdapterError("this network was merged into the model; it cannot be attached again")
        for m in self.adapters.values():
            _attach(m.org, m)
        self.attached = True
        return self

    def remove(self) -> None:
        """Detach every adapter; layers get their original ``forward`` back when no adapter is left on them."""
        for m in self.adapters.values():
            _detach(m.org, m)
        self.attached = False

    # ------------------------------------------------------------------ training

    def optimizer_param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups: everything at ``lr``; with LoRA+ (``loraplus_lr_ratio``), the up/B
        factors (``AdapterModule.up_param_names``) in a second group at ``lr × ratio``."""
        ratio = self.loraplus_lr_ratio
        base: list[nn.Parameter] = []
        up: list[nn.Parameter] = []
        for m in self.adapters.values():
            for n, p in m.named_parameters():
                if not p.requires_grad:
                    continue
                is_up = bool(ratio) and any(n == u or n.startswith(u + ".") for u in m.up_param_names)
                (up if is_up else base).append(p)
        if ratio and not up:
            log.warning("loraplus_lr_ratio has no effect on this network type: it has no up factors", network=self.network_type)
        groups = [{"params": base, "lr": lr, "name": self.network_type}]
        if up:
            groups.append({"params": up, "lr": lr * float(ratio), "name": f"{self.network_type}_plus_up"})
        return [g for g in groups if g["params"]]

    # ------------------------------------------------------------------ weights

    def adapter_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The adapter in kohya naming: ``{"<kohya name>.<suffix>": tensor}``; ``alpha`` stays float32."""
        out = {}
        for m in self.adapters.values():
            for suffix, t in m.kohya_tensors().items():
                t = t.detach()
                if dtype is not None and suffix != "alpha" and t.is_floating_point():
                    t = t.to(dtype)
                out[f"{m.name}.{suffix}"] = t.to(torch.float32) if suffix == "alpha" else t
        return out

    def load_adapter_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load tensors in kohya naming (as ``adapter_state_dict`` writes them), e.g. to resume training."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in state_dict.items():
            name, _, suffix = key.partition(".")
            grouped.setdefault(name, {})[suffix] = t
        unknown = sorted(set(grouped) - set(self.adapters))
        missing = sorted(set(self.adapters) - set(grouped))
        if unknown or missing:
            raise AdapterError(f"adapter state does not fit this network: unknown modules {unknown[:10]}, missing {missing[:10]}")
        for name, tensors in grouped.items():
            self.adapters[name].load_kohya_tensors(tensors)

    def network_metadata(self) -> dict[str, str]:
        """kohya ``ss_network_*`` keys describing this network (module, dim, alpha, dropout, args)."""
        ranks = Counter()
        alphas = Counter()
        for m in self.adapters.values():
            t = m.kohya_tensors()
            if "alpha" in t:
                alphas[float(t["alpha"])] += 1
            ranks[int(getattr(m, "rank", 0))] += 1
        opts = {k: v for k, v in self.options.items() if v is not None}
        md = {
            "ss_network_module": f"kern_{self.network_type}",
            "ss_network_dim": str(ranks.most_common(1)[0][0]) if ranks else "0",
            "ss_network_alpha": _num(alphas.most_common(1)[0][0]) if alphas else "",
            "ss_network_dropout": str(self.options.get("dropout") or 0),
            "ss_network_args": json.dumps(opts, sort_keys=True, default=str),
        }
        return md

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32, metadata: Mapping[str, str] | None = None) -> Path:
        """Write the adapter as safetensors in kohya naming (``lora_unet_*``), atomically.

        ``metadata`` (e.g. from :func:`modelspec_metadata` and :func:`ss_metadata`) is merged over this
        network's ``ss_network_*`` keys; ``sshs_model_hash`` / ``sshs_legacy_hash`` are computed as
        sd-scripts does. Values must be strings.
        """
        from kern.core.io import save_file

        tensors = self.adapter_state_dict(dtype)
        md = {**self.network_metadata(), **dict(metadata or {})}
        bad = [k for k, v in md.items() if not isinstance(v, str)]
        if bad:
            raise UsageError(f"adapter metadata values must be strings; not for {bad}")
        md.update(safetensors_hashes(tensors, md))
        save_file(tensors, path, md)
        log.info("saved adapter", path=str(path), modules=len(self.adapters), network=self.network_type, dtype=str(dtype).replace("torch.", ""))
        return Path(path)

    @torch.no_grad()
    def merge_into_model(self) -> None:
        """Add ``multiplier · ΔW`` of every enabled adapter into its layer's weight and detach the network.

        For "merged for speed" generation: afterwards the model runs at base speed. The merge is computed in
        float32 and rounded once to the weight's dtype (an fp8 ``Float8Linear`` is re-quantised). It is not
        undoable without a copy of the original weights; reload the model to unmerge.
        """
        if self.merged:
            return
        for m in self.adapters.values():
            if not m.enabled or m.multiplier == 0:
                continue
            add_to_weight_(m.org, m.delta_weight() * m.multiplier)
        self.remove()
        self.merged = True


def add_to_weight_(org: nn.Module, delta: torch.Tensor) -> None:
    """``org.weight += delta`` computed in float32 and rounded once (fp8 layers, ``kern.gpu.fp8.Float8Linear`` and
    ``kern.gpu.fp8_linear.FP8Linear`` alike, are dequantised and re-quantised with a new per-row scale)."""
    if hasattr(org, "weight_scale") and hasattr(org, "dequantized_weight"):
        from kern.gpu.fp8 import quantize_weight

        w = org.dequantized_weight(torch.float32) + delta.to(device=org.weight.device, dtype=torch.float32)
        q, s = quantize_weight(w)
        org.weight.copy_(q)
        org.weight_scale.copy_(s)
        return
    w = org.weight
    if tuple(w.shape) != tuple(delta.shape):
        raise AdapterError(f"ΔW shape {tuple(delta.shape)} does not fit weight {tuple(w.shape)}")
    w.copy_((w.to(torch.float32) + delta.to(device=w.device, dtype=torch.float32)).to(w.dtype))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# --------------------------------------------------------------------------- metadata


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

    ``architecture`` is the model-spec name without the suffix (``Flux.2-klein-4b``, ``Qwen-Image``);
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
        "modelspec.merged_from": merged_from if merged_from is None or isinstance(merged_from, str) else ",".join(merged_from),
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
    model_hash = hashlib.sha256(blob[8 + n:]).hexdigest()
    legacy = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}


def scale_of(alpha: float | None, rank: int, rslora: bool = False) -> float:
    """The α/r factor (α/√r with rsLoRA); α None or 0 means α = r."""
    a = float(rank) if alpha is None or float(alpha) == 0 else float(alpha)
    return a / (math.sqrt(rank) if rslora else rank)


def parse_rank_patterns(patterns: Sequence[str]) -> list[tuple[re.Pattern[str], int]]:
    """``"regex=rank"`` entries as (compiled regex, rank); a bad entry raises ``ValueError`` saying which and why.
    Network plugins use it as the ``check`` of their ``rank_pattern`` option, so a typo fails before any work."""
    out = []
    for entry in patterns:
        regex, sep, value = str(entry).rpartition("=")
        if not sep or not regex:
            raise ValueError(f"rank_pattern entry {entry!r} must look like 'regex=rank'")
        try:
            r = int(value)
        except ValueError:
            raise ValueError(f"rank_pattern entry {entry!r}: {value!r} is not an integer rank") from None
        if r < 1:
            raise ValueError(f"rank_pattern entry {entry!r}: the rank must be at least 1")
        try:
            out.append((re.compile(regex), r))
        except re.error as exc:
            raise ValueError(f"rank_pattern entry {entry!r}: bad regular expression: {exc}") from None
    return out


def rank_for(path: str, rank: int, patterns: Sequence[str]) -> int:
    """The rank for module ``path``: the first ``"regex=rank"`` entry of ``patterns`` whose regex fullmatches it, else ``rank``."""
    try:
        parsed = parse_rank_patterns(patterns)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for regex, r in parsed:
        if regex.fullmatch(path):
            return r
    return rank


# --------------------------------------------------------------------------- plugin scaffolding


def build_network(name: str, model: nn.Module, targets: TargetSpec, options: Mapping[str, Any], module_cls: type,
                  **network_kwargs: Any) -> Network:
    """``make_network`` for a rank-based adapter type: check the common options, wrap every selected layer
    with ``module_cls(kohya_name, path, layer, rank, alpha, use_rslora=, device=, dropout=, rank_dropout=,
    module_dropout=)`` and attach. Used by the LoRA and LoHa plugins; open to any network plugin."""
    rank = options.get("rank")
    rank = 16 if rank is None else int(rank)  # 0 is an error, not the default
    if rank < 1:
        raise UsageError(f"{name} option 'rank' must be at least 1, got {rank}")
    drop = {}
    for key in ("dropout", "rank_dropout", "module_dropout"):
        p = float(options.get(key) or 0.0)
        if not 0.0 <= p < 1.0:
            raise UsageError(f"{name} option {key!r} must be in [0, 1), got {p}")
        drop[key] = p
    selected = select_targets(model, targets, conv=True)
    if not selected:
        raise UsageError(
            f"{name}: no Linear/Conv2d module of the model matches targets {list(targets.targets)} "
            f"(exclude {list(targets.exclude)}, include {list(targets.include)})"
        )
    patterns = tuple(options.get("rank_pattern") or ())
    modules = [
        module_cls(kohya_name(path), path, org, rank_for(path, rank, patterns), options.get("alpha"),
                   use_rslora=bool(options.get("use_rslora")), device=layer_device(org), **drop)
        for path, org in selected
    ]
    log.info(f"{name} network", modules=len(modules), rank=rank, alpha=options.get("alpha"))
    return Network(name, modules, options=options, **network_kwargs).attach()


def load_network_modules(name: str, model: nn.Module, modules: Mapping[str, Mapping[str, torch.Tensor]], module_cls: type,
                         multiplier: float) -> Network:
    """``load_network`` for an adapter whose tensors are already grouped by module name (kohya suffixes):
    resolve every name against the model's layers (an unmatched one is an ``AdapterError`` listing them),
    build ``module_cls.from_tensors`` for each and attach unmerged with ``multiplier``."""
    layers = candidate_paths(model)
    resolved, unmatched = resolve_modules(modules, NameTable(layers))
    if unmatched:
        names = [n for n, _ in unmatched]
        label = module_cls.__name__.removesuffix("Module")  # LoRA, LoHa
        raise AdapterError(f"{len(names)} of {len(modules)} {label} modules match no layer of the model: {names[:12]}")
    adapters = [module_cls.from_tensors(kohya_name(p), p, layers[p], t) for p, t in resolved.items()]
    ranks = sorted({a.rank for a in adapters})
    net = Network(name, adapters, multiplier=multiplier, options={"rank": ranks[0] if len(ranks) == 1 else ranks})
    return net.attach()
