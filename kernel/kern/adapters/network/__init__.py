"""Architecture-free adapter machinery that every network plugin (LoRA, LoHa, third-party ones) builds on.

One module per topic; every public name is also importable from ``kern.adapters.network`` itself:

* :mod:`~kern.adapters.network.targets` — which layers of a model an adapter wraps (:func:`select_targets`);
* :mod:`~kern.adapters.network.names` — how adapter files name modules: :func:`kohya_name`, :class:`NameTable`,
  :class:`ModuleMap`, :func:`resolve_modules` (rename, split or fuse modules into one naming), key grouping and
  layouts;
* :mod:`~kern.adapters.network.runtime` — :class:`AdapterModule` (one adapter on one layer) and :class:`Network`
  (a set of them: wrapping, multiplier, LoRA+ groups, save, merge into the model);
* :mod:`~kern.adapters.network.scaffold` — what a rank-based adapter type shares: :func:`rank_options`,
  :class:`RankAdapterModule`, :class:`RankAdapter` (the network hooks written once), :func:`build_network`,
  :func:`load_network_modules`;
* :mod:`~kern.adapters.network.metadata` — the one owner of the ``ss_*`` / ``modelspec.*`` keys of a saved
  adapter (:func:`adapter_metadata`).
"""

from kern.adapters.network.metadata import (
    TrainingFacts,
    adapter_metadata,
    modelspec_metadata,
    network_metadata,
    safetensors_hashes,
    ss_metadata,
)
from kern.adapters.network.names import (
    CHECKPOINT_PREFIXES,
    DOTTED_PREFIXES,
    FLAT_PREFIXES,
    KOHYA_PREFIX,
    LAYOUTS,
    FactorOps,
    ModuleMap,
    NameTable,
    Rows,
    group_by_module,
    kohya_name,
    layout_name,
    layout_of,
    resolve_modules,
    split_keys,
    strip_layout_prefix,
)
from kern.adapters.network.runtime import (
    AdapterModule,
    Network,
    add_to_weight_,
    attached_adapters,
    compute_dtype,
    layer_device,
    layer_geometry,
)
from kern.adapters.network.scaffold import (
    RankAdapter,
    RankAdapterModule,
    build_network,
    load_network_modules,
    parse_rank_patterns,
    rank_for,
    rank_options,
    scale_of,
)
from kern.adapters.network.targets import candidate_paths, is_linear, select_targets

__all__ = [
    "CHECKPOINT_PREFIXES",
    "DOTTED_PREFIXES",
    "FLAT_PREFIXES",
    "KOHYA_PREFIX",
    "LAYOUTS",
    "AdapterModule",
    "FactorOps",
    "ModuleMap",
    "NameTable",
    "Network",
    "RankAdapter",
    "RankAdapterModule",
    "Rows",
    "TrainingFacts",
    "adapter_metadata",
    "add_to_weight_",
    "attached_adapters",
    "build_network",
    "candidate_paths",
    "compute_dtype",
    "group_by_module",
    "is_linear",
    "kohya_name",
    "layer_device",
    "layer_geometry",
    "layout_name",
    "layout_of",
    "load_network_modules",
    "modelspec_metadata",
    "network_metadata",
    "parse_rank_patterns",
    "rank_for",
    "rank_options",
    "resolve_modules",
    "safetensors_hashes",
    "scale_of",
    "select_targets",
    "split_keys",
    "ss_metadata",
    "strip_layout_prefix",
]
