"""Trackers (``train.log_with``) through accelerate's tracker API, where a user meets them: TensorBoard by default,
wandb in offline mode, names and packages checked before any work, and a resumed run continuing its trackers.

The TensorBoard event files are read with TensorBoard's own EventAccumulator; wandb's offline ``run-<id>.wandb``
files with :func:`wandb_records` (wandb's record log: LevelDB's log format behind a 7-byte ``:W&B`` header, each
record a ``wandb_internal_pb2.Record``)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from kern.core.config import load_job
from kern.errors import ConfigError
from kern.train import checkpoints, metrics
from kern.train import driver as train

from tests.train import test_run_folder as run_folder
from tests.train.test_train_toy import job as toy_job

BASE = run_folder.BASE
dataset = run_folder.dataset  # the CLI fixture, shared


def losses_of(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0}).Reload()  # 0: keep all


def wandb_records(path: Path):
    """The records of a wandb ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, size, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + size]
        pos += 7 + size
        if kind in (1, 4):  # a FULL record, or the LAST piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(folder: Path) -> dict:
    """The run, its config, history rows (by step) and exit code of the offline run in ``folder``."""
    (path,) = folder.glob("run-*.wandb")
    found: dict = {"history": {}, "config": {}}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            found["run"] = r.run
        elif kind == "config":
            found["config"] |= {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.config.update}
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            found["history"][row["_step"]] = row
        elif kind == "exit":
            found["exit_code"] = r.exit.exit_code
    return found


@pytest.fixture
def offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_NAME"):
        monkeypatch.delenv(var, raising=False)


def train_at_cli(kern_main, dataset, out, *args):
    return kern_main("train", *BASE, "--dataset", str(dataset), "--out", str(out), "--steps", "4", *args)


def test_tensorboard_is_on_by_default(tmp_path, dataset, kern_main):
    out = tmp_path / "run"
    code, err = train_at_cli(kern_main, dataset, out)
    assert code == 0, err
    events = tensorboard(out / "tensorboard" / "adapter")  # <run>/tensorboard/<project: save.name>
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx(list(losses_of(out).values()), rel=1e-6)  # stored as float32
    assert [e.step for e in events.Scalars("lr")] == [1, 2, 3, 4]
    assert [e.step for e in events.Histograms("timesteps")] == [1, 2, 3, 4]
    (hparams,) = (out / "tensorboard" / "adapter").glob("*/hparams.yml")
    assert "train.steps: 4" in hparams.read_text() and "model.arch: toy" in hparams.read_text()


def test_no_trackers_leaves_metrics_jsonl_only(tmp_path, dataset, kern_main):
    out = tmp_path / "run"
    code, err = train_at_cli(kern_main, dataset, out, "--set", "train.log_with=[]")
    assert code == 0, err
    assert not (out / "tensorboard").exists() and len(losses_of(out)) == 4


def test_wandb_offline_gets_the_losses_the_config_and_the_project(
    tmp_path, dataset, kern_main, offline_wandb, monkeypatch
):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    (tmp_path / "wandb-dir").mkdir()
    out = tmp_path / "run"
    code, err = train_at_cli(
        kern_main,
        dataset,
        out,
        "--set",
        "train.log_with=['tensorboard', 'wandb']",
        "--set",
        "train.tracker_project=kern-tests",
        "--set",
        "save.name=mine",
    )
    assert code == 0, err
    (folder,) = (tmp_path / "wandb-dir" / "wandb").glob("offline-run-*")
    found = wandb_run(folder)
    assert (found["run"].project, found["run"].display_name) == ("kern-tests", "mine")
    assert {s: row["loss"] for s, row in found["history"].items()} == losses_of(out)
    assert all(row["lr"] > 0 for row in found["history"].values())
    assert found["config"]["train.steps"] == 4 and found["config"]["train.log_with"] == '["tensorboard", "wandb"]'
    assert found["exit_code"] == 0
    assert [e.step for e in tensorboard(out / "tensorboard" / "kern-tests").Scalars("loss")] == [1, 2, 3, 4]


def test_a_resumed_run_continues_its_trackers(tmp_path, toy_plugin, offline_wandb, monkeypatch):
    """Killed after logging step 6 with the newest checkpoint at step 4, then resumed to step 8: TensorBoard shows
    each step once (the resumed run's 5 and 6 replace the first attempt's), wandb continues the same run id (its
    files in the run folder when WANDB_DIR is unset) and marks the killed attempt failed."""
    from tests.helpers import make_dataset

    data = make_dataset(tmp_path / "data", n=3)
    out = tmp_path / "run"
    keys = {"train.steps": 8, "save.every_n_steps": 2, "train.log_with": ["tensorboard", "wandb"]}
    real_save = checkpoints.save_checkpoint

    def die_at_six(out, step, *args, **kwargs):
        if step == 6:
            raise KeyboardInterrupt
        return real_save(out, step, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_checkpoint", die_at_six)
    with pytest.raises(KeyboardInterrupt):
        train.run(toy_job(tmp_path, data, out, **keys))
    first = tensorboard(out / "tensorboard" / "adapter")
    assert [e.step for e in first.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    train.run(toy_job(tmp_path, data, out, **keys), resume=True)

    losses = losses_of(out)
    assert list(losses) == [1, 2, 3, 4, 5, 6, 7, 8]
    loss = tensorboard(out / "tensorboard" / "adapter").Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [e.value for e in loss] == pytest.approx(list(losses.values()), rel=1e-6)

    run_id = json.loads((out / "trackers.json").read_text())["wandb"]
    # offline-run-<YYYYMMDD_HHMMSS>-<id>, with "-1" appended when both attempts started in the same second (sorted
    # after the first, so the killed attempt stays first)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert [r.name.split("-")[3] for r in runs] == [run_id, run_id]
    killed, resumed = (wandb_run(r) for r in runs)
    assert sorted(killed["history"]) == [1, 2, 3, 4, 5, 6] and killed["exit_code"] == 1
    assert {s: row["loss"] for s, row in resumed["history"].items()} == {s: losses[s] for s in (5, 6, 7, 8)}
    assert resumed["exit_code"] == 0


@pytest.mark.parametrize(
    "args, names",
    [
        (("--set", "train.log_with=['tensorbord']"), "unknown tracker 'tensorbord'; known: aim, clearml, comet_ml"),
        (("--set", "train.log_with=['wandb']"), "tracker 'wandb' is not installed: pip install kern-tuner[wandb]"),
        (("--set", "train.log_with=['tensorboard', 'tensorboard']"), "names a tracker twice"),
    ],
)
def test_tracker_names_are_checked_before_any_work(tmp_path, dataset, kern_main, monkeypatch, args, names):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    out = tmp_path / "run"
    code, err = train_at_cli(kern_main, dataset, out, *args)
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.startswith("kern: error:")]
    assert len(lines) == 1 and names in lines[0] and "train.log_with" in lines[0], err
    assert not out.exists()


def test_a_missing_default_tensorboard_is_a_warning_and_an_asked_for_one_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    default = load_job(None, {})
    metrics.check_trackers(default)
    assert metrics.active_trackers(default) == []
    asked = load_job(None, {"train.log_with": ["tensorboard"]})
    with pytest.raises(ConfigError, match=r"tracker 'tensorboard' is not installed: pip install tensorboard"):
        metrics.check_trackers(asked)


def test_overwrite_clears_the_trackers_files_and_a_fresh_run_refuses_them(tmp_path):
    from kern.train import runs

    out = tmp_path / "run"
    (out / "wandb" / "offline-run-1").mkdir(parents=True)
    (out / "trackers.json").write_text('{"wandb": "abcd1234"}\n')
    (out / "mine.txt").write_text("not kern's")
    assert runs.earlier_outputs(out, "adapter") == ["trackers.json", "wandb"]
    runs.clear_outputs(out, "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
