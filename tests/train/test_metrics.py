"""kern.train.metrics.Metrics: one log(step, values) for metrics.jsonl, TensorBoard and the progress bar."""

from __future__ import annotations

import json

import torch
from kern.train.metrics import Metrics


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_step_is_one_jsonl_line_with_tensors_as_lists(tmp_path):
    with Metrics(tmp_path, total=3, start=0, resumed=False, enabled=True) as m:
        m.log(1, {"loss": 0.5, "lr": 1e-4, "t": torch.tensor([0.25, 0.75])})
        m.log(2, {"loss": 0.25, "lr": 2e-4, "t": torch.tensor([0.5])})
    assert lines(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 0.5, "lr": 1e-4, "t": [0.25, 0.75]},
        {"step": 2, "loss": 0.25, "lr": 2e-4, "t": [0.5]},
    ]
    assert (tmp_path / "tensorboard").is_dir() and any((tmp_path / "tensorboard").iterdir())


def test_tensorboard_gets_scalars_and_the_timestep_histogram(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Metrics(tmp_path, total=2, start=0, resumed=False, enabled=True) as m:
        m.log(1, {"loss": 0.5, "lr": 1e-4, "t": torch.tensor([0.25, 0.75])})
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "lr"} and events.Tags()["histograms"] == ["timesteps"]
    assert events.Scalars("loss")[0].value == 0.5


def test_other_processes_write_nothing(tmp_path):
    with Metrics(tmp_path, total=2, start=0, resumed=False, enabled=False) as m:
        m.log(1, {"loss": 0.5, "t": torch.tensor([0.5])})
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_run_appends_after_its_checkpoint_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    with Metrics(tmp_path, total=6, start=2, resumed=True, enabled=True) as m:
        m.log(3, {"loss": 0.125})
    assert [r["step"] for r in lines(path)] == [1, 2, 3] and lines(path)[-1]["loss"] == 0.125


def test_close_twice_is_harmless(tmp_path):
    m = Metrics(tmp_path, total=1, start=0, resumed=False, enabled=True)
    m.close()
    m.close()
