"""Entry point of the lora plugin: the hook implementations kern calls.

The hooks are :class:`kern.adapters.network.RankAdapter`'s, shared with every rank-based adapter type; this module
says what is LoRA's own: its options, its file keys, and how its modules look in the ComfyUI and diffusers layouts
(α folded into the factors, named ``lora_A`` / ``lora_B``; diffusers also wants a PEFT config in the metadata).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import kern
import torch
from kern.adapters.network import RankAdapter, rank_options

from kern_lora.module import (
    ALPHA,
    DOWN,
    FACTOR_SUFFIXES,
    SUFFIX_ALIASES,
    UP,
    LoRAModule,
    LoRAOps,
    fold_alpha,
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
    # A PEFT config describes the file it came with; written anew for diffusers (α folded), dropped otherwise.
    dropped_metadata = RankAdapter.dropped_metadata + ("lora_adapter_metadata",)

    def normalise(
        self,
        state_dict: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None,
        modules: Mapping[str, Sequence[str]],
    ) -> dict[str, dict[str, torch.Tensor]]:
        return normalise(state_dict, metadata, modules)

    def claim_note(self, metadata: Mapping[str, str] | None) -> str:
        return "alpha from lora_adapter_metadata" if metadata and "lora_adapter_metadata" in metadata else ""

    def layout_tensors(self, tensors: Mapping[str, torch.Tensor], layout: str) -> Mapping[str, torch.Tensor]:
        if layout == "kohya":
            return {DOWN: tensors[DOWN], UP: tensors[UP], ALPHA: tensors[ALPHA]}
        a, b = fold_alpha(tensors)  # ComfyUI and diffusers: no alpha key, the scale lives in the factors
        return {"lora_A.weight": a, "lora_B.weight": b}

    def layout_metadata(self, resolved: Mapping[str, Mapping[str, torch.Tensor]], layout: str) -> dict[str, str]:
        return {"lora_adapter_metadata": _peft_metadata(resolved)} if layout == "diffusers" else {}


LORA = LoRA()
# kern finds a plugin's hooks as functions of its module: these are LORA's, bound to it.
register_networks, make_network, detect_weights, load_network, weight_delta, convert_weights = LORA.hooks()


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
