"""Cache files in musubi-tuner's layout: their names, their tensor keys, and whether an existing one can be reused.

Latents: ``{cache_dir}/{stem}_{origW:04d}x{origH:04d}_{arch_id}.safetensors`` with keys ``latents_{shape}_{dtype}``
and ``latents_control_{i}_{shape}_{dtype}``, ``shape`` the latent's shape after its channel axis (``64x64``, or
``1x64x64`` in the frames layout). Text: ``{cache_dir}/{stem}_{arch_id}_te.safetensors`` with one key per
text-encoder output, named by the architecture's ``kern.records.CacheLayout`` (``ctx_vec_bfloat16``, or
``varlen_vl_embed_bfloat16`` for an unpadded variable-length output). The empty caption is kern's own
(``_empty_{arch_id}_te.safetensors``). The dtype suffix is ``str(dtype)``'s last part, as musubi writes it.

Reuse: a file kern wrote carries kern's fingerprint (``kern.source`` / ``kern.settings``) and is reused when that
equals the current one. A file without one (musubi-tuner's) is reused when its own metadata, keys, shapes and
dtypes fit the item: musubi users' caches are used as they are (docs/datasets.md §4).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from kern.core.io import read_header
from kern.data.items import EMPTY_STEM, Item
from kern.errors import DatasetError, KernError
from kern.log import get_logger
from kern.records import CacheLayout

log = get_logger(__name__)

FORMAT_VERSION = "1.0.1"  # musubi's cache format version
SOURCE_KEY = "kern.source"
SETTINGS_KEY = "kern.settings"
NO_LAYOUT = CacheLayout()
# Bump when load_image's pixels change for the same inputs, so every latent cache is rebuilt.
RESIZE_RULE = (
    "rgb-on-white/exif/lanczos-cover/centre-crop/trim-below-step-is-crop/1/modes-2"  # modes-2: 16-bit, float, LAB, tRNS
)
VARLEN = "varlen_"  # musubi: a per-item tensor of its own length, batched as a list (kern pads it when it has a mask)

_DTYPE_NAMES = sorted(
    {str(v).removeprefix("torch.") for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=len, reverse=True
)
# The floating-point dtypes a cache tensor may have: safetensors header name -> torch name.
_FLOAT_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


# --------------------------------------------------------------------------- names


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def strip_dtype(key: str) -> str:
    """``ctx_vec_bfloat16`` → ``ctx_vec`` (dtype names may contain ``_``, e.g. ``float8_e4m3fn``)."""
    for name in _DTYPE_NAMES:
        if key.endswith("_" + name):
            return key[: -len(name) - 1]
    return key


def latent_cache_path(item: Item, arch_id: str) -> Path:
    return item.cache_dir / f"{item.stem}_{item.size[0]:04d}x{item.size[1]:04d}_{arch_id}.safetensors"


def text_cache_path(item: Item, arch_id: str) -> Path:
    return item.cache_dir / f"{item.stem}_{arch_id}_te.safetensors"


def empty_text_cache_path(cache_dir: str | os.PathLike, arch_id: str) -> Path:
    return Path(cache_dir) / f"{EMPTY_STEM}_{arch_id}_te.safetensors"


def item_empty_text_cache_path(item: Item, arch_id: str) -> Path:
    """The empty caption encoded with this item's control images (encoders that read them; caption dropout)."""
    return item.cache_dir / f"{item.stem}_{arch_id}{EMPTY_STEM}_te.safetensors"


# --------------------------------------------------------------------------- tensors in and out of the files


def latent_key(prefix: str, stored: torch.Tensor) -> str:
    """``latents_64x64_float32``: the shape after the channel axis, then the dtype."""
    return f"{prefix}_{'x'.join(str(d) for d in stored.shape[1:])}_{dtype_name(stored.dtype)}"


def latent_to_file(latent: torch.Tensor, layout: CacheLayout) -> torch.Tensor:
    """One item's latent as stored: in the frames layout (C, h, w) → (C, 1, h, w), (F, C, h, w) → (C, F, h, w)."""
    if not layout.latent_frames:
        return latent
    return latent.unsqueeze(1) if latent.ndim == 3 else latent.movedim(0, 1)


def latent_from_file(stored: torch.Tensor, layout: CacheLayout) -> torch.Tensor:
    """The inverse of ``latent_to_file``."""
    if not layout.latent_frames or stored.ndim != 4:
        return stored
    return stored[:, 0] if stored.shape[1] == 1 else stored.movedim(1, 0)


def latents_in(tensors: Mapping[str, Any]) -> tuple[list[str], dict[int, str]]:
    """The target key(s) and the control keys by index of a latent file's tensors."""
    targets, controls = [], {}
    for key in tensors:
        m = re.match(r"latents_control_(\d+)_", key)
        if m:
            controls[int(m.group(1))] = key
        elif key.startswith("latents_"):
            targets.append(key)
    return targets, controls


def text_to_file(row: Mapping[str, Any], layout: CacheLayout) -> dict[str, torch.Tensor]:
    """One item's text-encoder outputs as stored: named by the layout, variable-length ones without their padding
    (``varlen_<key>``) and without their mask."""
    named = {k.name: k for k in layout.text}
    masks = {k.mask for k in layout.text if k.mask}
    out = {}
    for name, t in row.items():
        if name in masks:
            continue
        spec = named.get(name)
        t = t.detach().cpu()
        if spec is not None and spec.mask:
            if spec.mask not in row:
                raise KernError(
                    f"the text encode function returned no {spec.mask!r}, which the architecture's cache layout "
                    f"names as the mask of {name!r}"
                )
            keep = row[spec.mask].detach().cpu().bool()
            out[f"{VARLEN}{spec.key}_{dtype_name(t.dtype)}"] = t[keep].clone()
        else:
            out[f"{spec.key if spec else name}_{dtype_name(t.dtype)}"] = t.clone()
    return out


def text_from_file(tensors: Mapping[str, torch.Tensor], layout: CacheLayout) -> dict[str, torch.Tensor]:
    """The inverse of ``text_to_file``, for one item: the outputs by their own names (a variable-length output
    unpadded; ``collate_text`` pads it and rebuilds its mask). Keys the layout does not name keep their name."""
    by_key = {(VARLEN if k.mask else "") + k.key: k.name for k in layout.text}
    return {by_key.get(base, base): t for base, t in ((strip_dtype(k), t) for k, t in tensors.items())}


def text_keys(layout: CacheLayout) -> set[str]:
    """The dtype-stripped keys a text file of this layout holds."""
    return {(VARLEN if k.mask else "") + k.key for k in layout.text}


# --------------------------------------------------------------------------- fingerprints


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _file_stamp(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
    except OSError as exc:
        raise DatasetError(
            f"{path}: cannot read it any more ({exc.strerror}); it was there when the dataset was scanned"
        ) from None
    return {"name": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def latent_fingerprint(
    item: Item,
    dtype: torch.dtype,
    settings: Mapping[str, Any] | None,
    layout: CacheLayout = NO_LAYOUT,
    mode: str = "RGB",
) -> str:
    """What the item's latents depend on (its images, their sizes, the pixel ``mode`` the VAE reads ...); a
    different value means the cache is stale."""
    controls = [{**_file_stamp(p), "bucket": list(b)} for p, b in zip(item.control_paths, item.control_buckets)]
    return _json(
        {
            "image": _file_stamp(item.image_path),
            "size": list(item.size),
            "bucket": list(item.bucket),
            "step": item.step,
            "controls": controls,
            "resize": RESIZE_RULE,
            "dtype": dtype_name(dtype),
            "settings": dict(settings or {}),
            # Only when set, so that files written before layouts existed stay current where nothing changed.
            **({"frames": True} if layout.latent_frames else {}),
            **({"targets": [_file_stamp(p) for p in item.target_paths]} if item.target_paths else {}),
            **({"mode": mode} if mode != "RGB" else {}),
        }
    )


def settings_fingerprint(settings: Mapping[str, Any] | None, layout: CacheLayout = NO_LAYOUT) -> str:
    keys = [[k.name, k.key, k.mask] for k in layout.text]
    return _json({**dict(settings or {}), **({"kern.keys": keys} if keys else {})})


def text_fingerprint(
    item: Item | None,
    settings: Mapping[str, Any] | None,
    *,
    controls: bool = False,
    layout: CacheLayout = NO_LAYOUT,
) -> str:
    """The ``kern.settings`` of a text cache: the encoder settings (and the layout's key names), plus the item's
    control files when the encoder reads them. ``item=None``: the empty caption's."""
    extra = {"controls": [_file_stamp(p) for p in item.control_paths]} if controls and item is not None else {}
    return settings_fingerprint({**dict(settings or {}), **extra}, layout)


# --------------------------------------------------------------------------- reuse


def read_cache_header(path: Path) -> tuple[dict[str, Any], dict[str, str]] | None:
    """The header of an existing cache file; ``None`` when it is missing or unreadable (then it is rebuilt)."""
    if not path.exists():
        return None
    try:
        return read_header(path)
    except KernError as exc:
        log.warning("corrupt cache file; rebuilding it", file=str(path), error=str(exc))
        return None


def _float_key(key: str, entry: Mapping[str, Any]) -> bool:
    """A floating-point tensor whose key ends with its own dtype, as musubi names them."""
    name = _FLOAT_DTYPES.get(entry.get("dtype", ""))
    return name is not None and key.endswith("_" + name)


def latent_state(
    path: Path,
    item: Item,
    fingerprint: str,
    *,
    arch_name: str,
    layout: CacheLayout,
    grid: tuple[int, int] | None,
) -> str | None:
    """``"kern"``: a latent file kern wrote with this fingerprint; ``"foreign"``: one without kern's fingerprint
    whose metadata (``architecture``, original ``width`` / ``height``), keys, shapes (``grid`` = latent channels,
    pixels per latent cell, at the item's bucket sizes) and dtypes fit the item; ``None``: (re)build it."""
    found = read_cache_header(path)
    if found is None:
        return None
    tensors, metadata = found
    targets, controls = latents_in(tensors)
    if len(targets) != 1 or sorted(controls) != list(range(len(item.control_paths))):
        return None
    if SOURCE_KEY in metadata:
        return "kern" if metadata[SOURCE_KEY] == fingerprint else None
    if grid is None or (metadata.get("architecture"), metadata.get("width"), metadata.get("height")) != (
        arch_name,
        str(item.size[0]),
        str(item.size[1]),
    ):
        return None
    channels, cell = grid
    if item.target_paths and not layout.latent_frames:
        return None  # several targets are stored as frames; without that layout only kern's own files are known
    sizes = [("latents", targets[0], item.bucket, 1 + len(item.target_paths))]
    sizes += [(f"latents_control_{i}", controls[i], b, 1) for i, b in enumerate(item.control_buckets)]
    for prefix, key, (w, h), frames in sizes:
        shape = [channels, *([frames] if layout.latent_frames else []), h // cell, w // cell]
        entry = tensors[key]
        dtype = _FLOAT_DTYPES.get(entry.get("dtype", ""))
        if list(entry.get("shape", ())) != shape or key != f"{prefix}_{'x'.join(map(str, shape[1:]))}_{dtype}":
            return None
    return "foreign"


def text_state(
    path: Path, caption: str, fingerprint: str, *, arch_name: str, layout: CacheLayout, own_only: bool = False
) -> str | None:
    """``"kern"``: a text file kern wrote for this caption with this fingerprint; ``"foreign"``: one without kern's
    fingerprint for this caption (``caption1``) and ``architecture`` that holds every tensor the layout names, as
    floating-point tensors; ``None``: (re)build it. ``own_only``: only kern's files count (the empty caption)."""
    found = read_cache_header(path)
    if found is None:
        return None
    tensors, metadata = found
    if not tensors or metadata.get("caption1") != caption:
        return None
    if SETTINGS_KEY in metadata:
        return "kern" if metadata[SETTINGS_KEY] == fingerprint else None
    if own_only or not layout.text or metadata.get("architecture") != arch_name:
        return None
    if not all(_float_key(k, e) for k, e in tensors.items()):
        return None
    return "foreign" if text_keys(layout) <= {strip_dtype(k) for k in tensors} else None
