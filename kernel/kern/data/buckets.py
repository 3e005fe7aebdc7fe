"""Buckets: the sizes images and their control images are trained at, by musubi-tuner's rules.

With ``enable_bucket`` an image goes to the bucket of nearest aspect ratio among ``make_buckets``; without it,
every image is trained at the dataset's resolution. ``control_bucket`` sizes a control image. Sizes are (W, H) in
pixels, multiples of the resolution step, which the caller gives (it belongs to the architecture). See
``docs/datasets.md`` §3.
"""

from __future__ import annotations

import math
from typing import Sequence

from kern.data.dataset_config import DatasetSpec, Size


def floor_to(value: int, step: int) -> int:
    return value - value % step


def make_buckets(resolution: Size, step: int) -> list[Size]:
    """Aspect-ratio buckets of area at most ``W·H`` of ``resolution`` (musubi's enumeration, aspect ≤ ~4).

    Widths run from about half the side of the square to the square's side in steps; each gives the
    tallest multiple-of-step height within the area, and the transposed bucket.
    """
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area))
    smallest = max(step, floor_to(side // 2, step))
    buckets = set()
    for w in range(smallest, side + step, step):
        h = floor_to(area // w, step)
        if h >= step:
            buckets.update({(w, h), (h, w)})
    if not buckets:
        raise ValueError(
            f"resolution {resolution[0]}x{resolution[1]} is smaller than one resolution step ({step} pixels)"
        )
    return sorted(buckets)


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest to ``size``'s (the first such on ties, as musubi)."""
    ratio = size[0] / size[1]
    return min(buckets, key=lambda b: abs(b[0] / b[1] - ratio))


def fit_area(size: Size, resolution: Size, step: int) -> Size:
    """musubi's ``calculate_bucket_resolution``: a multiple-of-step size near ``size``'s aspect, area ≤ ``resolution``'s."""
    area = resolution[0] * resolution[1]
    ratio = size[0] / size[1]
    base_w = floor_to(int(math.sqrt(area * ratio)), step)
    best: Size | None = None
    for i in range(-2, 3):
        w = base_w + i * step
        if w < step:
            continue
        h = floor_to(area // w, step)
        if h < step:
            continue
        if best is None or abs(w / h - ratio) < abs(best[0] / best[1] - ratio):
            best = (w, h)
    return best or (step, step)


def target_bucket(spec: DatasetSpec, size: Size, step: int, buckets: Sequence[Size]) -> Size:
    """The size an image of ``size`` is trained at: its bucket, or the dataset's resolution without bucketing."""
    if not spec.enable_bucket:
        return (floor_to(spec.resolution[0], step), floor_to(spec.resolution[1], step))
    area = spec.resolution[0] * spec.resolution[1]
    if spec.bucket_no_upscale and size[0] * size[1] <= area:
        return (floor_to(size[0], step), floor_to(size[1], step))
    return nearest_bucket(size, buckets)


def control_bucket(spec: DatasetSpec, size: Size, target: Size, step: int) -> Size | None:
    """The size a control is trained at; ``None`` when it is smaller than one step (item unusable)."""
    if spec.no_resize_control:
        limit = spec.control_resolution
        if limit is not None and size[0] * size[1] > limit[0] * limit[1]:
            return fit_area(size, limit, step)
        w, h = floor_to(size[0], step), floor_to(size[1], step)
        return (w, h) if w and h else None
    if spec.control_resolution is not None:
        return fit_area(size, spec.control_resolution, step)
    return target
