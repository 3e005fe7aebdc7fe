"""``kern convert``: rewrite an adapter in another layout (kohya, ComfyUI, diffusers)."""

from __future__ import annotations

import os

import click
import structlog

log = structlog.get_logger(__name__)


@click.command(name="convert")
@click.argument("in_path", metavar="IN")
@click.option(
    "--to", "to_layout", required=True, type=click.Choice(["kohya", "comfyui", "diffusers"]), help="Target layout."
)
@click.option(
    "--arch", "arch", required=True, help="Architecture or variant alias (for its module names), e.g. flux2-klein-4b."
)
@click.option("--variant", default=None, help="Variant, if --arch does not say it (default: detected from the file).")
@click.option("--out", "out", required=True, help="File to write (never IN itself).")
@click.option(
    "--overwrite", is_flag=True, help="Replace --out if it exists (atomically, once the conversion has succeeded)."
)
@click.option(
    "--model",
    "model",
    default=None,
    metavar="BASE",
    help="Base checkpoint the adapter was trained on (as kern merge --model reads it). Needed for a DoRA to or from "
    "ComfyUI (which normalises DoRA by the base weight); ignored by other conversions.",
)
def command(in_path, to_layout, arch, variant, out, overwrite, model) -> None:
    """Convert an adapter between layouts.

    kohya: lora_unet_* with lora_down/lora_up and alpha (musubi-tuner; ComfyUI and diffusers load it).
    comfyui: diffusion_model.<native name>.lora_A/lora_B with alpha folded in (the safest export).
    diffusers: transformer.<diffusers name>.lora_A/lora_B (FLUX.2 qkv split into q/k/v). diffusers cannot load
    LoHa: that is a usage error (exit 2; use --to comfyui, or kern merge). Adapters of any size convert (row
    counts are read from the file, e.g. a tiny model's). --out is written atomically; an existing one is replaced
    only with --overwrite. A DoRA for ComfyUI needs --model BASE: ComfyUI divides the magnitude by the base weight's
    norms, so kern writes it from the base weights to give PEFT's result exactly (without --model: exit 2). Example:

        kern convert my_lora.safetensors --to comfyui --arch flux2-klein-4b --out my_lora_comfy.safetensors
        kern convert my_dora.safetensors --to comfyui --arch flux2-klein-4b --model flux2-klein-4b.safetensors --out my_dora_comfy.safetensors
    """
    from kern.adapters.convert import convert

    from kern_cli.commands.merge import hub_file, input_file

    input_file(in_path, "IN")
    if model is not None:
        model = hub_file(model)
        if not os.path.isdir(model):  # a diffusers folder's transformer shards are read too
            input_file(model, "--model")
    result = convert(in_path, out, to_layout, arch, variant, overwrite=overwrite, model=model)
    click.echo(
        f"converted {result['network_type']} {result['from_layout']} → {result['to_layout']} "
        f"({result['tensors']} tensors, variant {result['variant']}): {result['out']}"
    )
