"""Latent and text-encoder caches in musubi-tuner's layout, rebuilt exactly when their inputs change.

Latents: ``{cache_dir}/{stem}_{origW:04d}x{origH:04d}_{arch_id}.safetensors`` with keys
``latents_{h}x{w}_{dtype}`` and ``latents_control_{i}_{h}x{w}_{dtype}``. Text:
``{cache_dir}/{stem}_{arch_id}_te.safetensors`` with one ``{name}_{dtype}`` key per tensor the encode
function returns, and once per cache folder ``_empty_{arch_id}_te.safetensors``, the empty caption
(for caption dropout). Metadata as musubi (``architecture``, ``width``, ``height`` / ``caption1``,
``format_version``) plus kern's fingerprints: ``kern.source`` for latents (the image and control files'
size and mtime, the sizes they are resized to, the dtype and the caller's settings), ``kern.settings``
for text (the caller's encoder settings; the caption itself is ``caption1``). A cache whose fingerprint
differs, or which is unreadable, is rebuilt; every write is atomic (``kern.core.io``). The architecture
(its id, name and encode functions) comes from the caller.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from kern.core.io import load_file, read_header, save_file
from kern.data.images import load_image
from kern.data.items import EMPTY_STEM, Item
from kern.errors import DatasetError, KernError
from kern.log import get_logger

log = get_logger(__name__)

FORMAT_VERSION = "1.0.1"  # musubi's cache format version
SOURCE_KEY = "kern.source"
SETTINGS_KEY = "kern.settings"
# Bump when load_image's pixels change for the same inputs, so every latent cache is rebuilt.
RESIZE_RULE = (
    "rgb-on-white/exif/lanczos-cover/centre-crop/trim-below-step-is-crop/1/modes-2"  # modes-2: 16-bit, float, LAB, tRNS
)

_DTYPE_NAMES = sorted(
    {str(v).removeprefix("torch.") for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=len, reverse=True
)

LatentEncode = Callable[[torch.Tensor], torch.Tensor]
TextEncode = Callable[..., Mapping[str, Any]]  # (prompts) -> tensors; (prompts, images) with ``images``


# --------------------------------------------------------------------------- names


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def _latent_key(prefix: str, latent: torch.Tensor) -> str:
    # The shape after the channel dim: "64x64" for (C, h, w), "1x64x64" for (C, F, h, w).
    return f"{prefix}_{'x'.join(str(d) for d in latent.shape[1:])}_{dtype_name(latent.dtype)}"


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


def latent_fingerprint(item: Item, dtype: torch.dtype, settings: Mapping[str, Any] | None) -> str:
    """What the item's latents depend on; a different value means the cache is stale."""
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
        }
    )


def settings_fingerprint(settings: Mapping[str, Any] | None) -> str:
    return _json(dict(settings or {}))


def _header(path: Path) -> tuple[dict[str, Any], dict[str, str]] | None:
    """The header of an existing cache file; ``None`` when it is missing or unreadable (then it is rebuilt)."""
    if not path.exists():
        return None
    try:
        return read_header(path)
    except KernError as exc:
        log.warning("corrupt cache file; rebuilding it", file=str(path), error=str(exc))
        return None


def _latent_is_current(path: Path, fingerprint: str, n_controls: int) -> bool:
    found = _header(path)
    if found is None:
        return False
    tensors, metadata = found
    targets = [k for k in tensors if k.startswith("latents_") and not k.startswith("latents_control_")]
    controls = [k for k in tensors if k.startswith("latents_control_")]
    return metadata.get(SOURCE_KEY) == fingerprint and len(targets) == 1 and len(controls) == n_controls


def _text_is_current(path: Path, caption: str, fingerprint: str) -> bool:
    found = _header(path)
    if found is None:
        return False
    tensors, metadata = found
    return bool(tensors) and metadata.get("caption1") == caption and metadata.get(SETTINGS_KEY) == fingerprint


# --------------------------------------------------------------------------- latents


def ensure_latent_cache(
    items: Sequence[Item],
    arch_id: str,
    encode: LatentEncode,
    dtype: torch.dtype | str,
    batch_size: int = 1,
    settings: Mapping[str, Any] | None = None,
    *,
    arch_name: str | None = None,
) -> int:
    """Encode the latents of every item whose cache is missing, stale or corrupt; return how many.

    ``encode(images)`` takes (B, 3, H, W) in [-1, 1] and returns (B, C, h, w) (or (B, C, F, h, w));
    it is called with up to ``batch_size`` images of one bucket at a time (targets, then each control
    index). ``settings`` (JSON-able: the VAE file, its dtype ...) is part of the fingerprint, so
    changing it rebuilds every cache. ``arch_name`` is written as ``architecture`` (default ``arch_id``).
    """
    dtype = _as_dtype(dtype)
    items = list({item.key: item for item in items}.values())
    prints = {item.key: latent_fingerprint(item, dtype, settings) for item in items}
    stale = [
        i for i in items if not _latent_is_current(latent_cache_path(i, arch_id), prints[i.key], len(i.control_paths))
    ]
    log.info("latent cache", items=len(items), to_encode=len(stale), arch=arch_id)
    _remove_old_sizes(items, arch_id)
    groups: dict[tuple, list[Item]] = {}
    for item in stale:
        groups.setdefault((item.bucket, item.control_buckets), []).append(item)
    for group in groups.values():
        for chunk in _chunks(group, max(1, batch_size)):
            _encode_latents(chunk, arch_id, encode, dtype, prints, arch_name or arch_id)
    return len(stale)


def _encode_latents(
    chunk: Sequence[Item],
    arch_id: str,
    encode: LatentEncode,
    dtype: torch.dtype,
    prints: Mapping[str, str],
    arch_name: str,
) -> None:
    targets = _encode_images(encode, [(i.image_path, i.bucket, i.step) for i in chunk], dtype)
    controls = [
        _encode_images(encode, [(i.control_paths[c], i.control_buckets[c], i.step) for i in chunk], dtype)
        for c in range(len(chunk[0].control_paths))
    ]
    for j, item in enumerate(chunk):
        tensors = {_latent_key("latents", targets[j]): targets[j].clone()}
        for c, control in enumerate(controls):
            tensors[_latent_key(f"latents_control_{c}", control[j])] = control[j].clone()
        _replace_nan(tensors, item.key)
        metadata = {
            "architecture": arch_name,
            "width": str(item.size[0]),
            "height": str(item.size[1]),
            "format_version": FORMAT_VERSION,
            SOURCE_KEY: prints[item.key],
        }
        save_file(tensors, latent_cache_path(item, arch_id), metadata)


def _encode_images(
    encode: LatentEncode, images: Sequence[tuple[Path, tuple[int, int], int]], dtype: torch.dtype
) -> torch.Tensor:
    batch = torch.stack([load_image(path, size, crop_below=step) for path, size, step in images])
    with torch.no_grad():
        out = encode(batch)
    if not isinstance(out, torch.Tensor) or out.ndim < 3 or out.shape[0] != len(images):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise KernError(
            f"the latent encode function returned {shape} for {len(images)} images; it must return (B, C, h, w)"
        )
    return out.detach().to("cpu", dtype)


def _remove_old_sizes(items: Sequence[Item], arch_id: str) -> None:
    """Drop an item's latent caches for other image sizes (left when an image is replaced), so tools
    that glob the folder, like musubi, never train on them. Files of stems kern does not know are kept."""
    pattern = re.compile(rf"(.+)_\d{{4,}}x\d{{4,}}_{re.escape(arch_id)}\.safetensors")
    by_dir: dict[Path, dict[str, Path]] = {}
    for item in items:
        by_dir.setdefault(item.cache_dir, {})[item.stem] = latent_cache_path(item, arch_id)
    for folder, current in by_dir.items():
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            m = pattern.fullmatch(path.name)
            if m and m.group(1) in current and path != current[m.group(1)]:
                log.info("removing latent cache of an earlier image size", file=str(path))
                path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- text


def ensure_text_cache(
    items: Sequence[Item],
    arch_id: str,
    encode: TextEncode,
    settings: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    *,
    arch_name: str | None = None,
    images: Callable[[Item], list] | None = None,
    empty_per_item: bool = False,
) -> int:
    """Encode the captions of every item whose text cache is missing, stale or corrupt; return how many.

    ``encode(prompts)`` returns ``{name: tensor}`` with the batch dimension first (or, for a
    variable-length output, a list of one tensor per prompt; name it ``varlen_...``). A cache is
    stale when its caption or ``settings`` (the text encoder, its options ...) differ. The empty
    caption is also cached once per cache folder, for caption dropout; it is not counted.

    With ``images`` (for encoders that also read the control images, such as an image-editing model's) the call is
    ``encode(prompts, [images(item) for each prompt])``, each cache is also keyed on its item's control
    files, and the empty caption, which means something else with each item's images, is cached per item
    (``item_empty_text_cache_path``) when ``empty_per_item`` (caption dropout) asks for it.
    """
    items = list({item.key: item for item in items}.values())

    def fingerprint(item: Item | None) -> str:
        return text_fingerprint(item, settings, controls=images is not None)

    stale = [i for i in items if not _text_is_current(text_cache_path(i, arch_id), i.caption, fingerprint(i))]
    log.info("text cache", items=len(items), to_encode=len(stale), arch=arch_id)
    name = arch_name or arch_id
    for chunk in _chunks(stale, max(1, batch_size)):
        prompts = [i.caption for i in chunk]
        outputs = (
            _encode_texts(encode, prompts)
            if images is None
            else _encode_texts(encode, prompts, [images(i) for i in chunk])
        )
        for j, item in enumerate(chunk):
            _save_text(
                text_cache_path(item, arch_id),
                {k: v[j] for k, v in outputs.items()},
                item.caption,
                fingerprint(item),
                name,
                item.key,
            )
    if images is not None:
        if empty_per_item:
            todo = [
                i for i in items if not _text_is_current(item_empty_text_cache_path(i, arch_id), "", fingerprint(i))
            ]
            for chunk in _chunks(todo, max(1, batch_size)):
                outputs = _encode_texts(encode, [""] * len(chunk), [images(i) for i in chunk])
                for j, item in enumerate(chunk):
                    _save_text(
                        item_empty_text_cache_path(item, arch_id),
                        {k: v[j] for k, v in outputs.items()},
                        "",
                        fingerprint(item),
                        name,
                        f"{item.key} <empty caption>",
                    )
        return len(stale)
    for folder in sorted({item.cache_dir for item in items}):
        path = empty_text_cache_path(folder, arch_id)
        if not _text_is_current(path, "", fingerprint(None)):
            outputs = _encode_texts(encode, [""])
            _save_text(path, {k: v[0] for k, v in outputs.items()}, "", fingerprint(None), name, "<empty caption>")
    return len(stale)


def text_fingerprint(item: Item | None, settings: Mapping[str, Any] | None, *, controls: bool = False) -> str:
    """The ``kern.settings`` of a text cache: the encoder settings, plus the item's control files when
    the encoder reads them. ``item=None``: the empty caption's."""
    extra = {"controls": [_file_stamp(p) for p in item.control_paths]} if controls and item is not None else {}
    return settings_fingerprint({**dict(settings or {}), **extra})


def _encode_texts(encode: TextEncode, prompts: list[str], *images: list) -> dict[str, Any]:
    with torch.no_grad():
        out = encode(prompts, *images)
    if not isinstance(out, Mapping) or not out:
        raise KernError(f"the text encode function returned {type(out).__name__}; it must return a dict of tensors")
    for name, value in out.items():
        ok = (isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == len(prompts)) or (
            isinstance(value, (list, tuple))
            and len(value) == len(prompts)
            and all(isinstance(v, torch.Tensor) for v in value)
        )
        if not isinstance(name, str) or not name or not ok:
            raise KernError(
                f"the text encode function's output {name!r} is not a tensor with batch dimension {len(prompts)} first"
            )
    return dict(out)


def _save_text(
    path: Path, tensors: Mapping[str, torch.Tensor], caption: str, fingerprint: str, arch_name: str, what: str
) -> None:
    out = {f"{name}_{dtype_name(t.dtype)}": t.detach().cpu().clone() for name, t in tensors.items()}
    _replace_nan(out, what)
    metadata = {
        "architecture": arch_name,
        "caption1": caption,
        "format_version": FORMAT_VERSION,
        SETTINGS_KEY: fingerprint,
    }
    save_file(out, path, metadata)


# --------------------------------------------------------------------------- loading


def load_batch(
    items: Sequence[Item], arch_id: str, generator: torch.Generator | None = None, caption_dropout_rate: float = 0.0
) -> dict[str, Any]:
    """One batch from the caches: ``latents`` (B, C, h, w) float32, ``text`` ``{name: (B, ...)}``,
    ``references`` (one (B, C, h_i, w_i) float32 per control, or ``None``), ``keys``, ``captions``.

    With ``caption_dropout_rate`` > 0 each item's text is, with that probability (drawn from
    ``generator``), the empty caption's encoding; its ``captions`` entry is then ``""``. Items must
    share a ``kern.data.items.batch_key`` (``batch_order`` makes such batches).
    """
    if not items:
        raise ValueError("load_batch needs at least one item")
    dropped = _dropout(len(items), caption_dropout_rate, generator)
    latents, references, texts = [], [], []
    for item, drop in zip(items, dropped):
        target, controls = _load_latents(latent_cache_path(item, arch_id))
        latents.append(target)
        references.append(controls)
        path = _empty_text(item, arch_id) if drop else text_cache_path(item, arch_id)
        texts.append(_load_text(*_stamp(path)))
    n_refs = {len(r) for r in references}
    if len(n_refs) != 1:
        raise KernError(
            f"batch {[i.key for i in items]} mixes items with different numbers of control images; build batches with kern.data.items.batch_order"
        )
    refs = [_stack([r[c] for r in references], "latents_control", items) for c in range(n_refs.pop())]
    return {
        "latents": _stack(latents, "latents", items),
        "text": _collate_text(texts, items),
        "references": refs or None,
        "keys": [i.key for i in items],
        "captions": ["" if d else i.caption for i, d in zip(items, dropped)],
    }


def _empty_text(item: Item, arch_id: str) -> Path:
    own = item_empty_text_cache_path(item, arch_id)  # written only for encoders that read the controls
    return own if own.exists() else empty_text_cache_path(item.cache_dir, arch_id)


def _dropout(n: int, rate: float, generator: torch.Generator | None) -> list[bool]:
    if rate <= 0:
        return [False] * n  # draws nothing, so turning dropout off leaves the generator's stream alone
    return (torch.rand(n, generator=generator) < rate).tolist()


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        return load_file(path)
    except Exception as exc:
        raise KernError(
            f"{path}: cache file missing or unreadable ({exc}); run the caching step again, it rebuilds the file"
        ) from None


def _load_latents(path: Path) -> tuple[torch.Tensor, list[torch.Tensor]]:
    tensors, _ = _load(path)
    target = [t for k, t in tensors.items() if k.startswith("latents_") and not k.startswith("latents_control_")]
    controls: dict[int, torch.Tensor] = {}
    for key, t in tensors.items():
        m = re.match(r"latents_control_(\d+)_", key)
        if m:
            controls[int(m.group(1))] = t
    if len(target) != 1:
        raise KernError(f"{path}: expected one latents_* tensor, found {len(target)}; delete the file and cache again")
    return target[0].float(), [controls[i].float() for i in sorted(controls)]


def _stamp(path: Path) -> tuple[str, int]:
    try:
        return str(path), path.stat().st_mtime_ns
    except OSError:
        return str(path), -1


@lru_cache(maxsize=64)
def _load_text(path: str, mtime_ns: int) -> dict[str, torch.Tensor]:
    # Cached by (path, mtime): the empty-caption file is read once, not once per dropped item.
    tensors, _ = _load(Path(path))
    return {strip_dtype(k): t for k, t in tensors.items()}


def _collate_text(texts: Sequence[Mapping[str, torch.Tensor]], items: Sequence[Item]) -> dict[str, Any]:
    names = set(texts[0])
    if any(set(t) != names for t in texts):
        raise KernError(
            f"text caches of batch {[i.key for i in items]} have different tensors; re-run text caching with one encoder"
        )
    return {
        n: [t[n] for t in texts] if n.startswith("varlen_") else _stack(pad_sequences([t[n] for t in texts]), n, items)
        for n in sorted(names)
    }


def pad_sequences(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-item text tensors that differ only in their first (sequence) length, right-padded with zeros to
    the longest: the batching rule for variable-length text (a mask's zeros then mark the padding)."""
    if len({tuple(t.shape) for t in tensors}) == 1 or len({(t.dim(), tuple(t.shape[1:])) for t in tensors}) != 1:
        return list(tensors)
    longest = max(t.shape[0] for t in tensors)
    return [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, longest - t.shape[0])) for t in tensors]


def _stack(tensors: Sequence[torch.Tensor], what: str, items: Sequence[Item]) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise KernError(
            f"{what} of batch {[i.key for i in items]} have different shapes {sorted(shapes)}; build batches with kern.data.items.batch_order"
        )
    return torch.stack(list(tensors))


# --------------------------------------------------------------------------- helpers


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def _chunks(seq: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _replace_nan(tensors: dict[str, torch.Tensor], what: str) -> None:
    """As musubi: NaN in an encoder output becomes 0, with a warning naming the item."""
    for key, t in tensors.items():
        if not t.is_floating_point():
            continue
        nan = torch.isnan(t.float())  # float() first: isnan is not implemented for every dtype (float8)
        if nan.any():
            log.warning("NaN in encoder output replaced by 0", item=what, tensor=key, count=int(nan.sum()))
            tensors[key] = t.float().masked_fill(nan, 0.0).to(t.dtype)
