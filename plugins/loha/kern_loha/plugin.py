"""Entry point of the loha plugin: the hook implementations kern calls.

The hooks are :class:`kern.adapters.network.RankAdapter`'s, shared with every rank-based adapter type; this module
says what is LoHa's own: its options and file keys (``hada_*``), and that diffusers cannot load it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from kern.adapters.network import RankAdapter, rank_options

from kern_loha.module import SUFFIXES, W1A, LoHaModule, LoHaOps, normalise

NAME = "loha"

OPTIONS = rank_options(
    rank="rank r of each factor pair (ΔW has rank ≤ r²); LyCORIS advises r ≤ 32",
    alpha="α; ΔW is scaled by γ = α/r. Unset or 0: α = r (γ = 1, musubi / LyCORIS default when no alpha is given). "
    "LyCORIS guidance: α between 1 and r/2",
    dropout="dropout probability on the adapter output ΔW·x (LyCORIS bypass semantics)",
    rank_dropout="probability of dropping each output row of ΔW per step, rescaled by 1/(1-p)",
    use_rslora="scale α/√r instead of α/r (LyCORIS rs_lora; saved alpha is adjusted)",
)


Tensors = Mapping[str, torch.Tensor]
Modules = Mapping[str, Sequence[str]]
Grouped = dict[str, dict[str, torch.Tensor]]


class LoHa(RankAdapter):
    name = NAME
    description = "LoHa (LyCORIS Hadamard product): ΔW = (α/r)·(W1a·W1b)⊙(W2a·W2b); loads in ComfyUI, not in diffusers"
    options = OPTIONS
    module = LoHaModule
    ops = LoHaOps()
    suffixes = SUFFIXES
    markers = (W1A,)
    refused_layouts = {
        "diffusers": "a LoHa adapter cannot be written in the diffusers layout: diffusers cannot load LoHa (hada_*; "
        "its LoRA loaders read lora_A/lora_B only); use --to comfyui for ComfyUI (or --to kohya), or merge it into "
        "the base model: kern merge --model BASE --weights FILE --out MERGED",
    }

    def normalise(self, state_dict: Tensors, metadata: Mapping[str, str] | None, modules: Modules) -> Grouped:
        return normalise(state_dict, modules)  # a LoHa file's metadata does not change its tensors


LOHA = LoHa()
# kern finds a plugin's hooks as functions of its module: these are LOHA's, bound to it.
register_networks, make_network, detect_weights, load_network = LOHA.hooks()[:4]
weight_delta, convert_weights, weight_shape, weight_rank = LOHA.hooks()[4:]
