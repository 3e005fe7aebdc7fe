"""Optimisers and learning-rate schedules as users write them: ``train.optimizer`` (a built-in name or a dotted class
path) with ``train.optimizer_args`` and ``train.weight_decay``; ``train.lr_scheduler`` (any
``transformers.get_scheduler`` curve) with ``train.warmup_steps``, ``train.lr_scheduler_min_lr_ratio``,
``train.lr_scheduler_num_cycles``, ``train.lr_scheduler_power`` and ``train.lr_scheduler_args``.

Everything is checked before any work (:func:`check_optimizer`, :func:`check_schedule`): the class imported and
built once over a stand-in parameter, the schedule's curve built once."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
from typing import Any, Callable, Mapping

import torch

from kern.errors import ConfigError

# Built-in names (matched without case, '-' or '_') and the class each stands for.
BUILTIN = {
    "adamw": "torch.optim.AdamW",
    "adamw8bit": "bitsandbytes.optim.AdamW8bit",
    "adafactor": "transformers.optimization.Adafactor",
    "prodigy": "prodigyopt.Prodigy",
    "sgd": "torch.optim.SGD",
}
OPTIMIZERS = tuple(BUILTIN)
# Adafactor follows the schedule: without these it sets its own relative step size and ignores the LR.
BUILTIN_ARGS = {"adafactor": {"scale_parameter": False, "relative_step": False, "warmup_init": False}}
# Top-level modules of optimizer packages that kern-tuner has an extra for.
EXTRAS = {"bitsandbytes": "bnb", "prodigyopt": "prodigy"}
RESERVED_ARGS = {"params": "the adapter's parameters are kern's to give", "lr": "set train.learning_rate"}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _install_hint(module: str) -> str:
    top = module.split(".")[0]
    return f"pip install kern-tuner[{EXTRAS[top]}]" if top in EXTRAS else f"pip install {top}"


def optimizer_class(name: str, source: str = "") -> type[torch.optim.Optimizer]:
    """The class ``train.optimizer`` names: a built-in name or ``package.module.Class``, imported and checked to be
    a ``torch.optim.Optimizer``. Errors name the key, the module or class, and what to install."""
    where = f"{source}: " if source else ""
    path = BUILTIN.get(_key(name), name)
    if "." not in path:
        raise ConfigError(
            f"{where}unknown train.optimizer {name!r}; known: {', '.join(OPTIMIZERS)}, or a dotted class path "
            "such as 'torch.optim.SGD' or 'prodigyopt.Prodigy'"
        )
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        missing = top if importlib.util.find_spec(top) is None else (exc.name or module_name)
        raise ConfigError(
            f"{where}train.optimizer = {name!r}: no module named {missing!r} ({_install_hint(missing)})"
        ) from None
    except ImportError as exc:  # installed but broken (a missing native library, say)
        raise ConfigError(f"{where}train.optimizer = {name!r}: importing {module_name!r} failed: {exc}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        found = [n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, torch.optim.Optimizer)]
        near = difflib.get_close_matches(class_name, found, n=3)
        hint = f"; did you mean {', '.join(f'{module_name}.{n}' for n in near)}?" if near else ""
        raise ConfigError(f"{where}train.optimizer = {name!r}: module {module_name!r} has no {class_name!r}{hint}")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"{where}train.optimizer = {name!r} is not a torch.optim.Optimizer class")
    return cls


def _parameters(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
    """The keyword arguments ``cls`` takes after its parameters, and whether it takes any (``**kwargs``)."""
    try:
        params = list(inspect.signature(cls).parameters.values())[1:]
    except (TypeError, ValueError):  # no signature to read (a C extension): take anything
        return {}, True
    named = {p.name: p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def optimizer_kwargs(name: str, cls: type, args: Mapping[str, Any], weight_decay: float) -> dict[str, Any]:
    """The keyword arguments the optimizer is built with: the built-in's defaults, ``train.weight_decay`` where the
    class takes ``weight_decay``, then ``train.optimizer_args`` (which win)."""
    named, _ = _parameters(cls)
    kwargs = dict(BUILTIN_ARGS.get(_key(name), {}))
    if "weight_decay" in named:
        kwargs["weight_decay"] = weight_decay
    return kwargs | dict(args)


def check_optimizer(train: Any, source: str = "", given: frozenset[str] = frozenset()) -> None:
    """Before any work: ``train.optimizer`` imports, ``train.optimizer_args`` fit its signature (and its own checks:
    the optimizer is built once over a stand-in parameter), and ``weight_decay`` is set in one place only.
    ``given``: the dotted keys the job set (a default ``train.weight_decay`` never conflicts)."""
    where = f"{source}: " if source else ""
    cls = optimizer_class(train.optimizer, source)
    label = f"train.optimizer = {train.optimizer!r} ({cls.__module__}.{cls.__qualname__})"
    args = dict(train.optimizer_args)
    for key, why in RESERVED_ARGS.items():
        if key in args:
            raise ConfigError(f"{where}train.optimizer_args.{key}: not an optimizer argument here ({why})")
    named, any_kwargs = _parameters(cls)
    unknown = sorted(set(args) - set(named)) if not any_kwargs else []
    if unknown:
        takes = ", ".join(n for n in named if n != "lr") or "none"
        raise ConfigError(f"{where}train.optimizer_args: {label} takes no {', '.join(unknown)}; it takes: {takes}")
    missing = [n for n, p in named.items() if p.default is p.empty and n != "lr" and n not in args]
    if missing:
        raise ConfigError(f"{where}train.optimizer_args: {label} needs {', '.join(missing)}")
    if "weight_decay" in args and "train.weight_decay" in given:
        raise ConfigError(
            f"{where}weight_decay is set twice, as train.weight_decay and train.optimizer_args.weight_decay: "
            "keep one of them"
        )
    if "train.weight_decay" in given and "weight_decay" not in named and not any_kwargs:
        raise ConfigError(f"{where}train.weight_decay: {label} takes no weight_decay; remove it")
    probe = torch.nn.Parameter(torch.zeros(1))
    try:
        cls([probe], lr=train.learning_rate, **optimizer_kwargs(train.optimizer, cls, args, train.weight_decay))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{where}train.optimizer_args: {label} refused them: {exc}") from None


def make_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    lr: float,
    args: Mapping[str, Any] | None = None,
    weight_decay: float = 0.01,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (a built-in name or a dotted class path) over ``groups``, with ``args`` as keyword
    arguments and ``weight_decay`` where the class takes it (``args`` win).

    AdamW is torch's fused kernel when every parameter is on a GPU (one launch for all adapter tensors instead
    of several per tensor), the default implementation otherwise (the CPU, whose runs the tests pin bit-exactly)."""
    cls = optimizer_class(name)
    kwargs = optimizer_kwargs(name, cls, args or {}, weight_decay)
    if cls is torch.optim.AdamW and "fused" not in kwargs:
        params = [p for g in groups for p in g["params"]]
        if params and all(p.is_cuda and p.dtype == torch.float32 for p in params):
            kwargs["fused"] = True
    return cls(groups, lr=lr, **kwargs)


# --------------------------------------------------------------------------- schedules

# What a schedule takes of kern's own keys: "cycles" (train.lr_scheduler_num_cycles), "min" (min_lr_ratio), "power".
SCHEDULES: dict[str, tuple[str, ...]] = {
    "constant": (),
    "constant_with_warmup": (),
    "linear": ("min",),
    "cosine": ("cycles", "min"),
    "cosine_with_restarts": ("cycles",),
    "polynomial": ("min", "power"),
    "inverse_sqrt": (),
    "cosine_with_min_lr": ("cycles", "min"),
    "cosine_warmup_with_min_lr": ("cycles", "min"),
    "warmup_stable_decay": ("cycles", "min"),
}
REFUSED = {
    name: "it follows a metric each step, not a curve over the run, and kern's schedule is a fixed curve a "
    "checkpoint restores exactly; use cosine_with_min_lr or warmup_stable_decay"
    for name in ("reduce_lr_on_plateau", "greedy")
}
NEEDS_MIN = ("cosine_with_min_lr", "cosine_warmup_with_min_lr")
# Schedule arguments kern sets itself (from the keys named), so lr_scheduler_args may not.
OWN_ARGS = {
    "optimizer": "the optimizer",
    "last_epoch": "resume",
    "num_warmup_steps": "train.warmup_steps",
    "num_training_steps": "train.steps",
    "num_cycles": "train.lr_scheduler_num_cycles",
    "power": "train.lr_scheduler_power",
    "lr_end": "train.lr_scheduler_min_lr_ratio",
    "min_lr": "train.lr_scheduler_min_lr_ratio",
    "min_lr_rate": "train.lr_scheduler_min_lr_ratio",
    "min_lr_ratio": "train.lr_scheduler_min_lr_ratio",
}


def _transformers_call(
    kind: str, num_cycles: float | None, min_lr_ratio: float | None, power: float | None, args: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """transformers' schedule name and keyword arguments for kern's ``kind`` and keys (musubi's meanings:
    ``num_cycles`` counts cosine decays, so transformers' half-waves are ``num_cycles / 2``, except in
    ``cosine_with_restarts``, whose ``num_cycles`` is the count of its restarts already)."""
    kwargs = dict(args)
    name = kind
    if kind == "linear":  # transformers' polynomial decay with power 1 computes 1 - progress as kern always did
        name, kwargs["power"], kwargs["lr_end"] = "polynomial", 1.0, min_lr_ratio or 0.0
    elif kind == "polynomial":
        kwargs["power"], kwargs["lr_end"] = power if power is not None else 1.0, min_lr_ratio or 0.0
    elif kind == "cosine" and min_lr_ratio is not None:
        name, kwargs["min_lr_rate"] = "cosine_with_min_lr", min_lr_ratio
    elif kind in NEEDS_MIN:
        kwargs["min_lr_rate"] = min_lr_ratio
    elif kind == "warmup_stable_decay":
        kwargs["min_lr_ratio"] = min_lr_ratio or 0.0
    if num_cycles is not None:
        kwargs["num_cycles"] = num_cycles if kind == "cosine_with_restarts" else num_cycles / 2
    return name, kwargs


def lr_lambda(
    kind: str,
    warmup: int,
    total: int,
    *,
    num_cycles: float | None = None,
    min_lr_ratio: float | None = None,
    power: float | None = None,
    args: Mapping[str, Any] | None = None,
) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step ``s`` (from 0): a warm-up over ``warmup`` steps, then the
    curve ``kind`` (a ``transformers.get_scheduler`` name) to the end of ``total`` steps, where it stays.

    The curves are ``transformers.get_scheduler``'s, read kern's way. Its warmup begins at 0 (a first step that
    learns nothing), kern's at ``1 / warmup``: during warmup kern reads the curve one step ahead, so the last
    warmup step reaches the full LR (``cosine_warmup_with_min_lr``, whose own warm-up already starts at
    ``1 / warmup`` and whose decay is already a step ahead, is read as it is). Past ``total`` (data-parallel runs
    step the schedule once per process) it holds the value at ``total``. The decay has at least one step, so a
    warmup as long as the run ends at the full LR. ``linear`` is transformers' polynomial decay with power 1,
    which computes ``1 - progress`` as kern always did (its ``linear`` rounds the same line differently in the
    last bit); ``linear`` and ``polynomial`` end at ``min_lr_ratio`` (0 unset), ``cosine`` with a
    ``min_lr_ratio`` is ``cosine_with_min_lr``."""
    from transformers import get_scheduler

    name, extra = _transformers_call(kind, num_cycles, min_lr_ratio, power, args or {})
    if kind == "constant" and warmup:
        name = "constant_with_warmup"
    end = max(total, warmup + 1)
    # Only the curve is wanted: built against a stand-in optimizer at LR 1 (polynomial divides by the base LR).
    probe = torch.optim.SGD([torch.zeros(1)], lr=1.0)
    curve = get_scheduler(
        name, probe, num_warmup_steps=warmup, num_training_steps=end, scheduler_specific_kwargs=extra
    ).lr_lambdas[0]

    if name == "cosine_warmup_with_min_lr":

        def ahead(s: int) -> float:
            return float(curve(min(s, end - 1)))

        return ahead

    def f(s: int) -> float:
        return float(curve(s + 1 if s < warmup else min(s, end)))

    return f


def schedule_lambda(train: Any) -> Callable[[int], float]:
    """:func:`lr_lambda` for ``train`` (a ``TrainConfig``)."""
    return lr_lambda(
        train.lr_scheduler,
        train.warmup_steps,
        train.steps,
        num_cycles=train.lr_scheduler_num_cycles,
        min_lr_ratio=train.lr_scheduler_min_lr_ratio,
        power=train.lr_scheduler_power,
        args=train.lr_scheduler_args,
    )


def check_schedule(train: Any, source: str = "") -> None:
    """Before any work: ``train.lr_scheduler`` is a schedule kern runs, the ``lr_scheduler_*`` keys set are ones it
    uses, ``lr_scheduler_args`` fit its signature, and the curve builds."""
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    where = f"{source}: " if source else ""
    kind = train.lr_scheduler
    if kind in REFUSED:
        raise ConfigError(f"{where}train.lr_scheduler = {kind!r} is not supported: {REFUSED[kind]}")
    if kind not in SCHEDULES:
        raise ConfigError(f"{where}unknown train.lr_scheduler {kind!r}; known: {', '.join(SCHEDULES)}")
    uses = SCHEDULES[kind]
    for key, value in (
        ("cycles", train.lr_scheduler_num_cycles),
        ("min", train.lr_scheduler_min_lr_ratio),
        ("power", train.lr_scheduler_power),
    ):
        if value is not None and key not in uses:
            dotted = {"cycles": "num_cycles", "min": "min_lr_ratio", "power": "power"}[key]
            takers = ", ".join(k for k, v in SCHEDULES.items() if key in v)
            raise ConfigError(
                f"{where}train.lr_scheduler_{dotted} does nothing with lr_scheduler = {kind!r}; it applies to: {takers}"
            )
    if kind in NEEDS_MIN and train.lr_scheduler_min_lr_ratio is None:
        raise ConfigError(f"{where}train.lr_scheduler = {kind!r} needs train.lr_scheduler_min_lr_ratio (e.g. 0.1)")
    args = dict(train.lr_scheduler_args)
    name, _ = _transformers_call(kind, None, train.lr_scheduler_min_lr_ratio, None, {})
    if kind == "constant" and train.warmup_steps:
        name = "constant_with_warmup"
    takes = set(inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]).parameters) - set(OWN_ARGS)
    for key in args:
        if key in OWN_ARGS:
            raise ConfigError(f"{where}train.lr_scheduler_args.{key}: kern sets it from {OWN_ARGS[key]}; set that")
        if key not in takes:
            known = ", ".join(sorted(takes)) or "none"
            raise ConfigError(f"{where}train.lr_scheduler_args.{key}: {kind!r} takes no {key!r}; it takes: {known}")
    if kind == "warmup_stable_decay":
        decay = args.get("num_decay_steps")
        room = max(train.steps, train.warmup_steps + 1) - train.warmup_steps
        if not isinstance(decay, int) or isinstance(decay, bool) or not 0 < decay <= room:
            raise ConfigError(
                f"{where}train.lr_scheduler = 'warmup_stable_decay' needs train.lr_scheduler_args.num_decay_steps, "
                f"a whole number of steps from 1 to {room} (the steps after the warm-up), got {decay!r}"
            )
    try:
        schedule_lambda(train)(0)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}train.lr_scheduler = {kind!r}: {exc}") from None


def make_scheduler(optimizer: torch.optim.Optimizer, train: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of ``train`` (a ``TrainConfig``) over ``optimizer``.

    A plain function as the lambda: ``LambdaLR.state_dict()`` then holds only counters and LRs, which a checkpoint
    stores without pickle, and a resumed run restores exactly."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_lambda(train))
