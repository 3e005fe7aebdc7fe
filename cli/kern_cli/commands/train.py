"""``kern train``: train an adapter from a job TOML and/or command-line options."""

from __future__ import annotations

from typing import Any

import click
from kern.core import config as kconfig
from kern.errors import UsageError


def _pairs(values: tuple[str, ...], option: str) -> list[tuple[str, Any]]:
    out = []
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} {item!r}: expected KEY=VALUE")
        out.append((key.strip(), kconfig.parse_value(value.strip())))
    return out


@click.command(name="train")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Job TOML ([model], [network], [dataset], [train], ...).",
)
@click.option(
    "--preset",
    metavar="NAME",
    help="Start from a preset per card, e.g. flux2-klein-4b-12gb (docs/training.md lists them); the job file's "
    "keys and the other options override it.",
)
@click.option("--arch", help="Architecture or variant alias, e.g. flux2-klein-4b (overrides model.arch).")
@click.option(
    "--model",
    "model_path",
    metavar="FOLDER|ORG/NAME[@REV]",
    help="Every model part at once: a diffusers folder or Hugging Face repo id, or a ComfyUI models/ folder "
    "(overrides model.path; model.transformer / vae / text_encoder still win).",
)
@click.option(
    "--network", help="Adapter type: lora (network.dora for DoRA), loha, lokr, or a plugin's (overrides network.type)."
)
@click.option("--dataset", help="Dataset TOML (overrides dataset.config).")
@click.option("--out", help="Run folder (overrides save.out).")
@click.option("--steps", type=int, help="Training steps (overrides train.steps).")
@click.option("--lr", type=float, help="Learning rate (overrides train.learning_rate).")
@click.option(
    "--network-opt",
    "network_opts",
    multiple=True,
    metavar="KEY=VALUE",
    help="Network option, e.g. rank=16 (repeatable).",
)
@click.option(
    "--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Any config key, e.g. train.seed=1 (repeatable)."
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from the newest intact checkpoint in the run folder; with --steps N above its steps, a finished "
    "run trains on to N.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an earlier run in the run folder (its adapter, checkpoints, samples, logs).",
)
def command(
    config_path, preset, arch, model_path, network, dataset, out, steps, lr, network_opts, sets, resume, overwrite
) -> None:
    """Train an adapter (LoRA, DoRA, LoHa, LoKr or a plugin's type).

    Values come from the preset (--preset), then the job file, then command-line options override them. Everything
    is checked before any work; a folder holding an earlier run needs --resume or --overwrite. Ctrl-C (SIGINT) or
    SIGTERM finishes the step, writes a checkpoint and exits (130 / 143); --resume continues from it. Examples:

        kern train --arch flux2-klein-4b --network loha --dataset dataset.toml --out runs/x
        kern train --preset flux2-klein-4b-12gb --model black-forest-labs/FLUX.2-klein-base-4B --dataset d.toml
    """
    overrides: dict[str, Any] = {}
    for key, value in (
        ("preset", preset),
        ("model.arch", arch),
        ("model.path", model_path),
        ("network.type", network),
        ("dataset.config", dataset),
        ("save.out", out),
        ("train.steps", steps),
        ("train.learning_rate", lr),
    ):
        if value is not None:
            overrides[key] = value
    overrides.update({f"network.{k}": v for k, v in _pairs(network_opts, "--network-opt")})
    overrides.update(dict(_pairs(sets, "--set")))
    from kern.train.presets import read_preset

    job = kconfig.load_job(config_path, overrides, read_preset)

    from kern.train import driver as train

    train.run(job, resume=resume, overwrite=overwrite)
