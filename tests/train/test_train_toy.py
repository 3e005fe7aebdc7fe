"""The training driver end to end on the example toy architecture: loss falls, resume is exact."""

from __future__ import annotations

import json

import pytest
import torch
from kern.core import config
from kern.core.io import load_file
from kern.train import checkpoints, optim
from kern.train import driver as train

from tests.helpers import make_dataset


def job(tmp_path, dataset, out, **over):
    base = {
        "model.arch": "toy",
        "model.dtype": "float32",
        "network.type": "lora",
        "network.rank": 4,
        "network.alpha": 4.0,
        "dataset.config": str(dataset),
        "save.out": str(out),
        "train.steps": 12,
        "train.learning_rate": 3e-3,
        "train.mixed_precision": "no",
        "train.device": "cpu",
        "train.gradient_checkpointing": False,
        "train.lr_scheduler": "cosine",
        "train.warmup_steps": 2,
    }
    base.update(over)
    return config.load_job(None, base)


def test_loss_falls_and_adapter_reloads(tmp_path, toy_plugin):
    dataset = make_dataset(tmp_path / "data", n=2)
    out = tmp_path / "run"
    adapter = train.run(
        job(tmp_path, dataset, out, **{"train.steps": 60, "sample.prompts": ["a red square"], "sample.steps": 2})
    )
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in lines]
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10, losses
    tensors, meta = load_file(adapter)
    assert any(k.endswith("lora_down.weight") for k in tensors)
    assert meta["ss_network_module"] == "lora" and meta["ss_steps"] == "60"
    assert (out / "loss.png").is_file() and (out / "config.toml").is_file()
    assert list((out / "samples").glob("step-000060_00.png"))


def test_resume_ends_with_the_same_weights(tmp_path, toy_plugin, monkeypatch):
    dataset = make_dataset(tmp_path / "data", n=3)
    steps = {"train.steps": 10, "save.every_n_steps": 4, "save.keep_last": 5, "network.dropout": 0.1}
    full = train.run(job(tmp_path, dataset, tmp_path / "full", **steps))

    # The interrupted run: killed right after the step-4 checkpoint is written.
    real_save = checkpoints.save_checkpoint

    def save_then_die(out, step, *args, **kwargs):
        path = real_save(out, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt
        return path

    part = tmp_path / "part"
    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.run(job(tmp_path, dataset, part, **steps))
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    assert [p.name for p in checkpoints.checkpoint_dirs(part)] == ["step-000004"]
    assert not (part / "adapter.safetensors").exists()

    resumed = train.run(job(tmp_path, dataset, part, **steps), resume=True)
    a, _ = load_file(full)
    b, _ = load_file(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = [json.loads(line)["loss"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    full_losses = [json.loads(line)["loss"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert losses == full_losses  # steps 1-4 from the first attempt, 5-10 from the resumed one


def test_resume_without_checkpoint_is_a_usage_error(tmp_path, toy_plugin):
    from kern.errors import UsageError

    dataset = make_dataset(tmp_path / "data", n=1)
    with pytest.raises(UsageError, match="no checkpoint"):
        train.run(job(tmp_path, dataset, tmp_path / "nothing"), resume=True)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, toy_plugin, monkeypatch):
    from kern.errors import KernError

    dataset = make_dataset(tmp_path / "data", n=2)
    out = tmp_path / "run"
    real = toy_plugin.hook.predict_velocity
    calls = {"n": 0}

    def poisoned(**kw):
        calls["n"] += 1
        v = real(**kw)
        return v * float("nan") if calls["n"] > 4 else v  # steps 1-4 fine, then NaN

    monkeypatch.setattr(toy_plugin.hook, "predict_velocity", poisoned)
    with pytest.raises(KernError, match=r"loss became nan at step 5 .*Last good checkpoint: .*step-000004"):
        train.run(job(tmp_path, dataset, out, **{"train.steps": 8, "save.every_n_steps": 2}))
    assert [p.name for p in checkpoints.checkpoint_dirs(out)] == ["step-000002", "step-000004"]
    from kern.train.state import load_state

    state = load_state(out / "checkpoints" / "step-000004")
    assert all(torch.isfinite(v).all() for v in state["network"].values())
    assert not (out / "adapter.safetensors").exists()


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_optimizers_train(tmp_path, toy_plugin, optimizer):
    dataset = make_dataset(tmp_path / "data", n=1)
    adapter = train.run(
        job(tmp_path, dataset, tmp_path / optimizer, **{"train.steps": 3, "train.optimizer": optimizer})
    )
    tensors, _ = load_file(adapter)
    assert any(float(v.abs().sum()) > 0 for k, v in tensors.items() if "lora_up" in k)  # B moved away from zero


def test_unknown_optimizer_and_missing_extras_are_usage_errors(tmp_path, toy_plugin):
    from kern.errors import UsageError

    dataset = make_dataset(tmp_path / "data", n=1)
    with pytest.raises(UsageError, match="unknown train.optimizer 'sgdx'"):
        train.run(job(tmp_path, dataset, tmp_path / "r", **{"train.optimizer": "sgdx"}))


def test_lr_schedule_warmup_and_decay():
    f = optim.lr_lambda("cosine", warmup=4, total=14)
    assert [round(f(s), 3) for s in (0, 1, 3)] == [0.25, 0.5, 1.0]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0)
    assert optim.lr_lambda("linear", 0, 10)(5) == pytest.approx(0.5)
    assert optim.lr_lambda("constant", 2, 10)(7) == 1.0


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(tmp_path, toy_plugin):
    from kern.errors import UsageError

    dataset = make_dataset(tmp_path / "data", n=1)
    out = tmp_path / "run"
    train.run(job(tmp_path, dataset, out, **{"train.steps": 4, "save.every_n_steps": 2}))
    with pytest.raises(
        UsageError, match="holds an earlier run .*: continue it with --resume, replace it with --overwrite"
    ):
        train.run(job(tmp_path, dataset, out, **{"train.steps": 4, "save.every_n_steps": 2}))


def test_overwrite_starts_the_metrics_anew(tmp_path, toy_plugin):
    dataset = make_dataset(tmp_path / "data", n=1)
    out = tmp_path / "run"
    train.run(job(tmp_path, dataset, out, **{"train.steps": 3}))
    train.run(job(tmp_path, dataset, out, **{"train.steps": 2}), overwrite=True)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
