"""``kern generate``: images from any architecture, one prompt, a prompt file, or interactively."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kern.errors import UsageError


def parse_weights(values: tuple[str, ...]) -> list[tuple[str, float]]:
    """``FILE[:multiplier]`` items, each checked to exist; a file whose name has a colon stays whole."""
    from kern.weights import parse_weights_arg

    out = [(item, 1.0) if Path(item).is_file() else parse_weights_arg(item) for item in values]
    for path, _ in out:
        if not Path(path).is_file():
            raise UsageError(f"--weights {path}: no such file")
    return out


@click.command(name="generate")
@click.option("--arch", required=True, help="Architecture or variant alias, e.g. flux2-klein-4b.")
@click.option("--variant", help="Force a variant instead of detecting it from the checkpoint.")
@click.option("--transformer", "--model", "transformer", help="Transformer checkpoint (file or diffusers folder).")
@click.option("--vae", help="VAE checkpoint.")
@click.option("--text-encoder", help="Text encoder folder.")
@click.option("--prompt", "-p", help="The prompt (or the base prompt for option-only lines of --from-file).")
@click.option("--negative-prompt", "-n", help="Negative prompt (used by true-CFG variants).")
@click.option("--width", "-W", type=int, help="Image width (default: the variant's).")
@click.option("--height", "-H", type=int, help="Image height (default: the variant's).")
@click.option("--steps", type=int, help="Denoising steps (default: the variant's).")
@click.option("--guidance", "--cfg", "guidance", type=float, help="Guidance scale (embedded or true CFG, as the variant uses).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the first image; later images count up.")
@click.option("--count", type=int, default=1, show_default=True, help="Images per prompt.")
@click.option("--out", type=click.Path(file_okay=False), default="outputs", show_default=True, help="Output folder.")
@click.option("--ref", "references", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="Reference / control image (FLUX.2 references, Qwen-Image edit controls); repeatable. Per line: --ci PATH.")
@click.option("--weights", multiple=True, metavar="FILE[:MULT]", help="Adapter (LoRA or LoHa, detected) with an optional multiplier; repeatable.")
@click.option("--merge", is_flag=True, help="Merge adapters into the weights (faster steps, no per-step adapter cost).")
@click.option("--from-file", type=click.Path(dir_okay=False), help="Prompt file: one prompt per line with --w --h --d --s --g --n --f options.")
@click.option("--wildcards", type=click.Path(file_okay=False), help="Folder of NAME.txt files for __NAME__ in prompts.")
@click.option("--interactive", "-i", is_flag=True, help="Read prompts from stdin, one per line; models stay loaded.")
@click.option("--grid", is_flag=True, help="Also write grid.png with every image of the run.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Images denoised together (same size and settings).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@click.option("--fp8-text-encoder", is_flag=True, help="Store text-encoder weights in float8 (less memory).")
@click.option("--layers", type=click.IntRange(min=1), help="Layered variants: output layers besides the composite (default 4). Per line: --layers N.")
@click.option("--auto-caption-lang", type=click.Choice(["en", "zh"]),
              help="Caption the input image with the text encoder for prompts left empty (Qwen-Image-Layered).")
@click.option("--compile", "compile_blocks", is_flag=True,
              help="Compile the transformer's blocks (torch.compile): faster steps after a 20-50 s first image; for long batches.")
def command(arch, variant, transformer, vae, text_encoder, prompt, negative_prompt, width, height, steps, guidance, seed,
            count, out, references, weights, merge, from_file, wildcards, interactive, grid, batch_size, dtype, device, fp8_text_encoder,
            layers, auto_caption_lang, compile_blocks) -> None:
    """Generate images, with adapters, from a prompt, a prompt file or interactively.

    \b
    kern generate --arch flux2-klein-4b --transformer flux-2-klein-4b.safetensors \\
        --vae ae.safetensors --text-encoder qwen3-4b/ -p "a cat" --weights my_lora.safetensors:0.8
    """
    from kern import generate, prompts

    if sum(bool(x) for x in (from_file, interactive)) > 1:
        raise UsageError("use either --from-file or --interactive, not both")
    if prompt is None and auto_caption_lang:
        prompt = ""  # every prompt is written from its image
    if prompt is None and not (from_file or interactive):
        raise UsageError("give --prompt, --from-file, --interactive or --auto-caption-lang")
    if count < 1:
        raise UsageError("--count must be at least 1")
    setup = generate.Setup(
        arch=arch, variant=variant, transformer=transformer, vae=vae, text_encoder=text_encoder, dtype=dtype, device=device,
        weights=parse_weights(weights), merge=merge, out=Path(out), wildcards=wildcards, grid=grid, batch_size=batch_size,
        width=width, height=height, steps=steps, guidance=guidance, seed=seed, count=count, negative=negative_prompt,
        fp8_text_encoder=fp8_text_encoder, references=list(references), layers=layers, auto_caption=auto_caption_lang,
        compile="blocks" if compile_blocks else "off",
    )
    if interactive:
        generate.run_interactive(setup, sys.stdin, prompt, lambda s: click.echo(s))
        return
    if from_file:
        requests = prompts.read_prompt_file(from_file, base_prompt=prompt)
    else:
        requests = [prompts.Request(prompt=prompt)]
    paths = generate.run_batch(setup, requests)
    for p in paths:
        click.echo(str(p))
