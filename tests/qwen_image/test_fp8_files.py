"""Qwen-Image fp8 transformer files (issue 15): ComfyUI's scaled fp8 (``model.diffusion_model.`` prefix,
``scaled_fp8`` marker, ``scale_weight`` / ``scale_input``) and mixed files, with the Edit 2511 marker
``__index_timestep_zero__``, made from the tiny transformer with ComfyUI's per-tensor recipe."""

from __future__ import annotations

import re

import pytest
import torch
from kern.core.io import load_file
from kern.core.plugins import get_manager
from kern.gpu.fp8 import Float8MatmulLinear
from kern_qwen_image import loader
from kern_qwen_image.plugin import KEEP_HIGH_PRECISION
from kern_qwen_image.tiny import TE_HIDDEN

from tests.kernel.test_fp8_checkpoints import E4M3, fp8_linears, write_fp8_checkpoint

pytestmark = pytest.mark.skipif(E4M3 is None, reason="this torch has no float8 dtypes")
PREFIX = "model.diffusion_model."


def in_blocks(k: str, v: torch.Tensor) -> bool:
    return k.endswith(".weight") and v.dim() == 2 and k.startswith("transformer_blocks.")


@pytest.fixture(scope="module")
def fp8_files(tiny_qwen, tmp_path_factory):
    """layout -> (path, float32 reference); the scaled file carries ComfyUI's Edit 2511 marker."""
    state, metadata = load_file(tiny_qwen["transformer"])
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    metadata = {"kern.axes_dim": metadata["kern.axes_dim"]}  # no kern.variant: the variant comes from the file
    folder = tmp_path_factory.mktemp("qwen-fp8")
    made = {}
    for layout in ("scaled", "mixed"):
        path = folder / f"qwen_image_fp8_{layout}.safetensors"
        extra = {"__index_timestep_zero__": torch.empty(0)} if layout == "scaled" else {}
        made[layout] = (
            path,
            write_fp8_checkpoint(path, {**state, **extra}, layout, in_blocks, metadata, prefix=PREFIX),
        )
        made[layout][1].pop("__index_timestep_zero__", None)
    return made


def velocity(model, variant):
    g = torch.Generator().manual_seed(0)
    text = {"ctx": torch.randn(1, 5, TE_HIDDEN, generator=g), "mask": torch.ones(1, 5, dtype=torch.bool)}
    with torch.no_grad():
        return get_manager().hook.predict_velocity(
            arch="qwen-image",
            variant=variant,
            model=model,
            latents=torch.randn(1, 16, 4, 4, generator=g),
            timesteps=torch.tensor([0.6]),
            text=text,
            references=None,
            options={},
        )


@pytest.mark.parametrize("layout,variant", [("scaled", "edit-2511"), ("mixed", "t2i")])
def test_fp8_files_load_exactly_and_as_an_fp8_base(fp8_files, layout, variant):
    path, reference = fp8_files[layout]
    assert loader.detect_variant(path) == variant  # the marker says Edit 2511; no unexpected keys either way
    plain = loader.load_transformer(path, None, torch.float32, "cpu")
    assert plain.variant == variant and plain.params.zero_cond_t == (variant == "edit-2511")
    state = plain.state_dict()
    assert set(state) == set(reference) and all(torch.equal(v, reference[k]) for k, v in state.items())

    model = loader.load_transformer(path, None, torch.float32, "cpu", fp8=True)
    keep = [re.compile(p) for p in KEEP_HIGH_PRECISION]
    expected = {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("transformer_blocks.") and not any(p.search(n) for p in keep)
    }
    layers = fp8_linears(model)
    assert layers and set(layers) == expected and all(type(m) is Float8MatmulLinear for m in layers.values())
    raw, _ = load_file(path)
    for name, m in layers.items():
        assert torch.equal(m.weight.view(torch.uint8), raw[PREFIX + name + ".weight"].view(torch.uint8))
    assert torch.equal(velocity(model, variant), velocity(plain, variant))
