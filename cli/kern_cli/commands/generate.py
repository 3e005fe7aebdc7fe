"""``kern generate``: images from any architecture, one prompt, a prompt file, or interactively.

Every option is checked before any model loads: numbers against ``kern.data.prompts.LIMITS`` (click names the
option), model paths exist, ``--out`` is a writable folder (``kern.generate.driver``); then the prompts and every
image's final settings (``Generator.plan``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click
from kern.data.prompts import LIMITS
from kern.errors import UsageError


def parse_weights(values: tuple[str, ...]) -> list[tuple[str, float]]:
    """``FILE[:multiplier]`` items, each checked to exist with a finite multiplier; a file whose name has a colon stays whole."""
    from kern.adapters.weights import parse_weights_arg

    out = [(item, 1.0) if Path(item).is_file() else parse_weights_arg(item) for item in values]
    for path, multiplier in out:
        if not Path(path).is_file():
            raise UsageError(f"--weights {path}: no such file")
        if not math.isfinite(multiplier):
            raise UsageError(f"--weights {path}:{multiplier}: the multiplier must be a finite number")
    return out


class FiniteFloat(click.ParamType):
    """A float that is neither nan nor infinite."""

    name = "float"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def bounded(field: str) -> click.IntRange:
    return click.IntRange(*LIMITS[field])


@click.command(name="generate")
@click.option("--arch", help="Architecture or variant alias, e.g. flux2-klein-4b (required unless --from-png).")
@click.option("--variant", help="Force a variant instead of detecting it from the checkpoint.")
@click.option(
    "--model",
    "model_path",
    metavar="FOLDER|ORG/NAME[@REV]",
    help="Every part at once: a diffusers folder or Hugging Face repo id, a ComfyUI models/ folder (files picked by "
    "their keys), or a single transformer file.",
)
@click.option(
    "--transformer",
    help="Transformer: checkpoint file, diffusers folder or repo id ORG/NAME[@REV][/PATH] (wins over --model).",
)
@click.option("--vae", help="VAE: file, folder or repo id (wins over --model).")
@click.option("--text-encoder", help="Text encoder: single file, transformers folder or repo id (wins over --model).")
@click.option("--prompt", "-p", help="The prompt (or the base prompt for option-only lines of --from-file).")
@click.option("--negative-prompt", "-n", help="Negative prompt (used by true-CFG variants).")
@click.option(
    "--width",
    "-W",
    type=bounded("width"),
    help="Image width (default: the variant's); a multiple of the architecture's step.",
)
@click.option(
    "--height",
    "-H",
    type=bounded("height"),
    help="Image height (default: the variant's); a multiple of the architecture's step.",
)
@click.option("--steps", type=bounded("steps"), help="Denoising steps (default: the variant's).")
@click.option(
    "--guidance",
    "--cfg",
    "guidance",
    type=FiniteFloat(),
    help="Guidance scale (embedded or true CFG, as the variant uses).",
)
@click.option(
    "--seed", type=bounded("seed"), default=0, show_default=True, help="Seed of the first image; later images count up."
)
@click.option("--count", type=bounded("count"), default=1, show_default=True, help="Images per prompt.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="outputs",
    show_default=True,
    help="Output folder; images already there are never replaced (new ones get the next free names).",
)
@click.option(
    "--ref",
    "references",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True),
    help="Reference / control image (FLUX.2 references, Qwen-Image edit controls); repeatable. Per line: --ci PATH.",
)
@click.option(
    "--weights",
    multiple=True,
    metavar="FILE[:MULT]",
    help="Adapter (LoRA, DoRA, LoHa or LoKr, detected) with an optional multiplier; repeatable.",
)
@click.option("--merge", is_flag=True, help="Merge adapters into the weights (faster steps, no per-step adapter cost).")
@click.option(
    "--from-file",
    type=click.Path(dir_okay=False),
    help="Prompt file: one prompt per line with --w --h --d --s --g --n --f options.",
)
@click.option(
    "--from-png",
    type=click.Path(dir_okay=False, exists=True),
    help="Make an image kern generated again, from the settings in its metadata; options given here override them.",
)
@click.option(
    "--wildcards",
    type=click.Path(file_okay=False, exists=True),
    help="Folder of NAME.txt files for __NAME__ in prompts.",
)
@click.option("--interactive", "-i", is_flag=True, help="Read prompts from stdin, one per line; models stay loaded.")
@click.option("--grid", is_flag=True, help="Also write grid.png with every image of the run.")
@click.option(
    "--batch-size",
    type=bounded("batch_size"),
    default=1,
    show_default=True,
    help="Images denoised together (same size and settings).",
)
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@click.option("--fp8-text-encoder", is_flag=True, help="Store text-encoder weights in float8 (less memory).")
@click.option(
    "--layers",
    type=bounded("layers"),
    help="Layered variants: output layers besides the composite (default 4). Per line: --layers N.",
)
@click.option(
    "--auto-caption-lang",
    type=click.Choice(["en", "zh"]),
    help="Caption the input image with the text encoder for prompts left empty (Qwen-Image-Layered).",
)
@click.option(
    "--compile",
    "compile_blocks",
    is_flag=True,
    help="Compile the transformer's blocks (torch.compile): faster steps after a 20-50 s first image; for long batches.",
)
def command(
    arch,
    variant,
    model_path,
    transformer,
    vae,
    text_encoder,
    prompt,
    negative_prompt,
    width,
    height,
    steps,
    guidance,
    seed,
    count,
    out,
    references,
    weights,
    merge,
    from_file,
    from_png,
    wildcards,
    interactive,
    grid,
    batch_size,
    dtype,
    device,
    fp8_text_encoder,
    layers,
    auto_caption_lang,
    compile_blocks,
) -> None:
    """Generate images, with adapters, from a prompt, a prompt file or interactively.

    \b
    kern generate --arch flux2-klein-4b --transformer flux-2-klein-4b.safetensors \\
        --vae ae.safetensors --text-encoder qwen_3_4b.safetensors -p "a cat" --weights my_lora.safetensors:0.8
    kern generate --arch qwen-image --model Qwen/Qwen-Image -p "a cat"
    """
    from kern.data import prompts
    from kern.generate import driver as generate

    if from_file and interactive:
        raise UsageError("use either --from-file or --interactive, not both")
    values = dict(
        arch=arch,
        variant=variant,
        path=model_path,
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        dtype=dtype,
        weights=weights,
        merge=merge,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        seed=seed,
        negative=negative_prompt,
        fp8_text_encoder=fp8_text_encoder,
        references=list(references),
        layers=layers,
        prompt=prompt,
    )
    if from_png:
        if from_file or interactive:
            raise UsageError("--from-png makes one image's settings again: drop --from-file / --interactive")
        values = _from_png(from_png, values)
    else:
        values["weights"] = parse_weights(weights)
    prompt = values.pop("prompt")
    if not values["arch"]:
        raise UsageError("give --arch (or --from-png IMAGE made by kern)")
    if prompt is None and auto_caption_lang:
        prompt = ""  # every prompt is written from its image
    if prompt is None and not (from_file or interactive):
        raise UsageError("give --prompt, --from-file, --interactive, --from-png or --auto-caption-lang")
    setup = generate.Setup(
        **values,
        device=device,
        out=Path(out),
        wildcards=wildcards,
        grid=grid,
        batch_size=batch_size,
        count=count,
        auto_caption=auto_caption_lang,
        compile="blocks" if compile_blocks else "off",
    )
    if interactive:
        # Bytes, decoded line by line: one line that is not UTF-8 is reported, it does not end the session.
        generate.run_interactive(setup, sys.stdin.buffer, prompt, lambda s: click.echo(s))
        return
    if from_file:
        requests = prompts.read_prompt_file(from_file, base_prompt=prompt)
    else:
        requests = [prompts.Request(prompt=prompt)]
    paths = generate.run_batch(setup, requests)
    for p in paths:
        click.echo(str(p))


# The command's parameter that overrides each setting read from an image (--from-png).
FROM_PNG_PARAMS = {
    "arch": "arch",
    "variant": "variant",
    "path": "model_path",
    "transformer": "transformer",
    "vae": "vae",
    "text_encoder": "text_encoder",
    "dtype": "dtype",
    "weights": "weights",
    "merge": "merge",
    "width": "width",
    "height": "height",
    "steps": "steps",
    "guidance": "guidance",
    "seed": "seed",
    "negative": "negative_prompt",
    "fp8_text_encoder": "fp8_text_encoder",
    "references": "references",
    "layers": "layers",
    "prompt": "prompt",
}


def _from_png(png: str, given: dict) -> dict:
    """The settings stored in ``png`` (``kern.generate.pnginfo``), each replaced by its option when that was
    given on the command line (or in the environment), not left at its default."""
    from click.core import ParameterSource
    from kern.generate import pnginfo

    ctx = click.get_current_context()
    given_now = lambda param: ctx.get_parameter_source(param) not in (None, ParameterSource.DEFAULT)  # noqa: E731
    values = pnginfo.rerun_settings(pnginfo.read_meta(png))
    for field, param in FROM_PNG_PARAMS.items():
        if given_now(param):
            values[field] = parse_weights(given[field]) if field == "weights" else given[field]
    if given_now("model_path"):  # --model now supplies every part not named on the command line
        for part in ("transformer", "vae", "text_encoder"):
            values[part] = given[part]
    return values
