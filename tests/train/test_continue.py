"""Continuing a finished run (issue 17 item 2): the last step always has a checkpoint, and ``kern train --resume
--steps N`` with N above the finished count goes on from it exactly as one run to N would have."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from kern.core.io import load_file
from kern.train import checkpoints

from tests.helpers import make_dataset
from tests.train import test_run_folder as run_folder

BASE = (
    *run_folder.BASE,
    "--network-opt",
    "dropout=0.1",  # the global RNG is part of what resume restores
    "--set",
    "train.warmup_steps=2",
    "--set",
    "train.log_with=[]",
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n=3)


def train(kern_main, dataset: Path, out: Path, steps: int, *extra: str) -> None:
    code, err = kern_main("train", *BASE, "--dataset", str(dataset), "--out", str(out), "--steps", str(steps), *extra)
    assert code == 0, err


def cont(kern_main, out: Path, steps: int | None, *extra: str) -> tuple[int, str]:
    """``kern train --config <run>/config.toml --resume [--steps N]``: as a user continues a run."""
    more = ("--steps", str(steps)) if steps is not None else ()
    return kern_main("train", "--config", str(out / "config.toml"), "--resume", *more, *extra)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, _ = load_file(a)
    tb, _ = load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".kern.lock"
    }


def test_continuing_a_finished_run_equals_one_run_to_n(tmp_path, dataset, kern_main):
    full, part = tmp_path / "full", tmp_path / "part"
    train(kern_main, dataset, full, 7)
    train(kern_main, dataset, part, 4)  # 3 batches an epoch: it ends inside the second epoch
    # No save.every_n_steps: the last step has its checkpoint all the same.
    assert [p.name for p in checkpoints.checkpoint_dirs(part)] == ["step-000004"]
    assert [p.name for p in checkpoints.checkpoint_dirs(full)] == ["step-000007"]
    plot = (part / "loss.png").stat().st_mtime_ns

    code, err = cont(kern_main, part, 7)
    assert code == 0, err
    assert_same_tensors(full / "adapter.safetensors", part / "adapter.safetensors")
    assert metrics(part) == metrics(full)  # loss, LR and timesteps of every step; steps 1-4 from the first run
    _, meta = load_file(part / "adapter.safetensors")
    assert meta["ss_steps"] == "7" and meta["ss_max_train_steps"] == "7"
    assert "steps = 7" in (part / "config.toml").read_text()
    assert (part / "loss.png").stat().st_mtime_ns != plot
    assert [p.name for p in checkpoints.checkpoint_dirs(part)] == ["step-000004", "step-000007"]

    # Not more steps than it has: refused before anything is touched, saying what to pass.
    before = snapshot(part)
    for steps in (7, 5, None):  # None: the config's own train.steps, now 7
        code, err = cont(kern_main, part, steps)
        assert code == 2, err
        assert "already has 7 steps" in err and "--steps N" in err and "above 7" in err and "Traceback" not in err
    assert snapshot(part) == before


def test_a_run_killed_after_its_last_checkpoint_is_finished_by_resume(tmp_path, dataset, kern_main):
    out = tmp_path / "run"
    train(kern_main, dataset, out, 3)
    kept = tmp_path / "adapter.safetensors"
    shutil.move(out / "adapter.safetensors", kept)  # as if killed between the last checkpoint and the final save
    code, err = cont(kern_main, out, None)
    assert code == 0, err
    assert_same_tensors(kept, out / "adapter.safetensors")
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


def test_keep_last_still_prunes_and_a_decaying_schedule_is_recomputed_for_the_new_total(tmp_path, dataset, kern_main):
    full, part = tmp_path / "full", tmp_path / "part"
    every = ("--set", "save.every_n_steps=2", "--set", "save.keep_last=2", "--set", "train.lr_scheduler=cosine")
    train(kern_main, dataset, full, 6, *every)
    train(kern_main, dataset, part, 3, *every)
    assert [p.name for p in checkpoints.checkpoint_dirs(part)] == ["step-000002", "step-000003"]
    assert cont(kern_main, part, 6)[0] == 0
    assert [p.name for p in checkpoints.checkpoint_dirs(part)] == ["step-000004", "step-000006"]
    # From the step it continues at, the LR is the new total's schedule: what one run to 6 uses there.
    lr_full, lr_part = [m["lr"] for m in metrics(full)], [m["lr"] for m in metrics(part)]
    assert lr_part[3:] == lr_full[3:]
    assert lr_part[:3] != lr_full[:3]  # the first three followed the schedule of a 3-step run
    assert lr_part[2] == pytest.approx(0.0, abs=1e-12)
