"""Reading safetensors files with errors that name the file, and checking the values read.

:func:`read_header` validates the whole header of a safetensors file (lengths, JSON, every entry's dtype / shape /
offsets, the metadata) in one place, so every reader (:func:`load_file`, ``kern.adapters.streaming.SafetensorsReader``,
``kern.models.files``, adapters) turns a corrupt file into a ``KernError`` naming the file and the tensor.
:func:`describe_nonfinite` finds NaN / Inf values. Writing is ``kern.core.io`` (atomic, ``save_file``).
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

from kern.errors import KernError

__all__ = [
    "FINITE_CHUNK",
    "MAX_HEADER_BYTES",
    "SAFETENSORS_DTYPE_BITS",
    "describe_nonfinite",
    "header_length",
    "load_file",
    "read_header",
]

# bits per element of every dtype name the safetensors format defines
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


class _BadJSON(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _BadJSON(f"key {k!r} appears twice")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise _BadJSON(f"{name} is not valid JSON")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_raw_header(p: Path) -> tuple[bytes, int]:
    """The header bytes and the file size; ``KernError`` for a missing, special, empty or too short file."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise KernError(f"{p}: no such file") from None
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, a loop of links ...
        raise KernError(f"{p}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise KernError(f"{p}: is a folder, not a safetensors file; give the .safetensors file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise KernError(f"{p}: not a regular file; give a .safetensors file")
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise KernError(f"{p}: empty file (0 bytes), not a safetensors file; re-download or re-save it")
            raw = f.read(8)
            if len(raw) < 8:
                raise KernError(f"{p}: not a safetensors file (only {size} bytes); check the path or re-download it")
            (n,) = struct.unpack("<Q", raw)
            if n < 2 or n > MAX_HEADER_BYTES:
                raise KernError(f"{p}: not a safetensors file (bad header length {n}); is it a .ckpt/.pt or truncated?")
            if n > size - 8:
                raise KernError(
                    f"{p}: truncated or not a safetensors file: its header length {n} runs past the end of the file "
                    f"({size} bytes); re-download or re-save it"
                )
            header = f.read(n)
    except OSError as exc:
        raise KernError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if len(header) != n:
        raise KernError(f"{p}: truncated while reading its header; re-download or re-save it")
    return header, size


def _parse_header(p: Path, raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KernError(
            f"{p}: not a safetensors file (header is not UTF-8 text at byte {8 + exc.start}); is it a .ckpt/.pt or corrupt?"
        ) from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, duplicates, NaN, 5000-digit numbers, deep nesting
        why = str(exc) if isinstance(exc, ValueError) else "nested too deeply"
        raise KernError(f"{p}: not a safetensors file (unreadable header: {why[:200]})") from None
    if not isinstance(header, dict):
        raise KernError(f"{p}: not a safetensors file (header is a JSON {type(header).__name__}, not an object)")
    return header


def _check_metadata(p: Path, metadata: Any) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise KernError(
            f"{p}: corrupt safetensors header: __metadata__ is a {type(metadata).__name__}, not a string → string map"
        )
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise KernError(f"{p}: corrupt safetensors header: __metadata__ values must be strings (not for {bad[:5]})")
    return metadata


def _numel(shape: list[int], limit: int) -> int:
    """Product of ``shape``, stopping early once above ``limit`` (a huge shape cannot fit the file anyway)."""
    if 0 in shape:
        return 0
    n = 1
    for s in shape:
        n *= s
        if n > limit:
            return n
    return n


def _check_entry(p: Path, name: str, entry: Any, data_size: int) -> tuple[int, int]:
    """The (begin, end) byte offsets of one validated header entry."""
    where = f"{p}: corrupt safetensors header: tensor {name!r}"
    if not isinstance(entry, dict):
        raise KernError(f"{where} is a JSON {type(entry).__name__}, not an object with dtype, shape and data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise KernError(f"{where} has no {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
        raise KernError(f"{where}: unknown dtype {dtype!r} (safetensors has {sorted(SAFETENSORS_DTYPE_BITS)})")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise KernError(f"{where}: shape {_short(shape)} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets):
        raise KernError(f"{where}: data_offsets {_short(offsets)} is not [begin, end] with non-negative integers")
    begin, end = offsets
    if begin > end:
        raise KernError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    bits = SAFETENSORS_DTYPE_BITS[dtype]
    numel = _numel(shape, 8 * (data_size + 1))
    if numel * bits != (end - begin) * 8:
        need = f"{numel * bits / 8:.0f}" if numel <= 8 * (data_size + 1) else "far more"
        raise KernError(f"{where}: holds {end - begin} bytes, but shape {_short(shape)} of {dtype} needs {need}")
    return begin, end


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_layout(p: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """Tensors must tile the data section exactly: no gap, no overlap, nothing past or after it."""
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < position:
            raise KernError(
                f"{p}: corrupt safetensors header: tensor {name!r} [{begin}, {end}] overlaps tensor {previous!r} (ends at {position})"
            )
        if begin > position:
            raise KernError(
                f"{p}: corrupt safetensors header: {begin - position} bytes before tensor {name!r} belong to no tensor"
            )
        position, previous = end, name
    if position > data_size:
        raise KernError(
            f"{p}: truncated: header promises {position} bytes of data, the file has {data_size}; re-download or re-save it"
        )
    if position < data_size:
        raise KernError(
            f"{p}: not a complete safetensors file: {data_size - position} bytes after the last tensor belong to no tensor"
        )


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensor index (name → dtype, shape, offsets) and ``__metadata__`` of a safetensors file.

    Reads only the header, so it is cheap on a 60 GB checkpoint, and validates all of it: a file that is
    missing, a folder, empty, not safetensors, truncated, or whose header has a malformed entry (dtype,
    shape, offsets, byte count), overlapping or gapped tensors, or non-string metadata raises ``KernError``
    naming the file (and the tensor). A file that passes is one the safetensors library reads.
    """
    p = Path(path)
    raw, size = _read_raw_header(p)
    header = _parse_header(p, raw)
    metadata = _check_metadata(p, header.pop("__metadata__", None))
    data_size = size - 8 - len(raw)
    spans = [(*_check_entry(p, name, entry, data_size), name) for name, entry in header.items()]
    _check_layout(p, spans, data_size)
    return header, metadata


def header_length(path: str | os.PathLike) -> int:
    """The byte offset where the tensor data of a (validated) safetensors file starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def load_file(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, Any], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, after checking it with ``read_header``.

    Any failure of the safetensors library itself (a dtype this torch lacks, the file changing meanwhile)
    is a ``KernError`` naming the file too.
    """
    from safetensors import safe_open

    _, metadata = read_header(path)
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except KernError:
        raise
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise KernError(f"{path}: unreadable safetensors file: {exc}") from None
    return tensors, metadata


# ---------------------------------------------------------------------------------------------- values

FINITE_CHUNK = 1 << 24  # elements checked at once: bounded memory (64 MiB for an fp8 chunk upcast to float32)


def describe_nonfinite(tensor: Any) -> str | None:
    """``None`` when every value of ``tensor`` is finite (or it is not a float tensor), else e.g. "2 NaN and 1 infinite of 600 values".

    Checks in chunks of ``FINITE_CHUNK`` elements on the tensor's own device, so memory stays bounded;
    8-bit float chunks are upcast to float32 first.
    """
    import torch

    if not (tensor.is_floating_point() or tensor.is_complex()):
        return None
    flat = tensor.detach().reshape(-1)
    total = flat.numel()
    upcast = flat.element_size() == 1
    nan = inf = 0
    for start in range(0, total, FINITE_CHUNK):
        chunk = flat[start : start + FINITE_CHUNK]
        if upcast:
            chunk = chunk.to(torch.float32)
        finite = torch.isfinite(chunk)
        if bool(finite.all()):
            continue
        n_nan = int(torch.isnan(chunk).sum())
        nan += n_nan
        inf += int((~finite).sum()) - n_nan
    if not nan and not inf:
        return None
    parts = [f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else ""]
    return f"{' and '.join(x for x in parts if x)} of {total} values"
