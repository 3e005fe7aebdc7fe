"""Validation loss: held-out items evaluated every ``train.validate_every_n_steps`` and at the last step.

The held-out items come from the dataset config: ``validation_split`` on a ``[[datasets]]`` table holds out a fixed,
seeded share of its items (never trained on), and ``[[validation.datasets]]`` tables are held out whole. Each is
cached with the training items and evaluated the same way every time: at the fixed timesteps :data:`TIMESTEPS`, with
noise drawn from a generator seeded per item (``validation_seed`` and the item's stem), without gradients, the model
in eval mode and the adapter active. Nothing is drawn from the training generator or torch's global one, so a run's
training is bit-identical with validation on or off, and the number is comparable across steps and runs. See
``docs/training.md`` (Validation loss) and ``docs/datasets.md`` §1.4.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
from typing import Any, Iterator, Sequence

import attrs
import torch
from torch import nn

from kern.errors import DatasetError, UsageError
from kern.log import get_logger

log = get_logger(__name__)

# sd-scripts' fixed validation timesteps (200, 400, 600, 800 of 1000), as kern's t in [0, 1] (1: pure noise).
TIMESTEPS = (0.2, 0.4, 0.6, 0.8)


@attrs.frozen
class HeldOut:
    """The validation items (the held-out share of split datasets, then the validation datasets' items) and the seed
    of each one's noise."""

    items: tuple[Any, ...] = ()  # kern.data.Item
    seeds: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.items)


def noise_seed(validation_seed: int, stem: str) -> int:
    """The seed of an item's validation noise: fixed by the seed and the item's file stem alone, so adding,
    removing or reordering other items or datasets leaves it alone."""
    digest = hashlib.sha256(f"kern.validation:{validation_seed}:{stem}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def split(specs: Sequence[Any], items: Sequence[Any], seed: int) -> tuple[list[Any], list[Any]]:
    """(training items, held-out items), each in ``items``' order: of each dataset with ``validation_split`` > 0,
    ``round(n * validation_split)`` of its n items are held out, picked by a shuffle seeded by its
    ``validation_seed`` (default ``seed``). A split that holds out none, or all, is a ``DatasetError``."""
    held: set[int] = set()
    for spec in specs:
        if spec.validation_split <= 0:
            continue
        mine = [i for i, item in enumerate(items) if item.dataset_index == spec.index]
        count = math.floor(len(mine) * spec.validation_split + 0.5)
        what = f"{spec.where} key 'validation_split': {spec.validation_split:g} of {len(mine)} item(s)"
        if count == 0:
            raise DatasetError(
                f"{what} holds out none; raise it, or hold out a folder with a [[validation.datasets]] table"
            )
        if count == len(mine):
            raise DatasetError(
                f"{what} leaves no training item; lower it, or hold out a folder with a [[validation.datasets]] table"
            )
        order = list(mine)
        used = spec.validation_seed if spec.validation_seed is not None else seed
        random.Random(f"kern.validation_split:{used}").shuffle(order)  # str seeds: stable across runs and machines
        held.update(order[:count])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def hold_out(plan: Any, specs: Sequence[Any], items: Sequence[Any]) -> tuple[list[Any], HeldOut]:
    """The training items without the held-out ones, and the validation data: the dataset config's
    ``validation_split`` applied and its ``[[validation.datasets]]`` read and scanned (before any work: a dataset
    with no usable image, a shared cache folder or a bad split is an error here). Checked against
    ``train.validate_every_n_steps`` (:func:`check`)."""
    from kern.core.io import remove_orphans
    from kern.data import targets
    from kern.data.dataset_config import load_validation_config
    from kern.data.items import scan_items

    job = plan.job
    extra = load_validation_config(job.dataset.config, first_index=max((s.index for s in specs), default=-1) + 1)
    _check_cache_dirs([*specs, *extra])
    targets.check_variant(extra, plan.arch.name, plan.arch.variant(plan.variant), job.source)  # as the training ones
    extra_items = scan_items(extra, plan.arch.resolution_step) if extra else []
    for folder in sorted({s.cache_directory for s in extra}):
        remove_orphans(folder)
    train, held = split(specs, items, job.train.seed)
    by_index = {s.index: s for s in [*specs, *extra]}
    chosen = [*held, *extra_items]
    seeds = []
    for item in chosen:
        own = by_index[item.dataset_index].validation_seed
        seeds.append(noise_seed(own if own is not None else job.train.seed, item.stem))
    data = HeldOut(tuple(chosen), tuple(seeds))
    check(job, data)
    if data.items:
        log.info("validation data", held_out=len(held), validation_datasets=len(extra_items), training=len(train))
    return train, data


def _check_cache_dirs(specs: Sequence[Any]) -> None:
    seen: dict[Any, Any] = {}
    for spec in specs:
        other = seen.setdefault(spec.cache_directory, spec)
        if other is not spec:
            name = other.label or f"datasets[{other.index}]"
            raise DatasetError(
                f"{spec.where} key 'cache_directory': {spec.cache_directory} is also {name}'s cache directory (it "
                "defaults to image_directory); give each dataset its own cache_directory"
            )


def check(job: Any, data: HeldOut) -> None:
    """``train.validate_every_n_steps`` with no validation data is an error; validation data with it 0 a warning
    (the held-out items stay out of training, so the training set does not depend on the setting)."""
    every = job.train.validate_every_n_steps
    if every and not data.items:
        raise UsageError(
            f"{job.source}: train.validate_every_n_steps = {every} but the dataset config {job.dataset.config} holds "
            "out no data; add validation_split = 0.1 to a [[datasets]] table or a [[validation.datasets]] table, or "
            "set train.validate_every_n_steps = 0"
        )
    if data.items and not every:
        log.warning(
            "held-out items are not trained on, and with train.validate_every_n_steps = 0 no validation loss is "
            "computed; set it (e.g. 100) to see one",
            items=len(data.items),
        )


@attrs.define
class Validator:
    """Called by the loop after each optimizer step: when due, the validation loss into ``pos.validation`` and
    ``{"val_loss": value}`` for the metrics; else ``{}``."""

    plan: Any
    acc: Any
    trainee: nn.Module
    data: HeldOut
    cache_key: str

    def __call__(self, pos: Any) -> dict[str, float]:
        every, steps = self.plan.job.train.validate_every_n_steps, self.plan.job.train.steps
        if not (self.data.items and every and (pos.step % every == 0 or pos.step == steps)):
            return {}
        value = validation_loss(self.plan, self.acc, self.trainee, self.data, self.cache_key)
        pos.validation.append((pos.step, value))
        log.info("validation", step=pos.step, val_loss=value, items=len(self.data.items))
        return {"val_loss": value}


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode, every submodule's own mode put back after (the frozen base stays in eval)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def validation_loss(plan: Any, acc: Any, trainee: nn.Module, data: HeldOut, cache_key: str) -> float:
    """The mean, over every validation item and each of :data:`TIMESTEPS`, of the unweighted MSE between the
    predicted and the true velocity (``noise - x0``).

    Items are evaluated one at a time (the number does not depend on batch sizes). Several processes share the
    items and sum their results; with ``train.shard_base`` each process runs every item, since every forward needs
    all of them."""
    from kern.data import cache
    from kern.train.setup import DTYPES

    device, base_dtype = acc.device, DTYPES[plan.job.model.dtype]
    model = acc.unwrap_model(trainee)  # no DDP collectives in a forward some processes may not make
    pairs = list(zip(data.items, data.seeds))
    if not plan.job.train.shard_base:
        pairs = pairs[acc.process_index :: acc.num_processes]
    losses = []
    with torch.no_grad(), evaluating(model):
        for item, seed in pairs:
            batch = cache.load_batch([item], cache_key, layout=plan.arch.cache_layout)
            x0, text, refs = cache.batch_on(batch, device, base_dtype)
            generator = torch.Generator().manual_seed(seed)
            for t_value in TIMESTEPS:
                noise = torch.randn(x0.shape, generator=generator).to(device)
                t = torch.full((x0.shape[0],), t_value, dtype=torch.float32, device=device)
                tb = t.view(-1, *([1] * (x0.dim() - 1)))
                noisy = (1 - tb) * x0 + tb * noise
                with acc.autocast():
                    pred = model(noisy.to(base_dtype), t, text, refs, {"guidance": 1.0})
                losses.append(((pred.float() - (noise - x0)) ** 2).mean().double())
    total = torch.stack(losses).sum() if losses else torch.zeros((), dtype=torch.float64, device=device)
    sums = torch.stack([total.to(device), torch.tensor(float(len(losses)), dtype=torch.float64, device=device)])
    if acc.num_processes > 1 and not plan.job.train.shard_base:
        sums = acc.reduce(sums, reduction="sum")
    return float(sums[0] / sums[1])
