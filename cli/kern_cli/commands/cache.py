"""``kern cache latents|text``: fill a dataset's caches ahead of training."""

from __future__ import annotations

import click
from kern.core import config as kconfig


@click.command(name="cache")
@click.argument("what", type=click.Choice(["latents", "text", "all"]))
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="Job TOML (its [model] and [dataset] are used)."
)
@click.option("--arch", help="Architecture or variant alias (overrides model.arch).")
@click.option("--dataset", help="Dataset TOML (overrides dataset.config).")
@click.option(
    "--model", "model_path", help="Diffusers or ComfyUI folder or repo id for every part (overrides model.path)."
)
@click.option("--vae", help="VAE: file, folder or repo id (overrides model.vae).")
@click.option("--text-encoder", help="Text encoder: file, folder or repo id (overrides model.text_encoder).")
@click.option(
    "--transformer", help="Transformer checkpoint, only read to detect the variant (overrides model.transformer)."
)
def command(what, config_path, arch, dataset, model_path, vae, text_encoder, transformer) -> None:
    """Encode a dataset's images (latents) and captions (text) into its cache directories.

    Caches are reused when the image, caption and settings are unchanged, and rebuilt when they
    change; `kern train` fills missing caches by itself, so this is for doing it ahead of time
    (e.g. on another machine) or for checking a dataset.
    """
    overrides = {
        k: v
        for k, v in (
            ("model.arch", arch),
            ("dataset.config", dataset),
            ("model.path", model_path),
            ("model.vae", vae),
            ("model.text_encoder", text_encoder),
            ("model.transformer", transformer),
        )
        if v
    }
    from kern.train.presets import read_preset

    job = kconfig.load_job(config_path, overrides, read_preset)  # a job file may start from a preset
    from kern.train.caching import cache_only

    counts = cache_only(job, text=what in ("text", "all"), latents=what in ("latents", "all"))
    for name, (encoded, total) in counts.items():
        click.echo(f"{name}: {encoded} encoded, {total - encoded} reused")
