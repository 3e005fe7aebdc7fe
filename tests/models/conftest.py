"""The tiny bundles of both architectures, for tests that mix them (a ComfyUI folder holds every model's files)."""

from __future__ import annotations

from tests.flux2.conftest import tiny_bundle  # noqa: F401  (session fixtures, built once)
from tests.qwen_image.conftest import tiny_qwen  # noqa: F401
