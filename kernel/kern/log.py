"""kern's loggers: structlog loggers over the standard library's ``logging``.

A program that uses kern as a library sees kern's messages only where it set up ``logging`` itself (until then,
warnings and errors reach stderr through Python's last-resort handler and info and debug stay quiet), as it
expects of any library. The ``kern`` command sets up both in ``kern_cli.log``; nothing in the library does.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog


def get_logger(name: str) -> Any:
    """A structlog logger named ``name`` (use ``__name__``) that hands its events to ``logging.getLogger(name)``.

    Processors are looked up when the logger is used, so whatever ``structlog.configure`` the program (or the
    ``kern`` command) runs later applies to loggers made at import time."""
    return structlog.wrap_logger(logging.getLogger(name), wrapper_class=structlog.stdlib.BoundLogger)
