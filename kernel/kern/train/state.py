"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

A checkpoint's state (adapter weights, optimizer and scheduler state, step counters, loss history, RNG states) is
a tree of dicts, lists, tuples, numbers, strings and tensors. :func:`save_state` splits it into
``state.safetensors`` (every tensor, under its path in the tree) and ``state.json`` (the tree with each tensor
replaced by a reference, plus the size and SHA-256 of every file of the checkpoint folder). :func:`load_state`
reads both back. Neither format can run code, so a shared or downloaded run folder is safe to resume from, and a
damaged file is detected by its digest instead of half-loading.

Tags in the JSON tree (plain dicts with string keys are written as they are):

* ``{"$tensor": "path"}`` — the tensor stored under ``path`` in ``state.safetensors``;
* ``{"$tuple": [...]}`` — a tuple (``random.getstate()``, Adam's ``betas``);
* ``{"$dict": [[key, value], ...]}`` — a dict whose keys are not all strings (an optimizer's per-parameter state),
  or has a key starting with ``$``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from kern.core.io import load_file, save_file, write_text
from kern.errors import KernError

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
FORMAT = "kern.train.state/1"


class DamagedState(KernError):
    """A checkpoint folder whose state cannot be trusted: a file missing, truncated, altered or unreadable."""


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        name = path if path not in tensors else f"{path}#{len(tensors)}"  # "a.b" as a key and as a path
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()  # a copy: safetensors refuses shared memory
        return {"$tensor": name}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in value.items()}
        return {
            "$dict": [
                [_encode(k, f"{path}.key{i}", tensors), _encode(v, f"{path}.{k}", tensors)]
                for i, (k, v) in enumerate(value.items())
            ]
        }
    raise TypeError(f"training state at {path!r}: cannot store a {type(value).__name__} without pickle")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == "$tensor":
            if inner not in tensors:
                raise DamagedState(f"{where}: refers to tensor {inner!r}, which {STATE_TENSORS} does not hold")
            return tensors[inner]
        if tag == "$tuple":
            return tuple(_decode(v, tensors, where) for v in inner)
        if tag == "$dict":
            return {_hashable(_decode(k, tensors, where)): _decode(v, tensors, where) for k, v in inner}
        if tag == "$float":
            if inner not in ("nan", "inf", "-inf"):
                raise DamagedState(f"{where}: bad float {inner!r}")
            return float(inner)
    return {k: _decode(v, tensors, where) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save_state(folder: str | Path, state: Mapping[str, Any], also: tuple[str, ...] = ()) -> None:
    """Write ``state`` into ``folder`` as ``state.safetensors`` + ``state.json``; ``state.json`` also records the
    size and digest of the files named in ``also`` (already written there, e.g. the adapter), so
    :func:`verify` catches damage to any of them. ``state.json`` is written last."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(dict(state), "state", tensors)
    save_file(tensors, folder / STATE_TENSORS)
    files = {
        name: {"bytes": (folder / name).stat().st_size, "sha256": file_digest(folder / name)}
        for name in (*also, STATE_TENSORS)
    }
    write_text(
        folder / STATE_JSON, json.dumps({"format": FORMAT, "files": files, "state": tree}, separators=(",", ":"))
    )


def _manifest(folder: Path) -> dict[str, Any]:
    path = folder / STATE_JSON
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedState(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedState(f"{path}: unreadable ({exc})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
        or "state" not in manifest
    ):
        raise DamagedState(f"{path}: not a kern training state ({FORMAT})")
    return manifest


def verify(folder: str | Path) -> dict[str, Any]:
    """Check every file ``state.json`` lists against its recorded size and digest; return the manifest, or raise
    :class:`DamagedState` naming the first file that differs."""
    folder = Path(folder)
    manifest = _manifest(folder)
    for name, entry in manifest["files"].items():
        path = folder / name
        if Path(name).name != name or not isinstance(entry, dict):
            raise DamagedState(f"{folder / STATE_JSON}: bad file entry {name!r}")
        if not path.is_file():
            raise DamagedState(f"{path}: missing")
        if path.stat().st_size != entry.get("bytes") or file_digest(path) != entry.get("sha256"):
            raise DamagedState(f"{path}: damaged (its size or SHA-256 differs from what was written)")
    return manifest


def load_state(folder: str | Path) -> dict[str, Any]:
    """The state :func:`save_state` wrote into ``folder``, after :func:`verify`; tensors on the CPU."""
    folder = Path(folder)
    manifest = verify(folder)
    try:
        tensors, _ = load_file(folder / STATE_TENSORS)
    except Exception as exc:
        raise DamagedState(f"{folder / STATE_TENSORS}: unreadable ({exc})") from None
    state = _decode(manifest["state"], tensors, str(folder / STATE_JSON))
    if not isinstance(state, dict):
        raise DamagedState(f"{folder / STATE_JSON}: the state is not a table")
    return state
