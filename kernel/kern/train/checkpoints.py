"""A run's checkpoints: ``checkpoints/step-NNNNNN/`` written during the loop, and read back by ``--resume``.

A checkpoint holds the adapter (``adapter.safetensors``, usable as it is; with ``train.ema_decay`` also
``adapter_ema.safetensors``) and the full state in the format of :mod:`kern.train.state` (no pickle): the network's
weights, the optimizer's and the scheduler's state, the loop's :class:`Position`, every process's RNG states and the
EMA's tensors. Resuming from it continues the run bit for bit. The last step of a run always has one, so a finished
run can be continued to more steps (:func:`kern.train.runs.check_continuation`). Every adapter a run saves, the final
one included, is written by :class:`AdapterSaver`, with the run's metadata.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import attrs
import torch
from torch import nn

from kern.errors import UsageError
from kern.log import get_logger
from kern.train.state import DamagedState, load_state, save_state

log = get_logger(__name__)

CHECKPOINT = re.compile(r"step-(\d{6,})")


@attrs.define
class Position:
    """Where the loop stands: what a checkpoint holds besides the weights, the optimizer and the scheduler."""

    generator: torch.Generator  # the CPU generator every draw of the loop comes from (this process's)
    step: int = 0
    epoch: int = 0
    batch_pos: int = 0  # batches of this epoch already trained on
    history: list[float] = attrs.Factory(list)  # the loss of every step so far
    validation: list[tuple[int, float]] = attrs.Factory(list)  # (step, validation loss) so far (kern.train.validation)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(generator: torch.Generator, state: dict[str, Any]) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(out: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first (intact or not: :func:`newest_intact_checkpoint` judges)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(CHECKPOINT.fullmatch(p.name).group(1)))


def save_checkpoint(
    out: Path,
    step: int,
    network: nn.Module,
    state: dict[str, Any],
    keep_last: int,
    save_adapter: Callable[[Path], None],
) -> Path:
    """Write ``checkpoints/step-NNNNNN/`` (the adapter, and the full state as safetensors + JSON, no pickle) into a
    temporary folder and rename it into place, then prune to the newest ``keep_last`` (0 keeps all). The digests in
    the state cover every file ``save_adapter`` wrote into the folder (the EMA adapter beside the plain one)."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_adapter(tmp / "adapter.safetensors")
        written = tuple(sorted(p.name for p in tmp.iterdir() if p.is_file()))
        save_state(tmp, {**state, "network": network.state_dict()}, also=written)
        if final.exists():  # the same step again (a resumed run): move the old one aside, never leave none
            old = root / f".step-{step:06d}.old.tmp"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(out)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def newest_intact_checkpoint(out: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint whose files all match their recorded digests, and its state. A damaged one is named in
    a warning and skipped; ``UsageError`` when there is none to resume from."""
    found = checkpoint_dirs(out)
    if not found:
        raise UsageError(f"--resume: no checkpoint in {out / 'checkpoints'}; start without --resume")
    problems = []
    for path in reversed(found):
        if (path / "state.pt").exists() and not (path / "state.json").exists():
            problems.append(
                f"{path.name}: written by an older kern as a pickle (state.pt), which kern no longer loads "
                "because a pickle can run code"
            )
            continue
        try:
            return path, load_state(path)
        except DamagedState as exc:
            problems.append(f"{path.name}: {exc}")
            log.warning("damaged checkpoint skipped; trying an older one", checkpoint=str(path), problem=str(exc))
    raise UsageError(
        f"--resume: no intact checkpoint in {out / 'checkpoints'} ({'; '.join(problems)}); "
        "start a new run with --overwrite, or another --out"
    )


def restore(checkpoint: Path, state: dict[str, Any], network: nn.Module, optimizer: Any, scheduler: Any) -> None:
    """Load a checkpoint's state into the run; a checkpoint of another network or optimizer is a clear error.

    The schedule is this job's (its ``train.steps``), from the checkpoint's step on: the optimizer's LR is set to
    the schedule's value there, which is the stored one unless the total changed (a finished run continued)."""
    try:
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for key in ("step", "epoch", "batch_pos", "history", "rng"):
            state[key]
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"--resume: {checkpoint} does not fit this job ({first[:300]}); resume with the [network] and "
            "[train] optimizer settings the run was started with (its config.toml)"
        ) from None
    reschedule(scheduler)


def reschedule(scheduler: Any) -> None:
    """Set the optimizer's LR to what ``scheduler`` (a ``LambdaLR``, perhaps inside accelerate's wrapper) gives at
    its current count: the same computation as its own ``step``, so the same number when the curve is the same."""
    inner = getattr(scheduler, "scheduler", scheduler)
    if not isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
        return
    lrs = [base * f(inner.last_epoch) for f, base in zip(inner.lr_lambdas, inner.base_lrs, strict=True)]
    for group, lr in zip(inner.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    inner._last_lr = [group["lr"] for group in inner.optimizer.param_groups]


@attrs.define
class Checkpoints:
    """The checkpoints of one run, for every process of it: :meth:`save` is called by all of them together (each
    gives its RNG state; the main process writes), :meth:`resume` by each."""

    acc: Any  # accelerate.Accelerator
    out: Path
    keep_last: int
    network: nn.Module
    optimizer: Any
    scheduler: Any
    save_adapter: Callable[[Path, int], None]  # (path, step): the adapter with the run's metadata
    ema: Any = None  # kern.train.ema.EMA with train.ema_decay: the loop updates it; saved and restored with the rest

    def save(self, pos: Position) -> Path | None:
        acc = self.acc
        states: list[Any] = [None] * acc.num_processes
        if acc.num_processes > 1:
            torch.distributed.all_gather_object(states, rng_state(pos.generator))
        else:
            states = [rng_state(pos.generator)]
        path = None
        if acc.is_main_process:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": pos.step,
                "epoch": pos.epoch,
                "batch_pos": pos.batch_pos,
                "history": pos.history,
                "validation": pos.validation,
                "rng": states,
            }
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
            path = save_checkpoint(
                self.out, pos.step, self.network, state, self.keep_last, lambda p: self.save_adapter(p, pos.step)
            )
            log.info("checkpoint saved", path=str(path), step=pos.step)
        acc.wait_for_everyone()
        return path

    def resume(self, found: tuple[Path, dict[str, Any]], pos: Position) -> None:
        """Continue from ``found`` (:func:`newest_intact_checkpoint`): weights, optimizer, scheduler, position, RNG."""
        checkpoint, state = found
        restore(checkpoint, state, self.network, self.optimizer, self.scheduler)
        pos.step, pos.epoch, pos.batch_pos = state["step"], state["epoch"], state["batch_pos"]
        pos.history = list(state["history"])
        pos.validation = [tuple(v) for v in state.get("validation", [])]  # older checkpoints have none
        set_rng_state(pos.generator, state["rng"][self.acc.process_index])
        self._resume_ema(checkpoint, state)
        log.info("resumed", checkpoint=str(checkpoint), step=pos.step, epoch=pos.epoch, batch=pos.batch_pos)

    def _resume_ema(self, checkpoint: Path, state: dict[str, Any]) -> None:
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"], str(checkpoint))
        elif self.ema is not None:  # the run had no EMA until now: it starts here, from the restored weights
            self.ema.reset()
            log.warning(
                "the checkpoint has no EMA (train.ema_decay was unset); the EMA starts here", step=state["step"]
            )
        elif "ema" in state:
            log.warning("the checkpoint's EMA is not continued: train.ema_decay is unset now", step=state["step"])

    def newest(self) -> Path | None:
        found = checkpoint_dirs(self.out)
        return found[-1] if found else None


@attrs.define
class AdapterSaver:
    """Saves the run's adapter (the final one and each checkpoint's) with the run's metadata: the facts known at
    the start (:meth:`for_run`), the step and the time of each save added. The keys themselves are
    :mod:`kern.adapters.network.metadata`'s."""

    plan: Any  # kern.train.setup.Plan
    variant: Any  # kern.records.Variant
    network: nn.Module
    facts: Any  # kern.adapters.network.metadata.TrainingFacts, at step 0
    ema: Any = None  # kern.train.ema.EMA: then each save also writes the EMA adapter beside the plain one

    @classmethod
    def for_run(
        cls,
        plan: Any,
        variant: Any,
        network: nn.Module,
        started: float,
        data: tuple[list[Any], list[Any]],
        processes: int,
    ) -> AdapterSaver:
        """``data``: the dataset's specs and items; ``processes``: the data-parallel processes of the run."""
        from kern.adapters.network.metadata import TrainingFacts, base_model_version, dataset_facts
        from kern.data import batch_order

        job, (specs, items) = plan.job, data
        batches = len(batch_order(items, specs, job.train.seed, 0))  # the count is the same every epoch
        facts = TrainingFacts(
            arch=plan.arch.name,
            variant=variant.name,
            base_model_version=base_model_version(plan.arch.name, variant),
            learning_rate=job.train.learning_rate,
            lr_scheduler=job.train.lr_scheduler,
            warmup_steps=job.train.warmup_steps,
            max_train_steps=job.train.steps,
            steps=0,
            seed=job.train.seed,
            optimizer=job.train.optimizer,
            mixed_precision=job.train.mixed_precision,
            gradient_checkpointing=job.train.gradient_checkpointing,
            gradient_accumulation_steps=job.train.gradient_accumulation,
            max_grad_norm=job.train.max_grad_norm,
            timestep_sampling=plan.timestep_method,
            timestep_options=attrs.asdict(plan.timestep_options),
            started_at=started,
            output_name=job.save.name,
            num_batches_per_epoch=math.ceil(batches / processes),  # the main process's share
            num_processes=processes,
            datasets=dataset_facts(specs, items),
            fp8_base=job.train.base_precision == "fp8",
            sd_model_name=Path(str(job.model.transformer)).name if job.model.transformer else None,
            vae_name=Path(str(job.model.vae)).name if job.model.vae else None,
            session_id=int.from_bytes(os.urandom(4), "little"),  # sd-scripts: a random id per training session
        )
        return cls(plan, variant, network, facts)

    def __call__(self, path: Path, step: int) -> None:
        """The adapter at ``path`` and, with an EMA, the EMA adapter beside it (:func:`kern.train.ema.ema_path`)."""
        from kern.train.setup import DTYPES

        dtype, metadata = DTYPES[self.plan.job.save.precision], self.metadata(step)
        self.network.save(path, dtype=dtype, metadata=metadata)
        if self.ema is not None:
            from kern.train.ema import METADATA_KEY, ema_path

            with self.ema.swapped():
                self.network.save(ema_path(path), dtype=dtype, metadata={**metadata, METADATA_KEY: str(self.ema.decay)})

    def metadata(self, step: int) -> dict[str, str]:
        from kern.adapters.network.metadata import adapter_metadata, modelspec_metadata

        plan, v = self.plan, self.variant
        facts = attrs.evolve(self.facts, steps=step, saved_at=time.time())
        spec = modelspec_metadata(
            architecture=v.modelspec or f"{plan.arch.name}-{v.name}",
            implementation=plan.arch.implementation,
            title=plan.job.save.name,
            # the training resolution, as sd-scripts writes it (the first dataset's)
            resolution=facts.datasets[0].resolution if facts.datasets else (v.width, v.height),
        )
        return adapter_metadata(plan.network.name, plan.network_options, modelspec=spec, training=facts)
