"""The streaming merge: equals unmerged application, handles prefixes / layouts / fp8, fails cleanly, stays small."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from kern.adapters.convert import convert
from kern.adapters.merge import merge
from kern.adapters.weights import apply_adapters
from kern.core.io import load_file, read_header
from kern.errors import AdapterError, ModelFileError, UsageError

from tests.adapters.helpers import (
    ARCH,
    BLOCK_PATHS,
    LayerTree,
    close,
    manager_with_arch,
    max_diff,
    random_loha,
    random_lora,
    write,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def save_base(model, path, prefix="", dtype=None):
    sd = {prefix + k: (v.to(dtype) if dtype is not None else v) for k, v in model.state_dict().items()}
    write(path, sd)
    return path


def load_merged(path, prefix=""):
    sd, _ = load_file(path)
    model = LayerTree()
    model.load_state_dict({k[len(prefix) :]: v.float() for k, v in sd.items()})
    return model


def no_leftovers(folder, *keep):
    names = sorted(p.name for p in folder.iterdir())
    assert [n for n in names if n not in keep] == [], names


@pytest.mark.parametrize("prefix", ["", "diffusion_model.", "model.diffusion_model."])
def test_merge_lora_and_loha_equals_unmerged(tmp_path, prefix):
    model = LayerTree()
    xs = model.inputs()
    base = save_base(model, tmp_path / "base.safetensors", prefix)
    lora = write(tmp_path / "lora.safetensors", random_lora(model, BLOCK_PATHS, seed=1))
    loha = write(tmp_path / "loha.safetensors", random_loha(model, BLOCK_PATHS[::2], seed=2, prefix="diffusion_model."))
    adapters = [(lora, 0.8), (loha, -0.6)]

    nets = apply_adapters(model, adapters)
    with torch.no_grad():
        expected = model(xs)
    for n in nets:
        n.remove()

    result = merge(base, adapters, tmp_path / "merged.safetensors")
    assert result["merged"] == len(BLOCK_PATHS) and result["unmatched"] == []
    header, md = read_header(tmp_path / "merged.safetensors")
    assert set(header) == set(read_header(base)[0])  # same keys, prefix kept
    assert "kern.merged_adapters" in md
    with torch.no_grad():
        got = load_merged(tmp_path / "merged.safetensors", prefix)(xs)
    assert close(got, expected, atol=1e-5), max_diff(got, expected)


def test_merge_peft_layout_with_adapter_metadata(tmp_path):
    """A PEFT/diffusers-style file (lora_A/B, no alpha keys) with α in lora_adapter_metadata merges with that α."""
    import json

    model = LayerTree()
    xs = model.inputs()
    base = save_base(model, tmp_path / "base.safetensors")
    kohya = random_lora(model, ["img_in", "final_layer.linear"], rank=4, alpha=4.0, seed=3)
    peft = {}
    for k, v in kohya.items():
        name, _, suffix = k.partition(".")
        path = {"lora_unet_img_in": "img_in", "lora_unet_final_layer_linear": "final_layer.linear"}[name]
        if suffix != "alpha":
            peft[f"{path}.{'lora_A' if 'down' in suffix else 'lora_B'}.weight"] = v
    md = {
        "lora_adapter_metadata": json.dumps(
            {"transformer.r": 4, "transformer.lora_alpha": 2, "transformer.alpha_pattern": {"final_layer.linear": 8}}
        )
    }
    write(tmp_path / "peft.safetensors", peft, md)
    merge(base, [(tmp_path / "peft.safetensors", 1.0)], tmp_path / "merged.safetensors")
    kohya["lora_unet_img_in.alpha"] = torch.tensor(2.0)
    kohya["lora_unet_final_layer_linear.alpha"] = torch.tensor(8.0)
    merge(base, [(write(tmp_path / "k.safetensors", kohya), 1.0)], tmp_path / "merged_k.safetensors")
    with torch.no_grad():
        a, b = load_merged(tmp_path / "merged.safetensors")(xs), load_merged(tmp_path / "merged_k.safetensors")(xs)
    assert close(a, b, atol=1e-6)


def test_diffusers_named_adapter_on_bfl_base_needs_the_module_map(tmp_path):
    model = LayerTree()
    xs = model.inputs()
    manager = manager_with_arch()
    base = save_base(model, tmp_path / "base.safetensors")
    kohya = write(tmp_path / "k.safetensors", random_lora(model, BLOCK_PATHS, seed=4))
    convert(kohya, tmp_path / "d.safetensors", "diffusers", ARCH, manager=manager)
    with pytest.raises(AdapterError, match=r"match no weight.*transformer_blocks.*give the architecture"):
        merge(base, [(tmp_path / "d.safetensors", 1.0)], tmp_path / "m.safetensors", manager=manager)
    no_leftovers(tmp_path, "base.safetensors", "k.safetensors", "d.safetensors")
    merge(base, [(tmp_path / "d.safetensors", 1.0)], tmp_path / "m_d.safetensors", arch=ARCH, manager=manager)
    merge(base, [(kohya, 1.0)], tmp_path / "m_k.safetensors", manager=manager)
    with torch.no_grad():
        a, b = load_merged(tmp_path / "m_d.safetensors")(xs), load_merged(tmp_path / "m_k.safetensors")(xs)
    assert close(a, b, atol=1e-5), max_diff(a, b)


def test_unmatched_modules_error_or_warn(tmp_path):
    model = LayerTree()
    base = save_base(model, tmp_path / "base.safetensors")
    sd = random_lora(model, ["double_blocks.0.img_attn.qkv"])
    sd.update(random_lora(LayerTree(depth=3), ["double_blocks.2.img_attn.qkv"], seed=9))
    adapter = write(tmp_path / "a.safetensors", sd)
    with pytest.raises(
        AdapterError,
        match=r"1 adapter modules match no weight.*a\.safetensors: \['lora_unet_double_blocks_2_img_attn_qkv'\].*--allow-unmatched",
    ):
        merge(base, [(adapter, 1.0)], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    result = merge(base, [(adapter, 1.0)], tmp_path / "m.safetensors", allow_unmatched=True)
    assert result["merged"] == 1 and len(result["unmatched"]) == 1


def test_out_dtype_and_fp8_base(tmp_path):
    model = LayerTree()
    xs = model.inputs()
    lora = write(tmp_path / "l.safetensors", random_lora(model, BLOCK_PATHS, seed=5))
    base = save_base(model, tmp_path / "base.safetensors")
    merge(base, [(lora, 1.0)], tmp_path / "bf16.safetensors", out_dtype="bf16")
    header, _ = read_header(tmp_path / "bf16.safetensors")
    assert {v["dtype"] for v in header.values()} == {"BF16"}

    fp8 = save_base(model, tmp_path / "fp8.safetensors", dtype=torch.float8_e4m3fn)
    merge(fp8, [(lora, 1.0)], tmp_path / "from_fp8.safetensors")
    header, _ = read_header(tmp_path / "from_fp8.safetensors")
    assert {v["dtype"] for v in header.values()} == {"BF16"}  # fp8 upcast, written bf16 by default
    # Merged from the fp8 weights: equals the fp8-rounded base plus ΔW (then rounded to bf16).
    ref = LayerTree()
    ref.load_state_dict({k: v.to(torch.float8_e4m3fn).float() for k, v in model.state_dict().items()})
    nets = apply_adapters(ref, [(lora, 1.0)])
    with torch.no_grad():
        expected = ref(xs)
        got = load_merged(tmp_path / "from_fp8.safetensors")(xs)
    for n in nets:
        n.remove()
    assert close(got, expected, atol=0.05)
    merge(fp8, [(lora, 1.0)], tmp_path / "to_fp8.safetensors", out_dtype="float8_e4m3fn")
    header, _ = read_header(tmp_path / "to_fp8.safetensors")
    assert {v["dtype"] for v in header.values()} == {"F8_E4M3"}

    with pytest.raises(UsageError, match="unknown dtype"):
        merge(base, [(lora, 1.0)], tmp_path / "x.safetensors", out_dtype="int3")


@pytest.mark.parametrize("layout", ["scaled", "mixed"])
def test_a_comfyui_scaled_fp8_base_merges_as_its_dequantised_weights(tmp_path, layout):
    from tests.kernel.test_fp8_checkpoints import fp8_checkpoint

    model = LayerTree()
    lora = write(tmp_path / "l.safetensors", random_lora(model, BLOCK_PATHS, seed=5))
    state = model.state_dict()
    out, metadata, reference = fp8_checkpoint(state, layout, lambda k, v: k.endswith(".weight") and v.dim() == 2)
    scaled = tmp_path / f"{layout}.safetensors"
    write(scaled, out, metadata)
    plain = write(tmp_path / "dequantised.safetensors", reference)
    merge(scaled, [(lora, 1.0)], tmp_path / "from_scaled.safetensors", out_dtype="float32")
    merge(plain, [(lora, 1.0)], tmp_path / "from_plain.safetensors", out_dtype="float32")
    got, got_meta = load_file(tmp_path / "from_scaled.safetensors")
    want, _ = load_file(tmp_path / "from_plain.safetensors")
    assert got.keys() == want.keys() == state.keys()  # no scale, marker or comfy_quant keys left
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert "_quantization_metadata" not in got_meta
    merge(scaled, [(lora, 1.0)], tmp_path / "default.safetensors")  # fp8 weights come out bf16 by default
    header, _ = read_header(tmp_path / "default.safetensors")
    assert "F8_E4M3" not in {v["dtype"] for v in header.values()}


def test_bad_inputs_fail_cleanly_without_partial_output(tmp_path):
    model = LayerTree()
    base = save_base(model, tmp_path / "base.safetensors")
    good = random_lora(model, BLOCK_PATHS, seed=6)
    write(tmp_path / "good.safetensors", good)
    out = tmp_path / "out.safetensors"

    raw = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "pickle.ckpt").write_bytes(b"\x80\x04\x95PK not safetensors at all" * 4)
    wrong = dict(good)
    key = "lora_unet_single_blocks_1_linear2.lora_up.weight"  # last in stream order would be too late to notice early
    wrong[key] = torch.randn(5, 3)
    write(tmp_path / "wrong.safetensors", wrong)

    cases = [
        ("trunc.safetensors", r"trunc\.safetensors: truncated"),
        ("pickle.ckpt", r"pickle\.ckpt: not a safetensors file"),
        (
            "wrong.safetensors",
            r"wrong\.safetensors: lora_unet_single_blocks_1_linear2: .*lora_up \(5, 3\).*does not fit",
        ),
        ("missing.safetensors", r"missing\.safetensors: no such file"),
    ]
    for name, pattern in cases:
        with pytest.raises(AdapterError, match=pattern):
            merge(base, [(tmp_path / name, 1.0)], out)
        assert not out.exists()
    with pytest.raises(ModelFileError, match=r"good\.safetensors: looks like an adapter"):
        merge(tmp_path / "good.safetensors", [(tmp_path / "good.safetensors", 1.0)], out)
    with pytest.raises(ModelFileError, match=r"trunc\.safetensors: truncated"):
        merge(tmp_path / "trunc.safetensors", [(tmp_path / "good.safetensors", 1.0)], out)
    no_leftovers(
        tmp_path, "base.safetensors", "good.safetensors", "trunc.safetensors", "pickle.ckpt", "wrong.safetensors"
    )


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from kern.adapters.merge import merge
    from kern.core.io import load_file

    def hwm_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    def rss_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    def reset_hwm():
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (Linux >= 4.0)
            f.write("5")

    small, small_adapter, big, adapter, out = sys.argv[1:6]
    merge(small, [(small_adapter, 1.0)], out + ".warm")  # imports, allocator and plugin start-up out of the way
    reset_hwm()
    before = rss_kib()
    merge(big, [(adapter, 1.0)], out)
    streaming = hwm_kib() - before
    reset_hwm()
    before = rss_kib()
    everything = {k: t.clone() for k, t in load_file(big)[0].items()}  # what a non-streaming merge would hold
    loaded = hwm_kib() - before
    print(json.dumps({"streaming_kib": streaming, "load_all_kib": loaded}))
    """
)


def test_streaming_merge_peak_memory_is_about_one_tensor(tmp_path):
    """Peak resident memory of a merge in a fresh process: VmHWM (peak RSS) reset via /proc/self/clear_refs
    just before the merge, read right after it.

    The base holds 48 fp32 tensors of 4 MiB (192 MiB), each targeted by a LoRA. A merge that loaded the
    checkpoint would grow by ≥ 192 MiB; the streaming merge holds the read buffer, the float32 sum, one ΔW
    and the cast copy of one tensor at a time: a few tensors (≈ 16 MiB). We allow 10 tensors (40 MiB).
    The reader uses plain reads, not a memory map, so file pages do not count towards the resident size.
    """
    from kern.adapters.streaming import StreamingWriter

    n, rows, cols = 48, 1024, 1024
    layout = [(f"blocks.{i}.proj.weight", torch.float32, (rows, cols)) for i in range(n)]
    with StreamingWriter(tmp_path / "big.safetensors", layout) as w:
        for name, _, shape in layout:
            w.write(name, torch.randn(shape))
    write(tmp_path / "small.safetensors", {f"blocks.{i}.proj.weight": torch.randn(8, 8) for i in range(n)})
    g = torch.Generator().manual_seed(0)
    lora = {}
    for i in range(n):
        lora[f"lora_unet_blocks_{i}_proj.lora_down.weight"] = torch.randn(2, cols, generator=g)
        lora[f"lora_unet_blocks_{i}_proj.lora_up.weight"] = torch.randn(rows, 2, generator=g)
    write(tmp_path / "lora.safetensors", lora)
    small_lora = {k: (v[:, :8] if "down" in k else v[:8]) for k, v in lora.items()}
    write(tmp_path / "small_lora.safetensors", small_lora)
    files = [
        tmp_path / f
        for f in (
            "small.safetensors",
            "small_lora.safetensors",
            "big.safetensors",
            "lora.safetensors",
            "out.safetensors",
        )
    ]
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, *map(str, files)], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    r = json.loads(proc.stdout.strip().splitlines()[-1])
    growth_mib, loaded_mib = r["streaming_kib"] / 1024, r["load_all_kib"] / 1024
    tensor_mib = rows * cols * 4 / 2**20
    print(
        f"\nstreaming merge of {n} x {tensor_mib:.0f} MiB: peak RSS +{growth_mib:.1f} MiB ({growth_mib / tensor_mib:.1f} tensors); "
        f"loading the checkpoint instead: +{loaded_mib:.0f} MiB"
    )
    assert loaded_mib > 0.9 * n * tensor_mib  # the measurement sees a whole-checkpoint load
    assert growth_mib < 10 * tensor_mib
    assert (tmp_path / "out.safetensors").stat().st_size > n * rows * cols * 4
