"""Several target images per item: musubi-tuner's ``multiple_target`` datasets (an image and its layers).

In a directory dataset the captioned image ``img.png`` is the item's first target; the images without a caption
file named ``img_<n>.<ext>`` are its further targets, ordered by ``n`` (longer stems claim their files first, so
``img1`` does not take ``img10_0.png``). In a JSONL dataset a line gives ``image_path`` (or ``image_path_0``) and
``image_path_1``, ``image_path_2`` ... The further targets are layers: each must carry an alpha channel, and every
item of a dataset has the same number of them. Nothing here names an architecture (``Variant.multiple_targets``
says which variants train on such items). See ``docs/datasets.md`` §2.4.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image

from kern.data.dataset_config import DatasetSpec
from kern.data.images import ALPHA_MODES
from kern.errors import DatasetError
from kern.log import get_logger

log = get_logger(__name__)

_TARGET_KEY = re.compile(r"image_path_(\d+)")


def has_caption_file(image: Path, spec: DatasetSpec) -> bool:
    return bool(spec.caption_extension) and image.with_name(image.stem + spec.caption_extension).is_file()


def split_targets(images: Sequence[Path], spec: DatasetSpec) -> tuple[list[Path], dict[Path, tuple[Path, ...]]]:
    """A directory dataset's images as (the items' first targets, each one's further targets), by musubi's rules.

    The first targets are the images with a caption file (with ``default_caption``, also those without one that
    are no ``<other image's stem>_<n>``). An image without a caption file named ``<stem>_<n>.<ext>`` after one of
    them is its target number ``n``; a non-numeric ``n`` is an error. Images left over are warned about and unused.
    """
    stems = {p.stem for p in images}

    def looks_like_target(p: Path) -> bool:
        head, sep, tail = p.stem.rpartition("_")
        return bool(sep) and tail.isdigit() and head in stems

    firsts = [p for p in images if has_caption_file(p, spec)]
    if spec.default_caption is not None:
        firsts += [p for p in images if not has_caption_file(p, spec) and not looks_like_target(p)]
    pool = sorted(set(images) - set(firsts))
    out: dict[Path, tuple[Path, ...]] = {}
    for first in sorted(firsts, key=lambda p: (-len(p.stem), p.name)):
        mine = [p for p in pool if p.name.startswith(first.stem + "_")]
        if mine:
            pool = [p for p in pool if p not in mine]
            out[first] = tuple(sorted(mine, key=lambda p: (_target_index(p, first, spec), p.name)))
    if pool:
        log.warning(
            "images without a caption file that are no numbered target of a captioned image: unused",
            dataset=spec.where,
            count=len(pool),
            first=pool[0].name,
        )
    return sorted(firsts), out


def _target_index(path: Path, first: Path, spec: DatasetSpec) -> int:
    suffix = path.stem[len(first.stem) + 1 :].rpartition("_")[2]
    if not suffix.isdigit():
        raise DatasetError(
            f"{spec.where}: {path} has no caption file, so it would be a target of {first.name}, but its suffix "
            f"{suffix!r} is not a number; name the layers {first.stem}_1{path.suffix}, {first.stem}_2{path.suffix}, ..."
        )
    return int(suffix)


def jsonl_targets(record: Mapping[str, Any], where: str) -> list[tuple[str, Any]]:
    """A JSONL line's targets as (key, value): ``image_path`` or ``image_path_0`` first, then ``image_path_1`` ...
    (consecutive). Both first keys, none, or a gap in the numbers are errors naming the line."""
    numbered = {int(m.group(1)): key for key in record if (m := _TARGET_KEY.fullmatch(key))}
    if "image_path" in record and 0 in numbered:
        raise DatasetError(f"{where}: give the first image as 'image_path' or as 'image_path_0', not both")
    first = "image_path" if "image_path" in record else numbered.pop(0, None)
    if first is None:
        raise DatasetError(
            f"{where} key 'image_path_0': missing; a multiple_target line names its images image_path_0, image_path_1, ..."
        )
    numbered.pop(0, None)
    expected = list(range(1, len(numbered) + 1))
    if sorted(numbered) != expected:
        gap = next(i for i in range(1, max(numbered) + 1) if i not in numbered)
        raise DatasetError(f"{where} key 'image_path_{gap}': missing; the layers are numbered 1, 2, ... without gaps")
    return [(first, record[first])] + [(numbered[i], record[numbered[i]]) for i in expected]


def check_alpha(path: Path, first: Path, spec: DatasetSpec) -> None:
    """A layer (a target after the first) must be transparent somewhere to be one: an image without an alpha
    channel is refused (musubi-tuner cannot stack it either), naming the file."""
    try:
        with Image.open(path) as img:
            ok = (
                img.mode in ALPHA_MODES
                or "transparency" in img.info
                or (img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA")
            )
    except Exception:  # unreadable files are reported (and skipped) by the probe
        return
    if not ok:
        raise DatasetError(
            f"{spec.where}: layer {path} of {first.name} has no alpha channel (mode {img.mode}); multiple_target "
            "layers are RGBA images, transparent where the layer is empty: save it with alpha"
        )


def check_counts(spec: DatasetSpec, items: Sequence[Any]) -> None:
    """Every item of a multiple_target dataset has at least one further target, and all the same number (musubi)."""
    if not spec.multiple_target or not items:
        return
    none = [i for i in items if not i.target_paths]
    if none:
        raise DatasetError(
            f"{spec.where} key 'multiple_target': {none[0].image_path} has no layers "
            f"({none[0].stem}_1.png ... without a caption file, or image_path_1 ... in the JSONL); add them or "
            "remove the image"
        )
    counts = {len(i.target_paths) for i in items}
    if len(counts) > 1:
        first = items[0]
        odd = next(i for i in items if len(i.target_paths) != len(first.target_paths))
        raise DatasetError(
            f"{spec.where} key 'multiple_target': every image must have the same number of layers; "
            f"{first.image_path.name} has {len(first.target_paths)}, {odd.image_path.name} has {len(odd.target_paths)}"
        )


def check_variant(specs: Sequence[DatasetSpec], arch: str, variant: Any, source: str) -> None:
    """Before scanning: a variant that trains on several targets per item (``Variant.multiple_targets``) takes only
    ``multiple_target`` datasets, and only such a variant takes them. ``ConfigError`` naming the key and variant."""
    from kern.errors import ConfigError

    for spec in specs:
        if spec.multiple_target and not variant.multiple_targets:
            raise ConfigError(
                f"{spec.where} key 'multiple_target': {arch} {variant.name} trains on one target image per item; "
                f"multiple_target datasets (an image and its layers) are for a variant that trains on several "
                f"(the job's model.variant, {source}); remove the key or pick such a variant"
            )
        if variant.multiple_targets and not spec.multiple_target:
            raise ConfigError(
                f"{source}: {arch} {variant.name} cannot be trained on {spec.where}: it trains on an image and its "
                "layers; set multiple_target = true in that [[datasets]] table and give each image its layers "
                "(docs/datasets.md)"
            )
