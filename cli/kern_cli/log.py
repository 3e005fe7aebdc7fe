"""Logging set-up: the one place in kern that configures logging (library code only gets loggers)."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(fmt: str = "console", verbosity: int = 0) -> None:
    """Route structlog and stdlib logging to stderr as console text or JSON lines.

    ``verbosity``: -1 errors only, 0 warnings and info, 1 debug for kern, 2 debug for everything.
    """
    state.format = fmt
    state.verbosity = verbosity
    level = {-1: logging.ERROR, 0: logging.INFO, 1: logging.DEBUG}.get(min(verbosity, 1), logging.INFO)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso" if fmt == "json" else "%H:%M:%S"),
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 2 else level)
    # Chatty dependencies stay at WARNING unless -vv asks for everything.
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.NOTSET if verbosity >= 2 else logging.WARNING)


class state:  # what configure() last set, for the error path in main()
    format = "console"
    verbosity = 0


NOISY = ("accelerate", "diffusers", "filelock", "httpx", "PIL", "torch", "transformers", "urllib3")
