"""The training driver: a job config in; an adapter, checkpoints, previews and logs out.

It asks hooks for everything architecture- or network-specific and never names either. :func:`run` is the story
of a run; the chapters live next to it: checks and set-up (:mod:`kern.train.setup`), the caching phases
(:mod:`kern.train.caching`), optimisers and schedules (:mod:`kern.train.optim`), checkpoints and resume
(:mod:`kern.train.checkpoints`), the run folder, its lock and stop signals (:mod:`kern.train.runs`), metrics
(:mod:`kern.train.metrics`) and preview images (:mod:`kern.train.previews`). Phases, in the order that keeps peak
memory at the largest single model rather than their sum:

1. text: load the text encoder, fill the text cache (and encode the preview prompts), free it;
2. latents: load the VAE, fill the latent cache (the VAE stays on the CPU for the preview images);
3. train: load the transformer, wrap it with the network, run the loop.

A run folder holds ``config.toml`` (the resolved job), ``metrics.jsonl``, ``tensorboard/``,
``samples/``, ``checkpoints/step-NNNNNN/`` and the final ``<name>.safetensors`` plus ``loss.png``.
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kern.core.config import JobConfig
from kern.errors import KernError, UsageError
from kern.log import get_logger
from kern.records import TargetSpec, Variant
from kern.train import presets, runs, warm_start
from kern.train.caching import (
    cache_id,
    cache_only,  # noqa: F401 - kept importable from here (tests call it through the driver)
    latent_phase,
    load_items,
    text_phase,
)
from kern.train.checkpoints import AdapterSaver, Checkpoints, Position
from kern.train.ema import EMA
from kern.train.metrics import Metrics
from kern.train.optim import make_optimizer, make_scheduler
from kern.train.previews import Previews
from kern.train.setup import (
    DTYPES,
    Plan,
    check_files,
    check_trainable,
    make_accelerator,
    prepare,
    resolve_variant,
    write_config,
)
from kern.train.validation import HeldOut, Validator, evaluating, hold_out

log = get_logger(__name__)


def run(job: JobConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train as ``job`` says; return the path of the final adapter.

    Everything is checked before any work; then the run folder is locked for this process (:class:`runs.RunLock`).
    An earlier run in the folder is continued with ``resume`` or replaced with ``overwrite``, never silently.
    SIGINT / SIGTERM during the loop finish the step, write a checkpoint and raise ``kern.errors.Interrupted``."""
    if resume and overwrite:
        raise UsageError("--resume continues the run in the folder and --overwrite replaces it: give one of them")
    plan, variant, specs, items, held, previews = check_job(job)

    acc, ddp = make_accelerator(plan)
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(runs.StopSignals())
        if acc.is_main_process:
            stack.enter_context(runs.RunLock(plan.out))
        resume_from = runs.open_run_folder(plan.out, job.save.name, acc, resume, overwrite, job.train.steps)
        if acc.is_main_process:
            write_config(plan, variant)
        # A sharded base needs every process in each forward, so then every process makes the previews.
        previews = previews.to(acc.device) if previews and (acc.is_main_process or job.train.shard_base) else None

        # Phases 1 and 2: the text cache (and the preview prompts), then the latent cache; one model at a time.
        text_phase(
            plan,
            variant,
            [*items, *held.items],  # the validation items are cached with the training ones
            acc.device,
            previews.encode if previews else None,
            write=acc.is_main_process,
            caption_dropout=any(s.caption_dropout_rate > 0 for s in specs),
        )
        _, vae = latent_phase(plan, variant, [*items, *held.items], acc.device, write=acc.is_main_process)
        acc.wait_for_everyone()

        # Phase 3: the transformer, the network, the optimizer; the checkpoint to resume from, if asked; the loop.
        trainee, optimizer, scheduler = setup_model(plan, variant, acc, ddp)
        model, started = acc.unwrap_model(trainee), time.time()
        pos = Position(generator=torch.Generator().manual_seed(job.train.seed + acc.process_index))
        save_adapter = AdapterSaver.for_run(plan, variant, model.network, started, (specs, items), acc.num_processes)
        checkpoints = Checkpoints(acc, plan.out, job.save.keep_last, model.network, optimizer, scheduler, save_adapter)
        ema = checkpoints.ema = save_adapter.ema = EMA.maybe(model.network, job.train.ema_decay)  # saved by both
        if resume_from is not None:
            checkpoints.resume(resume_from, pos)
        metrics = stack.enter_context(
            Metrics(plan.out, job.train.steps, pos.step, resume_from is not None, acc.is_main_process, acc, job)
        )
        make_previews = functools.partial(_make_previews, previews, acc, model, vae, plan.out / "samples", ema)
        data = (specs, items, cache_id(plan, variant))
        validate = Validator(plan, acc, trainee, held, data[2])
        loop(plan, acc, trainee, optimizer, scheduler, pos, data, checkpoints, metrics, stop, make_previews, validate)

        # The end: the final adapter, the last previews, the loss plot.
        metrics.close()
        return _finish(plan, acc, model.network, pos, save_adapter, make_previews, started)


def check_job(job: JobConfig) -> tuple[Plan, Variant, list[Any], list[Any], HeldOut, Previews | None]:
    """Everything a run needs, checked before any work: names and options (:func:`prepare`), the model files, the
    variant, the dataset (every image probed, every caption read), the preview prompts (parsed and sized, no model
    yet), a writable run folder. Returns the plan, the variant, the dataset's specs, its training items, the held-out
    validation data (:func:`kern.train.validation.hold_out`) and the previews."""
    from kern.core.io import ensure_writable_dir

    plan = prepare(job)
    if not job.dataset.config:
        raise UsageError(f"{job.source}: dataset.config is not set; pass --dataset dataset.toml")
    check_files(plan)
    variant = resolve_variant(plan)
    check_trainable(plan, variant)
    warm_start.check(plan, variant)  # network.init_weights, model.base_weights: files, types, ranks
    specs, items = load_items(plan)
    items, held = hold_out(plan, specs, items)
    wanted = job.sample.prompts or job.sample.prompt_file
    previews = Previews(plan, variant, torch.device("cpu"), DTYPES[job.model.dtype]) if wanted else None
    ensure_writable_dir(plan.out, "save.out (--out)")
    return plan, variant, specs, items, held, previews


def setup_model(plan: Plan, variant: Variant, acc: Any, ddp: Any) -> tuple[nn.Module, Any, Any]:
    """Phase 3's set-up: the transformer (frozen, fp8 base weights, its fast paths), the network around it, the
    optimizer and the schedule, prepared by ``acc``; or with ``train.shard_base`` the base sharded over the processes
    and DDP for the adapter only."""
    from kern.gpu import accel, distributed

    job, arch, device, sharded = plan.job, plan.arch, acc.device, plan.job.train.shard_base
    # Sharded: load on the CPU, each process then moves only its shard to the device; block swap: likewise, the
    # swapped blocks stay there.
    transformer = plan.hook.load_model(
        arch=arch.name,
        variant=variant.name,
        part="transformer",
        path=job.model.transformer,
        dtype=DTYPES[job.model.dtype],
        device="cpu" if sharded else accel.base_device(job.train, device),
        options={"fp8": job.train.base_precision == "fp8"},
    )
    if transformer is None:
        raise KernError(f"no installed plugin loads the {arch.name} transformer (see `kern plugins`)")
    transformer.requires_grad_(False)
    transformer.eval()  # the frozen base never uses dropout; the network's own modules go to train mode below
    init = warm_start.before_network(plan, variant, transformer)  # base_weights merged (before fp8); init file read
    base = accel.prepare_base(transformer, job.train, device, keep=arch.keep_high_precision)  # fp8: before adapters
    targets = TargetSpec(
        targets=tuple(job.network.targets) or arch.default_targets,
        exclude=tuple(arch.default_excludes) + tuple(job.network.exclude),
        include=tuple(job.network.include),
    )
    torch.manual_seed(job.train.seed)  # network init is part of what a seed fixes
    network = plan.hook.make_network(
        network_type=plan.network.name, model=transformer, targets=targets, options=plan.network_options
    )
    if network is None:
        raise KernError(f"no plugin built a {plan.network.name!r} network (see `kern plugins`)")
    warm_start.load_into(init, network)
    network.to(device)
    network.train()
    applied = accel.apply(transformer, job.train, device)  # checkpointing, attention, compile: after the network
    log.info("training with", **presets.summary(job, variant, base, applied))  # the run says what it does
    groups = network.optimizer_param_groups(job.train.learning_rate)
    t = job.train
    optimizer = make_optimizer(t.optimizer, groups, t.learning_rate, t.optimizer_args, t.weight_decay)
    scheduler = make_scheduler(optimizer, job.train)
    trainee = Trainee(plan, variant.name, transformer, network)
    if sharded:
        trainee = distributed.shard_base(trainee, transformer, device, find_unused=ddp.find_unused_parameters)
        optimizer, scheduler = acc.prepare(optimizer, scheduler)
    else:
        trainee, optimizer, scheduler = acc.prepare(trainee, optimizer, scheduler)
    return trainee, optimizer, scheduler


def loop(
    plan: Plan,
    acc: Any,
    trainee: nn.Module,
    optimizer: Any,
    scheduler: Any,
    pos: Position,
    data: tuple[list[Any], list[Any], str],
    checkpoints: Checkpoints,
    metrics: Metrics,
    stop: runs.StopSignals,
    make_previews: Callable[[int], None],
    validate: Callable[[Position], dict[str, float]] = lambda pos: {},
) -> None:
    """Train from ``pos`` to ``train.steps``: one cached batch per micro-step, its loss, learning rate and timesteps
    logged once per optimizer step (with the validation loss when ``validate`` gives one), the EMA updated,
    checkpoints (always at the last step) and previews when due. ``data``: the dataset's specs, its items and their
    cache id. A stop signal ends the loop after its step, with a checkpoint (``kern.errors.Interrupted``)."""
    from kern.data import batch_order, cache

    job, steps, device, base_dtype = plan.job, plan.job.train.steps, acc.device, DTYPES[plan.job.model.dtype]
    specs, items, cache_key = data
    trainee.train()
    acc.unwrap_model(trainee).transformer.eval()
    stop.deferred = True  # from here a signal ends the step, then the run, with a checkpoint
    while pos.step < steps:
        order = batch_order(items, specs, job.train.seed, pos.epoch)
        mine = order[acc.process_index :: acc.num_processes]
        if not mine:
            raise KernError(f"{job.dataset.config}: too few batches for {acc.num_processes} processes")
        while pos.batch_pos < len(mine) and pos.step < steps:
            picked = [items[i] for i in mine[pos.batch_pos]]
            batch = cache.load_batch(
                picked,
                cache_key,
                generator=pos.generator,
                caption_dropout_rate=specs[picked[0].dataset_index].caption_dropout_rate,
                layout=plan.arch.cache_layout,
            )
            pos.batch_pos += 1
            x0, text, refs = cache.batch_on(batch, device, base_dtype)
            try:
                loss, t = train_step(
                    acc, trainee, optimizer, scheduler, plan, x0, text, refs, pos.generator, base_dtype
                )
            except NonFiniteLoss as exc:
                raise KernError(
                    f"loss became {exc.value} at step {pos.step + 1} (batch {batch['keys']}); stopping. Last good "
                    f"checkpoint: {checkpoints.newest() or 'none yet'}. Lower train.learning_rate or check the data."
                ) from None
            if not acc.sync_gradients:
                continue
            pos.step += 1
            loss_value = acc.gather(loss.detach()).mean().item()
            pos.history.append(loss_value)
            if checkpoints.ema is not None:
                checkpoints.ema.update()
            metrics.log(pos.step, {"loss": loss_value, "lr": scheduler.get_last_lr()[0], "t": t, **validate(pos)})
            saved = _due(job.save.every_n_steps, pos.step, steps) or pos.step == steps  # the last step: continuable
            if saved:
                checkpoints.save(pos)
            if stop.requested_anywhere(acc):
                path = checkpoints.save(pos) if not saved else checkpoints.newest()
                raise stop.interrupted(
                    f"after step {pos.step} of {steps}; checkpoint {path}; "
                    f"continue with: kern train --config {plan.out / 'config.toml'} --resume"
                )
            if _due(job.sample.every_n_steps, pos.step, steps):
                make_previews(pos.step)
        if pos.batch_pos >= len(mine):
            pos.epoch, pos.batch_pos = pos.epoch + 1, 0
    stop.deferred = False


def _due(every: int, step: int, steps: int) -> bool:
    """Whether something done every ``every`` steps (0: never) is due after ``step``; the last step has its own."""
    return bool(every) and step % every == 0 and step < steps


def _finish(
    plan: Plan,
    acc: Any,
    network: nn.Module,
    pos: Position,
    save_adapter: Callable[[Path, int], None],
    make_previews: Callable[[int], None],
    started: float,
) -> Path:
    """The end of a run: the final adapter, the last previews, the loss plot."""
    if acc.num_processes > 1:
        _check_replicas_agree(network)
    final = plan.out / f"{plan.job.save.name}.safetensors"
    if acc.is_main_process:
        save_adapter(final, pos.step)
    make_previews(pos.step)  # after the save: a failing preview loses no training
    if acc.is_main_process:
        from kern.train.plot import loss_plot

        loss_plot(pos.history, plan.out / "loss.png", pos.validation)
        log.info(
            "training done",
            adapter=str(final),
            steps=pos.step,
            final_loss=pos.history[-1] if pos.history else None,
            seconds=round(time.time() - started, 1),
        )
    acc.wait_for_everyone()
    acc.end_training()
    if acc.num_processes > 1:
        # DDP's reducer holds the last reference to the gloo group; its destructor (GIL held) waits for gloo's worker
        # thread, which may still be freeing the last collective's tensors and need the GIL: a hang at exit, seen
        # under load. Sleeping frees the GIL so the worker can finish first.
        time.sleep(0.5)
    return final


def _make_previews(
    previews: Previews | None, acc: Any, model: nn.Module, vae: Any, folder: Path, ema: EMA | None, step: int
) -> None:
    """The preview images with the adapter in eval mode (no dropout, no draw from the training's random state) and,
    with ``train.ema_decay``, the EMA weights swapped in; the training weights and modes are exactly as before."""
    if previews is not None:
        with acc.autocast(), evaluating(model.network), ema.swapped() if ema else contextlib.nullcontext():
            previews.run(model.transformer, vae, folder, step, save=acc.is_main_process)


def _check_replicas_agree(network: nn.Module) -> None:
    """DDP keeps every process's adapter identical; a mismatch means a broken set-up, so fail loudly."""
    digest = sum(float(p.detach().double().sum()) * (i + 1) for i, p in enumerate(network.parameters()))
    digests: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise KernError(f"data-parallel processes ended with different adapter weights: {digests}")
    log.info("replicas agree", processes=len(digests), digest=digest)


# --------------------------------------------------------------------------- one step


class Trainee(nn.Module):
    """Transformer plus network as one module, so DDP syncs the network's gradients."""

    def __init__(self, plan: Plan, variant: str, transformer: nn.Module, network: nn.Module) -> None:
        super().__init__()
        self.transformer, self.network = transformer, network
        self._call = plan.hook.predict_velocity
        self._arch, self._variant = plan.arch.name, variant

    def forward(self, latents, timesteps, text, references, options):
        return self._call(
            arch=self._arch,
            variant=self._variant,
            model=self.transformer,
            latents=latents,
            timesteps=timesteps,
            text=text,
            references=references,
            options=options,
        )


class NonFiniteLoss(KernError):
    def __init__(self, value: float) -> None:
        super().__init__(f"loss became {value}")
        self.value = value


def train_step(
    acc: Any,
    trainee: nn.Module,
    optimizer: Any,
    scheduler: Any,
    plan: Plan,
    x0: torch.Tensor,
    text: dict[str, torch.Tensor],
    references: list[torch.Tensor] | None,
    generator: torch.Generator,
    base_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One flow-matching micro-step on clean latents ``x0``: sample t, noise, predict, weighted MSE to the
    velocity, backward, and (on accumulation boundaries) clip, optimizer and scheduler step.

    Returns (loss, t). t and all randomness come from the CPU ``generator`` (``draw_noise``), so runs are
    reproducible and resumable from its state alone. The loss is checked after backward and before the
    optimizer step (``NonFiniteLoss``): a NaN never reaches the weights, and the host does not wait for the
    forward before it queues the backward. The training loop and ``bench/train_step.py`` both run exactly this.
    """
    from kern.maths import timesteps

    device = x0.device
    t = plan.hook.sample_timesteps(
        arch=plan.arch.name,
        method=plan.timestep_method,
        batch_size=x0.shape[0],
        latent_shape=tuple(x0.shape[1:]),
        generator=generator,
        options=plan.timestep_options,
    )
    noise = draw_noise(x0, generator)
    t = t.to(device)
    tb = t.view(-1, *([1] * (x0.dim() - 1)))
    noisy = (1 - tb) * x0 + tb * noise
    max_grad_norm = plan.job.train.max_grad_norm
    with acc.accumulate(trainee):
        with acc.autocast():
            pred = trainee(noisy.to(base_dtype), t, text, references, {"guidance": 1.0})
        weight = timesteps.loss_weighting(plan.timestep_options.weighting_scheme, t).view_as(tb)
        loss = (weight * (pred.float() - (noise - x0)) ** 2).mean()
        acc.backward(loss)
        bad = ~torch.isfinite(loss.detach())
        if acc.num_processes > 1:  # one process's NaN is every process's after the gradient all-reduce
            bad = acc.reduce(bad.float(), reduction="sum") > 0
        if bad:
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(loss.item())
        if acc.sync_gradients and max_grad_norm > 0:
            acc.clip_grad_norm_(acc.unwrap_model(trainee).network.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, t


_device_generators: dict[torch.device, torch.Generator] = {}


def draw_noise(x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x0``, as fp32 on ``x0``'s device.

    On the CPU it is drawn from ``generator`` itself. On a GPU a device generator is re-seeded each step from
    one draw of ``generator`` and the noise is drawn there: no host-side sampling and copy per step, and the
    CPU generator's state still fixes everything (checkpoints store only it, so resume stays exact)."""
    if x0.device.type == "cpu":
        return torch.randn(x0.shape, generator=generator)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    g = _device_generators.get(x0.device)
    if g is None:
        g = _device_generators[x0.device] = torch.Generator(x0.device)
    g.manual_seed(seed)
    return torch.randn(x0.shape, generator=g, device=x0.device)
