"""Training state without pickle: every optimizer's state round-trips exactly, and damage is detected."""

from __future__ import annotations

import json
import random

import pytest
import torch
from kern.train.state import STATE_JSON, STATE_TENSORS, DamagedState, load_state, save_state


def trained_optimizer(kind: str):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    if kind == "adamw":
        opt = torch.optim.AdamW(
            [{"params": params[:1], "lr": 1e-3}, {"params": params[1:], "lr": 2e-3}], betas=(0.8, 0.95)
        )
    else:
        from transformers.optimization import Adafactor

        opt = Adafactor(params, lr=1e-3, scale_parameter=False, relative_step=False, warmup_init=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for _ in range(3):
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return opt, sched


def assert_same(a, b, where="state"):
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, where


@pytest.mark.parametrize("kind", ["adamw", "adafactor"])
def test_optimizer_scheduler_and_rng_states_round_trip_exactly(tmp_path, kind):
    opt, sched = trained_optimizer(kind)
    g = torch.Generator().manual_seed(7)
    torch.randn(3, generator=g)
    state = {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": 3,
        "history": [1.5, float("nan"), 2.0],
        "rng": [{"generator": g.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}],
        "odd": {"$not-a-tag": 1, "a.b": torch.ones(1), "a": {"b": torch.zeros(1)}},
    }
    save_state(tmp_path, state)
    back = load_state(tmp_path)
    assert_same(state, back)
    # The restored state drives an optimizer to the same next step.
    opt2, sched2 = trained_optimizer(kind)
    opt2.load_state_dict(back["optimizer"])
    sched2.load_state_dict(back["scheduler"])
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    random.setstate(back["rng"][0]["python"])
    a = random.random()
    random.setstate(state["rng"][0]["python"])
    assert a == random.random()


def test_the_files_hold_no_pickle_and_say_what_they_are(tmp_path):
    save_state(tmp_path, {"x": torch.arange(3), "y": (1, 2)})
    manifest = json.loads((tmp_path / STATE_JSON).read_text())
    assert manifest["format"] == "kern.train.state/1" and set(manifest["files"]) == {STATE_TENSORS}
    raw = (tmp_path / STATE_TENSORS).read_bytes()
    assert b"\x80\x04" not in raw[:8] and raw[8:9] == b"{"  # a safetensors header, not a pickle stream
    with pytest.raises(TypeError, match="without pickle"):
        save_state(tmp_path / "o", {"f": object()})


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove", "json", "extra-file"])
def test_damage_is_detected(tmp_path, damage):
    (tmp_path / "adapter.safetensors").write_bytes(b"adapter bytes")
    save_state(tmp_path, {"w": torch.randn(64)}, also=("adapter.safetensors",))
    target = tmp_path / STATE_TENSORS
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[-3] ^= 1
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-4])
    elif damage == "remove":
        (tmp_path / "adapter.safetensors").unlink()
    elif damage == "json":
        (tmp_path / STATE_JSON).write_text('{"format": "kern.train.state/1", "files": {}')
    else:
        (tmp_path / "adapter.safetensors").write_bytes(b"adapter bytez")
    with pytest.raises(DamagedState):
        load_state(tmp_path)


def test_a_manifest_cannot_point_outside_its_folder(tmp_path):
    save_state(tmp_path, {"w": torch.ones(2)})
    manifest = json.loads((tmp_path / STATE_JSON).read_text())
    manifest["files"]["../../etc/passwd"] = {"bytes": 1, "sha256": "0"}
    (tmp_path / STATE_JSON).write_text(json.dumps(manifest))
    with pytest.raises(DamagedState, match="bad file entry"):
        load_state(tmp_path)
