"""kern: a plugin-based fine-tuning kernel for diffusion transformers.

Plugin authors need only what this module exports: the ``hookimpl`` marker, the records they
register, the errors they raise and ``get_logger`` for their log lines. See ``docs/plugins.md``.
"""

from kern import _moved
from kern.errors import AdapterError, ConfigError, KernError, ModelFileError, PluginError, UsageError
from kern.hookspecs import hookimpl
from kern.log import get_logger
from kern.records import (
    Architecture,
    CacheLayout,
    ModelFile,
    NetworkType,
    Option,
    TargetSpec,
    TextCacheKey,
    Variant,
    WeightsClaim,
)

__version__ = "0.1.0"

_moved.install()  # old module paths (kern.network, kern.checkpoint ...) still import, with a warning

__all__ = [
    "AdapterError",
    "Architecture",
    "CacheLayout",
    "ConfigError",
    "KernError",
    "ModelFile",
    "ModelFileError",
    "NetworkType",
    "Option",
    "PluginError",
    "TargetSpec",
    "TextCacheKey",
    "UsageError",
    "Variant",
    "WeightsClaim",
    "get_logger",
    "hookimpl",
]
