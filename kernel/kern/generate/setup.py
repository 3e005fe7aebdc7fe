"""What one ``kern generate`` run is given (:class:`Setup`) and the checks on it that need no model: the
device, the numbers' options, whether an adapter was made for this architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from kern.errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PART_OPTIONS = {"transformer": "--transformer", "vae": "--vae", "text_encoder": "--text-encoder", "path": "--model"}
# The run's defaults, each checked with kern.data.prompts.check_value, and the option that sets it.
SETUP_NUMBERS = {
    "width": "--width",
    "height": "--height",
    "steps": "--steps",
    "guidance": "--guidance",
    "seed": "--seed",
    "count": "--count",
    "layers": "--layers",
    "batch_size": "--batch-size",
}


@attrs.define
class Setup:
    """Everything about a generation run except the prompts."""

    arch: str
    variant: str | None = None
    path: str | None = None  # --model: one diffusers / ComfyUI folder or repo id for every part (kern.models.sources)
    transformer: str | None = None
    vae: str | None = None
    text_encoder: str | None = None
    dtype: str = "bfloat16"
    device: str | None = None
    weights: list[tuple[str, float]] = attrs.Factory(list)
    merge: bool = False
    out: Path = Path("outputs")
    wildcards: str | None = None
    grid: bool = False
    batch_size: int = 1
    # defaults for what a prompt line does not set
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    count: int = 1
    negative: str | None = None
    fp8_text_encoder: bool = False
    references: list[str] = attrs.Factory(list)  # reference / control images for every prompt
    layers: int | None = None  # layered variants: output layers besides the composite (default: the plugin's)
    auto_caption: str | None = None  # "en" / "zh": prompts left empty are written by the text encoder from the image
    compile: str = "off"  # "blocks": compile the transformer's repeated blocks (kern.gpu.accel.apply_inference)
    attention: str = "auto"  # the SDPA backend on CUDA (kern.gpu.accel)


def _device(name: str | None) -> torch.device:
    """``--device`` as a torch device, checked to exist here (a typo or a missing GPU fails before any work)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: there are {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise UsageError(f"--device {name}: kern generates on cpu or cuda (or mps / xpu), not {device.type}")
    return device


def resolve_files(setup: Setup, arch: str, variant: str | None, hook: Any) -> None:
    """Each part named by its option or by ``--model``, resolved once to local files (a path, a Hugging Face repo id
    through its cache, a ComfyUI or diffusers folder) and identified by its keys (``kern.models.sources``); the
    setup then holds the local paths."""
    from kern.models import sources

    given = {part: getattr(setup, part) for part in sources.PARTS}
    resolved = sources.resolve_parts(
        given, setup.path, sources.PARTS, arch=arch, variant=variant, hook=hook, options=PART_OPTIONS
    )
    for part, path in resolved.items():
        setattr(setup, part, path)
