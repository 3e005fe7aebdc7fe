"""Old module paths of kern 0.1, before the kernel was grouped into subpackages.

A plugin written against them (``from kern.network import AdapterModule``, ``from kern.checkpoint import
require_path``) keeps working: importing an old path gives the module at its new place, with a
``DeprecationWarning`` that names the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "kern.plugins": "kern.core.plugins",
    "kern.config": "kern.core.config",
    "kern.io": "kern.core.io",
    "kern.defaults": "kern.core.defaults",
    "kern.timesteps": "kern.maths.timesteps",
    "kern.checkpoint": "kern.models.files",
    "kern.hf": "kern.models.hf",
    "kern.tiling": "kern.models.tiling",
    "kern.network": "kern.adapters.network",
    "kern.weights": "kern.adapters.weights",
    "kern.merge": "kern.adapters.merge",
    "kern.convert": "kern.adapters.convert",
    "kern.streaming": "kern.adapters.streaming",
    "kern.cache": "kern.data.cache",
    "kern.prompts": "kern.data.prompts",
    "kern.state": "kern.train.state",
    "kern.runs": "kern.train.runs",
    "kern.plot": "kern.train.plot",
    "kern.sampling": "kern.generate.denoise",
    "kern.accel": "kern.gpu.accel",
    "kern.fp8": "kern.gpu.fp8",
    "kern.fp8_linear": "kern.gpu.fp8",
    "kern.offload": "kern.gpu.offload",
    "kern.distributed": "kern.gpu.distributed",
    "kern.attention": "kern.gpu.attention",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old path with the module now at the new one (the same module object, not a copy)."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 — importlib's protocol
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):  # noqa: ANN001
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}: import it from there", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):  # noqa: ANN001 — already executed at its new path
        pass


def install() -> None:
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())
