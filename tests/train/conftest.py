"""Fixtures for training tests: a tiny image dataset and the example toy architecture on sys.path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

COLORS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 210, 40)]


def make_dataset(root: Path, n: int = 4, size: tuple[int, int] = (64, 64), refs: int = 0, batch_size: int = 1,
                 caption_ext: str = ".txt") -> Path:
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


@pytest.fixture
def toy_plugin(monkeypatch):
    """The example plugin importable in-process and registered with the global manager."""
    from kern.core import plugins

    monkeypatch.setenv(plugins.ENV_DENY, "toy")  # an in-tree build may have left an entry point for it
    monkeypatch.syspath_prepend(str(REPO / "examples" / "plugins" / "kern-toy"))
    import kern_toy.plugin as toy

    manager = plugins.build_manager(extra=[("toy", toy)])
    monkeypatch.setattr(plugins, "_MANAGER", manager)
    return manager


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
