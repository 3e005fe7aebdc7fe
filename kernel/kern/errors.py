"""Errors the kernel and plugins raise. Each message names the file, key or option and says what to do.

The CLI maps ``UsageError`` (and its subclasses) to exit code 2 and every other ``KernError`` to 1.
"""


class KernError(Exception):
    """Base of kern's errors: a runtime failure with a message meant for the user."""


class UsageError(KernError):
    """Bad command-line or config input (exit code 2)."""


class ConfigError(UsageError):
    """A config file or option is wrong; the message names the file and the key."""


class PluginError(KernError):
    """A plugin failed to load or declared something that clashes with another plugin."""


class ModelFileError(KernError):
    """A model checkpoint is unreadable, of another architecture, or has missing/unexpected/mis-shaped keys."""


class AdapterError(KernError):
    """An adapter file is unreadable, of an unknown kind, or does not fit the model it is applied to."""


class DatasetError(UsageError):
    """A dataset config or dataset item is unusable; names the file and the key or item."""


class Interrupted(BaseException):
    """A run stopped by SIGINT / SIGTERM (``kern.train.runs.StopSignals``); the CLI exits with ``128 + signum`` (130, 143).

    A ``BaseException``, as ``KeyboardInterrupt`` is, so no ``except Exception`` on the way up turns it into
    another error."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
