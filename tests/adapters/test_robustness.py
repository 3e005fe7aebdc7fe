"""Bad inputs to `kern merge`, `kern convert` and `kern generate --weights`: a clear error before any work, the
right exit code, and nothing already on disk changed (bytes and modification times compared)."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from kern.adapters.convert import convert
from kern.adapters.merge import merge
from kern.adapters.weights import parse_weights_arg
from kern.core.io import load_file
from kern.errors import AdapterError, KernError, ModelFileError, UsageError

from tests.adapters.helpers import ARCH, BLOCK_PATHS, LayerTree, manager_with_arch, random_lora, write
from tests.conftest import REPO, make_dist, run_kern

PLUGIN = """
from tests.adapters.helpers import tiny_arch_plugin
_p = tiny_arch_plugin()
register_architectures = _p.register_architectures
adapter_module_map = _p.adapter_module_map
"""
QKV = "lora_unet_double_blocks_0_img_attn_qkv"


def snapshot(folder):
    """{name: (bytes, mtime_ns)} of every file below ``folder`` (links by their target's text)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p.relative_to(folder))] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def bad_header_file(path, header):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    model = LayerTree()
    state = model.state_dict()
    write(tmp / "base.safetensors", state)
    write(tmp / "lora.safetensors", random_lora(model, BLOCK_PATHS, seed=1))
    nan = random_lora(model, BLOCK_PATHS, seed=2)
    nan[f"{QKV}.lora_up.weight"][1, 0] = float("nan")
    write(tmp / "nan_lora.safetensors", nan)
    inf_base = dict(state)
    inf_base["single_blocks.1.linear2.weight"] = state["single_blocks.1.linear2.weight"].clone()
    inf_base["single_blocks.1.linear2.weight"][0, 0] = float("inf")
    write(tmp / "inf_base.safetensors", inf_base)
    bad_header_file(tmp / "list_header.safetensors", {"a": [1, 2]})
    bad_header_file(tmp / "bad_offsets.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})
    (tmp / "folder.safetensors").mkdir()
    dist = make_dist(
        tmp_path_factory.mktemp("site"), "kern-tinyflux-robust", "0.1", "tinyflux", "kern_tinyflux_robust", PLUGIN
    )
    return tmp, dist


@pytest.fixture
def work(files, tmp_path):
    """A private copy of the inputs (each test may link, overwrite or corrupt files) and the output folder."""
    src, dist = files
    for p in src.iterdir():
        if p.is_file():
            (tmp_path / p.name).write_bytes(p.read_bytes())
        else:
            (tmp_path / p.name).mkdir()
    return tmp_path, dist


def kern_merge(tmp, *args):
    return run_kern("merge", "--model", str(tmp / "base.safetensors"), *args)


# ------------------------------------------------------------------------------------------- merge: the output


def test_merge_never_writes_over_an_input(work):
    tmp, _ = work
    os.symlink(tmp / "base.safetensors", tmp / "base_link.safetensors")
    os.link(tmp / "lora.safetensors", tmp / "lora_hard.safetensors")
    before = snapshot(tmp)
    out = tmp / "lora_hard.safetensors"
    proc = kern_merge(tmp, "--weights", str(tmp / "lora.safetensors"), "--out", str(out), "--overwrite")
    assert proc.returncode == 2, proc.stderr
    assert (
        f"--out {out} is the adapter {tmp / 'lora.safetensors'} (through a link)" in proc.stderr
        and "choose another --out" in proc.stderr
    )
    for name in ("base.safetensors", "base_link.safetensors"):
        with pytest.raises(UsageError, match=rf"--out .*{name} is the base model"):
            merge(tmp / "base.safetensors", [(tmp / "lora.safetensors", 1.0)], tmp / name, overwrite=True)
    assert snapshot(tmp) == before


def test_merge_replaces_an_existing_output_only_with_overwrite(work):
    tmp, _ = work
    out = tmp / "merged.safetensors"
    out.write_bytes(b"an older merge")
    before = snapshot(tmp)
    proc = kern_merge(tmp, "--weights", str(tmp / "lora.safetensors"), "--out", str(out))
    assert proc.returncode == 2
    assert f"--out {out}: already exists; pass --overwrite" in proc.stderr
    assert snapshot(tmp) == before
    proc = kern_merge(tmp, "--weights", str(tmp / "lora.safetensors"), "--out", str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    merged, md = load_file(out)
    assert "kern.merged_adapters" in md and set(merged) == set(load_file(tmp / "base.safetensors")[0])
    after = snapshot(tmp)
    assert {k: v for k, v in after.items() if k != "merged.safetensors"} == {
        k: v for k, v in before.items() if k != "merged.safetensors"
    }


def test_merge_output_path_problems_are_usage_errors(work):
    from click.testing import CliRunner
    from kern_cli.commands.merge import command

    tmp, _ = work
    (tmp / "plain_file").write_text("x")
    before = snapshot(tmp)
    proc = kern_merge(tmp, "--weights", str(tmp / "lora.safetensors"), "--out", str(tmp / "folder.safetensors"))
    assert proc.returncode == 2 and "--out" in proc.stderr and "is a folder" in proc.stderr
    cases = [
        (tmp / "plain_file" / "m.safetensors", "plain_file is not a folder"),
        ("/dev/null", "exists and is not a regular file"),
    ]
    for out, message in cases:
        result = CliRunner().invoke(
            command,
            [
                "--model",
                str(tmp / "base.safetensors"),
                "--weights",
                str(tmp / "lora.safetensors"),
                "--out",
                str(out),
                "--overwrite",
            ],
            standalone_mode=False,
        )
        assert isinstance(result.exception, UsageError) and message in str(result.exception), result.exception
        assert "--out" in str(result.exception)
    assert snapshot(tmp) == before


# ------------------------------------------------------------------------------------------- merge: checked before work


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--weights", "{tmp}/lora.safetensors:nan"],
            "--weights {tmp}/lora.safetensors:nan: multiplier 'nan' is not a finite number",
        ),
        (["--weights", "{tmp}/lora.safetensors:-inf"], "multiplier '-inf' is not a finite number"),
        (["--weights", "{tmp}/lora.safetensors:1e999"], "multiplier '1e999' is not a finite number"),
        (
            ["--weights", "{tmp}/folder.safetensors:0.5"],
            "--weights {tmp}/folder.safetensors:0.5: {tmp}/folder.safetensors is a folder",
        ),
        (
            ["--weights", "{tmp}/missing.safetensors"],
            "--weights {tmp}/missing.safetensors: {tmp}/missing.safetensors: no such file",
        ),
        (["--weights", "{tmp}/lora.safetensors", "--dtype", "int4"], "unknown dtype 'int4'"),
        (["--weights", "{tmp}/lora.safetensors", "--arch", "nope"], "unknown architecture 'nope'"),
        (["--weights", "{tmp}/lora.safetensors", "--variant", "dev"], "--variant dev needs the architecture (--arch)"),
        (["--weights", "{tmp}/lora.safetensors", "--out", "{tmp}/lora.safetensors"], "is the adapter"),
    ],
    ids=[
        "nan",
        "-inf",
        "overflowing-literal",
        "folder",
        "missing",
        "dtype",
        "arch",
        "variant-without-arch",
        "out-is-adapter",
    ],
)
def test_merge_usage_errors_come_before_the_base_is_read(work, args, message):
    """The base model here is corrupt: each of these mistakes must be reported first (exit 2), not the base."""
    from click.testing import CliRunner
    from kern_cli.commands.merge import command

    tmp, _ = work
    bad_header_file(tmp / "base.safetensors", {"w": [1]})
    args = [a.format(tmp=tmp) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp / "m.safetensors")]
    before = snapshot(tmp)
    result = CliRunner().invoke(command, ["--model", str(tmp / "base.safetensors"), *args], standalone_mode=False)
    assert isinstance(result.exception, UsageError), result.exception
    assert message.format(tmp=tmp) in str(result.exception)
    assert snapshot(tmp) == before


def test_merge_cli_exit_code_for_usage_errors(work):
    tmp, _ = work
    bad_header_file(tmp / "base.safetensors", {"w": [1]})
    before = snapshot(tmp)
    proc = kern_merge(tmp, "--weights", f"{tmp / 'lora.safetensors'}:nan", "--out", str(tmp / "m.safetensors"))
    assert proc.returncode == 2 and "multiplier 'nan' is not a finite number" in proc.stderr
    assert snapshot(tmp) == before


# ------------------------------------------------------------------------------------------- merge: values


def test_merge_refuses_an_adapter_with_nan(work):
    tmp, _ = work
    out = tmp / "merged.safetensors"
    out.write_bytes(b"keep me")
    before = snapshot(tmp)
    proc = kern_merge(
        tmp,
        "--weights",
        str(tmp / "lora.safetensors"),
        "--weights",
        str(tmp / "nan_lora.safetensors"),
        "--out",
        str(out),
        "--overwrite",
    )
    assert proc.returncode == 1, proc.stderr
    assert f"{tmp / 'nan_lora.safetensors'}: tensor '{QKV}.lora_up.weight' holds 1 NaN of 72 values" in proc.stderr
    assert snapshot(tmp) == before


def test_merge_refuses_a_base_with_inf(work):
    tmp, _ = work
    before = snapshot(tmp)
    proc = run_kern(
        "merge",
        "--model",
        str(tmp / "inf_base.safetensors"),
        "--weights",
        str(tmp / "lora.safetensors"),
        "--out",
        str(tmp / "m.safetensors"),
    )
    assert proc.returncode == 1, proc.stderr
    assert (
        f"{tmp / 'inf_base.safetensors'}: tensor 'single_blocks.1.linear2.weight' holds 1 infinite of 256 values"
        in proc.stderr
    )
    assert snapshot(tmp) == before


def test_merge_refuses_an_fp8_base_with_nan(tmp_path):
    model = LayerTree()
    state = {k: v.to(torch.float8_e4m3fn) for k, v in model.state_dict().items()}
    state["img_in.weight"].view(torch.uint8)[0, 0] = 0x7F  # e4m3fn NaN
    write(tmp_path / "fp8.safetensors", state)
    write(tmp_path / "lora.safetensors", random_lora(model, BLOCK_PATHS, seed=3))
    with pytest.raises(ModelFileError, match=r"fp8\.safetensors: tensor 'img_in\.weight' holds 1 NaN of 32 values"):
        merge(tmp_path / "fp8.safetensors", [(tmp_path / "lora.safetensors", 1.0)], tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp8.safetensors", "lora.safetensors"]


def test_merge_overflow_leaves_no_output_and_names_the_key(work):
    tmp, _ = work
    out = tmp / "merged.safetensors"
    out.write_bytes(b"keep me")
    before = snapshot(tmp)
    proc = kern_merge(
        tmp, "--weights", f"{tmp / 'lora.safetensors'}:1e30", "--dtype", "fp16", "--out", str(out), "--overwrite"
    )
    assert proc.returncode == 1, proc.stderr
    assert "does not fit float16" in proc.stderr and "lower the multipliers" in proc.stderr
    assert "double_blocks." in proc.stderr and "Nothing was written" in proc.stderr
    assert snapshot(tmp) == before
    with pytest.raises(
        AdapterError, match=r"merging .*lora\.safetensors: lora_unet_.* into '.*' gives .*infinite.*float32 overflow"
    ):
        merge(tmp / "base.safetensors", [(tmp / "lora.safetensors", 1e300)], out, overwrite=True)
    assert snapshot(tmp) == before


# ------------------------------------------------------------------------------------------- corrupt files


def test_corrupt_headers_at_the_cli(work):
    tmp, dist = work
    before = snapshot(tmp)
    proc = run_kern(
        "merge",
        "--model",
        str(tmp / "list_header.safetensors"),
        "--weights",
        str(tmp / "lora.safetensors"),
        "--out",
        str(tmp / "m.safetensors"),
    )
    assert proc.returncode == 1
    assert f"{tmp / 'list_header.safetensors'}: corrupt safetensors header: tensor 'a' is a JSON list" in proc.stderr
    with pytest.raises(AdapterError) as info:
        merge(tmp / "base.safetensors", [(tmp / "bad_offsets.safetensors", 1.0)], tmp / "m.safetensors")
    assert (
        f"{tmp / 'bad_offsets.safetensors'}: corrupt safetensors header: tensor 'w': data_offsets [8, 0] end before they begin"
        in str(info.value)
    )
    proc = run_kern(
        "convert",
        str(tmp / "bad_offsets.safetensors"),
        "--to",
        "comfyui",
        "--arch",
        ARCH,
        "--out",
        str(tmp / "c.safetensors"),
        pythonpath=[dist],
    )
    assert proc.returncode == 1 and "bad_offsets.safetensors: corrupt safetensors header" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(tmp) == before


@pytest.mark.parametrize(
    "header",
    [
        [1, 2],
        {"a": {"dtype": "F32", "shape": [2]}},
        {"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}},
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"x": 1}},
    ],
    ids=["not-a-dict", "no-offsets", "unknown-dtype", "bytes-vs-shape", "metadata-not-strings"],
)
def test_corrupt_adapter_or_base_in_merge_and_convert(tmp_path, header):
    model = LayerTree()
    base = write(tmp_path / "base.safetensors", model.state_dict())
    lora = write(tmp_path / "lora.safetensors", random_lora(model, BLOCK_PATHS, seed=1))
    bad = bad_header_file(tmp_path / "bad.safetensors", header)
    before = snapshot(tmp_path)
    out = tmp_path / "out.safetensors"
    manager = manager_with_arch()
    with pytest.raises(AdapterError, match=r"bad\.safetensors: "):
        merge(base, [(lora, 1.0), (bad, 1.0)], out)
    with pytest.raises(ModelFileError, match=r"bad\.safetensors: "):
        merge(bad, [(lora, 1.0)], out)
    with pytest.raises(AdapterError, match=r"bad\.safetensors: "):
        convert(bad, out, "comfyui", ARCH, manager=manager)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------- convert


def test_convert_output_rules(work, monkeypatch):
    from click.testing import CliRunner
    from kern.core import plugins
    from kern_cli.commands.convert import command

    tmp, dist = work
    monkeypatch.setattr(plugins, "_MANAGER", manager_with_arch())
    os.link(tmp / "lora.safetensors", tmp / "lora_hard.safetensors")
    (tmp / "c.safetensors").write_bytes(b"older export")
    before = snapshot(tmp)

    def kern_convert(src, out, *extra):
        return run_kern(
            "convert", str(src), "--to", "comfyui", "--arch", ARCH, "--out", str(out), *extra, pythonpath=[dist]
        )

    proc = kern_convert(tmp / "lora.safetensors", tmp / "lora_hard.safetensors", "--overwrite")
    assert proc.returncode == 2 and f"--out {tmp / 'lora_hard.safetensors'} is the input" in proc.stderr
    proc = kern_convert(tmp / "lora.safetensors", tmp / "c.safetensors")
    assert proc.returncode == 2 and "already exists; pass --overwrite" in proc.stderr
    for src, error, message in [
        ("nan_lora.safetensors", AdapterError, f"nan_lora.safetensors: tensor '{QKV}.lora_up.weight' holds 1 NaN"),
        ("folder.safetensors", UsageError, f"IN {tmp / 'folder.safetensors'}: is a folder"),
    ]:
        result = CliRunner().invoke(
            command,
            [str(tmp / src), "--to", "comfyui", "--arch", ARCH, "--out", str(tmp / "c.safetensors"), "--overwrite"],
            standalone_mode=False,
        )
        assert type(result.exception) is error and message in str(result.exception), result.exception
    assert snapshot(tmp) == before
    proc = kern_convert(tmp / "lora.safetensors", tmp / "c.safetensors", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert any(k.startswith("diffusion_model.") for k in load_file(tmp / "c.safetensors")[0])


def test_convert_checks_arch_variant_and_output_before_reading(tmp_path):
    manager = manager_with_arch()
    bad = bad_header_file(tmp_path / "bad.safetensors", {"w": [1]})
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match="unknown architecture"):
        convert(bad, tmp_path / "o.safetensors", "comfyui", "nope", manager=manager)
    with pytest.raises(UsageError, match="has no variant 'huge'"):
        convert(bad, tmp_path / "o.safetensors", "comfyui", ARCH, variant="huge", manager=manager)
    with pytest.raises(UsageError, match="already exists"):
        convert(bad, tmp_path / "exists.safetensors", "comfyui", ARCH, manager=manager)
    with pytest.raises(UsageError, match="unknown layout"):
        convert(bad, tmp_path / "o.safetensors", "a1111", ARCH, manager=manager)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------- --weights parsing


def test_parse_weights_arg(tmp_path):
    a = write(tmp_path / "a.safetensors", {"x": torch.zeros(1)})
    colon = write(tmp_path / "v1:final.safetensors", {"x": torch.zeros(1)})
    assert parse_weights_arg(f"{a}:0.8") == (str(a), 0.8)
    assert parse_weights_arg(str(a)) == (str(a), 1.0)
    assert parse_weights_arg(str(colon)) == (str(colon), 1.0)
    assert parse_weights_arg(f"{colon}:-0.5") == (str(colon), -0.5)
    for tail in ("nan", "inf", "-inf", "NaN", "1e400"):
        with pytest.raises(
            UsageError, match=rf"--weights .*a\.safetensors:{tail}: multiplier '{tail}' is not a finite number"
        ):
            parse_weights_arg(f"{a}:{tail}")
    with pytest.raises(UsageError, match="is a folder"):
        parse_weights_arg(f"{tmp_path}:0.5")
    with pytest.raises(UsageError, match=r"missing\.safetensors: no such file"):
        parse_weights_arg(f"{tmp_path / 'missing.safetensors'}:0.5")
    with pytest.raises(UsageError, match="give an adapter file"):
        parse_weights_arg(":0.5")


def test_apply_adapters_refuses_nonfinite_multipliers_before_reading(tmp_path):
    from kern.adapters.weights import apply_adapters

    model = LayerTree()
    with pytest.raises(UsageError, match="multiplier nan is not a finite number"):
        apply_adapters(model, [(tmp_path / "not_even_there.safetensors", float("nan"))])


TOY_SHIM = """
from kern_toy.plugin import *  # noqa: F401,F403  (the example plugin, registered under a test distribution)
"""


def test_generate_weights_errors_at_the_cli(work):
    tmp, _ = work
    site = make_dist(tmp / "site", "kern-toy-robust", "0.1", "toy", "kern_toy_robust_shim", TOY_SHIM)
    toy = REPO / "examples" / "plugins" / "kern-toy"
    before = snapshot(tmp)
    common = [
        "generate",
        "--arch",
        "toy",
        "-p",
        "a cube",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "-W",
        "32",
        "-H",
        "32",
        "--steps",
        "1",
    ]
    proc = run_kern(
        *common, "--weights", f"{tmp / 'lora.safetensors'}:inf", "--out", str(tmp / "images"), pythonpath=[site, toy]
    )
    assert proc.returncode == 2 and "multiplier 'inf' is not a finite number" in proc.stderr
    proc = run_kern(
        *common, "--weights", str(tmp / "nan_lora.safetensors"), "--out", str(tmp / "images"), pythonpath=[site, toy]
    )
    assert proc.returncode == 1, proc.stderr
    assert f"{tmp / 'nan_lora.safetensors'}: tensor '{QKV}.lora_up.weight' holds 1 NaN" in proc.stderr
    assert not list(tmp.rglob("*.png"))
    outside_site = lambda snap: {k: v for k, v in snap.items() if not k.startswith("site")}  # noqa: E731  (__pycache__ may appear there)
    assert outside_site(snapshot(tmp)) == outside_site(before)


def test_kern_errors_only(work):
    """Every failure above is a KernError subclass: the CLI never shows a traceback for them."""
    tmp, _ = work
    for path in ("list_header.safetensors", "bad_offsets.safetensors", "folder.safetensors", "nan_lora.safetensors"):
        with pytest.raises(KernError):
            merge(tmp / "base.safetensors", [(tmp / path, 1.0)], tmp / "o.safetensors")
    assert not (tmp / "o.safetensors").exists()
