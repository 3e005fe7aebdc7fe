"""``kern merge``: bake one or more adapters into a base checkpoint (streaming, one tensor at a time)."""

from __future__ import annotations

import click
import structlog
from kern.errors import UsageError

log = structlog.get_logger(__name__)


def input_file(path: str, option: str) -> str:
    """``path`` if it is an existing regular file; ``UsageError`` naming ``option`` otherwise."""
    import os

    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a folder; give the .safetensors file")
    if not os.path.isfile(path):
        raise UsageError(f"{option} {path}: {'no such file' if not os.path.lexists(path) else 'not a regular file'}")
    return path


def hub_file(spec: str) -> str:
    """A base checkpoint named inside a Hugging Face repo, fetched through its cache; a local path as it is."""
    import os

    from kern.core.repo_ids import parse

    ref = parse(spec)
    if os.path.lexists(spec) or ref is None or not ref.is_file:
        return spec
    from kern.models import hub

    return str(hub.resolve(spec, option="--model"))


@click.command(name="merge")
@click.option(
    "--model",
    "model",
    required=True,
    help="Base checkpoint (.safetensors), or one in a Hugging Face repo: ORG/NAME[@REV]/PATH/FILE.safetensors.",
)
@click.option(
    "--weights",
    "weights",
    multiple=True,
    metavar="FILE[:MULT]",
    help="Adapter file with an optional multiplier, e.g. style.safetensors:0.8 (repeatable; LoRA, DoRA, LoHa and LoKr mix).",
)
@click.option("--out", "out", required=True, help="Merged checkpoint to write (never one of the inputs).")
@click.option(
    "--overwrite", is_flag=True, help="Replace --out if it exists (atomically, once the merge has succeeded)."
)
@click.option(
    "--dtype",
    "dtype",
    default=None,
    help="Output dtype of floating-point tensors: float32, bfloat16, float16, float8_e4m3fn. Default: keep each (fp8 → bfloat16).",
)
@click.option(
    "--allow-unmatched", is_flag=True, help="Warn about adapter modules that match no base weight instead of failing."
)
@click.option(
    "--arch",
    default=None,
    help="Architecture (or variant alias): maps adapters in another naming (diffusers) onto the base.",
)
@click.option("--variant", default=None, help="Variant of --arch, if the alias does not say it.")
def command(model, weights, out, overwrite, dtype, allow_unmatched, arch, variant) -> None:
    """Merge adapters into a base model: W' = W + Σ mult · ΔW, computed in float32.

    Reads and writes one tensor at a time, so memory stays near one weight whatever the model size. Base
    files may carry a model.diffusion_model. / diffusion_model. prefix; adapters may be kohya, ComfyUI or
    diffusers files. Everything is checked before the merge starts; --out is written atomically and is
    never an input; an existing --out is replaced only with --overwrite. Example:

        kern merge --model flux2-klein-4b.safetensors --weights a.safetensors --weights b.safetensors:0.5 --out merged.safetensors
    """
    from kern.adapters.merge import merge, parse_dtype
    from kern.adapters.weights import parse_weights_arg

    out_dtype = parse_dtype(dtype)
    if not weights:
        raise UsageError("give at least one adapter with --weights FILE[:MULT]")
    model = hub_file(model)
    input_file(model, "--model")
    adapters = [parse_weights_arg(w) for w in weights]
    result = merge(
        model,
        adapters,
        out,
        out_dtype=out_dtype,
        allow_unmatched=allow_unmatched,
        arch=arch,
        variant=variant,
        overwrite=overwrite,
    )
    click.echo(f"merged {result['merged']} weights from {len(adapters)} adapter(s) into {result['out']}")
