"""Starting from weights: ``network.init_weights`` and ``model.base_weights`` (musubi's ``--network_weights`` /
``--dim_from_weights`` and ``--base_weights`` / ``--base_weights_multiplier``).

* :func:`check` — before any work: every file exists, is an adapter kern reads (any layout: kohya / musubi, ComfyUI,
  diffusers / PEFT; the network plugins' ``detect_weights``), made for this architecture; the init file is of the
  job's network type and its ranks (and alpha) agree with explicit ``network.rank`` / ``network.alpha``, or give them.
* :func:`before_network` — after the transformer is loaded, before fp8 quantisation and before the network is built:
  the base adapters are merged into it (``kern merge``'s maths: ``W + Σ m·ΔW`` in float32, rounded once to the base
  dtype), and the init file's modules are resolved to the model's layers (per-module ranks become rank patterns).
* :func:`load_into` — after the network is built: the init file's tensors are copied into it exactly (every tensor
  must land; modules the file does not cover keep their fresh init, with a warning).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import attrs
import torch
from torch import nn

from kern.core.config import split_weight
from kern.errors import AdapterError, ConfigError, KernError
from kern.log import get_logger

log = get_logger(__name__)

ALPHA = "alpha"
Modules = dict[str, dict[str, torch.Tensor]]  # module name (kohya) or layer path → its tensors by kohya suffix


@attrs.define
class AdapterFile:
    """An adapter file read, detected and brought to kohya naming (native module names when the file used another
    naming: the architecture's module map fuses / renames them, as ``kern generate`` and ``kern merge`` do)."""

    path: Path
    option: str  # "<job>: network.init_weights = ..." for messages
    network_type: str
    layout: str
    modules: Modules
    manager: Any = attrs.field(default=None, repr=False)  # asked for each module's rank (weight_rank)

    def rank(self, tensors: Mapping[str, torch.Tensor], where: str) -> int | None:
        return module_rank(tensors, where, self.manager, self.network_type)

    def ranks(self) -> dict[str, int]:
        """Each module's rank; modules without one (a LoKr of two full matrices) are left out."""
        out = {name: self.rank(t, f"{self.option}: module {name!r}") for name, t in self.modules.items()}
        return {name: r for name, r in out.items() if r is not None}


@attrs.define
class InitWeights:
    """The init file's modules by the model layer they adapt (what :func:`load_into` copies into the network)."""

    file: AdapterFile
    by_path: Modules


def module_rank(
    tensors: Mapping[str, torch.Tensor], where: str, manager: Any = None, network_type: str | None = None
) -> int | None:
    """A module's rank as its network type reads it (``weight_rank`` hook; None: the module has no rank, e.g. a LoKr
    of two full matrices); for a type without that hook, the one size every factor has among its first two
    dimensions (LoRA ``down [r, in]`` / ``up [out, r]``; LoHa ``w1a [out, r]`` / ``w1b [r, in]`` ...), the smallest
    when several are shared (a square layer)."""
    if manager is not None and network_type is not None:
        caller = manager.hook.caller_for("weight_rank", "network_type", network_type)
        if caller.get_hookimpls():  # the type's plugin answers: its None means "no rank"
            rank = caller(network_type=network_type, tensors=tensors)
            return None if rank is None else int(rank)
    shared: set[int] | None = None
    for suffix, t in tensors.items():
        if suffix != ALPHA and t.dim() >= 2:
            dims = {int(d) for d in t.shape[:2]}
            shared = dims if shared is None else shared & dims
    if not shared:
        raise ConfigError(f"{where}: no rank can be read from its tensors {sorted(tensors)}")
    return min(shared)


def module_alpha(tensors: Mapping[str, torch.Tensor], rank: int) -> float:
    """The module's kohya α (``alpha / rank`` is its scale); no ``alpha`` tensor means α = rank (scale 1)."""
    a = tensors.get(ALPHA)
    return float(rank) if a is None else float(a)


# --------------------------------------------------------------------------- before any work


def check(plan: Any, variant: Any) -> None:
    """Check ``model.base_weights`` and ``network.init_weights`` before any model loads; make their paths absolute
    (so ``config.toml`` reruns from anywhere); for the init file, take ``network.rank`` / ``alpha`` from it when the
    job does not give them, and refuse explicit values that disagree with it. Errors are ``ConfigError`` (exit 2)."""
    job = plan.job
    for i, entry in enumerate(job.model.base_weights):
        file, mult = split_weight(str(entry))
        option = f"{job.source}: model.base_weights[{i}] = {entry!r}"
        if not math.isfinite(mult):
            raise ConfigError(f"{option}: the multiplier must be a finite number, e.g. FILE:0.5")
        path = _existing(file, option)
        read(plan, variant, path, option)
        job.model.base_weights[i] = f"{path}:{mult!r}"
    if not job.network.init_weights:
        return
    option = f"{job.source}: network.init_weights = {job.network.init_weights!r}"
    path = _existing(job.network.init_weights, option)
    job.network.init_weights = str(path)
    adapter = read(plan, variant, path, option)
    if adapter.network_type != plan.network.name:
        raise ConfigError(
            f"{option}: it is a {adapter.network_type} adapter ({adapter.layout} layout) but network.type is "
            f"{plan.network.name!r}; set network.type = {adapter.network_type!r} to start from it, or give a "
            f"{plan.network.name} file"
        )
    _take_rank_and_alpha(plan, adapter)
    _check_fit(plan, adapter)


def fit_hint(tensors: Mapping[str, torch.Tensor], ours: Mapping[str, torch.Tensor]) -> str:
    """What to do when a file's module does not fit the job's network: its tensors' shapes against the job's."""
    return (
        f"the file was made with other [network] options than this job's (its module holds "
        f"{ {k: tuple(v.shape) for k, v in tensors.items()} }, the job's "
        f"{ {k: tuple(v.shape) for k, v in ours.items()} }): set the options it was made with "
        "(a kern file's ss_network_args metadata lists them)"
    )


def _check_fit(plan: Any, adapter: AdapterFile) -> None:
    """Before any work: each module of the file has the tensors, of the shapes, that the job's network would make
    for a layer of that module's shape (a LoKr of another factor, a DoRA file for a plain LoRA job). The job's
    network is built on a stand-in Linear of each shape on the meta device: no memory, no model needed."""
    from kern.records import TargetSpec

    made: dict[tuple, Mapping[str, torch.Tensor]] = {}
    for name, tensors in adapter.modules.items():
        shape = plan.manager.hook.weight_shape(network_type=adapter.network_type, tensors=tensors)
        if shape is None or len(shape) != 2:
            continue  # the type does not tell, or not a Linear: checked when the tensors are loaded
        rank = adapter.rank(tensors, adapter.option) or plan.network_options.get("rank")
        key = (tuple(shape), rank)
        if key not in made:
            layer = nn.ModuleDict({"m": nn.Linear(shape[1], shape[0], bias=False, device="meta")})
            options = {**plan.network_options, "rank": rank, "rank_pattern": []}
            kern_log = logging.getLogger("kern")
            level = kern_log.level
            kern_log.setLevel(logging.WARNING)  # the stand-in's "network built" line would read as the job's
            try:
                net = plan.manager.hook.make_network(
                    network_type=adapter.network_type, model=layer, targets=TargetSpec(targets=("m",)), options=options
                )
            finally:
                kern_log.setLevel(level)
            (module,) = net.adapters.values()
            made[key] = module.kohya_tensors()
            net.remove()
        ours = made[key]
        fits = set(tensors) <= set(ours) and all(
            tuple(t.shape) == tuple(ours[k].shape)
            or (t.numel() == ours[k].numel() and t.dim() and t.shape[0] == ours[k].shape[0])
            for k, t in tensors.items()
        )
        if not fits:
            raise ConfigError(f"{adapter.option}: module {name!r}: " + fit_hint(tensors, ours))


def _existing(file: str, option: str) -> Path:
    p = Path(file).expanduser()
    if p.is_dir():
        raise ConfigError(f"{option}: {p} is a folder; give the adapter's .safetensors file")
    if not p.is_file():
        raise ConfigError(f"{option}: no such file {str(p)!r}; give an adapter file (.safetensors)")
    return p.resolve()


def read(plan: Any, variant: Any, path: Path, option: str) -> AdapterFile:
    """Read and detect an adapter file for this job's architecture; ``ConfigError`` naming ``option`` otherwise."""
    from kern.adapters.network import NameTable
    from kern.adapters.network.metadata import is_for, made_for
    from kern.adapters.weights import detect, module_map_for, read_adapter, to_kohya

    manager = plan.manager
    try:
        tensors, metadata = read_adapter(path)
        claim = detect(tensors.keys(), metadata, manager, path=path)
    except AdapterError as exc:
        raise ConfigError(f"{option}: {exc}") from None
    made = made_for(metadata)
    if made and not is_for(made, plan.arch):
        raise ConfigError(f"{option}: adapter made for {made!r}, not for {plan.arch.name!r}")
    try:
        mm = module_map_for(manager, plan.arch.name, variant.name)
    except KeyError:
        mm = None
    table = mm.table() if mm is not None else NameTable()
    hits = {m: table.resolve(m) for m in claim.modules}
    if mm is not None and not any(hits.values()):
        raise ConfigError(
            f"{option}: none of its {len(hits)} modules (e.g. {sorted(hits)[:3]}) is a module of {plan.arch.name} "
            f"{variant.name}; it is an adapter for another model"
        )
    foreign = mm is not None and any(h is not None and h[0] == "other" for h in hits.values())
    try:
        kohya = to_kohya(tensors, metadata, claim, manager, mm if foreign else None)
    except AdapterError as exc:
        raise ConfigError(f"{option}: {exc}") from None
    modules: Modules = {}
    for key, t in kohya.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = t
    return AdapterFile(path, option, claim.network_type, claim.layout, modules, manager)


def _take_rank_and_alpha(plan: Any, adapter: AdapterFile) -> None:
    """``network.rank`` / ``alpha`` from the file when the job leaves them out; explicit ones must agree with it."""
    given, options = plan.job.network.options, plan.network_options
    ranks = adapter.ranks()
    counted = Counter(ranks.values()).most_common()
    if "rank" in given and not options.get("rank_pattern"):
        wrong = {n: r for n, r in ranks.items() if r != int(given["rank"])}
        if wrong:
            found = sorted(set(ranks.values()))
            raise ConfigError(
                f"{adapter.option}: network.rank = {given['rank']} but the file has rank "
                f"{found[0] if len(found) == 1 else found} ({len(wrong)} of {len(ranks)} modules, e.g. "
                f"{sorted(wrong)[:3]}); leave network.rank out to take the file's rank, or set it to "
                f"{counted[0][0]}"
            )
    if not counted:  # no module has a rank (a LoKr of two full matrices): the job's own rank stands
        return
    if "rank" not in given:
        options["rank"] = counted[0][0]  # per-module exceptions become rank patterns once paths are known
    rslora = bool(options.get("use_rslora"))
    # The network option α that gives each module the file's scale (α/r, or α/√r with rsLoRA).
    alphas = {
        n: module_alpha(t, ranks[n]) / ranks[n] * (math.sqrt(ranks[n]) if rslora else ranks[n])
        for n, t in adapter.modules.items()
        if n in ranks
    }
    if "alpha" in given:
        want = given["alpha"]
        wrong = {
            n: a for n, a in alphas.items() if not math.isclose(_job_alpha(want, ranks[n], rslora), a, rel_tol=1e-5)
        }
        if wrong:
            name = sorted(wrong)[0]
            raise ConfigError(
                f"{adapter.option}: network.alpha = {want} but the file's alpha is {wrong[name]:g} (module "
                f"{name!r} and {len(wrong) - 1} more); leave network.alpha out to take the file's, or set it to "
                f"{wrong[name]:g}"
            )
    else:
        options["alpha"] = Counter(alphas.values()).most_common(1)[0][0]


def _job_alpha(alpha: Any, rank: int, rslora: bool) -> float:
    """The job's α as the network option means it (None or 0: α = r, or √r with rsLoRA: scale 1)."""
    if alpha is None or float(alpha) == 0:
        return math.sqrt(rank) if rslora else float(rank)
    return float(alpha)


# --------------------------------------------------------------------------- once the transformer is loaded


def before_network(plan: Any, variant: Any, transformer: nn.Module) -> InitWeights | None:
    """Merge ``model.base_weights`` into ``transformer`` (call before fp8 quantisation and before the network is
    built); resolve the init file's modules to its layers, setting rank patterns for modules whose rank differs
    from ``network.rank`` when the rank came from the file. Returns what :func:`load_into` loads (None: no file)."""
    from kern.adapters.network import NameTable, candidate_paths

    job = plan.job
    if job.model.base_weights:
        merge_base_weights(plan, variant, transformer)
    if not job.network.init_weights:
        return None
    option = f"{job.source}: network.init_weights = {job.network.init_weights!r}"
    adapter = read(plan, variant, Path(job.network.init_weights), option)
    table = NameTable(candidate_paths(transformer))
    by_path: Modules = {}
    unmatched = []
    for name, tensors in adapter.modules.items():
        hit = table.resolve(name)
        if hit is None:
            unmatched.append(name)
        else:
            by_path[hit[1]] = tensors
    if unmatched:
        raise ConfigError(
            f"{option}: {len(unmatched)} of its {len(adapter.modules)} modules match no layer of the "
            f"{plan.arch.name} transformer: {sorted(unmatched)[:6]}; the file is for another model or size"
        )
    if "rank" not in job.network.options:
        rank = int(plan.network_options["rank"])
        ranks = {p: adapter.rank(t, option) for p, t in by_path.items()}
        extra = [f"{re.escape(p)}={r}" for p, r in ranks.items() if r is not None and r != rank]
        if extra:
            plan.network_options["rank_pattern"] = [*extra, *(plan.network_options.get("rank_pattern") or ())]
    return InitWeights(adapter, by_path)


def load_into(init: InitWeights | None, network: nn.Module) -> None:
    """Copy the init file's tensors into ``network`` exactly (values as stored, α from the file). Every module of the
    file must be one of the network's; network modules the file lacks keep their fresh init (a warning counts them)."""
    if init is None:
        return
    option = init.file.option
    mine = network.modules_by_path()
    lacking = sorted(p for p in init.by_path if p not in mine)
    if lacking:
        raise ConfigError(
            f"{option}: {len(lacking)} of its {len(init.by_path)} modules are not in the network "
            f"(network.targets / exclude leave them out): {lacking[:6]}; widen network.targets or network.include "
            "to train them, or give a file without them"
        )
    for path, tensors in init.by_path.items():
        module = mine[path]
        rank, want = getattr(module, "rank", None), init.file.rank(tensors, f"{option}: module {path!r}")
        if rank is not None and want is not None and rank != want:
            raise ConfigError(
                f"{option}: module {path!r} has rank {want} in the file but {rank} in the network "
                "(network.rank / rank_pattern); leave network.rank out to take the file's ranks"
            )
        hint = fit_hint(tensors, module.kohya_tensors())
        extra = sorted(set(tensors) - set(module.kohya_tensors()))
        if extra:
            raise ConfigError(
                f"{option}: module {path!r}: tensors {extra} have no place in this {network.network_type} network; "
                + hint
            )
        try:
            module.load_kohya_tensors(tensors)
        except (KernError, RuntimeError) as exc:
            raise ConfigError(f"{option}: module {path!r}: {exc}; {hint}") from None
    ranks = sorted({r for t in init.by_path.values() if (r := init.file.rank(t, option)) is not None}) or [None]
    fresh = len(mine) - len(init.by_path)
    log.info(
        "network starts from weights",
        file=str(init.file.path),
        network=init.file.network_type,
        layout=init.file.layout,
        rank=ranks[0] if len(ranks) == 1 else ranks,
        modules=len(init.by_path),
        fresh=fresh,
    )
    if fresh:
        log.warning(
            "network.init_weights covers only part of the network: the other modules start fresh",
            file=str(init.file.path),
            covered=len(init.by_path),
            fresh=fresh,
        )


@torch.no_grad()
def merge_base_weights(plan: Any, variant: Any, transformer: nn.Module) -> None:
    """Merge ``model.base_weights`` into ``transformer``'s weights: the files are applied as ``kern generate`` applies
    them (any layout, any types mixed), then every adapted weight becomes ``W + Σ m·ΔW`` through ``kern merge``'s
    own function (float32 sum, one rounding to the weight's dtype); fp8 layers are re-quantised."""
    from kern.adapters.merge import merged_weight
    from kern.adapters.network import add_to_weight_
    from kern.adapters.weights import apply_adapters

    job = plan.job
    entries = [split_weight(e) for e in job.model.base_weights]
    try:
        networks = apply_adapters(transformer, entries, arch=plan.arch.name, variant=variant.name, manager=plan.manager)
    except AdapterError as exc:
        raise ConfigError(f"{job.source}: model.base_weights: {exc}") from None
    layers: dict[str, tuple[nn.Module, list[tuple[str, dict[str, torch.Tensor], float, str]]]] = {}
    try:
        for net, (file, mult) in zip(networks, entries):
            for m in net.adapters.values():
                tensors = {k: v.detach() for k, v in m.kohya_tensors().items()}
                layers.setdefault(m.path, (m.org, []))[1].append((net.network_type, tensors, mult, f"{file}: {m.name}"))
    finally:
        for net in reversed(networks):
            net.remove()
    where = f"{job.source}: model.base_weights"
    for path, (org, parts) in layers.items():
        shape = tuple(org.weight.shape)
        if hasattr(org, "weight_scale") and hasattr(org, "dequantized_weight"):  # an fp8 layer of an fp8 checkpoint
            add_to_weight_(org, merged_weight(torch.zeros(shape), parts, shape, f"{path}.weight", plan.manager, where))
        else:
            w = org.weight
            w.copy_(merged_weight(w.detach(), parts, shape, f"{path}.weight", plan.manager, where).to(w.dtype))
    log.info(
        "merged base weights",
        files=[f"{Path(f).name}:{m:g}" for f, m in entries],
        networks=[n.network_type for n in networks],
        ranks=[sorted({getattr(a, "rank", 0) for a in n.adapters.values()}) for n in networks],
        modules=[len(n) for n in networks],
        layers=len(layers),
    )
