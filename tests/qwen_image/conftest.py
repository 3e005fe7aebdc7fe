"""A tiny Qwen-Image bundle in the real file formats, built once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    from kern_qwen_image import tiny

    return tiny.build(tmp_path_factory.mktemp("tiny-qwen-image"))


@pytest.fixture(scope="session")
def tiny_variants(tiny_qwen, tmp_path_factory):
    """The T2I bundle plus a tiny transformer for each other variant and the RGBA VAE, written once per session:
    ``edit`` (2511), ``edit-2509``, ``edit-2508``, ``layered``, ``rgba_vae``."""
    from kern_qwen_image import tiny

    folder = tmp_path_factory.mktemp("tiny-qwen-variants")
    return {
        **tiny_qwen,
        "edit": tiny.write_transformer(folder / "qwen-image-edit-tiny.safetensors", variant="edit-2511"),
        "edit-2509": tiny.write_transformer(folder / "qwen-image-edit-2509-tiny.safetensors", variant="edit-2509"),
        "edit-2508": tiny.write_transformer(folder / "qwen-image-edit-2508-tiny.safetensors", variant="edit"),
        "layered": tiny.write_transformer(folder / "qwen-image-layered-tiny.safetensors", variant="layered"),
        "rgba_vae": tiny.write_vae(folder / "vae-rgba.safetensors", rgba=True),
    }
