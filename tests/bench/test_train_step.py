"""bench/train_step.py end to end on the CPU (--tiny): kern and the diffusers + peft anchor both train, and the
JSON lines carry what the GPU runs will report (times, FLOPs, ratios)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "train_step.py"
CONFIGS = ("klein4b", "dev")  # dev: the guidance-embedding path too

RESULT_FIELDS = {
    "impl",
    "config",
    "res",
    "n_img",
    "n_txt",
    "batch",
    "rank",
    "ckpt",
    "dtype",
    "steps",
    "warmup",
    "step_s",
    "step_min_s",
    "peak_gib",
    "fwd_tflop",
    "model_tflops_per_s",
    "mfu",
    "loss_finite",
    "lora_modules",
    "lora_params",
    "optimizer",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("bench") / "train_step.jsonl"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--only", "both", "--configs", *CONFIGS, "--json-out", str(out)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    file_lines = [json.loads(line) for line in out.read_text().splitlines()]
    stdout_lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return file_lines, stdout_lines, proc.stdout


def test_json_out_matches_stdout(run):
    file_lines, stdout_lines, _ = run
    assert file_lines == stdout_lines
    assert file_lines[0]["kind"] == "header" and file_lines[0]["tiny"] is True
    assert file_lines[0]["matmul_tflops"] > 0 and "3 x forward FLOPs" in file_lines[0]["flops_convention"]


def test_one_result_per_config_and_implementation(run):
    lines = run[0]
    assert not [r for r in lines if r["kind"] == "error"]
    results = [r for r in lines if r["kind"] == "result"]
    assert sorted((r["config"], r["impl"]) for r in results) == sorted(
        (c, i) for c in CONFIGS for i in ("kern", "diffusers+peft")
    )
    for r in results:
        assert RESULT_FIELDS <= r.keys(), RESULT_FIELDS - r.keys()
        assert r["steps"] == 2 and r["warmup"] == 1 and r["ckpt"] is True and r["dtype"] == "float32"
        assert 0 < r["step_min_s"] <= r["step_s"]
        assert r["fwd_tflop"] > 0 and r["model_tflops_per_s"] > 0 and r["mfu"] > 0
        assert r["peak_gib"] is None  # CPU: no CUDA peak
        assert r["loss_finite"] is True
        assert r["lora_modules"] > 0 and r["lora_params"] > 0
        assert r["lora_updated"] == 1.0  # every adapter tensor moved: the optimizer step reached them all


def test_same_shapes_and_flops_for_both(run):
    results = {(r["config"], r["impl"]): r for r in run[0] if r["kind"] == "result"}
    for c in CONFIGS:
        k, a = results[c, "kern"], results[c, "diffusers+peft"]
        for key in ("n_img", "n_txt", "batch", "rank", "fwd_tflop"):
            assert k[key] == a[key], key
        # diffusers splits FLUX.2's fused qkv into q / k / v: more (thinner) LoRA modules on the same layers
        assert a["lora_modules"] > k["lora_modules"]


def test_ratios(run):
    lines, _, stdout = run
    results = {(r["config"], r["impl"]): r for r in lines if r["kind"] == "result"}
    ratios = {r["config"]: r for r in lines if r["kind"] == "ratio"}
    assert sorted(ratios) == sorted(CONFIGS)  # the H100 anchor numbers apply to full-size runs only
    for c, q in ratios.items():
        expected = results[c, "diffusers+peft"]["step_s"] / results[c, "kern"]["step_s"]
        assert q["speedup"] == pytest.approx(expected, rel=1e-2) and q["speedup"] > 0
        assert q["memory_ratio"] is None
    assert "anchor time / kern time" in stdout and "MFU" in stdout  # the table


@pytest.mark.parametrize("network", ["dora", "lokr"])
def test_the_other_networks_train_on_both_sides(network, tmp_path):
    """--network dora / lokr: kern trains its network type, the anchor peft's use_dora LoRA / LoKr, each updating."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    out = tmp_path / "train_step.jsonl"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--configs", "klein4b", "--network", network, "--json-out", str(out)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [r for r in map(json.loads, out.read_text().splitlines()) if r.get("kind") == "result"]
    assert sorted(r["impl"] for r in results) == ["diffusers+peft", "kern"]
    for r in results:
        assert r["network"] == network and r["loss_finite"] and r["lora_modules"] > 0
        assert r["lora_updated"] == 1.0


def test_repeat_reruns_every_config_and_reports_the_spread(tmp_path):
    """--repeat 2: each config runs twice (in order, in one process), and one spread line sums up the two runs."""
    out = tmp_path / "train_step.jsonl"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--only", "kern", "--configs", "klein4b", "--repeat", "2",
         "--json-out", str(out)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    results = [r for r in lines if r.get("kind") == "result"]
    assert [r["repeat"] for r in results] == [0, 1]
    (spread,) = [r for r in lines if r.get("kind") == "spread"]
    assert spread["runs"] == 2 and spread["step_s"] == [r["step_s"] for r in results]
    assert spread["min_s"] <= spread["median_s"] <= spread["max_s"] and spread["spread"] >= 0
    assert "2 runs, step" in proc.stdout
