"""FLUX.2 as registered: names, variants and their defaults, default adapter targets."""

from __future__ import annotations

import pytest
import torch
from kern.adapters.network import select_targets
from kern.core.plugins import get_manager
from kern.records import TargetSpec
from kern_flux2.params import PARAMS_BY_VARIANT
from kern_flux2.transformer import Flux2Transformer


@pytest.mark.parametrize(
    ("alias", "variant"),
    [
        ("flux2", None),
        ("flux2-dev", "dev"),
        ("flux2-klein-4b", "klein-4b"),
        ("flux2-klein-9b", "klein-9b"),
        ("flux2-klein-base-4b", "klein-base-4b"),
        ("flux2-klein-base-9b", "klein-base-9b"),
    ],
)
def test_names_resolve(alias, variant):
    arch, v = get_manager().resolve_arch(alias)
    assert arch.name == "flux2" and v == variant


def test_variant_generation_defaults():
    arch = get_manager().architectures["flux2"]
    got = {v.name: (v.steps, v.guidance, v.guidance_mode) for v in arch.variants}
    assert got == {
        "dev": (50, 4.0, "embedded"),
        "klein-4b": (4, 1.0, "none"),
        "klein-9b": (4, 1.0, "none"),
        "klein-base-4b": (50, 4.0, "cfg"),
        "klein-base-9b": (50, 4.0, "cfg"),
    }
    assert arch.timestep_method == "flux2_shift" and arch.resolution_step == 16
    assert {v.cache_id for v in arch.variants} == {"f2d", "f2k4b", "f2k9b"}


@pytest.mark.parametrize(("variant", "count"), [("dev", 160), ("klein-9b", 112), ("klein-4b", 80)])
def test_default_targets_are_every_block_linear(variant, count):
    arch = get_manager().architectures["flux2"]
    with torch.device("meta"):
        model = Flux2Transformer(PARAMS_BY_VARIANT[variant])
    chosen = select_targets(model, TargetSpec(targets=arch.default_targets))
    assert len(chosen) == count
    assert all(name.startswith(("double_blocks.", "single_blocks.")) for name, _ in chosen)
