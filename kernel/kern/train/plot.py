"""A loss curve as a PNG, drawn with Pillow so training needs no plotting library."""

from __future__ import annotations

from pathlib import Path

from kern.core.io import atomic_path


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the raw curve of a small batch is mostly noise)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_plot(losses: list[float], path: str | Path, width: int = 640, height: int = 360) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 20, 20, height - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    if losses:
        lo, hi = min(losses), max(losses)
        span = (hi - lo) or 1.0

        def xy(i: int, v: float) -> tuple[float, float]:
            x = left + (right - left) * (i / max(1, len(losses) - 1))
            return x, bottom - (bottom - top) * (v - lo) / span

        draw.line([xy(i, v) for i, v in enumerate(losses)], fill=(170, 190, 230), width=1)
        draw.line(
            [xy(i, v) for i, v in enumerate(smooth(losses, max(1, len(losses) // 20)))], fill=(20, 60, 160), width=2
        )
        draw.text((4, top), f"{hi:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.4g}", fill="black")
        draw.text((left, bottom + 8), "step 1", fill="black")
        draw.text((right - 60, bottom + 8), f"step {len(losses)}", fill="black")
    draw.text((left + 8, top + 4), "training loss (raw, smoothed)", fill="black")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
