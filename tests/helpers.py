"""Helpers the tests share: random weights for the reference comparisons, diffusers' FLUX.2 transformer on the same
hyper-parameters, and a tiny image dataset. (The tiny model bundles are the plugins' own ``tiny.py``; the
generic pieces under both are in ``kern.models.tiny``.)"""

from __future__ import annotations

from pathlib import Path

import torch
from kern.models.tiny import gains_near_one, init_random_

COLORS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 210, 40)]


def init_flux2_random(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights for a BFL-named module: RMSNorm ``scale`` about 1, the rest 0.05 N(0, 1), registration order."""
    return init_random_(model, seed, gains_near_one(lambda name, p: name.endswith(".scale")), sorted_names=False)


def init_qwen_image_random(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights for a Qwen-Image transformer: RMSNorm weights about 1 (not ``norm_out.linear``), the rest
    0.1 N(0, 1), registration order."""

    def is_gain(name: str, p: torch.Tensor) -> bool:
        return "norm" in name.split(".")[-2] and name.endswith(".weight")

    return init_random_(model, seed, gains_near_one(is_gain, std=0.1), sorted_names=False)


def flux2_diffusers_model(params):
    """diffusers' ``Flux2Transformer2DModel`` with the hyper-parameters of kern's ``Flux2Params`` (default init)."""
    from diffusers import Flux2Transformer2DModel

    p = params
    return Flux2Transformer2DModel(**p.diffusers_config())


def make_dataset(
    root: Path,
    n: int = 4,
    size: tuple[int, int] = (64, 64),
    refs: int = 0,
    batch_size: int = 1,
    caption_ext: str = ".txt",
) -> Path:
    """``n`` flat-colour images with captions (and ``refs`` control images each) plus a musubi TOML."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    controls = root / "controls"
    for i in range(n):
        color = COLORS[i % len(COLORS)]
        Image.new("RGB", size, color).save(images / f"img{i}.png")
        (images / f"img{i}{caption_ext}").write_text(f"a {['red', 'green', 'blue', 'yellow'][i % 4]} square")
        for j in range(refs):
            controls.mkdir(exist_ok=True)
            Image.new("RGB", size, tuple(255 - c for c in color)).save(controls / f"img{i}_{j}.png")
    toml = root / "dataset.toml"
    control = f'control_directory = "{controls}"\n' if refs else ""
    toml.write_text(
        "[general]\n"
        f"resolution = [{size[0]}, {size[1]}]\n"
        f'caption_extension = "{caption_ext}"\n'
        f"batch_size = {batch_size}\n"
        "enable_bucket = true\n\n"
        "[[datasets]]\n"
        f'image_directory = "{images}"\n'
        f'cache_directory = "{root / "cache"}"\n'
        f"{control}"
    )
    return toml
