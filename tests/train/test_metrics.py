"""kern.train.metrics.Metrics: one log(step, values) for metrics.jsonl, the trackers (TensorBoard here; wandb and
the run-level tests are in test_trackers.py) and the progress bar."""

from __future__ import annotations

import json

import pytest
import torch
from kern.core.config import JobConfig
from kern.train.metrics import Metrics, flat_config


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def accelerator(out, log_with=("tensorboard",)):
    """An accelerator as ``kern.train.setup.make_accelerator`` makes it for a run in ``out``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard"))
    return Accelerator(cpu=True, mixed_precision="no", log_with=list(log_with), project_config=project)


@pytest.fixture
def tracked(tmp_path):
    """``Metrics(...)`` for a fresh run in ``tmp_path`` with TensorBoard (project ``adapter``, save.name's default)."""

    def make(**kw):
        args = {"total": 3, "start": 0, "resumed": False, "enabled": True} | kw
        return Metrics(tmp_path, acc=accelerator(tmp_path), job=JobConfig(), **args)

    return make


def test_a_step_is_one_jsonl_line_with_tensors_as_lists(tmp_path, tracked):
    with tracked() as m:
        m.log(1, {"loss": 0.5, "lr": 1e-4, "t": torch.tensor([0.25, 0.75])})
        m.log(2, {"loss": 0.25, "lr": 2e-4, "t": torch.tensor([0.5])})
    assert lines(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 0.5, "lr": 1e-4, "t": [0.25, 0.75]},
        {"step": 2, "loss": 0.25, "lr": 2e-4, "t": [0.5]},
    ]
    assert (tmp_path / "tensorboard").is_dir() and any((tmp_path / "tensorboard").iterdir())


def test_tensorboard_gets_scalars_and_the_timestep_histogram(tmp_path, tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tracked(total=2) as m:
        m.log(1, {"loss": 0.5, "lr": 1e-4, "t": torch.tensor([0.25, 0.75])})
    events = EventAccumulator(str(tmp_path / "tensorboard" / "adapter")).Reload()  # <run>/tensorboard/<project>
    assert set(events.Tags()["scalars"]) == {"loss", "lr"} and events.Tags()["histograms"] == ["timesteps"]
    assert events.Scalars("loss")[0].value == 0.5


def test_other_processes_write_nothing(tmp_path):
    acc = accelerator(tmp_path)
    with Metrics(tmp_path, total=2, start=0, resumed=False, enabled=False, acc=acc, job=JobConfig()) as m:
        m.log(1, {"loss": 0.5, "t": torch.tensor([0.5])})
    assert list(tmp_path.iterdir()) == [] and acc.trackers == []  # no tracker started either


def test_a_resumed_run_appends_after_its_checkpoint_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    with Metrics(tmp_path, total=6, start=2, resumed=True, enabled=True) as m:
        m.log(3, {"loss": 0.125})
    assert [r["step"] for r in lines(path)] == [1, 2, 3] and lines(path)[-1]["loss"] == 0.125


def test_close_twice_is_harmless(tmp_path, tracked):
    m = tracked(total=1)
    m.close()
    m.close()


def test_without_an_accelerator_only_metrics_jsonl_is_written(tmp_path):
    with Metrics(tmp_path, total=1, start=0, resumed=False, enabled=True) as m:
        m.log(1, {"loss": 0.5, "t": torch.tensor([0.5])})
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_more_keys_for_a_step_are_scalars_of_that_step_and_move_the_bar_once(tmp_path, tracked):
    """A validation loss (another module's key) logged in a call of its own for the same step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tracked() as m:
        m.log(1, {"loss": 0.5, "lr": 1e-4})
        m.log(2, {"loss": 0.25, "lr": 1e-4})
        m.log(2, {"val_loss": 0.375})
        assert m.bar.n == 2
    assert lines(tmp_path / "metrics.jsonl")[-1] == {"step": 2, "val_loss": 0.375}
    events = EventAccumulator(str(tmp_path / "tensorboard" / "adapter")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [(2, 0.375)]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]


def test_the_resolved_job_is_the_trackers_config(tmp_path, tracked):
    """TensorBoard's hparams (accelerate writes them as hparams.yml too): the job flattened to section.key."""
    import yaml

    (tmp_path / "config.toml").write_text('[train]\nsteps = 7\nlog_with = ["tensorboard"]\n[model]\narch = "toy"\n')
    with tracked():
        pass
    (hparams,) = (tmp_path / "tensorboard" / "adapter").glob("*/hparams.yml")
    assert yaml.safe_load(hparams.read_text()) == {
        "train.steps": 7,
        "train.log_with": '["tensorboard"]',
        "model.arch": "toy",
    }


def test_flat_config():
    assert flat_config({"a": {"b": 1, "c": {"d": [1, 2]}, "e": {}}, "f": "x", "g": True}) == {
        "a.b": 1,
        "a.c.d": "[1, 2]",
        "a.e": "{}",
        "f": "x",
        "g": True,
    }
