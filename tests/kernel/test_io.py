"""kern.core.io: atomic writes (permissions, full disk, read-only folders, orphans), output-path checks; and
kern.core.safetensors_read (its names also importable from kern.core.io): header validation of safetensors files
of every malformed shape, finiteness checks."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import struct
import time

import kern.core.io as kio
import kern.core.safetensors_read as kread
import pytest
import torch
from kern.core.io import (
    OutputExistsError,
    WriteError,
    atomic_path,
    check_output_file,
    describe_nonfinite,
    load_file,
    read_header,
    remove_orphans,
    save_file,
    write_text,
)
from kern.errors import KernError, ModelFileError, UsageError


def snapshot(folder):
    """{name: (bytes, mtime_ns)} of every file in ``folder``: a failed write must leave it exactly so."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def raw_file(path, header, data=b"", length=None):
    """A safetensors-shaped file: 8-byte length, ``header`` (dict → JSON, or raw bytes), ``data``."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# ------------------------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_published_files_get_the_umask_permissions(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        write_text(tmp_path / "a.txt", "x")
        save_file({"t": torch.zeros(2)}, tmp_path / "b.safetensors")
        with atomic_path(tmp_path / "c.bin") as tmp:
            tmp.write_bytes(b"c")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.safetensors", "c.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_overwrite_false_never_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match="t.txt: already exists") as info:
        with atomic_path(target, overwrite=False) as tmp:
            tmp.write_text("new")
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, KernError)
    assert snapshot(tmp_path) == before
    with pytest.raises(OutputExistsError):
        save_file({"t": torch.zeros(1)}, target, overwrite=False)
    assert snapshot(tmp_path) == before
    save_file({"t": torch.zeros(1)}, tmp_path / "new.safetensors", overwrite=False)
    assert load_file(tmp_path / "new.safetensors")[0]["t"].shape == (1,)


def test_publish_without_hard_links_still_refuses_an_existing_name(tmp_path, monkeypatch):
    """Some file systems (exFAT, some FUSE) have no hard links: a checked rename publishes instead."""

    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(kio.os, "link", no_link)
    write_text(tmp_path / "fresh.txt", "x")  # overwrite=True: os.replace, unaffected
    with atomic_path(tmp_path / "new.txt", overwrite=False) as tmp:
        tmp.write_text("new")
    assert (tmp_path / "new.txt").read_text() == "new"
    with pytest.raises(OutputExistsError):
        with atomic_path(tmp_path / "new.txt", overwrite=False) as tmp:
            tmp.write_text("newer")
    assert (tmp_path / "new.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.txt", "new.txt"]


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_text(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("old")
    before = snapshot(tmp_path)
    monkeypatch.setattr(kio.Path, "write_text", enospc)
    with pytest.raises(
        WriteError, match=r"t\.txt: no space left on device \(needed about 1\.0 KiB, .* free\); free some space"
    ) as info:
        write_text(tmp_path / "t.txt", "y" * 1024)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "raised",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        # what safetensors itself raises when the disk fills up (it writes through Rust)
        "Error while serializing: I/O error: No space left on device (os error 28)",
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })',
    ],
    ids=["oserror", "safetensors-os-error-28", "safetensors-storage-full"],
)
def test_disk_full_in_save_file(tmp_path, monkeypatch, raised):
    import safetensors.torch
    from safetensors import SafetensorError

    (tmp_path / "a.safetensors").write_bytes(b"old bytes")
    before = snapshot(tmp_path)

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise raised if isinstance(raised, OSError) else SafetensorError(raised)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(WriteError, match=r"a\.safetensors: no space left on device \(needed about 4\.0 KiB"):
        save_file({"t": torch.zeros(1024)}, tmp_path / "a.safetensors")
    assert snapshot(tmp_path) == before


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(kio.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(WriteError, match=r"no space left on device \(needed about 4\.0 KiB, 100 bytes free\)"):
        save_file({"t": torch.zeros(1024)}, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_in_the_streaming_writer_leaves_nothing(tmp_path, monkeypatch):
    import builtins

    import kern.adapters.streaming as streaming

    layout = [("a", torch.float32, (64,)), ("b", torch.float32, (64,))]
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"previous")
    before = snapshot(tmp_path)

    class FillsUp:
        def __init__(self, f):
            self.f, self.left = f, 300

        def write(self, data):
            n = len(memoryview(data).cast("B"))
            if n > self.left:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.left -= n
            return self.f.write(data)

        def close(self):
            self.f.close()

    monkeypatch.setattr(streaming, "open", lambda p, mode: FillsUp(builtins.open(p, mode)), raising=False)
    with pytest.raises(WriteError, match=r"s\.safetensors: no space left on device \(needed about"):
        with streaming.StreamingWriter(out, layout) as w:
            for name, _, shape in layout:
                w.write(name, torch.ones(shape))
    assert snapshot(tmp_path) == before


def test_a_failing_close_removes_the_temporary_file(tmp_path, monkeypatch):
    import builtins

    import kern.adapters.streaming as streaming

    class CloseFails:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            return self.f.write(data)

        def close(self):
            self.f.close()
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(streaming, "open", lambda p, mode: CloseFails(builtins.open(p, mode)), raising=False)
    with pytest.raises(WriteError, match="disk quota exceeded"):
        with streaming.StreamingWriter(tmp_path / "s.safetensors", [("a", torch.float32, (4,))]) as w:
            w.write("a", torch.ones(4))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code,words", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system")])
def test_folder_not_writable(tmp_path, monkeypatch, code, words):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / ".x.tmp"))

    monkeypatch.setattr(kio.tempfile, "mkstemp", refuse)
    with pytest.raises(
        WriteError, match=rf"folder {tmp_path} is not writable \({words}\); choose another output folder"
    ):
        write_text(tmp_path / "t.txt", "x")
    with pytest.raises(WriteError, match="is not writable"):
        save_file({"t": torch.zeros(1)}, tmp_path / "t.safetensors")
    with pytest.raises(
        UsageError, match=rf"--out {tmp_path}/o.safetensors: folder {tmp_path} is not writable \({words}\)"
    ):
        check_output_file(tmp_path / "o.safetensors", [], what="--out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes into read-only folders; covered by the monkeypatched test above"
)
def test_read_only_folder_for_real(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(WriteError, match="is not writable"):
            write_text(folder / "t.txt", "x")
        with pytest.raises(UsageError, match="is not writable"):
            check_output_file(folder / "o.safetensors", [])
    finally:
        folder.chmod(0o755)


def test_an_unreadable_input_inside_a_write_keeps_its_own_error(tmp_path):
    """A permission error about another file (an input read inside the block) is not blamed on the output folder."""
    with pytest.raises(PermissionError) as info:
        with atomic_path(tmp_path / "out.bin"):
            raise PermissionError(errno.EACCES, "Permission denied", "/some/input.safetensors")
    assert not isinstance(info.value, KernError)
    assert list(tmp_path.iterdir()) == []


def test_a_file_in_the_way_of_the_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(WriteError, match="a file is in the way"):
        write_text(tmp_path / "f" / "sub" / "t.txt", "x")
    with pytest.raises(UsageError, match=r"--out .*f is not a folder"):
        check_output_file(tmp_path / "f" / "sub" / "o.safetensors", [])
    assert (tmp_path / "f").read_text() == "x"


def test_remove_orphans(tmp_path):
    old = time.time() - 7200
    orphans = [".model.safetensors.ab_cd123.tmp", ".config.toml.zzzzzzzz.tmp", ".tmpAb12Cd"]
    keep = ["model.safetensors", ".hidden", ".model.safetensors.tmp", "x.ab_cd123.tmp", ".model.safetensors.short.tmp"]
    for name in orphans + keep:
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (old, old))
    (tmp_path / ".fresh.safetensors.abcdefgh.tmp").write_text("still being written")
    (tmp_path / ".dir.abcdefgh.tmp").mkdir()
    os.utime(tmp_path / ".dir.abcdefgh.tmp", (old, old))
    os.symlink(tmp_path / "model.safetensors", tmp_path / ".link.abcdefgh.tmp")
    os.utime(tmp_path / ".link.abcdefgh.tmp", (old, old), follow_symlinks=False)
    removed = remove_orphans(tmp_path, older_than_s=3600)
    assert sorted(p.name for p in removed) == sorted(orphans)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(keep + [".fresh.safetensors.abcdefgh.tmp", ".dir.abcdefgh.tmp", ".link.abcdefgh.tmp"])
    assert remove_orphans(tmp_path, older_than_s=0) == [tmp_path / ".fresh.safetensors.abcdefgh.tmp"]
    assert remove_orphans(tmp_path / "missing") == []


def test_remove_orphans_finds_what_a_killed_write_leaves(tmp_path):
    """The name pattern matches what atomic_path really creates."""
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "ckpt.safetensors") as tmp:
            leftover = tmp.with_name(tmp.name + ".copy")
            os.link(tmp, leftover)  # what a SIGKILL would leave behind (the cleanup never ran)
            raise RuntimeError
    os.rename(leftover, tmp)
    assert remove_orphans(tmp_path, older_than_s=0) == [tmp]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- output checks


def test_output_that_is_an_input_through_links(tmp_path):
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"base")
    (tmp_path / "link.safetensors").symlink_to(base)
    os.link(base, tmp_path / "hard.safetensors")
    inputs = [("base model", base)]
    for name in ("base.safetensors", "link.safetensors", "hard.safetensors"):
        with pytest.raises(
            UsageError, match=rf"--out .*{name} is the base model .*base\.safetensors.*choose another --out"
        ):
            check_output_file(tmp_path / name, inputs, overwrite=True)
    with pytest.raises(UsageError, match=r"is the base model .*\(through a link\)"):
        check_output_file(tmp_path / "hard.safetensors", inputs, overwrite=True)
    with pytest.raises(UsageError, match=r"already exists; pass --overwrite"):
        check_output_file(tmp_path / "hard.safetensors", [], overwrite=False)
    assert check_output_file(tmp_path / "hard.safetensors", [], overwrite=True) == tmp_path / "hard.safetensors"
    with pytest.raises(UsageError, match="is a folder"):
        check_output_file(tmp_path, inputs, overwrite=True)
    with pytest.raises(UsageError, match="not a regular file"):
        check_output_file("/dev/null", [], overwrite=True)
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="already exists"):
        check_output_file(tmp_path / "dangling.safetensors", [])
    assert (
        check_output_file(tmp_path / "new" / "deeper" / "o.safetensors", inputs)
        == tmp_path / "new" / "deeper" / "o.safetensors"
    )
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert base.read_bytes() == b"base"


# ------------------------------------------------------------------------------------------- reading

GOOD = entry()
BAD_HEADERS = [
    ("header-is-a-list", [GOOD], b"\0" * 8, "header is a JSON list"),
    ("header-is-a-string", "x", b"", "header is a JSON str"),
    ("entry-not-a-dict", {"a": [1, 2]}, b"", "tensor 'a' is a JSON list, not an object"),
    ("entry-null", {"a": None}, b"", "tensor 'a' is a JSON NoneType"),
    ("no-dtype", {"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "tensor 'a' has no dtype"),
    ("no-shape", {"a": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8, "tensor 'a' has no shape"),
    ("no-offsets", {"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "tensor 'a' has no data_offsets"),
    ("shape-not-list", {"a": {**GOOD, "shape": 2}}, b"\0" * 8, "shape 2 is not a list"),
    ("shape-string", {"a": {**GOOD, "shape": "2"}}, b"\0" * 8, "is not a list of non-negative integers"),
    ("negative-dim", {"a": entry(shape=(-2,))}, b"\0" * 8, "shape [-2] is not a list of non-negative"),
    ("float-dim", {"a": entry(shape=(2.0,))}, b"\0" * 8, "shape [2.0]"),
    ("bool-dim", {"a": entry(shape=(True, 2))}, b"\0" * 8, "shape [true, 2]"),
    ("huge-dims", {"a": entry(shape=(2**62, 2**62, 2**62))}, b"\0" * 8, "needs far more"),
    ("offsets-missing-end", {"a": {**GOOD, "data_offsets": [0]}}, b"\0" * 8, "data_offsets [0] is not [begin, end]"),
    ("offsets-negative", {"a": entry(offsets=(-8, 0))}, b"\0" * 8, "data_offsets [-8, 0]"),
    ("offsets-float", {"a": entry(offsets=(0, 8.0))}, b"\0" * 8, "data_offsets [0, 8.0]"),
    ("offsets-reversed", {"a": entry(offsets=(8, 0))}, b"\0" * 8, "end before they begin"),
    ("offsets-overlap", {"a": entry(), "b": entry()}, b"\0" * 8, "overlaps tensor"),
    (
        "offsets-gap",
        {"a": entry(shape=(1,), offsets=(4, 8))},
        b"\0" * 8,
        "4 bytes before tensor 'a' belong to no tensor",
    ),
    (
        "offsets-past-end",
        {"a": entry(shape=(4,), offsets=(0, 16))},
        b"\0" * 8,
        "truncated: header promises 16 bytes of data",
    ),
    ("trailing-bytes", {"a": entry()}, b"\0" * 12, "4 bytes after the last tensor"),
    ("unknown-dtype", {"a": entry(dtype="F128")}, b"\0" * 8, "unknown dtype 'F128'"),
    ("dtype-not-string", {"a": entry(dtype=32)}, b"\0" * 8, "unknown dtype 32"),
    ("bytes-vs-shape", {"a": entry(shape=(3,))}, b"\0" * 8, "holds 8 bytes, but shape [3] of F32 needs 12"),
    ("metadata-list", {"__metadata__": ["a"], "a": GOOD}, b"\0" * 8, "__metadata__ is a list, not a string"),
    ("metadata-int-value", {"__metadata__": {"k": 1}, "a": GOOD}, b"\0" * 8, "__metadata__ values must be strings"),
    (
        "metadata-nested",
        {"__metadata__": {"k": {"x": "y"}}, "a": GOOD},
        b"\0" * 8,
        "__metadata__ values must be strings",
    ),
    (
        "duplicate-key",
        b'{"a":' + json.dumps(GOOD).encode() + b',"a":' + json.dumps(GOOD).encode() + b"}",
        b"\0" * 8,
        "key 'a' appears twice",
    ),
    ("nan-constant", b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', b"\0" * 8, "NaN is not valid JSON"),
    ("deep-nesting", b"[" * 100000 + b"]" * 100000, b"", "unreadable header"),
    ("non-utf8", b'{"a\xff":1}', b"", "header is not UTF-8 text"),
    ("not-json", b"PK\x03\x04 zip file", b"", "unreadable header"),
]


@pytest.mark.parametrize("header,data,message", [c[1:] for c in BAD_HEADERS], ids=[c[0] for c in BAD_HEADERS])
def test_malformed_headers_are_kern_errors_naming_the_file(tmp_path, header, data, message):
    from kern.adapters.streaming import SafetensorsReader
    from kern.models.files import load_tensors, read_shapes

    path = raw_file(tmp_path / "bad.safetensors", header, data)
    for read in (read_header, load_file, SafetensorsReader):
        with pytest.raises(KernError, match="bad.safetensors: ") as info:
            read(path)
        assert message in str(info.value)
    for read in (lambda p: read_shapes([p]), lambda p: load_tensors([p], None, "cpu")):
        with pytest.raises(ModelFileError, match="bad.safetensors: "):
            read(path)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
        (lambda p: p.write_bytes(b"\x05\0\0"), "only 3 bytes"),
        (
            lambda p: p.write_bytes(struct.pack("<Q", 1000) + b"{}"),
            "header length 1000 runs past the end of the file (10 bytes)",
        ),
        (lambda p: p.write_bytes(struct.pack("<Q", 2**63) + b"{}"), "bad header length"),
        (lambda p: p.write_bytes(struct.pack("<Q", 0)), "bad header length 0"),
        (lambda p: p.mkdir(), "is a folder, not a safetensors file"),
        (lambda p: None, "no such file"),
        (lambda p: os.symlink("/dev/null", p), "not a regular file"),
    ],
    ids=["zero-length", "short", "length-past-end", "length-huge", "length-zero", "folder", "missing", "device"],
)
def test_broken_files(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(KernError, match="bad.safetensors: ") as info:
        read_header(path)
    assert message in str(info.value)
    with pytest.raises(KernError, match=re.escape(message)):
        load_file(path)


def test_valid_edge_cases_read_the_same_as_safetensors(tmp_path):
    from kern.adapters.streaming import SafetensorsReader
    from safetensors import safe_open

    header = {
        "__metadata__": {"k": "v"},
        "empty": entry(shape=(0, 3), offsets=(0, 0)),
        "scalar": entry(shape=(), offsets=(8, 12)),
        "v": entry(shape=(2,), offsets=(0, 8)),
        "extra": {**entry(dtype="U8", shape=(4,), offsets=(12, 16)), "ignored": 1},
    }
    path = raw_file(
        tmp_path / "ok.safetensors",
        header,
        struct.pack("<2f", 1.5, -2.0) + struct.pack("<f", 3.0) + bytes([1, 2, 3, 4]),
    )
    h, md = read_header(path)
    assert md == {"k": "v"} and set(h) == {"empty", "scalar", "v", "extra"}
    tensors, _ = load_file(path)
    with safe_open(str(path), "pt") as f, SafetensorsReader(path) as r:
        for k in f.keys():
            assert torch.equal(tensors[k], f.get_tensor(k)) and torch.equal(r.get(k), f.get_tensor(k))
    assert tensors["v"].tolist() == [1.5, -2.0] and tensors["scalar"].item() == 3.0


def test_safetensors_library_errors_become_kern_errors(tmp_path, monkeypatch):
    import safetensors

    path = tmp_path / "a.safetensors"
    save_file({"t": torch.zeros(2)}, path)

    def broken(*args, **kwargs):
        raise safetensors.SafetensorError("Error while deserializing header: something new")

    monkeypatch.setattr(safetensors, "safe_open", broken)
    with pytest.raises(KernError, match=r"a\.safetensors: unreadable safetensors file: .*something new"):
        load_file(path)
    from kern.models.files import load_tensors

    with pytest.raises(ModelFileError, match=r"a\.safetensors: unreadable safetensors file"):
        load_tensors([path], None, "cpu")


# ------------------------------------------------------------------------------------------- finiteness


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]
)
def test_describe_nonfinite(dtype, monkeypatch):
    monkeypatch.setattr(kread, "FINITE_CHUNK", 7)  # several chunks, the bad values in different ones
    t = torch.randn(5, 9).to(dtype)
    assert describe_nonfinite(t) is None
    has_inf = dtype != torch.float8_e4m3fn  # e4m3fn has no infinity (inf casts to NaN)
    bad = t.float()
    bad[0, 1] = bad[4, 8] = float("nan")
    bad[3, 3] = float("-inf") if has_inf else float("nan")
    expected = "2 NaN and 1 infinite of 45 values" if has_inf else "3 NaN of 45 values"
    assert describe_nonfinite(bad.to(dtype)) == expected
    assert describe_nonfinite(torch.arange(5)) is None and describe_nonfinite(torch.ones(0)) is None


def test_load_tensors_refuses_nonfinite_tensors(tmp_path):
    from kern.models.files import load_tensors

    good = {"w": torch.randn(4, 4), "n": torch.arange(3)}
    save_file(good, tmp_path / "good.safetensors")
    assert torch.equal(load_tensors([tmp_path / "good.safetensors"], torch.bfloat16, "cpu")["w"], good["w"].bfloat16())
    fp8 = torch.randn(8, 8).to(torch.float8_e4m3fn)
    fp8.view(torch.uint8)[3, 5] = 0x7F  # the e4m3fn NaN pattern
    save_file({"blocks.0.w": fp8}, tmp_path / "fp8.safetensors")
    with pytest.raises(
        ModelFileError,
        match=r"fp8\.safetensors: tensor 'blocks\.0\.w' holds 1 NaN of 64 values; the checkpoint is corrupt",
    ):
        load_tensors([tmp_path / "good.safetensors", tmp_path / "fp8.safetensors"], torch.bfloat16, "cpu")
    save_file({"w": torch.tensor([1.0, 1e6])}, tmp_path / "big.safetensors")
    with pytest.raises(
        ModelFileError, match=r"big\.safetensors: tensor 'w' overflows float16 \(1 infinite of 2 values\)"
    ):
        load_tensors([tmp_path / "big.safetensors"], torch.float16, "cpu")
    assert load_tensors([tmp_path / "big.safetensors"], torch.float32, "cpu")["w"][1] == 1e6


# ------------------------------------------------------------------------------------------- properties

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "F4"]


@st.composite
def safetensors_bytes(draw):
    """A valid file (1–3 tensors, metadata) then one random corruption of its header, lengths or bytes."""
    header, offset = {}, 0
    for i in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        n = (math.prod(shape) * kread.SAFETENSORS_DTYPE_BITS[dtype] + 7) // 8
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    if draw(st.booleans()):
        header["__metadata__"] = {"k": "v"}
    data = draw(st.binary(min_size=offset, max_size=offset))
    names = [k for k in header if k != "__metadata__"]
    kind = draw(
        st.sampled_from(["none", "field", "drop", "offset", "data", "metadata", "entry", "byte", "cut", "length"])
    )
    name = draw(st.sampled_from(names))
    if kind == "field":
        header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON)
    elif kind == "drop":
        del header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif kind == "offset":
        header[name]["data_offsets"][draw(st.integers(0, 1))] += draw(st.integers(-9, 9))
    elif kind == "data":
        data = data + b"\0" * draw(st.integers(1, 9)) if draw(st.booleans()) else data[: -draw(st.integers(1, 9))]
    elif kind == "metadata":
        header["__metadata__"] = draw(JSON)
    elif kind == "entry":
        header[name] = draw(JSON)
    raw = json.dumps(header).encode()
    length = len(raw)
    if kind == "length":
        length = draw(
            st.sampled_from([0, 1, length - 1, length + 1, length + 100, 2**64 - 1, draw(st.integers(0, 2**64 - 1))])
        )
    blob = struct.pack("<Q", length) + raw + data
    if kind == "byte":
        at = draw(st.integers(0, len(blob) - 1))
        blob = blob[:at] + bytes([draw(st.integers(0, 255))]) + blob[at + 1 :]
    elif kind == "cut":
        blob = blob[: draw(st.integers(0, len(blob) - 1))]
    return blob


def read_everything(path):
    """Every reader kern has, on one file; returns what load_file read (or raises)."""
    from kern.adapters.streaming import SafetensorsReader
    from kern.models.files import read_shapes

    header, _ = read_header(path)
    read_shapes([path])
    tensors, _ = load_file(path)
    assert set(tensors) == set(header)
    from kern.adapters.streaming import _DTYPES

    with SafetensorsReader(path) as r:
        for k in r.keys():
            if header[k]["dtype"] in _DTYPES:
                got = r.get(k)
                assert got.shape == tensors[k].shape and got.dtype == tensors[k].dtype
                assert torch.equal(got.reshape(-1).view(torch.uint8), tensors[k].reshape(-1).view(torch.uint8))
    return tensors


def assert_kern_error_or_correct_read(path):
    from safetensors import safe_open

    try:
        tensors = read_everything(path)
    except KernError as exc:
        assert str(path) in str(exc)
        return
    with safe_open(str(path), "pt") as f:  # whatever kern accepts, the safetensors library reads the same way
        assert set(f.keys()) == set(tensors)


@PROPERTY
@given(blob=safetensors_bytes())
def test_property_corrupted_files_are_kern_errors_or_read_correctly(tmp_path, blob):
    path = tmp_path / "p.safetensors"
    path.write_bytes(blob)
    assert_kern_error_or_correct_read(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=JSON, data=st.binary(max_size=16))
def test_property_any_json_header(tmp_path, header, data):
    path = tmp_path / "j.safetensors"
    raw_file(path, header, data)
    assert_kern_error_or_correct_read(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=64))
def test_property_random_bytes(tmp_path, blob):
    path = tmp_path / "r.safetensors"
    path.write_bytes(blob)
    assert_kern_error_or_correct_read(path)


def test_the_readers_are_importable_from_kern_core_io():
    """Plugins import ``load_file`` / ``read_header`` ... from ``kern.core.io``: the same objects as in
    ``kern.core.safetensors_read``, where they live."""
    for name in (
        "read_header",
        "load_file",
        "header_length",
        "describe_nonfinite",
        "SAFETENSORS_DTYPE_BITS",
        "MAX_HEADER_BYTES",
        "FINITE_CHUNK",
    ):
        assert getattr(kio, name) is getattr(kread, name), name
    assert set(kread.__all__) <= set(kio.__all__)
