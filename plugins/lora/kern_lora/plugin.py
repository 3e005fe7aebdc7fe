"""Entry point of the lora plugin: the hook implementations kern calls.

The hooks are :class:`kern.adapters.network.RankAdapter`'s, shared with every rank-based adapter type; this module
says what is LoRA's own: its options, its file keys, and how its modules look in the ComfyUI and diffusers layouts
(α folded into the factors, named ``lora_A`` / ``lora_B``; diffusers also wants a PEFT config in the metadata).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import kern
import torch
from kern.adapters.network import RankAdapter, build_network, load_network_modules, rank_options
from torch import nn

from kern_lora.dora import (
    DORA_BASE,
    NORM_BASE,
    NORM_KEY,
    DoRAModule,
    base_normed,
    convert_modules,
    dora_delta,
    needs_base,
)
from kern_lora.module import (
    ALPHA,
    DORA,
    DOWN,
    FACTOR_SUFFIXES,
    SUFFIX_ALIASES,
    UP,
    LoRAModule,
    LoRAOps,
    fold_alpha,
    lora_delta,
    normalise,
)

NAME = "lora"

OPTIONS = rank_options(
    rank="rank r: lora_down is r × in, lora_up is out × r",
    alpha="α; the update is scaled by α/r. Unset or 0: α = r (scale 1, the PEFT / diffusers / ai-toolkit convention; "
    "musubi-tuner's default is α = 1)",
    dropout="dropout probability on the rank-r activations A·x (training only)",
    rank_dropout="probability of zeroing each rank channel of A·x per sample, rescaled by 1/(1-p)",
    use_rslora="rank-stabilised scale α/√r instead of α/r (saved alpha is adjusted so loaders agree)",
    extra=(
        kern.Option(
            "loraplus_lr_ratio",
            "float",
            None,
            "LoRA+: train lora_up (B) at lr × this ratio (paper: 16; musubi suggests ~4)",
            minimum=0.0,
        ),
        kern.Option(
            "dora",
            "bool",
            False,
            "DoRA (weight-decomposed LoRA, PEFT use_dora): a trained magnitude per output row rescales the "
            "row-normalised W + ΔW; saved as dora_scale (kohya, ComfyUI) / lora_magnitude_vector (diffusers)",
        ),
    ),
)


class LoRA(RankAdapter):
    name = NAME
    description = "Low-rank adaptation: ΔW = (α/r)·B·A (kohya / PEFT / ComfyUI compatible)"
    options = OPTIONS
    module = LoRAModule
    ops = LoRAOps()
    suffixes = tuple(SUFFIX_ALIASES)
    markers = FACTOR_SUFFIXES
    # A PEFT config describes the file it came with; written anew for diffusers (α folded), dropped otherwise. The
    # DoRA norm mark describes the magnitudes as written: set anew for ComfyUI, where kern writes them so.
    dropped_metadata = RankAdapter.dropped_metadata + ("lora_adapter_metadata", NORM_KEY)

    def normalise(
        self,
        state_dict: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None,
        modules: Mapping[str, Sequence[str]],
    ) -> dict[str, dict[str, torch.Tensor]]:
        return normalise(state_dict, metadata, modules)

    def claim_note(self, metadata: Mapping[str, str] | None) -> str:
        return "alpha from lora_adapter_metadata" if metadata and "lora_adapter_metadata" in metadata else ""

    @kern.hookimpl
    def detect_weights(self, keys: frozenset, metadata: Mapping[str, str]) -> Any:
        claim = super().detect_weights(keys, metadata)
        if claim is not None and any(k.endswith(DORA_KEYS) for k in keys):
            # A DoRA file is a LoRA file with a magnitude per module: same plugin, told apart by the note.
            note = "DoRA (magnitude per output row)" + (f"; {claim.note}" if claim.note else "")
            claim = kern.WeightsClaim(claim.network_type, claim.layout, claim.modules, note)
        return claim

    @kern.hookimpl
    def make_network(self, model: nn.Module, targets: kern.TargetSpec, options: Mapping[str, Any]) -> Any:
        module = DoRAModule if options.get("dora") else LoRAModule
        return build_network(
            self.name, model, targets, options, module, loraplus_lr_ratio=options.get("loraplus_lr_ratio")
        )

    @kern.hookimpl
    def load_network(
        self,
        model: nn.Module,
        state_dict: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        claim: Any,
        multiplier: float,
    ) -> Any:
        modules = self.normalise(state_dict, metadata, claim.modules)
        module = DoRAModule if is_dora(modules) else LoRAModule
        if module is DoRAModule and base_normed(metadata):  # each DoRAModule turns these into m with its layer's W
            modules = {n: {DORA_BASE if k == DORA else k: v for k, v in t.items()} for n, t in modules.items()}
        net = load_network_modules(self.name, model, modules, module, multiplier)
        if module is DoRAModule:
            net.options["dora"] = True
        return net

    @kern.hookimpl
    def weight_delta(self, tensors: Mapping[str, torch.Tensor], base_shape: tuple, base: Any) -> Any:
        if DORA in tensors or DORA_BASE in tensors:
            return dora_delta(tensors, tuple(base_shape), base)
        return lora_delta(tensors, tuple(base_shape))

    def read_modules(
        self, modules: dict[str, dict[str, torch.Tensor]], metadata: Mapping[str, str] | None, layout: str, base: Any
    ) -> dict[str, dict[str, torch.Tensor]]:
        """A DoRA file's magnitudes as m: a ComfyUI-normalised file's divided back with the base weights; a DoRA bound
        for ComfyUI needs them too, so both are refused here without ``base`` (before any work)."""
        if not is_dora(modules):
            return modules
        if base_normed(metadata):
            why = f"this DoRA file's magnitudes are ComfyUI-normalised ({NORM_KEY} = {NORM_BASE!r})"
            marked = {n: {DORA_BASE if k == DORA else k: v for k, v in t.items()} for n, t in modules.items()}
            return convert_modules(marked, base, read=True, why=why)
        if layout == "comfyui" and base is None:
            raise needs_base("a DoRA adapter for ComfyUI")
        return modules

    def write_modules(
        self, resolved: dict[str, dict[str, torch.Tensor]], layout: str, base: Any
    ) -> dict[str, dict[str, torch.Tensor]]:
        """For ComfyUI, DoRA magnitudes divided by ‖W + s·B·A‖ / (‖W‖ + eps), so that its rule gives PEFT's W'."""
        if layout != "comfyui" or not is_dora(resolved):
            return resolved
        return convert_modules(resolved, base, read=False, why="a DoRA adapter for ComfyUI")

    def layout_tensors(self, tensors: Mapping[str, torch.Tensor], layout: str) -> Mapping[str, torch.Tensor]:
        dora = tensors.get(DORA)
        if layout == "kohya":
            out = {DOWN: tensors[DOWN], UP: tensors[UP], ALPHA: tensors[ALPHA]}
            return out if dora is None else {**out, DORA: dora.reshape(-1, 1)}
        a, b = fold_alpha(tensors)  # ComfyUI and diffusers: no alpha key, the scale lives in the factors
        out = {"lora_A.weight": a, "lora_B.weight": b}
        if dora is not None:  # ComfyUI reads dora_scale [out, 1]; PEFT lora_magnitude_vector [out]
            out.update(
                {DORA: dora.reshape(-1, 1)} if layout == "comfyui" else {"lora_magnitude_vector": dora.reshape(-1)}
            )
        return out

    def layout_metadata(self, resolved: Mapping[str, Mapping[str, torch.Tensor]], layout: str) -> dict[str, str]:
        if layout == "comfyui" and is_dora(resolved):
            return {NORM_KEY: NORM_BASE}  # write_modules wrote the magnitudes so
        return {"lora_adapter_metadata": _peft_metadata(resolved)} if layout == "diffusers" else {}


DORA_KEYS = tuple("." + k for k, v in SUFFIX_ALIASES.items() if v == DORA)


def is_dora(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> bool:
    """Whether a file's modules are DoRA; ``AdapterError`` when only some carry a magnitude."""
    from kern.errors import AdapterError

    plain = [n for n, t in modules.items() if DORA not in t]
    if plain and len(plain) != len(modules):
        raise AdapterError(
            f"{len(modules) - len(plain)} of {len(modules)} modules carry a DoRA magnitude and {len(plain)} do not "
            f"(e.g. {plain[:3]}); a file is DoRA in every module or in none: re-export it"
        )
    return not plain and bool(modules)


LORA = LoRA()
# kern finds a plugin's hooks as functions of its module: these are LORA's, bound to it.
register_networks, make_network, detect_weights, load_network = LORA.hooks()[:4]
weight_delta, convert_weights, weight_shape, weight_rank = LORA.hooks()[4:]


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
        "use_dora": any(DORA in t for t in resolved.values()),
        "lora_bias": False,
    }
    return json.dumps({f"transformer.{k}": v for k, v in cfg.items()}, sort_keys=True)
