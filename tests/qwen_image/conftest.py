"""A tiny Qwen-Image bundle in the real file formats, built once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    from kern_qwen_image import tiny

    return tiny.build(tmp_path_factory.mktemp("tiny-qwen-image"))
