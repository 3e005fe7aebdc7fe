"""Datasets: the musubi-tuner dataset config, the items it names, their buckets and the batch order.

``load_dataset_config`` reads a musubi-tuner dataset TOML (or JSON) as users already have it, plus a
few keys of kern's own; ``scan_items`` turns it into ``Item`` records (one per usable image, with its
bucket and its control images); ``batch_order`` gives the deterministic batches of one epoch; and
``load_image`` reads one image at its bucket size. The resolution step is the caller's (it belongs
to the architecture): nothing here names an architecture. See ``docs/datasets.md``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import re
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import attrs
import torch
from PIL import Image, ImageOps

try:
    from PIL import ImageCms
except ImportError:  # Pillow built without LittleCMS: LAB images are then unsupported
    ImageCms = None

from kern.errors import DatasetError, UsageError
from kern.core.io import ensure_writable_dir
from kern.log import get_logger

log = get_logger(__name__)

# musubi's list; AVIF and JPEG XL only where this Pillow can read them.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp") + tuple(e for e in (".avif", ".jxl") if e in Image.registered_extensions())
DEFAULT_RESOLUTION = (960, 544)  # musubi's default
MAX_ITEM_WARNINGS = 20  # per dataset and reason; the rest are counted in one summary line
# Sane bounds for config numbers: beyond them a value is a typo, and would allocate absurd buckets or epochs.
MAX_SIDE = 16384  # pixels, each side of resolution / control_resolution
MAX_BATCH_SIZE = 4096
MAX_REPEATS = 10_000
MAX_EPOCH_ITEMS = 10_000_000  # items x num_repeats of one dataset: batch_order holds one epoch's list in memory
EMPTY_STEM = "_empty"  # reserved: the cache module names the empty-caption encoding after it

Size = tuple[int, int]

# Keys allowed in [general] and in each dataset: name -> (kind, default). Dataset values win over [general].
SHARED_KEYS: dict[str, tuple[str, Any]] = {
    "resolution": ("size", DEFAULT_RESOLUTION),
    "caption_extension": ("str", None),
    "batch_size": ("int", 1),
    "num_repeats": ("int", 1),
    "enable_bucket": ("bool", False),
    "bucket_no_upscale": ("bool", False),
    # musubi allows these two per dataset only; kern also takes them from [general].
    "no_resize_control": ("bool", False),
    "control_resolution": ("size", None),
    # kern's own additions.
    "caption_dropout_rate": ("float", 0.0),
    "default_caption": ("str", None),
}
# Keys allowed per dataset only (they name folders, or would clash if shared).
DATASET_KEYS: dict[str, tuple[str, Any]] = {
    "image_directory": ("path", None),
    "image_jsonl_file": ("path", None),
    "cache_directory": ("path", None),
    "control_directory": ("path", None),
    "multiple_target": ("bool", False),
}
DEPRECATED_KEYS = {
    "flux_kontext_no_resize_control": "no_resize_control",
    "qwen_image_edit_no_resize_control": "no_resize_control",
    "qwen_image_edit_control_resolution": "control_resolution",
}
# FramePack one-frame keys: meaningful only to that (video) architecture, so harmless to ignore.
IGNORED_KEYS = ("fp_latent_window_size", "fp_1f_clean_indices", "fp_1f_target_index", "fp_1f_no_post")
VIDEO_KEYS = (
    "video_directory", "video_jsonl_file", "target_frames", "frame_extraction",
    "frame_stride", "frame_sample", "max_frames", "source_fps",
)
JSONL_KEYS = ("image_path", "caption", "control_path")
_CONTROL_KEY = re.compile(r"control_path_(\d+)")


@attrs.frozen
class DatasetSpec:
    """One ``[[datasets]]`` table with every value resolved (dataset → [general] → default)."""

    index: int
    source: Path  # the config file, for messages
    resolution: Size
    batch_size: int
    num_repeats: int
    enable_bucket: bool
    bucket_no_upscale: bool
    cache_directory: Path
    image_directory: Path | None = None
    image_jsonl_file: Path | None = None
    caption_extension: str | None = None
    control_directory: Path | None = None
    no_resize_control: bool = False
    control_resolution: Size | None = None
    caption_dropout_rate: float = 0.0
    default_caption: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source}: datasets[{self.index}]"


@attrs.frozen
class Item:
    """One training image: where it is, its caption and controls, and the sizes it is trained at."""

    key: str  # unique over all datasets: "<dataset index>/<stem>"
    image_path: Path
    caption: str
    control_paths: tuple[Path, ...]
    size: Size  # original (W, H), after EXIF orientation
    bucket: Size  # (W, H) the image is trained at
    control_buckets: tuple[Size, ...]  # (W, H) of each control, in control order
    dataset_index: int
    cache_dir: Path
    stem: str
    step: int  # the resolution step; load_image crops (never resamples) a trim smaller than this


# --------------------------------------------------------------------------- config


def load_dataset_config(path: str | os.PathLike) -> list[DatasetSpec]:
    """Read a musubi-tuner dataset config (``.toml`` or ``.json``); errors name the file and the key."""
    path = Path(path)
    try:
        raw = _read_config(path)
    except OSError as exc:  # e.g. a name too long for the file system
        raise DatasetError(f"{path}: cannot read the dataset config ({exc.strerror or exc})") from None
    for key in raw:
        if key not in ("general", "datasets"):
            raise DatasetError(f"{path}: unknown top-level key {key!r}; a dataset config has [general] and [[datasets]]")
    general = raw.get("general", {})
    if not isinstance(general, dict):
        raise DatasetError(f"{path}: 'general' must be a table ([general])")
    datasets = raw.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise DatasetError(f"{path}: no datasets; add at least one [[datasets]] table with image_directory or image_jsonl_file")
    for i, d in enumerate(datasets):
        if not isinstance(d, dict):
            raise DatasetError(f"{path}: datasets[{i}] must be a table ([[datasets]]), got {_short(d)}")
    shared = _read_section(general, path, "[general]", SHARED_KEYS)
    specs = [_dataset_spec(i, d, shared, path) for i, d in enumerate(datasets)]
    _check_unique_cache_dirs(specs)
    return specs


def _read_config(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise DatasetError(f"{path}: a dataset config must be a .toml or .json file")
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder; --dataset / dataset.config names the dataset config file")
    if not path.is_file():
        raise DatasetError(f"{path}: dataset config not found; check the path")
    text = read_text_file(path)
    try:
        if suffix == ".toml":
            return tomllib.loads(text)
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors; so is an int of 5000 digits
        raise DatasetError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: the JSON must be an object with 'general' and 'datasets'")
    return data


def read_text_file(path: Path, where: str | None = None) -> str:
    """``path`` as text: UTF-8, a leading BOM dropped. Other encodings raise ``DatasetError`` naming the file, the
    line and the byte, rather than guessing (a wrong guess would train on garbled captions)."""
    where = where or str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{where}: cannot read ({exc.strerror or exc}); check the file and its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(
            f"{where}: not UTF-8 text (line {line}, byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
            "save the file as UTF-8"
        ) from None


def _read_section(section: Mapping[str, Any], path: Path, name: str, allowed: Mapping[str, tuple[str, Any]]) -> dict[str, Any]:
    """Check one table's keys and types; returns the values that are set (JSON nulls count as unset)."""
    section = _map_deprecated(dict(section), path, name)
    out: dict[str, Any] = {}
    for key, value in section.items():
        where = f"{path}: {name} key {key!r}"
        if key in VIDEO_KEYS:
            raise DatasetError(f"{where}: kern trains images; video datasets are not supported (use image_directory or image_jsonl_file)")
        if key in IGNORED_KEYS:
            log.warning("ignored FramePack-only dataset key", file=str(path), section=name, key=key)
            continue
        if key not in allowed:
            if key in DATASET_KEYS:
                raise DatasetError(f"{where}: this key is per dataset; move it into the [[datasets]] table(s)")
            known = ", ".join(sorted(allowed))
            raise DatasetError(f"{where}: unknown key; known keys here: {known}")
        if value is not None:
            out[key] = _check_value(value, allowed[key][0], where)
    return out


def _map_deprecated(section: dict[str, Any], path: Path, name: str) -> dict[str, Any]:
    for old, new in DEPRECATED_KEYS.items():
        if old not in section:
            continue
        value = section.pop(old)
        if new in section:
            log.warning("deprecated dataset key ignored: the new key is set", file=str(path), section=name, key=old, use=new)
        else:
            section[new] = value
            log.warning("deprecated dataset key; rename it", file=str(path), section=name, key=old, use=new)
    return section


def _check_value(value: Any, kind: str, where: str) -> Any:
    """Check ``value`` is of ``kind``; ints pass for floats, an int ``resolution`` means a square."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise DatasetError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise DatasetError(f"{where}: expected an integer, got {_short(value)}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DatasetError(f"{where}: expected a number, got {_short(value)}")
        try:
            value = float(value)
        except OverflowError:  # an int too large for a float
            raise DatasetError(f"{where}: expected a finite number, got {_short(value)}") from None
        if not math.isfinite(value):
            raise DatasetError(f"{where}: expected a finite number, got {value!r}")
        return value
    if kind in ("str", "path"):
        if not isinstance(value, str):
            raise DatasetError(f"{where}: expected a string, got {_short(value)}")
        if "\x00" in value:
            raise DatasetError(f"{where}: contains a NUL character; remove it")
        if kind == "path" and not value.strip():
            raise DatasetError(f"{where}: is empty; give a path (relative paths start at the config's folder)")
        return value
    if kind == "size":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise DatasetError(f"{where}: expected an integer or [width, height], got {_short(value)}")
        if min(value) < 1:
            raise DatasetError(f"{where}: sizes must be positive, got {_short(value)}")
        if max(value) > MAX_SIDE:
            raise DatasetError(f"{where}: each side must be at most {MAX_SIDE} pixels, got {_short(value)}")
        return (value[0], value[1])
    raise AssertionError(kind)


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message must stay readable whatever the file holds."""
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python prints
        text = f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _dataset_spec(index: int, table: Mapping[str, Any], shared: Mapping[str, Any], path: Path) -> DatasetSpec:
    name = f"datasets[{index}]"
    where = f"{path}: {name}"
    own = _read_section(table, path, name, {**SHARED_KEYS, **DATASET_KEYS})
    values = {key: own.get(key, shared.get(key, default)) for key, (_, default) in SHARED_KEYS.items()}
    base = path.parent
    paths = {key: _resolve(own[key], base) if key in own else None for key in ("image_directory", "image_jsonl_file", "cache_directory", "control_directory")}
    if own.get("multiple_target"):
        raise DatasetError(f"{where} key 'multiple_target': layered (multiple-target) datasets are not supported by kern; remove the key")
    if paths["image_directory"] and paths["image_jsonl_file"]:
        raise DatasetError(f"{where}: set image_directory or image_jsonl_file, not both")
    if not paths["image_directory"] and not paths["image_jsonl_file"]:
        raise DatasetError(f"{where}: set image_directory (a folder of images and captions) or image_jsonl_file")
    if paths["image_jsonl_file"] and not paths["cache_directory"]:
        raise DatasetError(f"{where} key 'cache_directory': required with image_jsonl_file; set it to a folder for this dataset's caches")
    if paths["image_directory"] and values["caption_extension"] is None and values["default_caption"] is None:
        raise DatasetError(f"{where} key 'caption_extension': not set; set it here or in [general] (e.g. \".txt\")")
    _check_ranges(values, where)
    return DatasetSpec(
        index=index,
        source=path,
        cache_directory=paths["cache_directory"] or paths["image_directory"],
        image_directory=paths["image_directory"],
        image_jsonl_file=paths["image_jsonl_file"],
        control_directory=paths["control_directory"],
        **values,
    )


def _resolve(value: str, base: Path) -> Path:
    """Relative paths are relative to the config file's folder, so a config works from any cwd."""
    p = Path(value).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _check_ranges(values: Mapping[str, Any], where: str) -> None:
    for key, top in (("batch_size", MAX_BATCH_SIZE), ("num_repeats", MAX_REPEATS)):
        if values[key] < 1:
            raise DatasetError(f"{where} key {key!r}: must be at least 1, got {_short(values[key])}")
        if values[key] > top:
            raise DatasetError(f"{where} key {key!r}: must be at most {top}, got {_short(values[key])}")
    if not 0.0 <= values["caption_dropout_rate"] <= 1.0:
        raise DatasetError(f"{where} key 'caption_dropout_rate': must be between 0 and 1, got {values['caption_dropout_rate']}")
    ext = values["caption_extension"]
    if ext is not None and (not ext or any(c in ext for c in "/\\")):
        raise DatasetError(f"{where} key 'caption_extension': {ext!r} must be a non-empty file-name ending such as \".txt\", "
                           "without / or \\")


def _check_unique_cache_dirs(specs: Sequence[DatasetSpec]) -> None:
    seen: dict[Path, int] = {}
    for spec in specs:
        other = seen.setdefault(spec.cache_directory, spec.index)
        if other != spec.index:
            raise DatasetError(
                f"{spec.where} key 'cache_directory': {spec.cache_directory} is also datasets[{other}]'s cache directory "
                "(it defaults to image_directory); give each dataset its own cache_directory"
            )


# --------------------------------------------------------------------------- buckets


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
        raise ValueError(f"resolution {resolution[0]}x{resolution[1]} is smaller than one resolution step ({step} pixels)")
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


# --------------------------------------------------------------------------- scanning


@attrs.define
class _Entry:
    """A candidate item before its images are opened."""

    image_path: Path
    caption: str | None
    control_paths: tuple[Path, ...]


@attrs.define
class _Skips:
    """Collects skipped items so a dataset with thousands of bad files logs a bounded number of lines."""

    where: str
    counts: dict[str, int] = attrs.Factory(dict)

    def add(self, reason: str, path: Path, **details: Any) -> None:
        n = self.counts[reason] = self.counts.get(reason, 0) + 1
        if n <= MAX_ITEM_WARNINGS:
            log.warning(f"skipped: {reason}", dataset=self.where, file=str(path), **details)

    def summary(self) -> None:
        for reason, n in self.counts.items():
            if n > MAX_ITEM_WARNINGS:
                log.warning(f"skipped: {reason}", dataset=self.where, items=n, note=f"only the first {MAX_ITEM_WARNINGS} were listed")


def scan_items(specs: Sequence[DatasetSpec], resolution_step: int) -> list[Item]:
    """Every usable item of every dataset, in a stable order (dataset, then file name or JSONL line).

    Bad items are skipped with a warning (see docs/datasets.md); a missing folder or file, or a dataset
    left with no usable item, raises ``DatasetError``.
    """
    if resolution_step < 1:
        raise ValueError(f"resolution_step must be positive, got {resolution_step}")
    with _os_errors_named(specs):
        for spec in specs:  # every folder and file named, before any image is opened
            _check_paths(spec)
    items: list[Item] = []
    for spec in specs:
        with _os_errors_named([spec]):
            found = _scan_dataset(spec, resolution_step)
        if not found:
            source = spec.image_directory or spec.image_jsonl_file
            raise DatasetError(f"{spec.where}: no usable images in {source}; see the warnings above for the skipped ones")
        if len(found) * spec.num_repeats > MAX_EPOCH_ITEMS:
            raise DatasetError(f"{spec.where} key 'num_repeats': {len(found)} images x {spec.num_repeats} repeats is more than "
                               f"{MAX_EPOCH_ITEMS} items per epoch; lower num_repeats")
        log.info("dataset scanned", dataset=spec.where, items=len(found), buckets=len({i.bucket for i in found}))
        items.extend(found)
    return items


@contextlib.contextmanager
def _os_errors_named(specs: Sequence[DatasetSpec]) -> Iterator[None]:
    """A file-system error (a folder that cannot be listed, a name too long ...) as a ``DatasetError`` naming the config."""
    try:
        yield
    except OSError as exc:
        where = specs[0].where if len(specs) == 1 else str(specs[0].source) if specs else "dataset"
        raise DatasetError(f"{where}: {exc.strerror or exc}: {exc.filename or ''}; check the paths and permissions") from None


def _check_paths(spec: DatasetSpec) -> None:
    """The image folder or JSONL file and the control folder exist as such, and the cache folder is writable
    (created if missing), so a typo is an error before any work and caching cannot fail half-way."""
    hint = "check the path (relative paths start at the config's folder)"
    for key, folder in (("image_directory", spec.image_directory), ("control_directory", spec.control_directory)):
        if folder is None:
            continue
        if folder.exists() and not folder.is_dir():
            raise DatasetError(f"{spec.where} key {key!r}: {folder} is a file, not a folder; {hint}")
        if not folder.is_dir():
            raise DatasetError(f"{spec.where} key {key!r}: folder {folder} does not exist; {hint}")
    jsonl = spec.image_jsonl_file
    if jsonl is not None and jsonl.is_dir():
        raise DatasetError(f"{spec.where} key 'image_jsonl_file': {jsonl} is a folder, not a JSONL file; {hint}")
    if jsonl is not None and not jsonl.is_file():
        raise DatasetError(f"{spec.where} key 'image_jsonl_file': {jsonl} does not exist; {hint}")
    what = f"{spec.where} key 'cache_directory'" + ("" if spec.image_jsonl_file or spec.cache_directory != spec.image_directory
                                                     else " (defaults to image_directory)")
    try:
        ensure_writable_dir(spec.cache_directory, what)
    except UsageError as exc:
        raise DatasetError(str(exc)) from None


def _scan_dataset(spec: DatasetSpec, step: int) -> list[Item]:
    skips = _Skips(spec.where)
    buckets = _buckets_of(spec, step)
    entries = _directory_entries(spec, skips) if spec.image_directory else _jsonl_entries(spec, skips)
    _check_unique_stems(spec, entries)
    paths = {p for e in entries for p in (e.image_path, *e.control_paths)}
    sizes = _probe_all(sorted(paths))
    items = []
    for entry in entries:
        item = _make_item(spec, entry, sizes, step, buckets, skips)
        if item is not None:
            items.append(item)
    skips.summary()
    return items


def _buckets_of(spec: DatasetSpec, step: int) -> list[Size]:
    W, H = spec.resolution
    too_small = W * H < step * step if spec.enable_bucket else min(W, H) < step
    if too_small:
        raise DatasetError(f"{spec.where} key 'resolution': {W}x{H} is smaller than one resolution step ({step} px); raise it")
    return make_buckets(spec.resolution, step) if spec.enable_bucket else []


def _make_item(spec: DatasetSpec, entry: _Entry, sizes: Mapping[Path, Size | str], step: int, buckets: Sequence[Size], skips: _Skips) -> Item | None:
    size = sizes[entry.image_path]
    if isinstance(size, str):
        skips.add("unreadable or truncated image", entry.image_path, error=size)
        return None
    if min(size) < step:
        skips.add(f"image smaller than one resolution step ({step} px)", entry.image_path, size=f"{size[0]}x{size[1]}")
        return None
    bucket = target_bucket(spec, size, step, buckets)
    control_buckets = []
    for path in entry.control_paths:
        csize = sizes[path]
        if isinstance(csize, str):
            skips.add("unreadable or truncated control image", path, error=csize, image=str(entry.image_path))
            return None
        cbucket = control_bucket(spec, csize, bucket, step)
        if cbucket is None:
            skips.add(f"control image smaller than one resolution step ({step} px)", path, image=str(entry.image_path))
            return None
        control_buckets.append(cbucket)
    stem = entry.image_path.stem
    return Item(
        key=f"{spec.index}/{stem}",
        image_path=entry.image_path,
        caption=entry.caption if entry.caption is not None else "",
        control_paths=entry.control_paths,
        size=size,
        bucket=bucket,
        control_buckets=tuple(control_buckets),
        dataset_index=spec.index,
        cache_dir=spec.cache_directory,
        stem=stem,
        step=step,
    )


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not path.name.startswith(".")


def _list_images(folder: Path, spec: DatasetSpec, key: str) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"{spec.where} key {key!r}: folder {folder} does not exist; check the path (relative paths start at the config's folder)")
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _directory_entries(spec: DatasetSpec, skips: _Skips) -> list[_Entry]:
    images = _list_images(spec.image_directory, spec, "image_directory")
    controls = match_controls([p.stem for p in images], _list_images(spec.control_directory, spec, "control_directory"), spec) if spec.control_directory else {}
    entries = []
    for image in images:
        caption = _read_caption(image, spec, skips)
        if caption is None:
            continue
        entries.append(_Entry(image, caption, controls.get(image.stem, ())))
    return entries


def _read_caption(image: Path, spec: DatasetSpec, skips: _Skips) -> str | None:
    """The caption of ``image``; ``default_caption`` when it has no caption file; ``None``: skip it.

    A caption file that exists but cannot be read as UTF-8 text is an error, not a skip: training silently on
    fewer images (or on a garbled caption) is worse than stopping to fix one file."""
    if spec.caption_extension is not None:
        path = image.with_name(image.stem + spec.caption_extension)
        if path.is_dir():
            raise DatasetError(f"{spec.where}: caption {path} of {image.name} is a folder; it must be a text file")
        if path.is_file():
            return read_text_file(path, f"{spec.where}: caption file {path}").strip()
    if spec.default_caption is not None:
        return spec.default_caption
    skips.add("no caption file", image, expected=image.stem + (spec.caption_extension or ""))
    return None


def match_controls(stems: Iterable[str], controls: Iterable[Path], spec: DatasetSpec | None = None) -> dict[str, tuple[Path, ...]]:
    """Control images of each target stem, by musubi's rules.

    A control belongs to a target when its name is ``<stem>.<ext>`` or ``<stem>_<n>.<ext>`` (n an
    integer, e.g. ``img_0.png`` or ``img_0001.png``). Longer stems claim their files first, so ``img1``
    does not take ``img10_0.png``; the unsuffixed file comes first, then by ``n``.
    """
    pool = sorted(controls)
    where = spec.where if spec else "controls"
    out: dict[str, tuple[Path, ...]] = {}
    for stem in sorted(set(stems), key=lambda s: (-len(s), s)):
        mine, rest = [], []
        for path in pool:
            (mine if path.name.startswith((stem + ".", stem + "_")) else rest).append(path)
        pool = rest
        if mine:
            out[stem] = tuple(sorted(mine, key=lambda p: (_control_index(p, stem, where), p.name)))
    if pool:
        log.warning("control images that match no target image", dataset=where, count=len(pool), first=pool[0].name)
    return out


def _control_index(path: Path, stem: str, where: str) -> int:
    """-1 for ``<stem>.<ext>``, else the integer suffix of ``<stem>_<n>.<ext>``."""
    rest = path.name[len(stem):]
    if rest.startswith("."):
        return -1
    suffix = Path(rest[1:]).stem
    if not suffix.isdigit():
        raise DatasetError(
            f"{where}: control image {path} matches target {stem!r} but its suffix {suffix!r} is not a number; "
            f"name controls {stem}_0{path.suffix}, {stem}_1{path.suffix}, ..."
        )
    return int(suffix)


def _jsonl_entries(spec: DatasetSpec, skips: _Skips) -> list[_Entry]:
    path = spec.image_jsonl_file
    if not path.is_file():
        raise DatasetError(f"{spec.where} key 'image_jsonl_file': {path} does not exist; check the path (relative paths start at the config's folder)")
    entries, ignored = [], set()
    for lineno, line in enumerate(read_text_file(path).split("\n"), 1):
        if not line.strip():
            continue
        entry = _jsonl_entry(path, lineno, line, spec, skips, ignored)
        if entry is not None:
            entries.append(entry)
    if ignored:
        log.warning("ignored JSONL keys", file=str(path), keys=sorted(ignored))
    return entries


def _jsonl_entry(path: Path, lineno: int, line: str, spec: DatasetSpec, skips: _Skips, ignored: set[str]) -> _Entry | None:
    where = f"{path}:{lineno}"
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise DatasetError(f"{where}: not valid JSON ({_short(str(exc), 200)}); each line must be one object") from None
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: each line must be a JSON object with image_path and caption")
    if "video_path" in record:
        raise DatasetError(f"{where} key 'video_path': kern trains images; video datasets are not supported")
    if not isinstance(record.get("image_path"), str):
        raise DatasetError(f"{where} key 'image_path': missing or not a string; every line needs the image's path")
    image_path = _jsonl_path(record["image_path"], path, where, "image_path")
    controls: list[tuple[int, Path]] = []
    for key, value in record.items():
        m = _CONTROL_KEY.fullmatch(key)
        if key == "control_path" or m:
            controls.append((int(m.group(1)) if m else -1, _jsonl_path(value, path, where, key)))
        elif key not in JSONL_KEYS:
            ignored.add(key)
    caption = record.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise DatasetError(f"{where} key 'caption': expected a string, got {_short(caption)}")
    caption = caption if caption is not None else spec.default_caption
    if caption is None:
        skips.add("no caption", image_path, line=lineno)
        return None
    return _Entry(image_path, caption.strip(), tuple(p for _, p in sorted(controls, key=lambda c: c[0])))


def _jsonl_path(value: Any, jsonl: Path, where: str, key: str) -> Path:
    """An image path of a JSONL line: a string naming an existing file. A missing file or a folder is an error
    naming the line (a wrong path is a mistake in the file to fix, unlike a corrupt image, which is skipped)."""
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise DatasetError(f"{where} key {key!r}: expected a path string, got {_short(value)}")
    p = _resolve(value, jsonl.parent)
    if p.is_dir():
        raise DatasetError(f"{where} key {key!r}: {p} is a folder, not an image file")
    if not p.is_file():
        raise DatasetError(f"{where} key {key!r}: {p} does not exist; check the path (relative paths start at the JSONL file's folder)")
    return p


def _check_unique_stems(spec: DatasetSpec, entries: Sequence[_Entry]) -> None:
    """Cache files are named by stem, so two images of one dataset with the same stem would share them."""
    seen: dict[str, Path] = {}
    for entry in entries:
        stem = entry.image_path.stem
        if stem == EMPTY_STEM:
            raise DatasetError(f"{spec.where}: image {entry.image_path}: the name {EMPTY_STEM!r} is reserved for kern's empty-caption cache; rename the image")
        other = seen.setdefault(stem, entry.image_path)
        if other != entry.image_path:
            raise DatasetError(
                f"{spec.where}: images {other} and {entry.image_path} have the same name stem {stem!r}, "
                "so their cache files would collide; rename one"
            )


def _probe_all(paths: Sequence[Path]) -> dict[Path, Size | str]:
    """Sizes of ``paths`` (decoding each fully, in threads, so truncated files are caught); a str is the error."""
    if not paths:
        return {}
    workers = min(8, os.cpu_count() or 1, len(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(paths, pool.map(_probe, paths)))


def _probe(path: Path) -> Size | str:
    try:
        with Image.open(path) as img:
            w, h = img.size
            swap = img.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that rotate by 90°
            if img.format == "JPEG":
                img.draft("RGB", (1, 1))  # decode at 1/8 scale: still reads all the data, far faster
            img.load()
            if img.mode not in IMAGE_MODES or (img.mode == "LAB" and ImageCms is None):
                return f"unsupported image mode {img.mode!r}; convert the image to RGB or RGBA"
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        return f"{type(exc).__name__}: {exc}"
    return (h, w) if swap else (w, h)


# --------------------------------------------------------------------------- batches


def batch_key(item: Item) -> tuple:
    """Items with equal keys stack into one batch: same dataset, target size, and control count and sizes."""
    return (item.dataset_index, item.bucket, len(item.control_buckets), item.control_buckets)


def batch_order(items: Sequence[Item], specs: Sequence[DatasetSpec], seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch, as lists of indices into ``items``.

    Each item appears ``num_repeats`` times; each group of stackable items (``batch_key``) is shuffled
    and cut into batches of its dataset's ``batch_size`` (a short last batch is kept); then all batches
    are shuffled. Everything is drawn from one generator seeded by ``(seed, epoch)``, so the same
    inputs always give the same order and a run can resume at (epoch, batch index).
    """
    by_index = {spec.index: spec for spec in specs}
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(batch_key(item), []).append(i)
    rng = random.Random(f"kern.batch_order:{seed}:{epoch}")  # str seeds are hashed with SHA-512: stable across runs
    batches: list[list[int]] = []
    for key in sorted(groups):
        spec = by_index[key[0]]
        pool = groups[key] * spec.num_repeats
        rng.shuffle(pool)
        batches.extend(pool[j : j + spec.batch_size] for j in range(0, len(pool), spec.batch_size))
    rng.shuffle(batches)
    return batches


# --------------------------------------------------------------------------- images


def open_picture(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """``path`` as a Pillow image, EXIF orientation applied, in ``mode`` (``"RGB"`` or ``"RGBA"``), converted by
    ``to_mode``. Unreadable files raise ``DatasetError`` naming the file."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return to_mode(img, mode)
    except Exception as exc:
        raise DatasetError(f"{path}: cannot read image ({type(exc).__name__}: {exc}); fix or remove it") from None


def load_image(path: str | os.PathLike, size: Size, *, crop_below: int = 0, mode: str = "RGB") -> torch.Tensor:
    """``path`` (read by ``open_picture``) as a (3, H, W) float32 tensor in [-1, 1] at ``size`` = (W, H);
    (4, H, W) with ``mode="RGBA"``.

    The image is scaled (Lanczos) to cover ``size`` and centre-cropped. When it already covers ``size`` and exceeds it by
    less than ``crop_below`` pixels on each side, it is only cropped: resampling by 0.99 just blurs.
    """
    img = _cover_crop(open_picture(path, mode), size, crop_below)
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(size[1], size[0], len(mode)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# Pillow modes kern reads (docs/datasets.md §2.3); anything else is skipped when scanning, as unreadable.
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit greyscale (a 16-bit PNG opens as one of these) and 32-bit ints
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
IMAGE_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "F", *WIDE_GREY_MODES, *ALPHA_MODES)


def to_mode(img: Image.Image, mode: str = "RGB") -> Image.Image:
    """``img`` as 8-bit ``RGB`` or ``RGBA``, whatever its Pillow mode.

    16-bit and 32-bit integer greyscale keep their high byte (``value >> 8``, values clipped to 0..65535) instead
    of Pillow's clipping at 255, which turns a 16-bit image white; float (``F``) images are taken as 0.0..1.0 (NaN
    → 0); LAB goes to sRGB through LittleCMS without its lossy 8-bit shortcut; premultiplied ``RGBa`` / ``La`` are
    un-premultiplied. RGB composites transparent pixels on white (a transparent PNG shows as on a white page, not
    the arbitrary colour hidden under alpha); RGBA keeps the alpha.
    """
    if mode not in ("RGB", "RGBA"):
        raise ValueError(f"mode must be 'RGB' or 'RGBA', got {mode!r}")
    img = _to_8_bits(img)
    if mode == "RGBA":
        return img.convert("RGBA")
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _has_alpha(img: Image.Image) -> bool:
    palette_alpha = img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"
    return img.mode in ALPHA_MODES or "transparency" in img.info or palette_alpha


def _to_8_bits(img: Image.Image) -> Image.Image:
    """Modes whose ``convert`` would lose or garble the picture, as an equivalent 8-bit image; others unchanged."""
    import numpy as np

    if img.mode in WIDE_GREY_MODES:
        values = np.asarray(img).astype(np.int64)
        out = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")
        key = img.info.get("transparency")  # a PNG tRNS grey value: those pixels are transparent
        if isinstance(key, int):
            alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")
            out = Image.merge("LA", (out, alpha))
        return out
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        return Image.fromarray(np.rint(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8), "L")
    if img.mode == "La":  # Pillow converts La only to LA
        return img.convert("LA")
    if img.mode == "LAB" and ImageCms is not None:
        return _lab_to_srgb().apply(img)
    return img


@functools.cache
def _lab_to_srgb() -> Any:
    # NOOPTIMIZE: LittleCMS's default 8-bit lookup table is off by up to ~36 levels on saturated colours.
    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB",
                                   flags=ImageCms.Flags.NOOPTIMIZE)


def _cover_crop(img: Image.Image, size: Size, crop_below: int) -> Image.Image:
    W, H = size
    w, h = img.size
    small_trim = 0 <= w - W < max(crop_below, 1) and 0 <= h - H < max(crop_below, 1)
    if (w, h) != (W, H) and not small_trim:
        scale = max(W / w, H / h)
        w, h = max(W, int(w * scale + 0.5)), max(H, int(h * scale + 0.5))
        img = img.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - W) // 2, (h - H) // 2
    return img.crop((left, top, left + W, top + H)) if (w, h) != (W, H) else img
