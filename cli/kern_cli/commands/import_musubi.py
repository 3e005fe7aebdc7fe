"""``kern import musubi``: a musubi-tuner training command line (or its ``--config_file`` TOML) as a kern job."""

from __future__ import annotations

from pathlib import Path

import click


@click.group(name="import")
def command() -> None:
    """Turn another trainer's settings into a kern job TOML (see docs/migrating.md)."""


@command.command(name="musubi", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--file", "file", default=None, help="Read the musubi command line from this text file.")
@click.option("--out", "out", default=None, help="Write the job TOML here (default: stdout).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--arch", "arch", default=None, help="Architecture, when the command names no musubi script.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def musubi(file, out, overwrite, arch, args) -> None:
    """Translate a musubi-tuner training command (kern's options first, then the command as you ran it).

    Options kern cannot reproduce are refused (exit 2, each named with why); options with no meaning in kern
    (data-loader workers, --sdpa ...) are listed on stderr as ignored. Relative paths are made absolute from the
    current folder, where musubi read them. Example:

        kern import musubi --out job.toml accelerate launch src/musubi_tuner/flux_2_train_network.py --dit ...
    """
    from kern.core.config import dump_toml, load_job
    from kern.core.io import atomic_path
    from kern.core.plugins import get_manager
    from kern.errors import UsageError
    from kern.train import musubi_args, musubi_options
    from kern.train.setup import prepare

    tokens = list(args)
    if file is not None:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--file {file}: cannot read it ({exc.strerror or exc})") from None
        tokens = musubi_options.command_tokens(text) + tokens
    if not tokens:
        raise UsageError("give the musubi command line (after kern's options) or --file")
    cmd = musubi_options.split_command(tokens)
    options = dict(cmd.options)
    if "config_file" in options:  # musubi: the file's values, then the command line's over them
        options = {**_config_file(str(options.pop("config_file"))), **options}
    cmd = musubi_options.Command(cmd.script, options, cmd.launcher)
    manager = get_manager()
    forced = None
    if arch is not None:
        forced, _ = manager.resolve_arch(arch)
    architectures = list(manager.architectures.values())
    batches = _batches_per_epoch(cmd, architectures, forced)
    result = musubi_args.translate(cmd, architectures, manager.networks, arch=forced, batches_per_epoch=batches)
    for line in musubi_args.report(result):
        click.echo(line, err=True)
    if result.refused:
        raise UsageError(
            f"{len(result.refused)} musubi option(s) cannot be translated (listed above); remove or change them"
        )
    musubi_args.rebase_paths(result.job, Path.cwd())
    text = dump_toml(result.job)
    _check(result.job, dump_toml, load_job, prepare)
    if out is None:
        click.echo(text, nl=False)
        return
    if Path(out).exists() and not overwrite:
        raise UsageError(f"--out {out} exists; pass --overwrite to replace it")
    with atomic_path(out, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    click.echo(f"wrote {out}", err=True)


def _config_file(path: str) -> dict:
    """musubi's --config_file (".toml" added when missing, as musubi does)."""
    import tomllib

    from kern.errors import UsageError
    from kern.train.musubi_options import config_file_options

    p = Path(path if path.endswith(".toml") else path + ".toml")
    try:
        return config_file_options(tomllib.loads(p.read_text(encoding="utf-8")))
    except OSError as exc:
        raise UsageError(f"--config_file {p}: cannot read it ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config_file {p}: not valid TOML: {exc}") from None


def _batches_per_epoch(cmd, architectures, forced) -> int | None:
    """Batches of one epoch of the dataset, when an epoch count needs them and the dataset can be read now."""
    wanted = ("max_train_epochs", "save_every_n_epochs", "sample_every_n_epochs")
    config = cmd.options.get("dataset_config")
    if not any(k in cmd.options for k in wanted) or config is None:
        return None
    arch = forced or next((a for a in architectures if a.musubi_script and a.musubi_script == cmd.script), None)
    if arch is None:
        return None
    from kern.data import batch_order, load_dataset_config, scan_items
    from kern.errors import KernError

    try:
        specs = load_dataset_config(config)
        items = scan_items(specs, arch.resolution_step)
    except (KernError, OSError) as exc:
        click.echo(f"note: cannot count an epoch of {config}: {exc}", err=True)
        return None
    return len(batch_order(items, specs, 0, 0))


def _check(job: dict, dump_toml, load_job, prepare) -> None:
    """The job reads back and resolves (architecture, variant, network, timestep and optimizer settings) as kern
    train would. The optimizer's package need only be installed where the job trains: a missing one is a note."""
    import copy
    import tempfile

    from kern.errors import ConfigError, UsageError

    with tempfile.TemporaryDirectory() as folder:
        p = Path(folder) / "job.toml"
        for attempt in range(2):
            p.write_text(dump_toml(job), encoding="utf-8")
            try:
                prepare(load_job(p))
                return
            except ConfigError as exc:
                message = str(exc).replace(str(p), "the translated job")
                if attempt == 0 and "no module named" in message and "train.optimizer" in message:
                    click.echo(f"note: {message} (needed where you train)", err=True)
                    job = copy.deepcopy(job)
                    for key in ("optimizer", "optimizer_args"):
                        job["train"].pop(key, None)
                    continue
                raise UsageError(f"the translated job is not one kern accepts: {message}") from None
