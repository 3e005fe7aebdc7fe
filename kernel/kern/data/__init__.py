"""Data: dataset configs, their items and buckets, pictures, latent and text caches, prompt lines.

- ``dataset_config``: the musubi-tuner dataset TOML / JSON, its keys and checks (``load_dataset_config``);
- ``items``: the training images it names, their captions and controls (``scan_items``), batches (``batch_order``);
- ``buckets``: the sizes images and controls are trained at;
- ``images``: opening pictures whatever their Pillow mode (``open_picture``, ``load_image``);
- ``cache``: latent and text-encoder caches; ``prompts``: prompt lines and files for generation.

The dataset API is importable from here too, as in kern 0.1 (``from kern.data import load_dataset_config``).
It is loaded on first use, so importing ``kern.data.prompts`` does not load Pillow or torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "dataset_config": ("DatasetSpec", "load_dataset_config", "read_text_file", "SHARED_KEYS", "DATASET_KEYS"),
    "items": ("Item", "scan_items", "match_controls", "batch_key", "batch_order", "EMPTY_STEM"),
    "buckets": ("make_buckets", "nearest_bucket", "fit_area"),
    "images": ("open_picture", "load_image", "to_mode", "IMAGE_EXTENSIONS"),
}
_HOME = {name: module for module, names in _API.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
