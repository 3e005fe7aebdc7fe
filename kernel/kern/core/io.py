"""Atomic file writes, with errors that name the file.

Every checkpoint, cache and adapter kern writes goes through ``atomic_path``: the data is written
to a temporary file in the same folder and renamed over the target only once complete, so an
interrupted or failed write never leaves a partial file behind. A full disk, a read-only or
non-writable folder become a :class:`WriteError` (a ``KernError`` that is also an ``OSError``) saying
so in words, the temporary file removed and the old target untouched.

Reading safetensors files (``read_header``, ``load_file``, ``describe_nonfinite`` ...) lives in
``kern.core.safetensors_read``; its names are importable from here too, so ``from kern.core.io import
load_file, save_file`` keeps working.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from kern.core.safetensors_read import (  # re-exported: plugins and tests import the readers from here
    FINITE_CHUNK,
    MAX_HEADER_BYTES,
    SAFETENSORS_DTYPE_BITS,
    describe_nonfinite,
    header_length,
    load_file,
    read_header,
)
from kern.errors import KernError

__all__ = [
    "FINITE_CHUNK",
    "MAX_HEADER_BYTES",
    "SAFETENSORS_DTYPE_BITS",
    "TMP_SUFFIX",
    "OutputExistsError",
    "WriteError",
    "atomic_path",
    "check_output_file",
    "describe_nonfinite",
    "ensure_writable_dir",
    "header_length",
    "human_bytes",
    "load_file",
    "read_header",
    "remove_orphans",
    "save_file",
    "write_text",
]


class WriteError(KernError, OSError):
    """Writing a file failed for a reason the user can act on (full disk, folder not writable ...).

    Also an ``OSError`` (with ``errno`` set), so code that handled the raw ``OSError`` keeps working.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        OSError.__init__(self, code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class OutputExistsError(WriteError, FileExistsError):
    """``atomic_path(..., overwrite=False)``: the target name was taken; nothing was replaced."""


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (kern starts no threads that create files here).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


TMP_SUFFIX = ".tmp"  # temporary files are ".<name>.<random>.tmp" beside their target

_QUOTA = getattr(errno, "EDQUOT", errno.ENOSPC)
_NO_SPACE = {errno.ENOSPC, _QUOTA}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP), errno.EMLINK, errno.ENOSYS}


def human_bytes(n: int | float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # pragma: no cover


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _write_error(exc: OSError, target: Path, needed: int | None = None) -> WriteError:
    """``exc`` (raised while writing ``target``) as a message about the user's disk or folder."""
    folder = target.parent
    code = exc.errno
    if code in _NO_SPACE:
        free = _free_bytes(folder)
        parts = [
            f"needed about {human_bytes(needed)}" if needed else None,
            f"{human_bytes(free)} free" if free is not None else None,
        ]
        detail = ", ".join(p for p in parts if p)
        what = "disk quota exceeded" if code == _QUOTA and code != errno.ENOSPC else "no space left on device"
        return WriteError(f"{target}: {what} ({detail}); free some space or write elsewhere. Nothing was written", code)
    if code in _NOT_WRITABLE:
        why = "read-only file system" if code == errno.EROFS else "permission denied"
        return WriteError(
            f"{target}: folder {folder} is not writable ({why}); choose another output folder or fix its permissions",
            code,
        )
    if code == errno.EFBIG:
        return WriteError(
            f"{target}: file too large for the file system of {folder} (needed about {human_bytes(needed or 0)}); write elsewhere",
            code,
        )
    if code in (errno.ENOTDIR, errno.EEXIST) and not folder.is_dir():
        return WriteError(
            f"{target}: cannot create folder {folder}: a file is in the way; choose another output path", code
        )
    if code == errno.EISDIR:
        return WriteError(f"{target}: is a folder; give a file name", code)
    return WriteError(f"{target}: writing failed: {exc.strerror or exc}", code)


def _about_target(exc: OSError, tmp: Path, target: Path) -> bool:
    """Whether an ``OSError`` raised inside an ``atomic_path`` block is about the file being written.

    Disk-full errors always are; permission errors only when they name no file (a write on an open file)
    or the temporary file / target (an unreadable *input* keeps its own error).
    """
    if isinstance(exc, KernError):
        return False
    if exc.errno in _NO_SPACE or exc.errno == errno.EFBIG:
        return True
    return exc.errno in _NOT_WRITABLE and (exc.filename is None or str(exc.filename) in (str(tmp), str(target)))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True, *, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is published as ``path``, on error it is removed.

    The published file gets the permissions a plain ``open()`` would give it (0666 minus the umask; ``mkstemp``
    alone makes 0600). With ``overwrite=False`` an existing ``path`` is never replaced: publishing is a hard
    link, which fails atomically with ``FileExistsError`` (:class:`OutputExistsError`) if the name was taken
    meanwhile. ``needed`` (bytes, optional) is checked against the free space up front and named in the
    message of a full disk. Errors about the disk or folder become :class:`WriteError`.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if needed is not None:
            free = _free_bytes(target.parent)
            if free is not None and free < needed:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent)
    except OSError as exc:
        raise _write_error(exc, target, needed) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
        except OSError as exc:
            if _about_target(exc, tmp, target):
                raise _write_error(exc, target, needed) from exc
            raise
        try:
            os.chmod(tmp, 0o666 & ~_umask())
            if overwrite:
                os.replace(tmp, target)
            else:
                _publish_new(tmp, target)
        except KernError:
            raise
        except OSError as exc:
            raise _write_error(exc, target, needed) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _publish_new(tmp: Path, target: Path) -> None:
    """Publish ``tmp`` as ``target`` only if that name is free. A hard link is atomic; a file system without
    hard links (FAT, some network shares) gets the name reserved by an exclusive create, then replaced."""
    taken = OutputExistsError(
        f"{target}: already exists (created while kern was writing?); it was not replaced", errno.EEXIST
    )
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise taken from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise taken from None
        os.replace(tmp, target)  # over our own empty placeholder
        return
    os.unlink(tmp)


_ORPHAN = re.compile(r"^\..+\.[A-Za-z0-9_]{8}" + re.escape(TMP_SUFFIX) + r"$")  # tempfile.mkstemp's 8 random characters
_SAFETENSORS_ORPHAN = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")  # safetensors' own temporary file (Rust tempfile crate)


def remove_orphans(folder: str | os.PathLike, older_than_s: float = 3600.0) -> list[Path]:
    """Delete the temporary files of atomic writes that were killed before they finished; return them.

    Matches kern's ``.<name>.<8 random>.tmp`` and safetensors' ``.tmp<6 random>``, regular files directly
    in ``folder`` (not below it) and last modified more than ``older_than_s`` seconds ago. A write still in
    progress also has such a file: call this only while no other process writes into ``folder`` (hold its
    lock), or keep ``older_than_s`` well above the longest write.
    """
    root = Path(folder)
    now = time.time()
    removed = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not (_ORPHAN.match(entry.name) or _SAFETENSORS_ORPHAN.match(entry.name)):
            continue
        try:
            if (
                not entry.is_file(follow_symlinks=False)
                or now - entry.stat(follow_symlinks=False).st_mtime < older_than_s
            ):
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(root / entry.name)
    return removed


def ensure_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create folder ``path`` if needed and check a file can be made in it, before any work starts.

    ``what`` names the option or key in the message (e.g. ``"--out"``, ``"save.out"``); raises ``UsageError``.
    """
    from kern.errors import UsageError

    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{what} {folder}: exists and is not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".kern-write-check.", suffix=TMP_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            reason = "a file is in the way of its path"
        raise UsageError(f"{what} {folder}: cannot write there ({reason}); choose a writable folder") from None
    return folder


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file (symlinks followed, hard links recognised)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_output_file(
    out: str | os.PathLike,
    inputs: Iterable[tuple[str, str | os.PathLike]],
    overwrite: bool = False,
    what: str = "--out",
) -> Path:
    """Refuse, before any work, an output file that would destroy an input or replace a file unasked.

    ``inputs`` is ``[(label, path)]`` (e.g. ``("base model", ...)``). Raises ``UsageError`` naming ``what``
    when ``out`` is a folder or not a regular file, is one of the inputs (compared by device and inode, so
    symlinks and hard links count; even with ``overwrite``), already exists and ``overwrite`` is false, or
    its folder cannot be created or written. Creates nothing.
    """
    from kern.errors import UsageError

    target = Path(out)
    if str(out) == "" or target.name in ("", ".", ".."):
        raise UsageError(f"{what} {str(out)!r}: give the name of the file to write")
    try:
        if target.is_dir():
            raise UsageError(f"{what} {target}: is a folder; give the file to write, e.g. {target / 'out.safetensors'}")
        for label, path in inputs:
            if _same_file(target, Path(path)):
                how = "" if os.path.realpath(target) == os.path.realpath(path) else " (through a link)"
                raise UsageError(
                    f"{what} {target} is the {label} {path}{how}; writing there would destroy it: choose another {what}"
                )
        if os.path.lexists(target):
            if target.exists() and not target.is_file():
                raise UsageError(f"{what} {target}: exists and is not a regular file; choose another {what}")
            if not overwrite:
                raise UsageError(
                    f"{what} {target}: already exists; pass --overwrite to replace it, or choose another {what}"
                )
        _check_folder_writable(target, what)
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte ...
        raise UsageError(
            f"{what} {target}: unusable path ({getattr(exc, 'strerror', None) or exc}); choose another {what}"
        ) from None
    return target


def _check_folder_writable(target: Path, what: str) -> None:
    from kern.errors import UsageError

    folder = target.parent
    while (
        not os.path.lexists(folder) and folder != folder.parent
    ):  # the nearest existing folder: it must take the new ones
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{what} {target}: {folder} is not a folder; choose another {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".kern-write-check.", suffix=TMP_SUFFIX, dir=folder)
    except OSError as exc:
        why = "read-only file system" if exc.errno == errno.EROFS else (exc.strerror or str(exc)).lower()
        raise UsageError(
            f"{what} {target}: folder {folder} is not writable ({why}); choose another {what} or fix its permissions"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _safetensors_os_error(exc: Exception) -> OSError | None:
    """The ``OSError`` inside a ``SafetensorError`` message ("... No space left on device (os error 28)")."""
    text = str(exc)
    m = re.search(r"os error (\d+)", text)
    if m:
        return OSError(int(m.group(1)), os.strerror(int(m.group(1))))
    for code in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EFBIG):
        if os.strerror(code).lower() in text.lower():
            return OSError(code, os.strerror(code))
    return None


def save_file(
    tensors: Mapping[str, Any],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
) -> None:
    """``safetensors.torch.save_file``, atomically. Metadata values must be strings.

    With ``overwrite=False`` an existing ``path`` is never replaced (:class:`OutputExistsError`).
    """
    from safetensors.torch import save_file as _save

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    needed = sum(t.numel() * t.element_size() for t in contiguous.values())
    with atomic_path(path, overwrite=overwrite, needed=needed) as tmp:
        try:
            _save(contiguous, str(tmp), metadata=dict(metadata) if metadata else None)
        except OSError:
            raise
        except Exception as exc:  # safetensors reports I/O failures as SafetensorError("... (os error 28)")
            cause = _safetensors_os_error(exc)
            if cause is None:
                raise
            raise _write_error(cause, Path(path), needed) from exc


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path, needed=len(text.encode("utf-8"))) as tmp:
        tmp.write_text(text, encoding="utf-8")
