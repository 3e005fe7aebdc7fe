"""Learning-rate schedules built by transformers.get_scheduler give kern's values of before, step for step, and a
scheduler's state survives a checkpoint exactly."""

from __future__ import annotations

import math

import pytest
import torch
from kern.core.config import TrainConfig
from kern.train import optim


def expected(kind: str, warmup: int, total: int, s: int) -> float:
    """kern's schedule as plain maths (the hand-written ``lr_lambda`` it had before transformers built it): a
    warmup of (s + 1) / warmup, then progress p = (s - warmup) / max(1, total - warmup), capped at 1, and
    1 (constant), 1 - p (linear) or (1 + cos(pi p)) / 2 (cosine)."""
    if warmup and s < warmup:
        return (s + 1) / warmup
    p = min(1.0, (s - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - p
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0


KINDS = ("constant", "linear", "cosine")


def test_every_kind_the_config_accepts_is_covered():
    from transformers import SchedulerType

    def accepted(kind: str) -> bool:
        try:
            TrainConfig(lr_scheduler=kind)
        except Exception:
            return False
        return True

    assert {k for k in {*KINDS, *(t.value for t in SchedulerType)} if accepted(k)} == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("warmup", [0, 1, 2, 5, 12])
@pytest.mark.parametrize("total", [1, 4, 12, 50])
def test_the_schedule_matches_the_old_formulas_bit_for_bit(kind, warmup, total):
    f = optim.lr_lambda(kind, warmup, total)
    # Past ``total`` too: under data parallel, accelerate steps the schedule once per process and optimizer step.
    for s in range(3 * total + warmup + 2):
        assert f(s) == expected(kind, warmup, total, s), (kind, warmup, total, s)


@pytest.mark.parametrize("kind", KINDS)
def test_the_scheduler_logs_the_same_learning_rates(kind):
    """Through torch's LambdaLR, as the loop reads it: ``get_last_lr()`` after each optimizer step."""
    train = TrainConfig(lr_scheduler=kind, warmup_steps=3, steps=10, learning_rate=2e-3)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=train.learning_rate)
    sched = optim.make_scheduler(opt, train)
    seen = [opt.param_groups[0]["lr"]]
    for _ in range(train.steps):
        opt.step()
        sched.step()
        seen.append(sched.get_last_lr()[0])
    assert seen == [2e-3 * expected(kind, 3, 10, s) for s in range(train.steps + 1)]


@pytest.mark.parametrize("kind", KINDS)
def test_the_scheduler_state_survives_a_checkpoint_exactly(tmp_path, kind):
    from kern.train.state import load_state, save_state

    train = TrainConfig(lr_scheduler=kind, warmup_steps=2, steps=9, learning_rate=1e-3)

    def fresh():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=train.learning_rate)
        return opt, optim.make_scheduler(opt, train)

    opt, sched = fresh()
    for _ in range(4):
        opt.step()
        sched.step()
    save_state(tmp_path, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    state = load_state(tmp_path)
    assert state["scheduler"] == sched.state_dict()  # nothing lost on the way through JSON + safetensors

    opt2, sched2 = fresh()
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert sched2.get_last_lr() == sched.get_last_lr() and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for _ in range(5):
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()
        assert sched2.get_last_lr() == sched.get_last_lr()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
