"""Atomic file writes and safetensors reading with errors that name the file.

Every checkpoint, cache and adapter kern writes goes through ``atomic_path``: the data is written
to a temporary file in the same folder and renamed over the target only once complete, so an
interrupted or failed write never leaves a partial file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from kern.errors import KernError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_file(tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, atomically. Metadata values must be strings."""
    from safetensors.torch import save_file as _save

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        _save(contiguous, str(tmp), metadata=dict(metadata) if metadata else None)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensor index (name → dtype, shape, offsets) and ``__metadata__`` of a safetensors file.

    Reads only the header, so it is cheap on a 60 GB checkpoint; raises ``KernError`` naming the
    file when it is missing, not safetensors, or truncated.
    """
    p = Path(path)
    if not p.is_file():
        raise KernError(f"{p}: no such file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise KernError(f"{p}: not a safetensors file (only {size} bytes); check the path or re-download it")
        (n,) = struct.unpack("<Q", raw)
        if n <= 1 or n > min(size - 8, 100 * 1024 * 1024):
            raise KernError(f"{p}: not a safetensors file (bad header length {n}); is it a .ckpt/.pt or truncated?")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise KernError(f"{p}: not a safetensors file (unreadable header: {exc})") from None
    if not isinstance(header, dict):
        raise KernError(f"{p}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise KernError(f"{p}: truncated: header promises {8 + n + end} bytes, file has {size}; re-download or re-save it")
    return header, metadata


def load_file(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, Any], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, after checking it with ``read_header``."""
    from safetensors import safe_open

    _, metadata = read_header(path)
    tensors = {}
    with safe_open(str(path), framework="pt", device=device) as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, metadata
