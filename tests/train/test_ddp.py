"""Two-process data parallel training on the CPU (gloo) through `accelerate launch`, unchanged.

`--multi_gpu` is accelerate's name for its torchrun launcher; with no GPU, kern runs the processes on
the CPU with the gloo backend.
"""

from __future__ import annotations

import os
import subprocess
import sys

from kern.io import load_file
from tests.conftest import REPO
from tests.train.conftest import make_dataset


def test_two_process_ddp_trains_and_replicas_agree(tmp_path, toy_site):
    dataset = make_dataset(tmp_path / "data", n=4)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERN_")}
    env["PYTHONPATH"] = os.pathsep.join([str(toy_site), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kern_cli.main",
           "train", "--arch", "toy", "--network", "lora", "--dataset", str(dataset), "--out", str(out), "--steps", "6",
           "--set", "model.dtype=\"float32\"", "--set", "train.mixed_precision=\"no\"", "--set", "save.every_n_steps=3",
           "--network-opt", "rank=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "replicas agree" in proc.stdout + proc.stderr
    tensors, meta = load_file(out / "adapter.safetensors")
    assert meta["ss_steps"] == "6" and tensors
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000003"]
