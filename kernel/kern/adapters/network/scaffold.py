"""Plugin scaffolding: what a rank-based adapter type (LoRA, LoHa, LoKr ...) shares, so that a new type is small.

* :func:`rank_options` — the options every such type has (rank, alpha, dropouts, rsLoRA, rank patterns);
* :class:`RankAdapterModule` — the adapter layer's boilerplate (rank and α/r scale, tensors by kohya suffix,
  loading, ΔW); a type adds its factors and its forward;
* :class:`RankAdapter` — the eight network hooks written once (``register_networks``, ``make_network``,
  ``detect_weights``, ``load_network``, ``weight_delta``, ``convert_weights``, ``weight_shape``, ``weight_rank``);
  a type declares its names, key suffixes and factor algebra and reads its files (``normalise``);
* :func:`build_network` / :func:`load_network_modules` — the ``make_network`` / ``load_network`` work, open to any
  network plugin; :func:`scale_of` and the ``rank_pattern`` helpers.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from kern.adapters.network.names import (
    KOHYA_PREFIX,
    LAYOUTS,
    FactorOps,
    ModuleMap,
    NameTable,
    kohya_name,
    layout_name,
    layout_of,
    resolve_modules,
    split_keys,
    strip_layout_prefix,
)
from kern.adapters.network.runtime import AdapterModule, Network, layer_device
from kern.adapters.network.targets import candidate_paths, select_targets
from kern.errors import AdapterError, UsageError
from kern.hookspecs import hookimpl
from kern.log import get_logger
from kern.records import NetworkType, Option, TargetSpec, WeightsClaim

log = get_logger(__name__)

ALPHA = "alpha"


class LayoutRefused(AdapterError, UsageError):
    """A network type asked for in a layout its readers cannot load (``refused_layouts``): the user picks another."""


# --------------------------------------------------------------------------- rank and scale


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


# --------------------------------------------------------------------------- options


def rank_options(
    *, rank: str, alpha: str, dropout: str, rank_dropout: str, use_rslora: str, extra: Sequence[Option] = ()
) -> tuple[Option, ...]:
    """The options of a rank-based adapter type, each described in the type's own words where its meaning differs:
    ``rank``, ``alpha``, ``dropout``, ``rank_dropout``, ``module_dropout``, ``use_rslora``, ``rank_pattern`` (what
    :func:`build_network` reads). ``extra`` options go after the dropouts (LoRA's ``loraplus_lr_ratio``); the order
    is the one ``kern plugins`` lists and ``ss_network_args`` keeps."""
    return (
        Option("rank", "int", 16, rank, minimum=1),
        Option("alpha", "float", None, alpha, minimum=0.0),
        Option("dropout", "float", 0.0, dropout, minimum=0.0, maximum=0.99),
        Option("rank_dropout", "float", 0.0, rank_dropout, minimum=0.0, maximum=0.99),
        Option(
            "module_dropout",
            "float",
            0.0,
            "probability of skipping the whole adapter of a layer for one forward",
            minimum=0.0,
            maximum=0.99,
        ),
        *extra,
        Option("use_rslora", "bool", False, use_rslora),
        Option(
            "rank_pattern",
            "list",
            (),
            "per-module ranks: 'regex=rank' entries fullmatched on module paths, first match wins",
            check=parse_rank_patterns,
        ),
    )


# --------------------------------------------------------------------------- the adapter layer


class RankAdapterModule(AdapterModule):
    """An adapter of rank r scaled by ``s = α/r`` (``α/√r`` with rsLoRA; α unset or 0 means α = r): what LoRA, LoHa
    and their kin share.

    A subclass creates its factors in :meth:`make_factors`, initialises them in :meth:`reset_factors` (ΔW must be 0 at
    step 0, so training starts from the base model), lists them by kohya suffix in :meth:`factors`, sets
    :attr:`weight_delta` (its ΔW from kohya tensors) and writes ``adapter_forward``, applying the dropouts it keeps in
    ``dropout`` / ``rank_dropout`` its own way. The ``alpha`` buffer holds the kohya-equivalent α (``s · r``), so
    every loader that computes ``alpha / r`` gets the trained scale, also with rsLoRA.
    """

    label = "adapter"  # as messages name the type: "LoRA", "LoHa"
    rank_factor = ""  # kohya suffix of the factor whose first dimension is the rank
    reshape_loaded = (
        False  # whether files may hold a factor flattened (LoHa's conv factors): same rows and size suffice
    )

    def __init__(
        self,
        name: str,
        path: str,
        org: nn.Module,
        rank: int,
        alpha: float | None = None,
        *,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        use_rslora: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        init: bool = True,
    ) -> None:
        super().__init__(name, path, org, module_dropout)
        if rank < 1:
            raise AdapterError(f"{path}: {self.label} rank must be at least 1, got {rank}")
        self.make_factors(rank, dtype=dtype, device=device)
        self.rank = rank
        self.scale = scale_of(alpha, rank, use_rslora)
        self.register_buffer("alpha", torch.tensor(self.scale * rank, dtype=torch.float32, device=device))
        self.dropout = float(dropout or 0.0)
        self.rank_dropout = float(rank_dropout or 0.0)
        if init:
            with torch.no_grad():
                self.reset_factors()

    def make_factors(self, rank: int, *, dtype: torch.dtype, device: torch.device | str | None) -> None:
        raise NotImplementedError

    def reset_factors(self) -> None:
        raise NotImplementedError

    def factors(self) -> dict[str, torch.Tensor]:
        """The trainable factors by kohya suffix (``lora_down.weight``, ``hada_w1_a`` ...), in file order."""
        raise NotImplementedError

    @staticmethod
    def weight_delta(tensors: Mapping[str, torch.Tensor], base_shape: Sequence[int], where: str = "") -> torch.Tensor:
        """ΔW in float32 with the layer weight's shape, from a module's kohya tensors (also the ``weight_delta`` hook)."""
        raise NotImplementedError

    @staticmethod
    def weight_shape(tensors: Mapping[str, torch.Tensor]) -> tuple[int, ...] | None:
        """The shape of the layer weight a module's kohya ``tensors`` update, from their shapes alone (also the
        ``weight_shape`` hook); ``None`` when they do not tell."""
        return None

    @classmethod
    def file_rank(cls, tensors: Mapping[str, torch.Tensor]) -> int | None:
        """The rank a module's kohya ``tensors`` were made at (the ``weight_rank`` hook): ``rank_factor``'s rows."""
        t = tensors.get(cls.rank_factor)
        return None if t is None else int(t.shape[0])

    @classmethod
    def from_tensors(
        cls, name: str, path: str, org: nn.Module, tensors: Mapping[str, torch.Tensor]
    ) -> RankAdapterModule:
        """A module holding ``tensors`` (kohya suffixes), in their dtype, on the layer's device."""
        first = tensors[cls.rank_factor]
        m = cls(name, path, org, cls.file_rank(tensors), dtype=first.dtype, device=layer_device(org), init=False)
        m.load_kohya_tensors(tensors)
        return m

    def delta_weight(self) -> torch.Tensor:
        return self.weight_delta(self.kohya_tensors(), self.geometry["weight_shape"], where=self.path)

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.factors(), ALPHA: self.alpha}

    @torch.no_grad()
    def load_kohya_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for suffix, p in self.factors().items():
            if suffix not in tensors:
                raise AdapterError(f"{self.name}: missing {suffix}")
            t = tensors[suffix]
            fits = tuple(t.shape) == tuple(p.shape) or (
                self.reshape_loaded and t.numel() == p.numel() and t.shape[0] == p.shape[0]
            )
            if not fits:
                raise AdapterError(
                    f"{self.name}.{suffix}: shape {tuple(t.shape)} does not fit layer {self.path!r} "
                    f"{tuple(self.geometry['weight_shape'])} (expected {tuple(p.shape)})"
                )
            p.copy_(t.reshape(p.shape))
        alpha = tensors.get(ALPHA)
        a = float(self.rank) if alpha is None else float(alpha)
        self.alpha.fill_(a)
        self.scale = a / self.rank


# --------------------------------------------------------------------------- building and loading networks


def build_network(
    name: str,
    model: nn.Module,
    targets: TargetSpec,
    options: Mapping[str, Any],
    module_cls: type,
    **network_kwargs: Any,
) -> Network:
    """``make_network`` for a rank-based adapter type: check the common options, wrap every selected layer
    with ``module_cls(kohya_name, path, layer, rank, alpha, use_rslora=, device=, dropout=, rank_dropout=,
    module_dropout=)`` and attach. Used by the LoRA, LoHa and LoKr plugins; open to any network plugin."""
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
        module_cls(
            kohya_name(path),
            path,
            org,
            rank_for(path, rank, patterns),
            options.get("alpha"),
            use_rslora=bool(options.get("use_rslora")),
            device=layer_device(org),
            **drop,
        )
        for path, org in selected
    ]
    log.info(f"{name} network", modules=len(modules), rank=rank, alpha=options.get("alpha"))
    return Network(name, modules, options=options, **network_kwargs).attach()


def load_network_modules(
    name: str, model: nn.Module, modules: Mapping[str, Mapping[str, torch.Tensor]], module_cls: type, multiplier: float
) -> Network:
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


# --------------------------------------------------------------------------- the network hooks


class RankAdapter:
    """A rank-based adapter type as a network plugin: its eight hooks, written once.

    A plugin subclasses it, sets the class attributes and implements :meth:`normalise` (reading its files); the
    other methods are optional refinements. The hooks that take ``network_type`` need no guard: kern calls them
    only on the plugin that registered that type (``kern.core.routing``). kern finds a plugin's hooks as functions
    of its module, so the plugin module exposes one instance's::

        LORA = LoRA()
        register_networks, make_network, detect_weights, load_network = LORA.hooks()[:4]
        weight_delta, convert_weights, weight_shape, weight_rank = LORA.hooks()[4:]
    """

    name = ""  # the network type, e.g. "lora"
    description = ""
    options: tuple[Option, ...] = ()
    module: type[RankAdapterModule] = RankAdapterModule  # the adapter layer; its ``label`` names the type in messages
    ops: FactorOps | None = None  # exact split / fuse along output rows, to convert between namings
    suffixes: Iterable[str] = ()  # every key suffix the type's files use
    markers: tuple[str, ...] = ()  # a file is of this type only if some key ends with one of these suffixes
    refused_layouts: Mapping[str, str] = {}  # layouts the type cannot be written in → why, and what to use instead
    dropped_metadata = ("sshs_model_hash", "sshs_legacy_hash", "format")  # not carried over by a conversion

    # ------------------------------------------------------------------ what a type says in its own way

    def normalise(
        self,
        state_dict: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None,
        modules: Mapping[str, Sequence[str]],
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``{module name as written: {kohya suffix: tensor}}`` with every factor and ``alpha``, from a claimed file
        (``modules``: the claim's module name → its keys). Raises ``AdapterError`` for an incomplete module."""
        raise NotImplementedError

    def claim_note(self, metadata: Mapping[str, str] | None) -> str:
        """A note for a file this type claims (in the log lines of generate, merge and convert: e.g. "DoRA ...")."""
        return ""

    def layout_tensors(self, tensors: Mapping[str, torch.Tensor], layout: str) -> Mapping[str, torch.Tensor]:
        """One module's tensors as ``layout`` names them (kohya suffixes unless a layout wants others)."""
        return tensors

    def layout_metadata(self, resolved: Mapping[str, Mapping[str, torch.Tensor]], layout: str) -> dict[str, str]:
        """Metadata a file in ``layout`` needs besides the carried-over keys (e.g. diffusers' PEFT config)."""
        return {}

    def read_modules(
        self, modules: dict[str, dict[str, torch.Tensor]], metadata: Mapping[str, str] | None, layout: str, base: Any
    ) -> dict[str, dict[str, torch.Tensor]]:
        """A file's normalised modules (file names) as the type means them, before a conversion to ``layout``;
        ``base`` as ``convert_weights`` gets it (a type whose files depend on the base weights reads them here)."""
        return modules

    def write_modules(
        self, resolved: dict[str, dict[str, torch.Tensor]], layout: str, base: Any
    ) -> dict[str, dict[str, torch.Tensor]]:
        """The modules (names as written: native paths for kohya / comfyui with a module map) made ready for
        ``layout``, before :meth:`layout_tensors`; e.g. DoRA's magnitudes rescaled for ComfyUI with ``base``."""
        return resolved

    # ------------------------------------------------------------------ the hooks

    def hooks(self) -> tuple[Any, ...]:
        """The hook implementations, bound to this type, in the order the class docstring unpacks them."""
        return (
            self.register_networks,
            self.make_network,
            self.detect_weights,
            self.load_network,
            self.weight_delta,
            self.convert_weights,
            self.weight_shape,
            self.weight_rank,
        )

    @property
    def label(self) -> str:
        return self.module.label

    @hookimpl
    def register_networks(self, register: Any) -> None:
        register(NetworkType(name=self.name, options=self.options, description=self.description))

    @hookimpl
    def make_network(self, model: nn.Module, targets: TargetSpec, options: Mapping[str, Any]) -> Any:
        return build_network(
            self.name, model, targets, options, self.module, loraplus_lr_ratio=options.get("loraplus_lr_ratio")
        )

    @hookimpl
    def detect_weights(self, keys: frozenset, metadata: Mapping[str, str]) -> Any:
        modules, rest = split_keys(keys, self.suffixes)
        if rest or not modules or not any(k.endswith(tuple("." + m for m in self.markers)) for k in keys):
            return None
        return WeightsClaim(
            network_type=self.name, layout=layout_of(modules), modules=modules, note=self.claim_note(metadata)
        )

    @hookimpl
    def load_network(
        self,
        model: nn.Module,
        state_dict: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        claim: Any,
        multiplier: float,
    ) -> Any:
        modules = self.normalise(state_dict, metadata, claim.modules)
        return load_network_modules(self.name, model, modules, self.module, multiplier)

    @hookimpl
    def weight_delta(self, tensors: Mapping[str, torch.Tensor], base_shape: tuple) -> Any:
        return self.module.weight_delta(tensors, tuple(base_shape))

    def _kohya(self, tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor] | None:
        """One module's tensors under kohya suffixes (the file's spellings, lora_A ..., read); None if incomplete."""
        names = {f"m.{k}": v for k, v in tensors.items()}
        try:
            (kohya,) = self.normalise(names, None, {"m": tuple(names)}).values()
        except (AdapterError, KeyError):
            return None  # an incomplete module: what is wrong is said where it is loaded or converted
        return kohya

    @hookimpl
    def weight_shape(self, tensors: Mapping[str, torch.Tensor]) -> Any:
        kohya = self._kohya(tensors)
        shape = None if kohya is None else self.module.weight_shape(kohya)
        return None if shape is None else tuple(int(s) for s in shape)

    @hookimpl
    def weight_rank(self, tensors: Mapping[str, torch.Tensor]) -> Any:
        kohya = self._kohya(tensors)
        return None if kohya is None else self.module.file_rank(kohya)

    @hookimpl
    def convert_weights(
        self,
        state_dict: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        claim: Any,
        to_layout: str,
        module_map: list | None,
        base: Any,
    ) -> Any:
        if to_layout in self.refused_layouts:
            raise LayoutRefused(self.refused_layouts[to_layout])
        if to_layout not in LAYOUTS:
            raise UsageError(f"unknown adapter layout {to_layout!r}; choose kohya, comfyui or diffusers")
        modules = self.read_modules(self.normalise(state_dict, metadata, claim.modules), metadata, to_layout, base)
        md = {k: v for k, v in (metadata or {}).items() if k not in self.dropped_metadata}
        out: dict[str, torch.Tensor] = {}
        if module_map is None:
            if to_layout != "kohya":
                raise AdapterError(
                    f"converting a {self.label} to the {to_layout} layout needs the architecture's "
                    "module map (give the architecture)"
                )
            # Keep every name in its own naming; only flatten it the kohya way.
            for name, t in self.write_modules(modules, to_layout, base).items():
                rest, flat = strip_layout_prefix(name)
                _emit(out, KOHYA_PREFIX + (rest if flat else rest.replace(".", "_")), self.layout_tensors(t, "kohya"))
            return out, md
        mm = ModuleMap(module_map)
        want = "other" if to_layout == "diffusers" else "native"
        resolved, unmatched = resolve_modules(modules, mm.table(), want=want, module_map=mm, ops=self.ops)
        if unmatched:
            listed = [f"{n} ({why})" for n, why in unmatched[:12]]
            raise AdapterError(
                f"{len(unmatched)} {self.label} modules cannot be written in the {to_layout} layout: {listed}"
            )
        resolved = self.write_modules(resolved, to_layout, base)
        for path, t in resolved.items():
            _emit(out, layout_name(path, to_layout), self.layout_tensors(t, to_layout))
        md.update(self.layout_metadata(resolved, to_layout))
        return out, md


def _emit(out: dict[str, torch.Tensor], name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Add one module's tensors under ``name``; ``alpha`` as a float32 scalar, as every loader expects it."""
    for suffix, v in tensors.items():
        key = f"{name}.{suffix}"
        if key in out:
            raise AdapterError(f"two modules map to the same name {name!r}")
        out[key] = v.to(torch.float32).reshape(()) if suffix == ALPHA else v.contiguous()
