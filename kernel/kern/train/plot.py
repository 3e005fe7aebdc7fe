"""A loss curve as a PNG, drawn with Pillow so training needs no plotting library."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from kern.core.io import atomic_path

Series = dict[str, list[tuple[int, float]]]
COLOURS = {"loss": (170, 190, 230), "smoothed": (20, 60, 160), "val_loss": (220, 110, 20)}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the raw curve of a small batch is mostly noise)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def series(losses: Sequence[float], validation: Sequence[tuple[int, float]] = ()) -> Series:
    """What :func:`loss_plot` draws, as (step, value) points: the training loss of each step (``loss``, from step 1),
    its moving average (``smoothed``) and the validation loss at the steps it was computed (``val_loss``)."""
    steps = range(1, len(losses) + 1)
    return {
        "loss": list(zip(steps, map(float, losses))),
        "smoothed": list(zip(steps, smooth(list(losses), max(1, len(losses) // 20)))),
        "val_loss": [(int(step), float(value)) for step, value in validation],
    }


def loss_plot(
    losses: Sequence[float],
    path: str | Path,
    validation: Sequence[tuple[int, float]] = (),
    width: int = 640,
    height: int = 360,
) -> Series:
    """Draw the training loss (raw and smoothed) and the validation loss (``(step, loss)`` pairs, a second series
    with its points marked) against the step into the PNG ``path``; returns what was drawn (:func:`series`)."""
    from PIL import Image, ImageDraw

    data = series(losses, validation)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 20, 20, height - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    points = [p for name in ("loss", "val_loss") for p in data[name]]
    if points:
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        span, first, last = (hi - lo) or 1.0, min(s for s, _ in points), max(s for s, _ in points)

        def xy(step: int, v: float) -> tuple[float, float]:
            x = left + (right - left) * ((step - first) / max(1, last - first))
            return x, bottom - (bottom - top) * (v - lo) / span

        for name, width_px in (("loss", 1), ("smoothed", 2), ("val_loss", 2)):
            line = [xy(s, v) for s, v in data[name]]
            if len(line) > 1:
                draw.line(line, fill=COLOURS[name], width=width_px)
        for x, y in (xy(s, v) for s, v in data["val_loss"]):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLOURS["val_loss"])
        draw.text((4, top), f"{hi:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.4g}", fill="black")
        draw.text((left, bottom + 8), f"step {first}", fill="black")
        draw.text((right - 60, bottom + 8), f"step {last}", fill="black")
    draw.text((left + 8, top + 4), "training loss (raw, smoothed)", fill=COLOURS["smoothed"])
    if data["val_loss"]:
        draw.text((left + 8, top + 18), "validation loss", fill=COLOURS["val_loss"])
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return data
