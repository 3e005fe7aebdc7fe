"""Stream tensors into and out of safetensors files one at a time.

:class:`StreamingWriter` writes a safetensors file whose tensors are produced one by one (a merge of a 20 GB
checkpoint): the header is computed up front from the announced names, dtypes and shapes, then each tensor's
bytes are appended as it arrives, into a temporary file beside the target that is renamed over it only when
every tensor has been written (``kern.core.io.atomic_path``). Peak memory is the tensor being written.

:class:`SafetensorsReader` reads one tensor at a time with plain positional reads into a fresh buffer
(no memory map), so the memory a reader holds is exactly the tensors it returned and still references. The
header is validated by ``kern.core.io.read_header`` first (missing, non-safetensors and truncated files raise
errors naming the file).

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes of JSON
header (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, padded with spaces
to a multiple of 8), then the data, offsets relative to the end of the header.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping, Sequence

import torch

from kern.core.io import atomic_path, header_length, read_header
from kern.errors import KernError

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_from_safetensors(name: str, where: str = "") -> torch.dtype:
    if name not in _DTYPES:
        raise KernError(
            f"{where}safetensors dtype {name!r} is not supported by kern's reader (supported: {sorted(_DTYPES)})"
        )
    return _DTYPES[name]


def dtype_to_safetensors(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise KernError(f"cannot write {dtype} tensors to safetensors")
    return _NAMES[dtype]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SafetensorsReader:
    """Random access to the tensors of one safetensors file, one tensor per read, without a memory map."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.header, self.metadata = read_header(self.path)
        try:
            self._data_start = header_length(self.path)
        except OSError as exc:
            raise KernError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        self._file: BinaryIO | None = None

    def __enter__(self) -> SafetensorsReader:
        self._file = open(self.path, "rb")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def keys(self) -> list[str]:
        return list(self.header)

    def dtype(self, name: str) -> torch.dtype:
        return dtype_from_safetensors(self.header[name]["dtype"], f"{self.path}: tensor {name!r}: ")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self.header[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read into its own buffer."""
        entry = self.header[name]
        dtype, shape = self.dtype(name), self.shape(name)
        begin, end = (int(x) for x in entry["data_offsets"])  # checked against shape and dtype by read_header
        buf = bytearray(end - begin)
        try:
            f = self._file or open(self.path, "rb")
            try:
                f.seek(self._data_start + begin)
                if f.readinto(buf) != len(buf):
                    raise KernError(
                        f"{self.path}: truncated while reading {name!r} (did the file change?); re-download or re-save it"
                    )
            finally:
                if self._file is None:
                    f.close()
        except OSError as exc:
            raise KernError(f"{self.path}: cannot read tensor {name!r} ({exc.strerror or exc})") from None
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


class StreamingWriter:
    """Write a safetensors file tensor by tensor, in the order of ``layout``, atomically.

    ``layout`` is ``[(name, dtype, shape), ...]``; order it by falling element size if you want every tensor
    aligned to its size in the file (:func:`aligned_order`). Use as a context manager::

        with StreamingWriter(out, layout, metadata) as w:
            for name, dtype, shape in layout:
                w.write(name, make(name))

    On an exception, or if a tensor was left unwritten, the temporary file is removed and ``out`` is untouched.
    With ``overwrite=False`` an existing ``out`` is never replaced (``kern.core.io.OutputExistsError``). The free
    space is checked against the file size before anything is written; a full disk or a folder that is not
    writable is a ``kern.core.io.WriteError`` saying so.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layout: Sequence[tuple[str, torch.dtype, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = True,
    ) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.layout = [(str(n), d, tuple(int(s) for s in shape)) for n, d, shape in layout]
        names = [n for n, _, _ in self.layout]
        if len(set(names)) != len(names):
            raise KernError(f"{self.path}: duplicate tensor names in the output layout")
        header: dict[str, Any] = {}
        if metadata:
            bad = [k for k, v in metadata.items() if not isinstance(v, str)]
            if bad:
                raise KernError(f"{self.path}: metadata values must be strings (not for {bad})")
            header["__metadata__"] = dict(metadata)
        offset = 0
        for name, dtype, shape in self.layout:
            size = math.prod(shape) * _itemsize(dtype)
            header[name] = {
                "dtype": dtype_to_safetensors(dtype),
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._header = struct.pack("<Q", len(raw)) + raw
        self.size = len(self._header) + offset  # bytes of the finished file
        self._next = 0
        self._ctx: contextlib.AbstractContextManager | None = None
        self._file: BinaryIO | None = None

    def __enter__(self) -> StreamingWriter:
        self._ctx = atomic_path(self.path, overwrite=self.overwrite, needed=self.size)
        tmp = self._ctx.__enter__()
        try:
            self._file = open(tmp, "wb")
            self._file.write(self._header)
        except BaseException:
            self._ctx.__exit__(*_exc_info())
            raise
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; its name, dtype and shape must be the next ones of the layout."""
        if self._file is None:
            raise KernError("StreamingWriter.write outside its `with` block")
        if self._next >= len(self.layout):
            raise KernError(f"{self.path}: more tensors written than announced (extra {name!r})")
        want_name, want_dtype, want_shape = self.layout[self._next]
        if name != want_name or tensor.dtype != want_dtype or tuple(tensor.shape) != want_shape:
            raise KernError(
                f"{self.path}: expected tensor {want_name!r} {want_dtype} {list(want_shape)} next, "
                f"got {name!r} {tensor.dtype} {list(tensor.shape)}"
            )
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.numel():
            self._file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._ctx is not None and self._file is not None
        f, self._file = self._file, None
        try:
            f.close()  # flushes: a full disk may only show here
        except Exception as close_exc:
            if exc_type is None:
                self._fail(close_exc)
        if exc_type is None and self._next != len(self.layout):
            missing = [n for n, _, _ in self.layout[self._next :]][:5]
            self._fail(
                KernError(
                    f"{self.path}: only {self._next} of {len(self.layout)} tensors were written (next missing: {missing})"
                )
            )
        self._ctx.__exit__(exc_type, exc, tb)

    def _fail(self, err: BaseException) -> None:
        """Remove the temporary file (the atomic context may turn ``err`` into a clearer error) and raise."""
        assert self._ctx is not None
        self._ctx.__exit__(type(err), err, err.__traceback__)
        raise err


def _exc_info() -> tuple[Any, Any, Any]:
    import sys

    return sys.exc_info()


def aligned_order(
    layout: Iterable[tuple[str, torch.dtype, Sequence[int]]],
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``layout`` sorted (stably) by falling element size, so every tensor starts aligned to its element size."""
    items = [(n, d, tuple(s)) for n, d, s in layout]
    return sorted(items, key=lambda e: -_itemsize(e[1]))
