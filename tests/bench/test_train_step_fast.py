"""bench/train_step.py's fast-path settings (--kern) on the CPU: each setting is one kern run with its own label,
the JSON says what kern.gpu.accel applied, and no step after the warm-up compiled anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "train_step.py"


def test_kern_settings_run_and_report_what_was_applied(tmp_path):
    out = tmp_path / "fast.jsonl"
    settings = ["default", "compile=off,ckpt=selective", "ckpt=false", "base=fp8,swap=1"]
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--tiny",
            "--only",
            "kern",
            "--configs",
            "klein4b",
            "--kern",
            *settings,
            "--json-out",
            str(out),
        ],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [r for r in map(json.loads, out.read_text().splitlines()) if r["kind"] == "result"]
    assert [r["impl"] for r in results] == [
        "kern",
        "kern[compile=off,ckpt=selective]",
        "kern[ckpt=False]",
        "kern[base=fp8,swap=1]",
    ]
    fast = [r["fast"] for r in results]
    assert [f["checkpointing"] for f in fast] == ["full", "selective", "off", "full"]
    assert all(f["compile"] == "off" for f in fast)  # auto: eager on the CPU
    assert fast[3]["blocks_swapped"] == 1 and fast[3]["fp8_layers"] > 0
    assert all(r["recompiles_timed"] == 0 and r["loss_finite"] and r["lora_updated"] == 1.0 for r in results)


def test_bad_setting_is_refused():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--kern", "speed=max"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "use key=value over compile" in proc.stderr
