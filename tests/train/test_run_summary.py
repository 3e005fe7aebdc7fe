"""The run says what it is doing (issue 17 item 12): one log line at the start of training with the preset, the fp8
base and its layer count, blocks swapped, compile, checkpointing, attention backend and activation offload."""

from __future__ import annotations

import tomllib
from types import SimpleNamespace

import pytest
import torch
from kern.core import config
from kern.gpu.fp8 import Float8MatmulLinear
from kern.train import driver as train
from kern.train import presets
from structlog.testing import capture_logs

from tests.helpers import make_dataset


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from kern_flux2 import tiny

    return tiny.build(tmp_path_factory.mktemp("tiny-flux2"))


def started(logs):
    lines = [e for e in logs if e["event"] == "training with"]
    assert len(lines) == 1, [e["event"] for e in logs]
    return lines[0]


def test_a_preset_run_logs_its_modes_and_records_the_preset(bundle, tmp_path, monkeypatch):
    torch.set_num_threads(2)
    dataset = make_dataset(tmp_path / "data", n=1)
    overrides = {f"model.{p}": str(bundle[p]) for p in ("transformer", "vae", "text_encoder")}
    overrides.update(
        {
            "preset": "flux2-klein-4b-12gb",  # fp8 base + selective checkpointing
            "model.dtype": "float32",
            "network.rank": 2,
            "dataset.config": str(dataset),
            "save.out": str(tmp_path / "run"),
            "train.steps": 1,
            "train.mixed_precision": "no",
            "train.device": "cpu",
            "train.log_with": [],
        }
    )
    from kern.gpu import accel

    counted, real = [], accel.prepare_base

    def spy(transformer, *args, **kwargs):
        out = real(transformer, *args, **kwargs)
        counted.append(sum(isinstance(m, Float8MatmulLinear) for m in transformer.modules()))
        return out

    monkeypatch.setattr(accel, "prepare_base", spy)
    job = config.load_job(None, overrides, presets.read_preset)
    with capture_logs() as logs:
        train.run(job)
    line = started(logs)
    assert counted and counted[0] > 0
    assert line["preset"] == "flux2-klein-4b-12gb"
    assert line["base"] == f"fp8 ({counted[0]} layers)"  # counted on the CPU too
    assert line["checkpointing"] == "selective"
    assert line["blocks_swapped"].startswith("0 of ") and int(line["blocks_swapped"].split()[-1]) > 0
    assert line["compile"] == "off"  # auto: eager on the CPU
    assert line["attention"] == "auto" and line["offload_activations"] is False
    assert line["variant"] == "klein-4b"
    assert not [e for e in logs if e["log_level"] == "warning" and "preset" in e]  # measured for this variant
    resolved = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert resolved["preset"] == "flux2-klein-4b-12gb"
    assert resolved["train"]["base_precision"] == "fp8" and resolved["train"]["gradient_checkpointing"] == "selective"


def job_of(**train_keys):
    return SimpleNamespace(preset=None, train=config.TrainConfig(**train_keys))


def test_the_line_without_a_preset_and_with_every_memory_mode():
    variant = SimpleNamespace(name="v")
    plain = presets.summary(job_of(gradient_checkpointing=False), variant, {}, {"checkpointing": "off", "blocks": 4})
    assert plain == {
        "preset": "none",
        "variant": "v",
        "base": "bf16",
        "blocks_swapped": "0 of 4",
        "compile": "off",
        "checkpointing": "off",
        "attention": "auto",
        "offload_activations": False,
    }
    applied = {
        "checkpointing": "selective",
        "selective_blocks": 3,
        "blocks": 8,
        "blocks_swapped": 5,
        "compile": "blocks (inner forward)",
        "attention": "CUDNN",
        "activations": "offloaded",
    }
    job = job_of(base_precision="fp8", gradient_checkpointing="selective", blocks_to_swap=5, selective_blocks=3)
    line = presets.summary(job, variant, {"fp8_layers": 40, "fp8_backward": "fp8"}, applied)
    assert line["base"] == "fp8 (40 layers)" and line["blocks_swapped"] == "5 of 8"
    assert line["checkpointing"] == "selective (3 of 8 blocks)" and line["compile"] == "blocks (inner forward)"
    assert line["attention"] == "CUDNN" and line["offload_activations"] is True


def test_a_preset_measured_for_another_model_warns():
    job = SimpleNamespace(preset="flux2-klein-9b-16gb", train=config.TrainConfig(base_precision="fp8"))
    with capture_logs() as logs:
        line = presets.summary(job, SimpleNamespace(name="klein-4b"), {"fp8_layers": 2}, {"checkpointing": "full"})
    assert line["preset"] == "flux2-klein-9b-16gb"
    (warning,) = [e for e in logs if e["log_level"] == "warning"]
    assert warning["measured_for"] == "klein-9b, klein-base-9b" and warning["variant"] == "klein-4b"
