"""Entry point of the lokr plugin: the hook implementations kern calls.

The hooks are :class:`kern.adapters.network.RankAdapter`'s, shared with every rank-based adapter type; this module
says what is LoKr's own: its options (LyCORIS' ``factor``, ``decompose_both``, ``full_matrix``), its file keys
(``lokr_*``), and that diffusers cannot load it.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import kern
import torch
from kern.adapters.network import RankAdapter, build_network, rank_options

from kern_lokr.module import SUFFIXES, W1, W1A, LoKrModule, normalise

NAME = "lokr"


def _check_factor(value: int) -> None:
    if value == 0 or value < -1:
        raise ValueError(f"lokr option 'factor' must be -1 (most balanced split) or a positive integer, got {value}")


OPTIONS = rank_options(
    rank="rank r of the low-rank side(s); W2 (and W1 with decompose_both) become full matrices where r is at least "
    "half their larger dimension, as in LyCORIS",
    alpha="α; ΔW is scaled by γ = α/r when a side is low rank (γ = 1 when both are full). Unset or 0: α = r",
    dropout="dropout probability on the adapter output ΔW·x",
    rank_dropout="probability of dropping each output row of ΔW per step, rescaled by 1/(1-p)",
    use_rslora="scale α/√r instead of α/r (saved alpha is adjusted)",
    extra=(
        kern.Option(
            "factor",
            "int",
            -1,
            "Kronecker split: each dimension n becomes (f, n/f) when f divides it, else the most balanced split with "
            "the smaller part ≤ f; -1: the most balanced split (LyCORIS factorization)",
            check=_check_factor,
        ),
        kern.Option("decompose_both", "bool", False, "also make W1 (the small side) a rank-r product"),
        kern.Option("full_matrix", "bool", False, "make both W1 and W2 full matrices (no rank; γ = 1)"),
    ),
)


class LoKr(RankAdapter):
    name = NAME
    description = "LoKr (LyCORIS Kronecker product): ΔW = γ·W1⊗W2, W2 low rank; loads in ComfyUI, not in diffusers"
    options = OPTIONS
    module = LoKrModule
    ops = None  # a Kronecker product does not split along output rows into LoKr modules
    suffixes = SUFFIXES
    markers = (W1, W1A)
    refused_layouts = {
        "diffusers": "kern writes a LoKr in the kohya and comfyui layouts only: diffusers (0.42+) loads a FLUX.2 LoKr "
        "from the comfyui layout (diffusion_model.<name>.lokr_*, as ai-toolkit writes it): use --to comfyui; for other "
        "architectures diffusers has no LoKr loader: merge it into the base model instead "
        "(kern merge --model BASE --weights FILE --out MERGED)",
    }

    @kern.hookimpl
    def make_network(self, model: torch.nn.Module, targets: Any, options: Mapping[str, Any]) -> Any:
        module = functools.partial(
            LoKrModule,
            factor=int(options.get("factor") or -1),
            decompose_both=bool(options.get("decompose_both")),
            full_matrix=bool(options.get("full_matrix")),
        )
        return build_network(self.name, model, targets, options, module)

    def normalise(
        self,
        state_dict: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None,
        modules: Mapping[str, Sequence[str]],
    ) -> dict[str, dict[str, torch.Tensor]]:
        return normalise(state_dict, modules)  # a LoKr file's metadata does not change its tensors


LOKR = LoKr()
# kern finds a plugin's hooks as functions of its module: these are LOKR's, bound to it.
register_networks, make_network, detect_weights, load_network = LOKR.hooks()[:4]
weight_delta, convert_weights, weight_shape, weight_rank = LOKR.hooks()[4:]
