"""Entry point of the lora plugin: the hook implementations kern calls.

Every hook answers only for network type ``lora`` (``detect_weights`` answers for files that hold LoRA keys
and nothing else).
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
from kern_lora.module import ALPHA, DOWN, FACTOR_SUFFIXES, SUFFIX_ALIASES, UP, LoRAModule, LoRAOps, fold_alpha, lora_delta, normalise

log = get_logger(__name__)

NAME = "lora"

OPTIONS = (
    kern.Option("rank", "int", 16, "rank r: lora_down is r × in, lora_up is out × r", minimum=1),
    kern.Option(
        "alpha",
        "float",
        None,
        "α; the update is scaled by α/r. Unset or 0: α = r (scale 1, the PEFT / diffusers / ai-toolkit convention; "
        "musubi-tuner's default is α = 1)",
        minimum=0.0,
    ),
    kern.Option("dropout", "float", 0.0, "dropout probability on the rank-r activations A·x (training only)", minimum=0.0, maximum=0.99),
    kern.Option("rank_dropout", "float", 0.0, "probability of zeroing each rank channel of A·x per sample, rescaled by 1/(1-p)", minimum=0.0, maximum=0.99),
    kern.Option("module_dropout", "float", 0.0, "probability of skipping the whole adapter of a layer for one forward", minimum=0.0, maximum=0.99),
    kern.Option("loraplus_lr_ratio", "float", None, "LoRA+: train lora_up (B) at lr × this ratio (paper: 16; musubi suggests ~4)",
                minimum=0.0),
    kern.Option("use_rslora", "bool", False, "rank-stabilised scale α/√r instead of α/r (saved alpha is adjusted so loaders agree)"),
    kern.Option("rank_pattern", "list", (), "per-module ranks: 'regex=rank' entries fullmatched on module paths, first match wins",
                check=parse_rank_patterns),
)


@kern.hookimpl
def register_networks(register):
    register(
        kern.NetworkType(
            name=NAME,
            options=OPTIONS,
            description="Low-rank adaptation: ΔW = (α/r)·B·A (kohya / PEFT / ComfyUI compatible)",
        )
    )


@kern.hookimpl
def make_network(network_type, model, targets, options):
    if network_type != NAME:
        return None
    return build_network(NAME, model, targets, options, LoRAModule, loraplus_lr_ratio=options.get("loraplus_lr_ratio"))


@kern.hookimpl
def detect_weights(keys, metadata):
    modules, rest = split_keys(keys, SUFFIX_ALIASES)
    if rest or not modules:
        return None
    if not any(k.endswith(FACTOR_SUFFIXES) for k in keys):
        return None
    layout = layout_of(modules)
    note = "alpha from lora_adapter_metadata" if metadata and "lora_adapter_metadata" in metadata else ""
    return kern.WeightsClaim(network_type=NAME, layout=layout, modules=modules, note=note)


@kern.hookimpl
def load_network(network_type, model, state_dict, metadata, claim, multiplier):
    if network_type != NAME:
        return None
    modules = normalise(state_dict, metadata, claim.modules)
    return load_network_modules(NAME, model, modules, LoRAModule, multiplier)


@kern.hookimpl
def weight_delta(network_type, tensors, base_shape):
    if network_type != NAME:
        return None
    return lora_delta(tensors, tuple(base_shape))


def _carry_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    drop = ("lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash", "format")
    return {k: v for k, v in (metadata or {}).items() if k not in drop}


@kern.hookimpl
def convert_weights(network_type, state_dict, metadata, claim, to_layout, module_map):
    if network_type != NAME:
        return None
    if to_layout not in ("kohya", "comfyui", "diffusers"):
        raise UsageError(f"unknown adapter layout {to_layout!r}; choose kohya, comfyui or diffusers")
    modules = normalise(state_dict, metadata, claim.modules)
    md = _carry_metadata(metadata)
    if module_map is None:
        if to_layout != "kohya":
            raise AdapterError(f"converting a LoRA to the {to_layout} layout needs the architecture's module map (give the architecture)")
        # Keep every name in its own naming; only flatten it the kohya way.
        out: dict[str, torch.Tensor] = {}
        for name, t in modules.items():
            rest, flat = strip_layout_prefix(name)
            _emit_kohya(out, KOHYA_PREFIX + (rest if flat else rest.replace(".", "_")), t)
        return out, md
    mm = ModuleMap(module_map)
    want = "other" if to_layout == "diffusers" else "native"
    resolved, unmatched = resolve_modules(modules, mm.table(), want=want, module_map=mm, ops=LoRAOps())
    if unmatched:
        listed = [f"{n} ({why})" for n, why in unmatched[:12]]
        raise AdapterError(f"{len(unmatched)} LoRA modules cannot be written in the {to_layout} layout: {listed}")
    out = {}
    for path, t in resolved.items():
        if to_layout == "kohya":
            _emit_kohya(out, kohya_name(path), t)
        else:
            prefix = "transformer." if to_layout == "diffusers" else "diffusion_model."
            a, b = fold_alpha(t)
            out[f"{prefix}{path}.lora_A.weight"] = a.contiguous()
            out[f"{prefix}{path}.lora_B.weight"] = b.contiguous()
    if to_layout == "diffusers":
        md["lora_adapter_metadata"] = _peft_metadata(resolved)
    return out, md


def _emit_kohya(out: dict[str, torch.Tensor], name: str, t: Mapping[str, torch.Tensor]) -> None:
    if f"{name}.{DOWN}" in out:
        raise AdapterError(f"two modules flatten to the same kohya name {name!r}")
    out[f"{name}.{DOWN}"] = t[DOWN].contiguous()
    out[f"{name}.{UP}"] = t[UP].contiguous()
    out[f"{name}.{ALPHA}"] = t[ALPHA].to(torch.float32).reshape(())


def _peft_metadata(resolved: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
    """diffusers' ``lora_adapter_metadata`` (a PEFT LoraConfig, keys prefixed ``transformer.``); α is folded, so α = r."""
    import json
    import re
    from collections import Counter

    ranks = {p: int(t[DOWN].shape[0]) for p, t in resolved.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{re.escape(p)}": v for p, v in sorted(ranks.items()) if v != r}
    cfg = {
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "use_dora": False,
        "lora_bias": False,
    }
    return json.dumps({f"transformer.{k}": v for k, v in cfg.items()}, sort_keys=True)
