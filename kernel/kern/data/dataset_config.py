"""The dataset config: musubi-tuner's dataset TOML (or JSON) as users already have it, plus a few keys of kern's own.

``load_dataset_config`` reads it into one ``DatasetSpec`` per ``[[datasets]]`` table, every value resolved (dataset
→ [general] → default) and checked: the keys allowed where, their types and ranges. Errors name the file and the
key. See ``docs/datasets.md`` §1.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping, Sequence

import attrs

from kern.errors import ConfigError, DatasetError
from kern.log import get_logger

log = get_logger(__name__)

DEFAULT_RESOLUTION = (960, 544)  # musubi's default
# Sane bounds for config numbers: beyond them a value is a typo, and would allocate absurd buckets or epochs.
MAX_SIDE = 16384  # pixels, each side of resolution / control_resolution
MAX_BATCH_SIZE = 4096
MAX_REPEATS = 10_000

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
    # sd-scripts' validation keys: hold out this share of a [[datasets]] table's items, split with this seed
    # (default: train.seed); the seed also fixes the validation noise (kern.train.validation).
    "validation_split": ("float", 0.0),
    "validation_seed": ("int", None),
}
# Keys allowed per dataset only (they name folders, or would clash if shared).
DATASET_KEYS: dict[str, tuple[str, Any]] = {
    "image_directory": ("path", None),
    "image_jsonl_file": ("path", None),
    "cache_directory": ("path", None),
    "control_directory": ("path", None),
    "multiple_target": ("bool", False),
    # kern's own: images that match no file of control_directory train without controls instead of being an error.
    "allow_missing_control": ("bool", False),
}
# musubi names some keys after an architecture ("<prefix>_no_resize_control", "<prefix>_control_resolution"); kern
# reads each as the plain key, with a warning to rename it, whatever the prefix.
PREFIXED_KEYS = ("no_resize_control", "control_resolution")
_PREFIXED_KEY = re.compile(r"[A-Za-z0-9_]+_(" + "|".join(PREFIXED_KEYS) + ")")
# FramePack one-frame keys: meaningful only to that (video) architecture, so harmless to ignore.
IGNORED_KEYS = ("fp_latent_window_size", "fp_1f_clean_indices", "fp_1f_target_index", "fp_1f_no_post")
VIDEO_KEYS = (
    "video_directory",
    "video_jsonl_file",
    "target_frames",
    "frame_extraction",
    "frame_stride",
    "frame_sample",
    "max_frames",
    "source_fps",
)


class AmbiguousPathError(DatasetError, ConfigError):
    """A relative path of a dataset config that exists both from the config's folder and from the working
    directory, as two places (``locate_path``)."""


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
    multiple_target: bool = False  # musubi's: each image comes with numbered target images (RGBA layers)
    allow_missing_control: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None
    label: str | None = None  # the table, for messages: "validation.datasets[0]"; default "datasets[<index>]"

    @property
    def where(self) -> str:
        return f"{self.source}: {self.label or f'datasets[{self.index}]'}"


def load_dataset_config(path: str | os.PathLike) -> list[DatasetSpec]:
    """Read a musubi-tuner dataset config (``.toml`` or ``.json``); errors name the file and the key."""
    path = Path(path)
    try:
        raw = _read_config(path)
    except OSError as exc:  # e.g. a name too long for the file system
        raise DatasetError(f"{path}: cannot read the dataset config ({exc.strerror or exc})") from None
    for key in raw:
        if key not in ("general", "datasets", "validation"):
            raise DatasetError(
                f"{path}: unknown top-level key {key!r}; a dataset config has [general], [[datasets]] and "
                "[[validation.datasets]]"
            )
    general = raw.get("general", {})
    if not isinstance(general, dict):
        raise DatasetError(f"{path}: 'general' must be a table ([general])")
    datasets = raw.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise DatasetError(
            f"{path}: no datasets; add at least one [[datasets]] table with image_directory or image_jsonl_file"
        )
    for i, d in enumerate(datasets):
        if not isinstance(d, dict):
            raise DatasetError(f"{path}: datasets[{i}] must be a table ([[datasets]]), got {short_repr(d)}")
    shared = _read_section(general, path, "[general]", SHARED_KEYS)
    specs = [_dataset_spec(i, d, shared, path) for i, d in enumerate(datasets)]
    _check_unique_cache_dirs(specs)
    return specs


def load_validation_config(path: str | os.PathLike, first_index: int = 0) -> list[DatasetSpec]:
    """The config's ``[[validation.datasets]]`` tables (held-out data: the keys of ``[[datasets]]``, ``[general]``
    applying, ``validation_split`` excepted), indexed from ``first_index`` (after the training datasets, so item keys
    stay unique); ``[]`` when it has none. Call after :func:`load_dataset_config` has checked the file."""
    path = Path(path)
    raw = _read_config(path)
    section = raw.get("validation")
    if section is None:
        return []
    tables = section.get("datasets") if isinstance(section, dict) and set(section) == {"datasets"} else None
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise DatasetError(f"{path}: 'validation' holds only [[validation.datasets]] tables (one or more)")
    shared = _read_section(raw.get("general", {}), path, "[general]", SHARED_KEYS)
    specs = []
    for j, table in enumerate(tables):
        name = f"validation.datasets[{j}]"
        if "validation_split" in table:
            raise DatasetError(
                f"{path}: {name} key 'validation_split': a validation dataset is held out whole; remove the key "
                "(validation_split splits a [[datasets]] table)"
            )
        spec = _dataset_spec(first_index + j, table, shared, path, name)
        specs.append(attrs.evolve(spec, validation_split=0.0))  # [general]'s split is for the training tables
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
    except (
        ValueError,
        RecursionError,
    ) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors; so is an int of 5000 digits
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
        raise DatasetError(
            f"{where}: cannot read ({exc.strerror or exc}); check the file and its permissions"
        ) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(
            f"{where}: not UTF-8 text (line {line}, byte {exc.start}: {data[exc.start : exc.start + 1]!r}); "
            "save the file as UTF-8"
        ) from None


def _read_section(
    section: Mapping[str, Any], path: Path, name: str, allowed: Mapping[str, tuple[str, Any]]
) -> dict[str, Any]:
    """Check one table's keys and types; returns the values that are set (JSON nulls count as unset)."""
    section = _map_prefixed(dict(section), path, name)
    out: dict[str, Any] = {}
    for key, value in section.items():
        where = f"{path}: {name} key {key!r}"
        if key in VIDEO_KEYS:
            raise DatasetError(
                f"{where}: kern trains images; video datasets are not supported (use image_directory or image_jsonl_file)"
            )
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


def unprefixed_key(key: str) -> str | None:
    """The plain key that a musubi key prefixed with an architecture's name stands for
    (``<prefix>_control_resolution`` → ``control_resolution``); ``None`` for any other key."""
    m = _PREFIXED_KEY.fullmatch(key)
    return m.group(1) if m else None


def _map_prefixed(section: dict[str, Any], path: Path, name: str) -> dict[str, Any]:
    # Sorted, so that of two prefixed keys for one plain key the same one wins whatever the file's order.
    for old in sorted(k for k in section if unprefixed_key(k)):
        new = unprefixed_key(old)
        value = section.pop(old)
        if new in section:
            log.warning(
                "deprecated dataset key ignored: the new key is set", file=str(path), section=name, key=old, use=new
            )
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
            raise DatasetError(f"{where}: expected an integer, got {short_repr(value)}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DatasetError(f"{where}: expected a number, got {short_repr(value)}")
        try:
            value = float(value)
        except OverflowError:  # an int too large for a float
            raise DatasetError(f"{where}: expected a finite number, got {short_repr(value)}") from None
        if not math.isfinite(value):
            raise DatasetError(f"{where}: expected a finite number, got {value!r}")
        return value
    if kind in ("str", "path"):
        if not isinstance(value, str):
            raise DatasetError(f"{where}: expected a string, got {short_repr(value)}")
        if "\x00" in value:
            raise DatasetError(f"{where}: contains a NUL character; remove it")
        if kind == "path" and not value.strip():
            raise DatasetError(f"{where}: is empty; give a path ({PATH_HINT})")
        return value
    if kind == "size":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if not (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise DatasetError(f"{where}: expected an integer or [width, height], got {short_repr(value)}")
        if min(value) < 1:
            raise DatasetError(f"{where}: sizes must be positive, got {short_repr(value)}")
        if max(value) > MAX_SIDE:
            raise DatasetError(f"{where}: each side must be at most {MAX_SIDE} pixels, got {short_repr(value)}")
        return (value[0], value[1])
    raise AssertionError(kind)


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message must stay readable whatever the file holds."""
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python prints
        text = f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _dataset_spec(
    index: int, table: Mapping[str, Any], shared: Mapping[str, Any], path: Path, name: str | None = None
) -> DatasetSpec:
    name = name or f"datasets[{index}]"
    where = f"{path}: {name}"
    own = _read_section(table, path, name, {**SHARED_KEYS, **DATASET_KEYS})
    values = {key: own.get(key, shared.get(key, default)) for key, (_, default) in SHARED_KEYS.items()}
    paths, found_from = {}, None
    for key in ("image_directory", "image_jsonl_file", "control_directory", "cache_directory"):
        if key not in own:
            paths[key] = None
            continue
        # A cache folder found nowhere is made where the dataset's images were found (see locate_path).
        prefer = found_from if key == "cache_directory" else None
        paths[key], origin = locate_path(own[key], path.parent, f"{where} key {key!r}", "the config's folder", prefer)
        if key in ("image_directory", "image_jsonl_file"):
            found_from = origin
    if own.get("multiple_target") and paths["control_directory"]:
        raise DatasetError(
            f"{where} key 'control_directory': a multiple_target dataset has no control images (its captioned "
            "image is the condition); remove control_directory"
        )
    if paths["image_directory"] and paths["image_jsonl_file"]:
        raise DatasetError(f"{where}: set image_directory or image_jsonl_file, not both")
    if not paths["image_directory"] and not paths["image_jsonl_file"]:
        raise DatasetError(f"{where}: set image_directory (a folder of images and captions) or image_jsonl_file")
    if paths["image_jsonl_file"] and not paths["cache_directory"]:
        raise DatasetError(
            f"{where} key 'cache_directory': required with image_jsonl_file; set it to a folder for this dataset's caches"
        )
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
        multiple_target=own.get("multiple_target", False),
        allow_missing_control=own.get("allow_missing_control", False),
        label=name,
        **values,
    )


# The hint of "does not exist" errors (docs/datasets.md §1, Paths).
PATH_HINT = "relative paths are looked up from the config's folder and from the working directory"


def locate_path(value: str, base: Path, what: str, base_name: str, prefer: str | None = None) -> tuple[Path, str]:
    """Where a path of a dataset config (or of a JSONL line) is, and where it was found: ``"base"``, ``"cwd"``
    or ``"either"`` (absolute, or both lookups name one place).

    kern used to resolve relative paths from the config's folder (``base``), musubi-tuner from the working
    directory; both are tried, so a config written for either works. Found in one place: that one. In both,
    as two different places: ambiguous, an error naming ``what`` and both, saying to write an absolute path.
    In neither: from ``base`` (then the caller's "does not exist" error names it), or from the working
    directory when ``prefer`` is ``"cwd"`` (a cache folder not made yet goes beside the images found there).
    """
    p = Path(value).expanduser()
    if p.is_absolute():
        return p.resolve(), "either"
    here, there = (base / p).resolve(), p.resolve()
    if here == there:
        return here, "either"
    here_exists, there_exists = _exists(here), _exists(there)
    if here_exists and there_exists:
        raise AmbiguousPathError(
            f"{what}: the relative path {value!r} names two places: {here} (from {base_name}) and {there} "
            "(from the working directory); write an absolute path"
        )
    if here_exists or (not there_exists and prefer != "cwd"):
        return here, "base"
    return there, "cwd"


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the file system ...: the scan that opens it reports it, naming the key
        return False


def _check_ranges(values: Mapping[str, Any], where: str) -> None:
    for key, top in (("batch_size", MAX_BATCH_SIZE), ("num_repeats", MAX_REPEATS)):
        if values[key] < 1:
            raise DatasetError(f"{where} key {key!r}: must be at least 1, got {short_repr(values[key])}")
        if values[key] > top:
            raise DatasetError(f"{where} key {key!r}: must be at most {top}, got {short_repr(values[key])}")
    if not 0.0 <= values["validation_split"] < 1.0:
        raise DatasetError(
            f"{where} key 'validation_split': must be at least 0 and below 1, got {values['validation_split']}; "
            "to hold out a whole folder, give it a [[validation.datasets]] table"
        )
    if values["validation_seed"] is not None and not 0 <= values["validation_seed"] < 2**63:
        raise DatasetError(f"{where} key 'validation_seed': must be between 0 and 2**63 - 1")
    if not 0.0 <= values["caption_dropout_rate"] <= 1.0:
        raise DatasetError(
            f"{where} key 'caption_dropout_rate': must be between 0 and 1, got {values['caption_dropout_rate']}"
        )
    ext = values["caption_extension"]
    if ext is not None and (not ext or any(c in ext for c in "/\\")):
        raise DatasetError(
            f"{where} key 'caption_extension': {ext!r} must be a non-empty file-name ending such as \".txt\", "
            "without / or \\"
        )


def _check_unique_cache_dirs(specs: Sequence[DatasetSpec]) -> None:
    seen: dict[Path, int] = {}
    for spec in specs:
        other = seen.setdefault(spec.cache_directory, spec.index)
        if other != spec.index:
            raise DatasetError(
                f"{spec.where} key 'cache_directory': {spec.cache_directory} is also datasets[{other}]'s cache directory "
                "(it defaults to image_directory); give each dataset its own cache_directory"
            )
