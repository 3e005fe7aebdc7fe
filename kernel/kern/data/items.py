"""Items: the training images a dataset config names, and the batches of one epoch.

``scan_items`` turns ``DatasetSpec``s into ``Item`` records: one per usable image, with its caption, its control
images (matched by musubi's naming rules) and its bucket; bad files are skipped with a bounded number of warnings.
``batch_order`` gives the deterministic batches of one epoch. The resolution step is the caller's (it belongs to
the architecture): nothing here names an architecture. See ``docs/datasets.md`` §2 and §3.3.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import attrs

from kern.core.io import ensure_writable_dir
from kern.data import targets
from kern.data.buckets import control_bucket, make_buckets, target_bucket
from kern.data.dataset_config import PATH_HINT, DatasetSpec, Size, locate_path, read_text_file, short_repr
from kern.data.images import IMAGE_EXTENSIONS, probe
from kern.errors import DatasetError, UsageError
from kern.log import get_logger

log = get_logger(__name__)

MAX_ITEM_WARNINGS = 20  # per dataset and reason; the rest are counted in one summary line
MAX_EPOCH_ITEMS = 10_000_000  # items x num_repeats of one dataset: batch_order holds one epoch's list in memory
EMPTY_STEM = "_empty"  # reserved: the cache module names the empty-caption encoding after it
JSONL_KEYS = ("image_path", "caption", "control_path")
_CONTROL_KEY = re.compile(r"control_path_(\d+)")


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
    # multiple_target datasets: the further target images (layers), trained at ``bucket`` (kern.data.targets)
    target_paths: tuple[Path, ...] = ()


# --------------------------------------------------------------------------- scanning


@attrs.define
class _Entry:
    """A candidate item before its images are opened."""

    image_path: Path
    caption: str | None
    control_paths: tuple[Path, ...]
    target_paths: tuple[Path, ...] = ()


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
                log.warning(
                    f"skipped: {reason}",
                    dataset=self.where,
                    items=n,
                    note=f"only the first {MAX_ITEM_WARNINGS} were listed",
                )


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
            raise DatasetError(
                f"{spec.where}: no usable images in {source}; see the warnings above for the skipped ones"
            )
        if len(found) * spec.num_repeats > MAX_EPOCH_ITEMS:
            raise DatasetError(
                f"{spec.where} key 'num_repeats': {len(found)} images x {spec.num_repeats} repeats is more than "
                f"{MAX_EPOCH_ITEMS} items per epoch; lower num_repeats"
            )
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
        raise DatasetError(
            f"{where}: {exc.strerror or exc}: {exc.filename or ''}; check the paths and permissions"
        ) from None


def _check_paths(spec: DatasetSpec) -> None:
    """The image folder or JSONL file and the control folder exist as such, and the cache folder is writable
    (created if missing), so a typo is an error before any work and caching cannot fail half-way."""
    hint = f"check the path ({PATH_HINT})"
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
    what = f"{spec.where} key 'cache_directory'" + (
        ""
        if spec.image_jsonl_file or spec.cache_directory != spec.image_directory
        else " (defaults to image_directory)"
    )
    try:
        ensure_writable_dir(spec.cache_directory, what)
    except UsageError as exc:
        raise DatasetError(str(exc)) from None


def _scan_dataset(spec: DatasetSpec, step: int) -> list[Item]:
    skips = _Skips(spec.where)
    buckets = _buckets_of(spec, step)
    entries = _directory_entries(spec, skips) if spec.image_directory else _jsonl_entries(spec, skips)
    _check_unique_stems(spec, entries)
    paths = {p for e in entries for p in (e.image_path, *e.control_paths, *e.target_paths)}
    sizes = _probe_all(sorted(paths))
    items = []
    for entry in entries:
        item = _make_item(spec, entry, sizes, step, buckets, skips)
        if item is not None:
            items.append(item)
    skips.summary()
    targets.check_counts(spec, items)
    return items


def _buckets_of(spec: DatasetSpec, step: int) -> list[Size]:
    W, H = spec.resolution
    too_small = W * H < step * step if spec.enable_bucket else min(W, H) < step
    if too_small:
        raise DatasetError(
            f"{spec.where} key 'resolution': {W}x{H} is smaller than one resolution step ({step} px); raise it"
        )
    return make_buckets(spec.resolution, step) if spec.enable_bucket else []


def _make_item(
    spec: DatasetSpec,
    entry: _Entry,
    sizes: Mapping[Path, Size | str],
    step: int,
    buckets: Sequence[Size],
    skips: _Skips,
) -> Item | None:
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
    for path in entry.target_paths:
        if isinstance(sizes[path], str):
            skips.add("unreadable or truncated layer image", path, error=sizes[path], image=str(entry.image_path))
            return None
        targets.check_alpha(path, entry.image_path, spec)
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
        target_paths=entry.target_paths,
    )


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not path.name.startswith(".")


def _list_images(folder: Path, spec: DatasetSpec, key: str) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"{spec.where} key {key!r}: folder {folder} does not exist; check the path ({PATH_HINT})")
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _directory_entries(spec: DatasetSpec, skips: _Skips) -> list[_Entry]:
    images = _list_images(spec.image_directory, spec, "image_directory")
    controls = (
        match_controls([p.stem for p in images], _list_images(spec.control_directory, spec, "control_directory"), spec)
        if spec.control_directory
        else {}
    )
    layers: dict[Path, tuple[Path, ...]] = {}
    if spec.multiple_target:
        images, layers = targets.split_targets(images, spec)
    entries = []
    for image in images:
        caption = _read_caption(image, spec, skips)
        if caption is None:
            continue
        entries.append(_Entry(image, caption, controls.get(image.stem, ()), layers.get(image, ())))
    if spec.control_directory:
        _check_missing_controls(spec, [e.image_path for e in entries if not e.control_paths])
    return entries


def _check_missing_controls(spec: DatasetSpec, missing: Sequence[Path]) -> None:
    """Images that no file of ``control_directory`` matches: an error (as in musubi-tuner; a file missing from a
    control folder is more likely a mistake), or, with ``allow_missing_control``, items without controls."""
    if not missing:
        return
    names = ", ".join(p.name for p in missing[:5]) + (", ..." if len(missing) > 5 else "")
    if not spec.allow_missing_control:
        raise DatasetError(
            f"{spec.where} key 'control_directory': {len(missing)} image(s) have no control image in "
            f"{spec.control_directory} ({names}); add them (<stem>.<ext> or <stem>_<n>.<ext>), or set "
            "allow_missing_control = true in this [[datasets]] table to train those images without controls"
        )
    log.info("images without control images", dataset=spec.where, items=len(missing), first=names)


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


def match_controls(
    stems: Iterable[str], controls: Iterable[Path], spec: DatasetSpec | None = None
) -> dict[str, tuple[Path, ...]]:
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
    rest = path.name[len(stem) :]
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
        raise DatasetError(f"{spec.where} key 'image_jsonl_file': {path} does not exist; check the path ({PATH_HINT})")
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


def _jsonl_entry(
    path: Path, lineno: int, line: str, spec: DatasetSpec, skips: _Skips, ignored: set[str]
) -> _Entry | None:
    where = f"{path}:{lineno}"
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise DatasetError(
            f"{where}: not valid JSON ({short_repr(str(exc), 200)}); each line must be one object"
        ) from None
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: each line must be a JSON object with image_path and caption")
    if "video_path" in record:
        raise DatasetError(f"{where} key 'video_path': kern trains images; video datasets are not supported")
    named = targets.jsonl_targets(record, where) if spec.multiple_target else [("image_path", record.get("image_path"))]
    if not isinstance(named[0][1], str):
        raise DatasetError(f"{where} key 'image_path': missing or not a string; every line needs the image's path")
    image_path, *layers = (_jsonl_path(value, path, where, key) for key, value in named)
    controls: list[tuple[int, Path]] = []
    for key, value in record.items():
        m = _CONTROL_KEY.fullmatch(key)
        if key == "control_path" or m:
            controls.append((int(m.group(1)) if m else -1, _jsonl_path(value, path, where, key)))
        elif key not in JSONL_KEYS and key not in {k for k, _ in named}:
            ignored.add(key)
    caption = record.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise DatasetError(f"{where} key 'caption': expected a string, got {short_repr(caption)}")
    caption = caption if caption is not None else spec.default_caption
    if caption is None:
        skips.add("no caption", image_path, line=lineno)
        return None
    controls_sorted = tuple(p for _, p in sorted(controls, key=lambda c: c[0]))
    return _Entry(image_path, caption.strip(), controls_sorted, tuple(layers))


def _jsonl_path(value: Any, jsonl: Path, where: str, key: str) -> Path:
    """An image path of a JSONL line: a string naming an existing file. A missing file or a folder is an error
    naming the line (a wrong path is a mistake in the file to fix, unlike a corrupt image, which is skipped)."""
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise DatasetError(f"{where} key {key!r}: expected a path string, got {short_repr(value)}")
    # As the config's paths: from the JSONL file's folder and from the working directory (musubi's).
    p, _ = locate_path(value, jsonl.parent, f"{where} key {key!r}", "the JSONL file's folder")
    if p.is_dir():
        raise DatasetError(f"{where} key {key!r}: {p} is a folder, not an image file")
    if not p.is_file():
        raise DatasetError(
            f"{where} key {key!r}: {p} does not exist; check the path (relative paths are looked up from the "
            "JSONL file's folder and from the working directory)"
        )
    return p


def _check_unique_stems(spec: DatasetSpec, entries: Sequence[_Entry]) -> None:
    """Cache files are named by stem, so two images of one dataset with the same stem would share them."""
    seen: dict[str, Path] = {}
    for entry in entries:
        stem = entry.image_path.stem
        if stem == EMPTY_STEM:
            raise DatasetError(
                f"{spec.where}: image {entry.image_path}: the name {EMPTY_STEM!r} is reserved for kern's empty-caption cache; rename the image"
            )
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
        return dict(zip(paths, pool.map(probe, paths)))


# --------------------------------------------------------------------------- batches


def batch_key(item: Item) -> tuple:
    """Items with equal keys stack into one batch: same dataset, target size, and control count and sizes."""
    return (item.dataset_index, item.bucket, len(item.control_buckets), item.control_buckets, len(item.target_paths))


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
