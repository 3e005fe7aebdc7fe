"""A tiny FLUX.2 klein bundle in the real file formats, built once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    from kern_flux2 import tiny

    return tiny.build(tmp_path_factory.mktemp("tiny-flux2"))
