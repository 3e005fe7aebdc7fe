"""Latent and text-encoder caches in musubi-tuner's layout, rebuilt exactly when their inputs change.

File names, tensor keys and the reuse rules are in ``kern.data.cache_files``; this module fills the caches
and loads batches from them. Metadata as musubi (``architecture``, ``width``, ``height`` / ``caption1``,
``format_version``) plus kern's fingerprints: ``kern.source`` for latents (the image and control files'
size and mtime, the sizes they are resized to, the dtype and the caller's settings), ``kern.settings``
for text (the caller's encoder settings; the caption itself is ``caption1``). A kern cache whose fingerprint
differs, or which is unreadable, is rebuilt; a cache file without a fingerprint (musubi-tuner's) is reused
when its own metadata, keys and shapes fit. Every write is atomic (``kern.core.io``). The architecture (its
id, name, file layout and encode functions) comes from the caller.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from kern.core.io import load_file, save_file
from kern.data.cache_files import (  # re-exported: the names are part of this module's API
    FORMAT_VERSION,
    NO_LAYOUT,
    SETTINGS_KEY,
    SOURCE_KEY,
    VARLEN,
    dtype_name,
    empty_text_cache_path,
    item_empty_text_cache_path,
    latent_cache_path,
    latent_fingerprint,
    latent_from_file,
    latent_key,
    latent_state,
    latent_to_file,
    latents_in,
    strip_dtype,
    text_cache_path,
    text_fingerprint,
    text_from_file,
    text_state,
    text_to_file,
)
from kern.data.images import load_image
from kern.data.items import Item
from kern.errors import KernError
from kern.log import get_logger
from kern.records import CacheLayout

log = get_logger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "SETTINGS_KEY",
    "SOURCE_KEY",
    "dtype_name",
    "empty_text_cache_path",
    "ensure_latent_cache",
    "ensure_text_cache",
    "item_empty_text_cache_path",
    "latent_cache_path",
    "latent_fingerprint",
    "load_batch",
    "pad_sequences",
    "strip_dtype",
    "text_cache_path",
    "text_fingerprint",
]

FOREIGN = "cache files made without kern's fingerprint (musubi-tuner's): reused, trusted on their own metadata, keys and shapes"

LatentEncode = Callable[[torch.Tensor], torch.Tensor]
TextEncode = Callable[..., Mapping[str, Any]]  # (prompts) -> tensors; (prompts, images) with ``images``


def _log_foreign(what: str, paths: Sequence[Path]) -> None:
    if paths:
        log.info(FOREIGN, cache=what, files=len(paths), first=str(paths[0]))


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
    layout: CacheLayout = NO_LAYOUT,
    grid: tuple[int, int] | None = None,
    mode: str = "RGB",
) -> int:
    """Encode the latents of every item whose cache is missing, stale or corrupt; return how many.

    ``encode(images)`` takes (B, 3, H, W) in [-1, 1] (B, 4, H, W with ``mode="RGBA"``) and returns (B, C, h, w)
    (or (B, F, C, h, w)); it is called with up to ``batch_size`` images of one bucket at a time (targets, then
    each further target index, then each control index). An item with further targets (``Item.target_paths``)
    is stored as frames (F, C, h, w), its first target first. ``settings`` (JSON-able: the VAE file, its dtype ...) is part of the fingerprint, so
    changing it rebuilds every cache. ``arch_name`` is written as ``architecture`` (default ``arch_id``).
    ``layout`` says how latents are stored; ``grid`` = (latent channels, pixels per latent cell) lets a file
    without kern's fingerprint be checked, and reused when it fits (without it such a file is rebuilt).
    """
    dtype = _as_dtype(dtype)
    name = arch_name or arch_id
    items = list({item.key: item for item in items}.values())
    prints = {item.key: latent_fingerprint(item, dtype, settings, layout, mode) for item in items}
    states = {
        i.key: latent_state(latent_cache_path(i, arch_id), i, prints[i.key], arch_name=name, layout=layout, grid=grid)
        for i in items
    }
    stale = [i for i in items if states[i.key] is None]
    foreign = [latent_cache_path(i, arch_id) for i in items if states[i.key] == "foreign"]
    log.info("latent cache", items=len(items), to_encode=len(stale), reused_foreign=len(foreign), arch=arch_id)
    _log_foreign("latents", foreign)
    _remove_old_sizes(items, arch_id)
    groups: dict[tuple, list[Item]] = {}
    for item in stale:
        groups.setdefault((item.bucket, item.control_buckets, len(item.target_paths)), []).append(item)
    for group in groups.values():
        for chunk in _chunks(group, max(1, batch_size)):
            _encode_latents(chunk, arch_id, encode, dtype, prints, name, layout, mode)
    return len(stale)


def _encode_latents(
    chunk: Sequence[Item],
    arch_id: str,
    encode: LatentEncode,
    dtype: torch.dtype,
    prints: Mapping[str, str],
    arch_name: str,
    layout: CacheLayout,
    mode: str = "RGB",
) -> None:
    targets = _encode_images(encode, [(i.image_path, i.bucket, i.step) for i in chunk], dtype, mode)
    if chunk[0].target_paths:  # several targets: one encode per target index, stacked as frames (F, C, h, w)
        layers = [
            _encode_images(encode, [(i.target_paths[n], i.bucket, i.step) for i in chunk], dtype, mode)
            for n in range(len(chunk[0].target_paths))
        ]
        targets = torch.stack([targets, *layers], dim=1)
    controls = [
        _encode_images(encode, [(i.control_paths[c], i.control_buckets[c], i.step) for i in chunk], dtype)
        for c in range(len(chunk[0].control_paths))
    ]
    for j, item in enumerate(chunk):
        target = latent_to_file(targets[j], layout).clone()
        tensors = {latent_key("latents", target): target}
        for c, control in enumerate(controls):
            stored = latent_to_file(control[j], layout).clone()
            tensors[latent_key(f"latents_control_{c}", stored)] = stored
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
    encode: LatentEncode, images: Sequence[tuple[Path, tuple[int, int], int]], dtype: torch.dtype, mode: str = "RGB"
) -> torch.Tensor:
    batch = torch.stack([load_image(path, size, crop_below=step, mode=mode) for path, size, step in images])
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
    caption_dropout: bool = False,
    layout: CacheLayout = NO_LAYOUT,
) -> int:
    """Encode the captions of every item whose text cache is missing, stale or corrupt; return how many.

    ``encode(prompts)`` returns ``{name: tensor}`` with the batch dimension first (or, for a
    variable-length output, a list of one tensor per prompt; name it ``varlen_...``); ``layout`` names
    the outputs in the files. A cache is stale when its caption or ``settings`` (the text encoder, its
    options ...) differ. The empty caption (kern's own file) is cached too, for caption dropout: once per
    cache folder when ``caption_dropout`` asks for it or anything else is encoded; it is not counted.

    With ``images`` (for encoders that also read the control images, such as an image-editing model's) the call is
    ``encode(prompts, [images(item) for each prompt])``, each cache is also keyed on its item's control
    files, and the empty caption, which means something else with each item's images, is cached per item
    (``item_empty_text_cache_path``) when ``caption_dropout`` asks for it.
    """
    items = list({item.key: item for item in items}.values())
    name = arch_name or arch_id

    def fingerprint(item: Item | None) -> str:
        return text_fingerprint(item, settings, controls=images is not None, layout=layout)

    def state(path: Path, caption: str, item: Item | None, own_only: bool = False) -> str | None:
        return text_state(path, caption, fingerprint(item), arch_name=name, layout=layout, own_only=own_only)

    states = {i.key: state(text_cache_path(i, arch_id), i.caption, i) for i in items}
    stale = [i for i in items if states[i.key] is None]
    foreign = [text_cache_path(i, arch_id) for i in items if states[i.key] == "foreign"]
    log.info("text cache", items=len(items), to_encode=len(stale), reused_foreign=len(foreign), arch=arch_id)
    _log_foreign("text", foreign)

    def save(path: Path, row: Mapping[str, Any], caption: str, item: Item | None, what: str) -> None:
        _save_text(path, text_to_file(row, layout), caption, fingerprint(item), name, what)

    for chunk in _chunks(stale, max(1, batch_size)):
        prompts = [i.caption for i in chunk]
        extra = [] if images is None else [[images(i) for i in chunk]]
        outputs = _encode_texts(encode, prompts, *extra)
        for j, item in enumerate(chunk):
            save(text_cache_path(item, arch_id), {k: v[j] for k, v in outputs.items()}, item.caption, item, item.key)
    if images is not None:
        if caption_dropout:
            own = item_empty_text_cache_path
            todo = [i for i in items if not state(own(i, arch_id), "", i, own_only=True)]
            for chunk in _chunks(todo, max(1, batch_size)):
                outputs = _encode_texts(encode, [""] * len(chunk), [images(i) for i in chunk])
                for j, item in enumerate(chunk):
                    row = {k: v[j] for k, v in outputs.items()}
                    save(own(item, arch_id), row, "", item, f"{item.key} <empty caption>")
        return len(stale)
    if caption_dropout or stale:  # else the encoder need not be loaded for it
        for folder in sorted({item.cache_dir for item in items}):
            path = empty_text_cache_path(folder, arch_id)
            if not state(path, "", None, own_only=True):
                outputs = _encode_texts(encode, [""])
                save(path, {k: v[0] for k, v in outputs.items()}, "", None, "<empty caption>")
    return len(stale)


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
    path: Path, tensors: dict[str, torch.Tensor], caption: str, fingerprint: str, arch_name: str, what: str
) -> None:
    _replace_nan(tensors, what)
    metadata = {
        "architecture": arch_name,
        "caption1": caption,
        "format_version": FORMAT_VERSION,
        SETTINGS_KEY: fingerprint,
    }
    save_file(tensors, path, metadata)


# --------------------------------------------------------------------------- loading


def batch_on(
    batch: dict[str, Any], device: Any, dtype: torch.dtype
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor] | None]:
    """A :func:`load_batch` batch as the model takes it on ``device``: the latents in float32, the text tensors as
    cached, the references (or None) in ``dtype``, the model's."""
    refs = [r.to(device, dtype) for r in batch["references"]] if batch["references"] else None
    return batch["latents"].to(device, torch.float32), {k: v.to(device) for k, v in batch["text"].items()}, refs


def load_batch(
    items: Sequence[Item],
    arch_id: str,
    generator: torch.Generator | None = None,
    caption_dropout_rate: float = 0.0,
    *,
    layout: CacheLayout = NO_LAYOUT,
) -> dict[str, Any]:
    """One batch from the caches: ``latents`` (B, C, h, w) float32, ``text`` ``{name: (B, ...)}``,
    ``references`` (one (B, C, h_i, w_i) float32 per control, or ``None``), ``keys``, ``captions``. Items with
    several targets (``Item.target_paths``) give ``latents`` (B, F, C, h, w) and their first target as the one
    reference (``kern.records.Variant.multiple_targets``).

    With ``caption_dropout_rate`` > 0 each item's text is, with that probability (drawn from
    ``generator``), the empty caption's encoding; its ``captions`` entry is then ``""``. Items must
    share a ``kern.data.items.batch_key`` (``batch_order`` makes such batches). ``layout`` is the one
    the caches were written with: it turns file keys back into the text encoder's output names.
    """
    if not items:
        raise ValueError("load_batch needs at least one item")
    dropped = _dropout(len(items), caption_dropout_rate, generator)
    latents, references, texts = [], [], []
    for item, drop in zip(items, dropped):
        target, controls = _load_latents(latent_cache_path(item, arch_id), layout)
        latents.append(target)
        references.append(controls)
        path = _empty_text(item, arch_id) if drop else text_cache_path(item, arch_id)
        texts.append(text_from_file(_load_text(*_stamp(path)), layout))
    n_refs = {len(r) for r in references}
    if len(n_refs) != 1:
        raise KernError(
            f"batch {[i.key for i in items]} mixes items with different numbers of control images; build batches with kern.data.items.batch_order"
        )
    refs = [_stack([r[c] for r in references], "latents_control", items) for c in range(n_refs.pop())]
    stacked = _stack(latents, "latents", items)
    if items[0].target_paths:  # several targets (B, F, C, h, w): the first, clean, is the one reference
        refs = [stacked[:, 0]]
    return {
        "latents": stacked,
        "text": _collate_text(texts, items, layout),
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


def _load_latents(path: Path, layout: CacheLayout = NO_LAYOUT) -> tuple[torch.Tensor, list[torch.Tensor]]:
    tensors, _ = _load(path)
    targets, controls = latents_in(tensors)
    if len(targets) != 1:
        raise KernError(f"{path}: expected one latents_* tensor, found {len(targets)}; delete the file and cache again")

    def read(key: str) -> torch.Tensor:
        return latent_from_file(tensors[key], layout).float()

    return read(targets[0]), [read(controls[i]) for i in sorted(controls)]


def _stamp(path: Path) -> tuple[str, int]:
    try:
        return str(path), path.stat().st_mtime_ns
    except OSError:
        return str(path), -1


@lru_cache(maxsize=64)
def _load_text(path: str, mtime_ns: int) -> dict[str, torch.Tensor]:
    # Cached by (path, mtime): the empty-caption file is read once, not once per dropped item.
    return _load(Path(path))[0]


def _collate_text(
    texts: Sequence[Mapping[str, torch.Tensor]], items: Sequence[Item], layout: CacheLayout
) -> dict[str, Any]:
    names = set(texts[0])
    if any(set(t) != names for t in texts):
        raise KernError(
            f"text caches of batch {[i.key for i in items]} have different tensors; re-run text caching with one encoder"
        )
    out: dict[str, Any] = {}
    for n in sorted(names):
        rows = [t[n] for t in texts]
        out[n] = rows if n.startswith(VARLEN) else _stack(pad_sequences(rows), n, items)
    for spec in layout.text:  # unpadded rows: padded above; their mask rebuilt, ones over each row's tokens
        if spec.mask and spec.name in names:
            masks = [torch.ones(t[spec.name].shape[0], dtype=torch.int64) for t in texts]
            out[spec.mask] = _stack(pad_sequences(masks), spec.mask, items)
    return out


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
