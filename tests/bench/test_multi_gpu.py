"""bench/multi_gpu.py on two CPU processes (gloo): plain data parallel and the sharded base both run kern's step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("shard", [False, True], ids=["ddp", "sharded"])
def test_multi_gpu_bench_runs_on_two_cpu_processes(shard):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(REPO / "bench" / "multi_gpu.py"),
        "--tiny",
        *(["--shard-base"] if shard else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]  # rank 0 only
    assert line["processes"] == 2 and line["shard_base"] is shard and line["loss_finite"]
    assert line["step_s"] > 0 and line["images_per_s"] == pytest.approx(2 / line["step_s"], rel=1e-2)
    assert len(line["peak_gib"]) == 2 and line["lora_modules"] > 0
