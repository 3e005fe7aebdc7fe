"""Learning-rate schedules built by transformers.get_scheduler give kern's values of before, step for step, and a
scheduler's state survives a checkpoint exactly."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from kern.core.config import TrainConfig
from kern.errors import ConfigError
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
# What a schedule needs besides its name.
NEEDS = {
    "cosine_with_min_lr": {"lr_scheduler_min_lr_ratio": 0.1},
    "cosine_warmup_with_min_lr": {"lr_scheduler_min_lr_ratio": 0.1},
    "warmup_stable_decay": {"lr_scheduler_args": {"num_decay_steps": 3}},
}


def test_every_transformers_schedule_is_run_or_refused_with_a_reason():
    """The job schema takes any string; kern runs every ``transformers.get_scheduler`` name but the two that follow
    a metric (refused before any work, saying why), and nothing else."""
    from transformers import SchedulerType

    names = {t.value for t in SchedulerType}
    assert set(optim.SCHEDULES) | set(optim.REFUSED) == names and not set(optim.SCHEDULES) & set(optim.REFUSED)
    for name in names:
        TrainConfig(lr_scheduler=name)  # the schema itself refuses none
        train = TrainConfig(lr_scheduler=name, **NEEDS.get(name, {}))
        if name in optim.REFUSED:
            with pytest.raises(
                ConfigError, match=f"train.lr_scheduler = '{name}' is not supported: it follows a metric"
            ):
                optim.check_schedule(train, "job.toml")
        else:
            optim.check_schedule(train, "job.toml")


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


# --------------------------------------------------------------------------- every schedule, against transformers

L = 2e-3  # the reference schedules run at a real LR: polynomial's end and min_lr are absolute there
# (kern's train keys, transformers' name and keyword arguments for the same curve); kern's keys use musubi's
# meanings: num_cycles counts cosine decays (transformers' half-waves: num_cycles / 2) but cosine_with_restarts'
# restarts, min_lr_ratio is a fraction of the LR.
CURVES = [
    ("constant", {}, "constant", {}),
    ("constant_with_warmup", {}, "constant_with_warmup", {}),
    ("linear", {}, "linear", {}),
    ("linear", {"lr_scheduler_min_lr_ratio": 0.1}, "polynomial", {"power": 1.0, "lr_end": 0.1 * L}),
    ("cosine", {}, "cosine", {}),
    ("cosine", {"lr_scheduler_num_cycles": 3}, "cosine", {"num_cycles": 1.5}),
    ("cosine", {"lr_scheduler_min_lr_ratio": 0.1}, "cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_with_restarts", {}, "cosine_with_restarts", {}),
    ("cosine_with_restarts", {"lr_scheduler_num_cycles": 3}, "cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {}, "polynomial", {"power": 1.0, "lr_end": 0.0}),
    (
        "polynomial",
        {"lr_scheduler_power": 2.0, "lr_scheduler_min_lr_ratio": 0.05},
        "polynomial",
        {"power": 2.0, "lr_end": 0.05 * L},
    ),
    ("inverse_sqrt", {}, "inverse_sqrt", {}),
    ("inverse_sqrt", {"lr_scheduler_args": {"timescale": 7}}, "inverse_sqrt", {"timescale": 7}),
    ("cosine_with_min_lr", {"lr_scheduler_min_lr_ratio": 0.2}, "cosine_with_min_lr", {"min_lr_rate": 0.2}),
    (
        "cosine_with_min_lr",
        {"lr_scheduler_min_lr_ratio": 0.2, "lr_scheduler_num_cycles": 2},
        "cosine_with_min_lr",
        {"min_lr_rate": 0.2, "num_cycles": 1.0},
    ),
    (
        "cosine_warmup_with_min_lr",
        {"lr_scheduler_min_lr_ratio": 0.1},
        "cosine_warmup_with_min_lr",
        {"min_lr_rate": 0.1},
    ),
    (
        "cosine_warmup_with_min_lr",
        {"lr_scheduler_min_lr_ratio": 0.1, "lr_scheduler_args": {"warmup_lr_rate": 0.3}},
        "cosine_warmup_with_min_lr",
        {"min_lr_rate": 0.1, "warmup_lr_rate": 0.3},
    ),
    (
        "warmup_stable_decay",
        {"lr_scheduler_args": {"num_decay_steps": 4}},
        "warmup_stable_decay",
        {"num_decay_steps": 4, "min_lr_ratio": 0.0},
    ),
    (
        "warmup_stable_decay",
        {
            "lr_scheduler_min_lr_ratio": 0.1,
            "lr_scheduler_num_cycles": 1,
            "lr_scheduler_args": {"num_decay_steps": 5, "warmup_type": "cosine", "decay_type": "linear"},
        },
        "warmup_stable_decay",
        {"num_decay_steps": 5, "min_lr_ratio": 0.1, "num_cycles": 0.5, "warmup_type": "cosine", "decay_type": "linear"},
    ),
]


def transformers_curve(name: str, kwargs: dict, warmup: int, end: int):
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=L)
    if name == "constant" and warmup:
        name = "constant_with_warmup"  # transformers' constant has no warm-up
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=end, scheduler_specific_kwargs=kwargs)
    return sched.lr_lambdas[0]


@pytest.mark.parametrize("kind, keys, name, kwargs", CURVES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CURVES)])
@pytest.mark.parametrize("warmup, total", [(0, 12), (3, 12), (4, 30)])
def test_every_schedule_is_transformers_curve_read_kerns_way(kind, keys, name, kwargs, warmup, total):
    """kern's rule aside (the warm-up read one step ahead; past the end, the end's value), each curve is
    transformers' own, from the same settings. cosine_warmup_with_min_lr already starts its warm-up at 1 / warmup
    and decays a step ahead: kern reads it as it is, holding its last value (the minimum)."""
    train = TrainConfig(lr_scheduler=kind, warmup_steps=warmup, steps=total, learning_rate=L, **keys)
    optim.check_schedule(train)
    f = optim.schedule_lambda(train)
    end = max(total, warmup + 1)
    ref = transformers_curve(name, kwargs, warmup, end)
    for s in range(end + 5):
        if name == "cosine_warmup_with_min_lr":
            want = ref(min(s, end - 1))
        else:
            want = ref(s + 1 if s < warmup else min(s, end))
        assert f(s) == pytest.approx(want, rel=1e-12, abs=1e-15), (s, f(s), want)


@pytest.mark.parametrize(
    "kind, keys",
    [
        ("linear", {}),
        ("polynomial", {"lr_scheduler_power": 3.0}),
        ("cosine", {}),
        ("cosine_with_min_lr", {}),
        ("cosine_warmup_with_min_lr", {}),
        ("warmup_stable_decay", {"lr_scheduler_args": {"num_decay_steps": 6}}),
    ],
)
def test_min_lr_is_where_the_decay_ends_and_stays(kind, keys):
    train = TrainConfig(lr_scheduler=kind, warmup_steps=2, steps=20, lr_scheduler_min_lr_ratio=0.25, **keys)
    optim.check_schedule(train)
    f = optim.schedule_lambda(train)
    values = [f(s) for s in range(40)]
    assert min(values) == pytest.approx(0.25) and values[-1] == pytest.approx(0.25)
    assert f(1) == 1.0  # the last warm-up step at the full LR


def test_restarts_are_hard_restarts_to_the_full_lr():
    train = TrainConfig(lr_scheduler="cosine_with_restarts", steps=30, lr_scheduler_num_cycles=3)
    f = optim.schedule_lambda(train)
    assert [s for s in range(30) if f(s) == 1.0] == [0, 10, 20]  # three cosine decays, each from the full LR
    assert all(f(s) > f(s + 1) for s in range(30) if (s + 1) % 10)


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"lr_scheduler": "cosinee"}, "unknown train.lr_scheduler 'cosinee'; known: constant, constant_with_warmup"),
        ({"lr_scheduler": "reduce_lr_on_plateau"}, "follows a metric each step"),
        ({"lr_scheduler": "greedy"}, "follows a metric each step"),
        (
            {"lr_scheduler_min_lr_ratio": 0.1},
            "train.lr_scheduler_min_lr_ratio does nothing with lr_scheduler = 'constant'; it applies to: linear, cosine",
        ),
        ({"lr_scheduler": "cosine_with_restarts", "lr_scheduler_min_lr_ratio": 0.1}, "min_lr_ratio does nothing"),
        ({"lr_scheduler": "linear", "lr_scheduler_num_cycles": 2}, "num_cycles does nothing"),
        ({"lr_scheduler": "cosine", "lr_scheduler_power": 2.0}, "lr_scheduler_power does nothing"),
        ({"lr_scheduler": "cosine_with_min_lr"}, "needs train.lr_scheduler_min_lr_ratio"),
        ({"lr_scheduler": "cosine", "lr_scheduler_args": {"num_cycles": 2}}, "lr_scheduler_num_cycles; set that"),
        ({"lr_scheduler": "polynomial", "lr_scheduler_args": {"lr_end": 1e-7}}, "lr_scheduler_min_lr_ratio; set"),
        (
            {"lr_scheduler": "inverse_sqrt", "lr_scheduler_args": {"timescal": 7}},
            "takes no 'timescal'; it takes: timescale",
        ),
        ({"lr_scheduler": "warmup_stable_decay"}, "needs train.lr_scheduler_args.num_decay_steps"),
        (
            {"lr_scheduler": "warmup_stable_decay", "lr_scheduler_args": {"num_decay_steps": 11}},
            "from 1 to 10",
        ),
        (
            {"lr_scheduler": "warmup_stable_decay", "lr_scheduler_args": {"num_decay_steps": 3, "decay_type": "x"}},
            "Unknown decay type",
        ),
        ({"lr_scheduler": "polynomial", "lr_scheduler_min_lr_ratio": 1.0}, "lr_end"),
    ],
)
def test_bad_schedule_settings_name_the_key(keys, message):
    train = TrainConfig(steps=10, **keys)
    with pytest.raises(ConfigError, match=re.escape(message) if "(" not in message else message) as err:
        optim.check_schedule(train, "job.toml")
    assert str(err.value).startswith("job.toml: ")


@pytest.mark.parametrize("kind, keys", [(k, v) for k, v, _, _ in CURVES if k not in KINDS])
def test_every_schedule_state_is_counters_only(tmp_path, kind, keys):
    """No pickle: the state of every schedule is LambdaLR's counters and LRs (the curve is a plain function), and
    it round-trips a checkpoint."""
    from kern.train.state import load_state, save_state

    train = TrainConfig(lr_scheduler=kind, warmup_steps=2, steps=12, learning_rate=1e-3, **keys)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=train.learning_rate)
    sched = optim.make_scheduler(opt, train)
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["lr_lambdas"] == [None]  # a callable object would put its __dict__ here
    save_state(tmp_path, {"scheduler": state})
    assert load_state(tmp_path)["scheduler"] == state


# --------------------------------------------------------------------------- optimisers


class CountingSGD(torch.optim.SGD):
    """An optimizer only a dotted path reaches (``tests.train.test_optim.CountingSGD``), with an argument of its own."""

    steps = 0

    def __init__(self, params, lr=1e-3, momentum=0.0, weight_decay=0.0, tag="none"):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        type(self).tag = tag

    def step(self, closure=None):
        type(self).steps += 1
        return super().step(closure)


def sgd_train(**kw):
    return TrainConfig(optimizer="torch.optim.SGD", **kw)


@pytest.mark.parametrize(
    "name, cls",
    [
        ("adamw", torch.optim.AdamW),
        ("AdamW", torch.optim.AdamW),
        ("sgd", torch.optim.SGD),
        ("adafactor", "Adafactor"),
        ("torch.optim.SGD", torch.optim.SGD),
        ("tests.train.test_optim.CountingSGD", CountingSGD),
    ],
)
def test_names_and_dotted_paths_resolve(name, cls):
    found = optim.optimizer_class(name)
    assert found is cls if isinstance(cls, type) else found.__name__ == cls


@pytest.mark.parametrize(
    "name, message",
    [
        ("sgdx", "unknown train.optimizer 'sgdx'; known: adamw, adamw8bit, adafactor, prodigy, sgd, or a dotted"),
        ("torch.optim.SGDD", "module 'torch.optim' has no 'SGDD'; did you mean torch.optim.SGD"),
        ("nosuchpackage.optim.Fast", "no module named 'nosuchpackage' (pip install nosuchpackage)"),
        ("torch.nn.Linear", "'torch.nn.Linear' is not a torch.optim.Optimizer class"),
        ("torch.optim.lr_scheduler", "'torch.optim.lr_scheduler' is not a torch.optim.Optimizer class"),  # a module
    ],
)
def test_bad_optimizer_names_say_what_is_wrong(name, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        optim.check_optimizer(TrainConfig(optimizer=name), "job.toml")


@pytest.mark.parametrize(
    "name, module, extra",
    [
        ("adamw8bit", "bitsandbytes", "bnb"),
        ("bitsandbytes.optim.AdamW8bit", "bitsandbytes", "bnb"),
        ("prodigy", "prodigyopt", "prodigy"),
        ("prodigyopt.Prodigy", "prodigyopt", "prodigy"),
    ],
)
def test_a_missing_optimizer_package_names_kerns_extra(monkeypatch, name, module, extra):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(ConfigError, match=re.escape(f"no module named '{module}' (pip install kern-tuner[{extra}])")):
        optim.check_optimizer(TrainConfig(optimizer=name), "job.toml")


@pytest.mark.parametrize(
    "keys, given, message",
    [
        ({"optimizer_args": {"momentun": 0.9}}, (), "takes no momentun; it takes: momentum, dampening, weight_decay"),
        ({"optimizer_args": {"momentum": -1.0}}, (), "refused them: Invalid momentum value: -1.0"),
        (
            {"optimizer_args": {"lr": 1.0}},
            (),
            "optimizer_args.lr: not an optimizer argument here (set train.learning_rate)",
        ),
        ({"optimizer_args": {"params": []}}, (), "optimizer_args.params"),
        (
            {"optimizer_args": {"weight_decay": 0.1}, "weight_decay": 0.2},
            ("train.weight_decay",),
            "weight_decay is set twice",
        ),
        ({"optimizer": "tests.train.test_optim.NeedsBeta"}, (), "needs beta"),
        (
            {"optimizer": "tests.train.test_optim.NoDecay", "weight_decay": 0.1},
            ("train.weight_decay",),
            "takes no weight_decay; remove it",
        ),
    ],
)
def test_bad_optimizer_arguments_fail_in_the_check(keys, given, message):
    train = sgd_train(**keys) if "optimizer" not in keys else TrainConfig(**keys)
    with pytest.raises(ConfigError, match=re.escape(message)):
        optim.check_optimizer(train, "job.toml", frozenset(given))


class NeedsBeta(torch.optim.SGD):
    def __init__(self, params, beta, lr=1e-3):
        super().__init__(params, lr=lr)


class NoDecay(torch.optim.SGD):
    def __init__(self, params, lr=1e-3):
        super().__init__(params, lr=lr)


def test_weight_decay_goes_to_every_optimizer_that_takes_it_and_optimizer_args_win():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert optim.make_optimizer("sgd", [{"params": p}], 1e-3).param_groups[0]["weight_decay"] == 0.01
    made = optim.make_optimizer("torch.optim.SGD", [{"params": p}], 1e-3, {"momentum": 0.9}, weight_decay=0.2)
    assert made.param_groups[0]["weight_decay"] == 0.2 and made.param_groups[0]["momentum"] == 0.9
    made = optim.make_optimizer("sgd", [{"params": p}], 1e-3, {"weight_decay": 0.3}, weight_decay=0.01)
    assert made.param_groups[0]["weight_decay"] == 0.3  # only optimizer_args set it (the check refuses both)
    made = optim.make_optimizer("adafactor", [{"params": p}], 1e-3, {"clip_threshold": 2.0}, weight_decay=0.05)
    group = made.param_groups[0]
    assert (group["relative_step"], group["scale_parameter"], group["clip_threshold"], group["weight_decay"]) == (
        False,
        False,
        2.0,
        0.05,
    )
    made = optim.make_optimizer("adafactor", [{"params": p}], 1e-3, {"scale_parameter": True})
    assert made.param_groups[0]["scale_parameter"] is True
    assert isinstance(optim.make_optimizer("tests.train.test_optim.NoDecay", [{"params": p}], 1e-3), NoDecay)


def test_adamw_is_built_as_before_on_the_cpu():
    """The call the CPU bit-exact tests pin: torch's AdamW, weight decay 0.01, not fused."""
    p = [torch.nn.Parameter(torch.zeros(2))]
    made = optim.make_optimizer("adamw", [{"params": p, "lr": 5e-4}], 1e-3)
    assert type(made) is torch.optim.AdamW
    assert made.param_groups[0]["weight_decay"] == 0.01 and made.param_groups[0]["lr"] == 5e-4
    assert not made.param_groups[0]["fused"]


# --------------------------------------------------------------------------- at the command line

from tests.train import test_run_folder as run_folder  # noqa: E402

BASE = run_folder.BASE
dataset = run_folder.dataset  # the CLI fixture, shared


def train_at_cli(kern_main, dataset, out, *args):
    return kern_main("train", *BASE, "--dataset", str(dataset), "--out", str(out), "--steps", "4", *args)


def test_torch_sgd_with_momentum_trains_at_the_cli(tmp_path, dataset, kern_main):
    from kern.core.io import load_file
    from kern.train.state import load_state

    out = tmp_path / "run"
    code, err = train_at_cli(
        kern_main,
        dataset,
        out,
        "--set",
        "train.optimizer=torch.optim.SGD",
        "--set",
        "train.optimizer_args={momentum = 0.9, nesterov = true}",
        "--set",
        "train.weight_decay=0.001",
        "--set",
        "train.lr_scheduler=cosine_with_min_lr",
        "--set",
        "train.lr_scheduler_min_lr_ratio=0.1",
        "--set",
        "save.every_n_steps=2",
    )
    assert code == 0, err
    state = load_state(out / "checkpoints" / "step-000002")
    (group,) = state["optimizer"]["param_groups"]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 0.001)
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] == pytest.approx(0.1 * 3e-3)  # cosine down to the min-LR at the last step
    tensors, _ = load_file(out / "adapter.safetensors")
    assert any(float(v.abs().sum()) > 0 for k, v in tensors.items() if "lora_up" in k)


def test_an_optimizer_class_of_ones_own_module_trains_at_the_cli(tmp_path, dataset, kern_main):
    CountingSGD.steps = 0
    code, err = train_at_cli(
        kern_main,
        dataset,
        tmp_path / "run",
        "--set",
        "train.optimizer=tests.train.test_optim.CountingSGD",
        "--set",
        "train.optimizer_args={tag = 'mine', momentum = 0.5}",
    )
    assert code == 0, err
    assert CountingSGD.steps == 4 and CountingSGD.tag == "mine"


@pytest.mark.parametrize(
    "args, names",
    [
        (("--set", "train.optimizer=torch.optim.SGDD"), "did you mean torch.optim.SGD"),
        (("--set", "train.optimizer=nosuchpackage.Fast"), "no module named 'nosuchpackage'"),
        (("--set", "train.optimizer=torch.nn.Linear"), "not a torch.optim.Optimizer class"),
        (("--set", "train.optimizer=torch.optim.SGD", "--set", "train.optimizer_args={momentum = -1}"), "momentum"),
        (("--set", "train.optimizer_args={betaz = [0.9, 0.99]}"), "takes no betaz"),
        (("--set", "train.optimizer_args={weight_decay = 0.1}", "--set", "train.weight_decay=0.1"), "set twice"),
        (("--set", "train.lr_scheduler=cosinee"), "unknown train.lr_scheduler 'cosinee'"),
        (("--set", "train.lr_scheduler=reduce_lr_on_plateau"), "follows a metric"),
        (("--set", "train.lr_scheduler_min_lr_ratio=0.1"), "train.lr_scheduler_min_lr_ratio does nothing"),
        (("--set", "train.lr_scheduler=warmup_stable_decay"), "num_decay_steps"),
    ],
)
def test_bad_optimizer_and_schedule_settings_exit_2_before_any_work(tmp_path, dataset, kern_main, args, names):
    out = tmp_path / "run"
    code, err = train_at_cli(kern_main, dataset, out, *args)
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.startswith("kern: error:")]
    assert len(lines) == 1 and names in lines[0], err
    assert "Traceback" not in err and not out.exists()
