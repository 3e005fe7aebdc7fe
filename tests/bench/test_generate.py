"""bench/generate.py end to end on the CPU (--tiny): kern's loop and the diffusers pipelines' loops both run for
every configuration (distilled, embedded guidance, true CFG), and the JSON lines carry times and ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_generate_bench_runs_both_sides(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "generate.jsonl"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "generate.py"), "--tiny", "--json-out", str(out)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results = {(r["config"], r["impl"]): r for r in lines if r["kind"] == "result"}
    assert set(results) == {(c, i) for c in ("klein4b", "dev", "qwen") for i in ("kern", "anchor")}
    assert all(r["finite"] and r["s_per_image"] > 0 for r in results.values())
    assert results[("qwen", "kern")]["cfg"] and not results[("dev", "kern")]["cfg"]
    ratios = [r for r in lines if r["kind"] == "ratio"]
    assert len(ratios) == 3 and all(r["speedup"] > 0 for r in ratios)
