"""`kern merge` and `kern convert` end to end: exit codes 0 / 1 / 2, messages, no partial files."""

from __future__ import annotations

import pytest
import torch
from kern.core.io import load_file
from kern.errors import AdapterError, UsageError

from tests.adapters.helpers import BLOCK_PATHS, LayerTree, random_loha, random_lora, write
from tests.conftest import make_dist, run_kern

PLUGIN = """
from tests.adapters.helpers import tiny_arch_plugin
_p = tiny_arch_plugin()
register_architectures = _p.register_architectures
adapter_module_map = _p.adapter_module_map
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model = LayerTree()
    write(tmp / "base.safetensors", {f"diffusion_model.{k}": v for k, v in model.state_dict().items()})
    write(tmp / "lora.safetensors", random_lora(model, BLOCK_PATHS, seed=1))
    write(tmp / "loha.safetensors", random_loha(model, BLOCK_PATHS[:4], seed=2))
    (tmp / "pickle.ckpt").write_bytes(b"PK\x03\x04 not safetensors" * 8)
    dist = make_dist(tmp / "site", "kern-tinyflux", "0.1", "tinyflux", "kern_tinyflux_cli", PLUGIN)
    return tmp, dist


def test_merge_cli(files):
    tmp, _ = files
    out = tmp / "merged.safetensors"
    proc = run_kern(
        "merge",
        "--model",
        str(tmp / "base.safetensors"),
        "--weights",
        f"{tmp / 'lora.safetensors'}:0.5",
        "--weights",
        str(tmp / "loha.safetensors"),
        "--out",
        str(out),
        "--dtype",
        "bf16",
    )
    assert proc.returncode == 0, proc.stderr
    assert "merged 20 weights from 2 adapter(s)" in proc.stdout
    merged, _ = load_file(out)
    assert merged["diffusion_model.double_blocks.0.img_attn.qkv.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "args,error,message",
    [
        (["--weights", "{tmp}/pickle.ckpt"], AdapterError, "pickle.ckpt: not a safetensors file"),
        ([], UsageError, "at least one adapter"),
        (["--weights", "{tmp}/lora.safetensors", "--dtype", "int3"], UsageError, "unknown dtype 'int3'"),
        (["--weights", "{tmp}/base.safetensors"], AdapterError, "full model checkpoint"),
    ],
    ids=["not-safetensors", "no-weights", "bad-dtype", "checkpoint-as-adapter"],
)
def test_merge_cli_errors(files, args, error, message):
    """In-process (no interpreter start-up per case): the command raises kern's errors, which the CLI maps to
    exit code 2 (UsageError) or 1 (any other KernError)."""
    from click.testing import CliRunner
    from kern_cli.commands.merge import command

    tmp, _ = files
    out = tmp / "bad.safetensors"
    result = CliRunner().invoke(
        command,
        ["--model", str(tmp / "base.safetensors"), "--out", str(out), *[a.format(tmp=tmp) for a in args]],
        standalone_mode=False,
    )
    assert type(result.exception) is error, result.exception
    assert message in str(result.exception)
    assert issubclass(error, UsageError) or not isinstance(result.exception, UsageError)
    assert not out.exists()


def test_convert_cli(files):
    tmp, dist = files
    out = tmp / "comfy.safetensors"
    proc = run_kern(
        "convert",
        str(tmp / "lora.safetensors"),
        "--to",
        "comfyui",
        "--arch",
        "tinyflux",
        "--out",
        str(out),
        pythonpath=[dist],
    )
    assert proc.returncode == 0, proc.stderr
    assert "lora kohya → comfyui" in proc.stdout
    assert any(k.startswith("diffusion_model.double_blocks.0.img_attn.qkv.lora_A") for k in load_file(out)[0])

    bad = tmp / "loha_diffusers.safetensors"
    proc = run_kern(
        "convert",
        str(tmp / "loha.safetensors"),
        "--to",
        "diffusers",
        "--arch",
        "tinyflux",
        "--out",
        str(bad),
        pythonpath=[dist],
    )
    # A usage error (exit 2), before anything is written, naming what to do instead (issue 16).
    assert proc.returncode == 2, proc.stderr
    assert "loha.safetensors: a LoHa adapter cannot be written in the diffusers layout: diffusers cannot load LoHa" in (
        proc.stderr
    )
    assert "use --to comfyui for ComfyUI" in proc.stderr and "kern merge" in proc.stderr
    assert not bad.exists()

    proc = run_kern("convert", str(tmp / "lora.safetensors"), "--to", "a1111", "--arch", "tinyflux", "--out", str(bad))
    assert proc.returncode == 2
    proc = run_kern("convert", str(tmp / "lora.safetensors"), "--to", "kohya", "--arch", "nope", "--out", str(bad))
    assert proc.returncode == 2 and "unknown architecture 'nope'" in proc.stderr
