"""The ``kern`` command: a click group whose subcommands each live in ``kern_cli/commands/``.

Exit codes: 0 success, 2 usage or configuration error, 1 runtime failure.
"""

from __future__ import annotations

import sys

import click
import structlog

from kern.errors import KernError, UsageError
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
    """kern: train, generate with, merge and convert LoRA / LoHa adapters for diffusion transformers.

    Architectures (FLUX.2, Qwen-Image, ...) and adapter types (LoRA, LoHa, ...) come from plugins;
    `kern plugins` lists what is installed.
    """
    logsetup.configure(log_format, -1 if quiet else verbose)


for _command in COMMANDS:
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; maps kern's errors to exit codes instead of tracebacks."""
    try:
        code = cli.main(args=argv, prog_name="kern", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("kern: aborted", err=True)
        code = EXIT_FAILURE
    except click.ClickException as exc:  # click's own usage errors exit 2
        exc.show()
        code = exc.exit_code
    except KernError as exc:
        code = EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILURE
        if logsetup.state.format == "json":
            structlog.get_logger("kern_cli").error(str(exc), exit_code=code)
        else:
            click.echo(f"kern: error: {exc}", err=True)
    except KeyboardInterrupt:
        click.echo("kern: interrupted", err=True)
        code = 130
    except Exception:
        structlog.get_logger("kern_cli").exception("unexpected failure")
        code = EXIT_FAILURE
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
