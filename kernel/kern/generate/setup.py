"""What one ``kern generate`` run is given (:class:`Setup`) and the checks on it that need no model: the
device, the numbers' options, whether an adapter was made for this architecture."""

from __future__ import annotations

from pathlib import Path

import attrs
import torch

from kern.errors import UsageError
from kern.records import Architecture

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PART_OPTIONS = {"transformer": "--transformer", "vae": "--vae", "text_encoder": "--text-encoder"}
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


def _same_arch(made_for: str, arch: Architecture) -> bool:
    names = {arch.name, *arch.aliases, *(a for v in arch.variants for a in v.aliases)}
    norm = lambda s: s.lower().replace(".", "").replace("-", "").replace("_", "")  # noqa: E731
    made = norm(made_for)
    return any(made == norm(n) or made.startswith(norm(arch.name)) for n in names)
