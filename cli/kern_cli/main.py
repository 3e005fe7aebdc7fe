"""The ``kern`` command: a click group whose subcommands each live in ``kern_cli/commands/``.

Exit codes: 0 success, 2 usage or configuration error, 1 runtime failure.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback

import click
import structlog
from kern.errors import Interrupted, KernError, UsageError

from kern_cli import log as logsetup
from kern_cli.commands import COMMANDS

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--log-format",
    type=click.Choice(["console", "json"]),
    default="console",
    envvar="KERN_LOG_FORMAT",
    show_default=True,
    help="Log lines for people (console) or machines (json lines), on stderr.",
)
@click.option("-v", "--verbose", count=True, help="More detail: -v debug for kern, -vv debug for everything.")
@click.option("-q", "--quiet", is_flag=True, help="Errors only.")
@click.version_option(package_name="kern-tuner", prog_name="kern")
def cli(log_format: str, verbose: int, quiet: bool) -> None:
    """kern: train, generate with, merge and convert LoRA, DoRA, LoHa and LoKr adapters for diffusion transformers.

    Architectures (FLUX.2, Qwen-Image, ...) and adapter types (LoRA, LoHa, ...) come from plugins;
    `kern plugins` lists what is installed.
    """
    logsetup.configure(log_format, -1 if quiet else verbose)


for _command in COMMANDS:
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: kern's errors, the environment's limits (disk full, read-only folders, memory) and
    interruptions become one line on stderr and an exit code; the traceback is shown only with -vv."""
    try:
        code = cli.main(args=argv, prog_name="kern", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("kern: aborted", err=True)
        code = EXIT_FAILURE
    except click.ClickException as exc:  # click's own usage errors exit 2
        exc.show()
        code = exc.exit_code
    except Interrupted as exc:
        code = _report(str(exc), exc.exit_code, prefix="kern: ")
    except KeyboardInterrupt:
        code = _report("interrupted", 130, prefix="kern: ")
    except KernError as exc:
        code = _report(str(exc), EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILURE)
    except BrokenPipeError:  # `kern plugins | head`: the reader left; say nothing more
        sys.stdout = open(os.devnull, "w")
        code = EXIT_FAILURE
    except Exception as exc:
        code = _report(describe_failure(exc), EXIT_FAILURE)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


def _report(message: str, code: int, prefix: str = "kern: error: ") -> int:
    """One line (or one JSON log line) per failure; the traceback follows only with -vv."""
    if logsetup.state.format == "json":
        structlog.get_logger("kern_cli").error(message, exit_code=code, exc_info=logsetup.state.verbosity >= 2)
        return code
    click.echo(prefix + message, err=True)
    if logsetup.state.verbosity >= 2:
        click.echo(traceback.format_exc().rstrip(), err=True)
    return code


def describe_failure(exc: BaseException) -> str:
    """A user's words for what the environment refused, or for an error kern did not expect."""
    if isinstance(exc, OSError):
        where = next((str(f) for f in (exc.filename, exc.filename2) if f), "")
        reason = {
            errno.ENOSPC: "no space left on device; free some space or write somewhere else",
            errno.EDQUOT: "disk quota exceeded; free some space or write somewhere else",
            errno.EROFS: "read-only file system; write somewhere else",
            errno.EACCES: "permission denied; choose a path you can write to (or read)",
            errno.EPERM: "operation not permitted; choose another path",
            errno.ENOENT: "no such file or folder",
            errno.EISDIR: "is a folder, not a file",
            errno.ENOTDIR: "a part of this path is not a folder",
            errno.ENAMETOOLONG: "file name too long",
        }.get(exc.errno or -1, exc.strerror or str(exc))
        return f"{where}: {reason}" if where else reason
    text = str(exc)
    if "No space left on device" in text or "os error 28" in text:
        return "no space left on device; free some space or write somewhere else"
    if isinstance(exc, MemoryError):
        return "out of memory (CPU RAM); use a smaller batch, fewer images per step or a smaller model"
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
        return (
            "out of GPU memory; see docs/memory.md for the settings that fit your card "
            '(train.base_precision = "fp8", train.blocks_to_swap, gradient checkpointing)'
        )
    if isinstance(exc, UnicodeError):
        return f"a file is not UTF-8 text ({exc}); save it as UTF-8"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return (
        f"unexpected {type(exc).__name__}{': ' + first[:500] if first else ''} "
        "(a bug in kern or a plugin; run with -vv for the traceback and report it)"
    )


if __name__ == "__main__":
    main()
