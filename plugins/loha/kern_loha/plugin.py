"""Entry point of the loha plugin: the hook implementations kern calls.

Every hook answers only for network type ``loha`` (``detect_weights`` answers for files that hold LoHa keys
(``hada_*``) and nothing else).
"""

from __future__ import annotations

from typing import Mapping

import torch

import kern
from kern.errors import AdapterError, UsageError
from kern.log import get_logger
from kern.adapters.network import (
    build_network,
    load_network_modules,
    KOHYA_PREFIX,
    ModuleMap,
    kohya_name,
    layout_of,
    parse_rank_patterns,
    resolve_modules,
    split_keys,
    strip_layout_prefix,
)
from kern_loha.module import ALPHA, SUFFIXES, W1A, LoHaModule, LoHaOps, loha_delta, normalise

log = get_logger(__name__)

NAME = "loha"

OPTIONS = (
    kern.Option("rank", "int", 16, "rank r of each factor pair (ΔW has rank ≤ r²); LyCORIS advises r ≤ 32", minimum=1),
    kern.Option(
        "alpha",
        "float",
        None,
        "α; ΔW is scaled by γ = α/r. Unset or 0: α = r (γ = 1, musubi / LyCORIS default when no alpha is given). "
        "LyCORIS guidance: α between 1 and r/2",
        minimum=0.0,
    ),
    kern.Option("dropout", "float", 0.0, "dropout probability on the adapter output ΔW·x (LyCORIS bypass semantics)", minimum=0.0, maximum=0.99),
    kern.Option("rank_dropout", "float", 0.0, "probability of dropping each output row of ΔW per step, rescaled by 1/(1-p)", minimum=0.0, maximum=0.99),
    kern.Option("module_dropout", "float", 0.0, "probability of skipping the whole adapter of a layer for one forward", minimum=0.0, maximum=0.99),
    kern.Option("use_rslora", "bool", False, "scale α/√r instead of α/r (LyCORIS rs_lora; saved alpha is adjusted)"),
    kern.Option("rank_pattern", "list", (), "per-module ranks: 'regex=rank' entries fullmatched on module paths, first match wins",
                check=parse_rank_patterns),
)


@kern.hookimpl
def register_networks(register):
    register(
        kern.NetworkType(
            name=NAME,
            options=OPTIONS,
            description="LoHa (LyCORIS Hadamard product): ΔW = (α/r)·(W1a·W1b)⊙(W2a·W2b); loads in ComfyUI, not in diffusers",
        )
    )


@kern.hookimpl
def make_network(network_type, model, targets, options):
    if network_type != NAME:
        return None
    return build_network(NAME, model, targets, options, LoHaModule)


@kern.hookimpl
def detect_weights(keys, metadata):
    modules, rest = split_keys(keys, SUFFIXES)
    if rest or not modules or not any(k.endswith("." + W1A) for k in keys):
        return None
    return kern.WeightsClaim(network_type=NAME, layout=layout_of(modules), modules=modules)


@kern.hookimpl
def load_network(network_type, model, state_dict, metadata, claim, multiplier):
    if network_type != NAME:
        return None
    modules = normalise(state_dict, claim.modules)
    return load_network_modules(NAME, model, modules, LoHaModule, multiplier)


@kern.hookimpl
def weight_delta(network_type, tensors, base_shape):
    if network_type != NAME:
        return None
    return loha_delta(tensors, tuple(base_shape))


@kern.hookimpl
def convert_weights(network_type, state_dict, metadata, claim, to_layout, module_map):
    if network_type != NAME:
        return None
    if to_layout == "diffusers":
        raise AdapterError(
            "a LoHa (hada_*) adapter cannot be written in the diffusers layout: diffusers and PEFT's diffusers "
            "loader only load LoRA (lora_A/lora_B) and LoKr; use --to comfyui (ComfyUI loads LoHa) or --to kohya"
        )
    if to_layout not in ("kohya", "comfyui"):
        raise UsageError(f"unknown adapter layout {to_layout!r}; choose kohya, comfyui or diffusers")
    modules = normalise(state_dict, claim.modules)
    md = {k: v for k, v in (metadata or {}).items() if k not in ("sshs_model_hash", "sshs_legacy_hash", "format")}
    if module_map is None:
        if to_layout != "kohya":
            raise AdapterError(f"converting a LoHa to the {to_layout} layout needs the architecture's module map (give the architecture)")
        out: dict[str, torch.Tensor] = {}
        for name, t in modules.items():
            rest, flat = strip_layout_prefix(name)
            _emit(out, KOHYA_PREFIX + (rest if flat else rest.replace(".", "_")), t)
        return out, md
    mm = ModuleMap(module_map)
    resolved, unmatched = resolve_modules(modules, mm.table(), want="native", module_map=mm, ops=LoHaOps())
    if unmatched:
        listed = [f"{n} ({why})" for n, why in unmatched[:12]]
        raise AdapterError(f"{len(unmatched)} LoHa modules cannot be written in the {to_layout} layout: {listed}")
    out = {}
    for path, t in resolved.items():
        _emit(out, kohya_name(path) if to_layout == "kohya" else f"diffusion_model.{path}", t)
    return out, md


def _emit(out: dict[str, torch.Tensor], name: str, t: Mapping[str, torch.Tensor]) -> None:
    for suffix, v in t.items():
        key = f"{name}.{suffix}"
        if key in out:
            raise AdapterError(f"two modules map to the same name {name!r}")
        out[key] = v.to(torch.float32).reshape(()) if suffix == ALPHA else v.contiguous()
