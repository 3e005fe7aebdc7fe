"""Before any work: a job resolved into a :class:`Plan` and checked, and the set-up a run needs before its phases.

Every check here runs before a model loads or a cache is written, so a typo fails in a second, naming the key and
the job file, not after an hour of caching.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from kern.core.config import MODEL_KEYS, PATH_KEYS, JobConfig, dump_toml
from kern.core.plugins import KernPluginManager, get_manager
from kern.errors import ConfigError, UsageError
from kern.log import get_logger
from kern.records import Architecture, NetworkType, Variant, resolve_options
from kern.train.metrics import active_trackers, check_trackers
from kern.train.optim import check_optimizer, check_schedule

log = get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@attrs.define
class Plan:
    """A job with every name resolved and every plugin option checked: what the loop runs."""

    job: JobConfig
    arch: Architecture
    variant: str | None  # None: detected from the checkpoint before anything loads
    network: NetworkType
    network_options: dict[str, Any]
    timestep_method: str
    timestep_options: Any
    out: Path
    manager: KernPluginManager

    @property
    def hook(self) -> Any:
        return self.manager.hook


def prepare(job: JobConfig, manager: KernPluginManager | None = None) -> Plan:
    """Resolve architecture, variant, network type and their options; errors name the key and file."""
    from kern.maths import timesteps

    manager = manager or get_manager()
    if not job.model.arch:
        raise ConfigError(f"{job.source}: model.arch is not set; pass --arch or set [model] arch (see `kern plugins`)")
    arch, variant = manager.resolve_arch(job.model.arch)
    if job.model.variant:
        try:
            variant = arch.variant(job.model.variant).name
        except KeyError as exc:
            raise ConfigError(f"{job.source}: model.variant: {exc.args[0]}") from None
    network = manager.resolve_network(job.network.type)
    try:
        options = resolve_options(network.options, job.network.options, f"{job.source}: [network] ({network.name})")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    known = {f.name for f in attrs.fields(timesteps.TimestepOptions)}
    unknown = sorted(set(job.timesteps.options) - known)
    if unknown:
        raise ConfigError(f"{job.source}: unknown key(s) {['timesteps.' + k for k in unknown]}; known: {sorted(known)}")
    method = job.timesteps.method or arch.timestep_method
    try:
        ts_options = timesteps.TimestepOptions.from_mapping(job.timesteps.options)
    except (UsageError, TypeError, ValueError) as exc:
        raise ConfigError(f"{job.source}: [timesteps]: {exc}") from None
    if job.train.steps < 1:
        raise ConfigError(f"{job.source}: train.steps must be at least 1, got {job.train.steps}")
    _check_timesteps(manager, arch, method, ts_options, job.source)
    check_optimizer(job.train, job.source, job.given)
    check_schedule(job.train, job.source)
    check_trackers(job)
    return Plan(
        job=job,
        arch=arch,
        variant=variant,
        network=network,
        network_options=options,
        timestep_method=method,
        timestep_options=ts_options,
        out=Path(job.save.out),
        manager=manager,
    )


def _check_timesteps(manager: KernPluginManager, arch: Architecture, method: str, options: Any, source: str) -> None:
    """Draw once with the job's method and options (a pure function, no model): a typo fails now, not after caching."""
    key = "timesteps.method" if method != arch.timestep_method else f"{arch.name}'s timestep method"
    try:
        t = manager.hook.sample_timesteps(
            arch=arch.name,
            method=method,
            batch_size=2,
            latent_shape=(arch.latent_channels, 64, 64),
            generator=torch.Generator().manual_seed(0),
            options=options,
        )
    except (UsageError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {key} = {method!r}: {exc}") from None
    if t is None:
        raise ConfigError(f"{source}: {key} = {method!r}: no installed plugin samples timesteps this way")


def check_files(plan: Plan, needed: tuple[str, ...] = ("transformer", "vae", "text_encoder")) -> None:
    """Before any work: every model part among ``needed`` that the architecture requires is named (by its own key
    or by the bundle ``model.path``), and every part named is resolved to local files once (a path, a Hugging Face
    repo id fetched through its cache, a ComfyUI or diffusers folder) and identified by its keys
    (``kern.models.sources``). The job's model keys then hold the local paths. Errors name the key and the file."""
    from kern.models import sources

    job = plan.job
    given = {part: getattr(job.model, part) for part in sources.PARTS}
    wanted = [p for p in sources.PARTS if p in needed or given[p]]
    options = {part: f"{job.source}: model.{part}" for part in (*sources.PARTS, "path")}
    resolved = sources.resolve_parts(
        given, job.model.path, wanted, arch=plan.arch.name, variant=plan.variant, hook=plan.hook, options=options
    )
    for part, path in resolved.items():
        setattr(job.model, part, path)
    for part in sources.PARTS:
        if part in needed and part in plan.arch.required_files and not getattr(job.model, part):
            raise ConfigError(
                f"{job.source}: model.{part} is not set; {plan.arch.name} needs its {part.replace('_', ' ')} "
                f"(set [model] {part} or --set model.{part}=PATH, or model.path / --model to a diffusers or ComfyUI "
                "folder or a Hugging Face repo id holding it)"
            )


def check_trainable(plan: Plan, variant: Variant) -> None:
    if variant.untrainable:
        raise ConfigError(
            f"{plan.job.source}: {plan.arch.name} {variant.name} cannot be trained: {variant.untrainable}"
        )


def resolve_variant(plan: Plan) -> Variant:
    """The job's variant, or the one the transformer file says it is (read from its header, nothing loaded)."""
    if plan.variant is None and plan.job.model.transformer:
        detected = plan.hook.detect_variant(arch=plan.arch.name, path=plan.job.model.transformer)
        if detected:
            plan.variant = detected
            log.info("variant detected", arch=plan.arch.name, variant=detected, file=plan.job.model.transformer)
    return plan.arch.variant(plan.variant)


def make_accelerator(plan: Plan) -> tuple[Any, Any]:
    """The ``Accelerator`` (one process, or each of ``accelerate launch``'s) and its DDP settings, checked."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    from kern.gpu import distributed

    job = plan.job
    # Module dropout leaves whole adapters without a gradient in a step: DDP must expect unused parameters then.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=bool(plan.network_options.get("module_dropout")))
    acc = Accelerator(
        mixed_precision=job.train.mixed_precision,
        gradient_accumulation_steps=job.train.gradient_accumulation,
        cpu=job.train.device == "cpu" or not torch.cuda.is_available(),  # CPU-only: gloo DDP under torchrun
        kwargs_handlers=[ddp],
        # trackers (kern.train.metrics), started on the main process only; TensorBoard in <run>/tensorboard/<project>
        log_with=active_trackers(job) or None,  # None: accelerate warns of an empty list
        project_config=ProjectConfiguration(project_dir=str(plan.out), logging_dir=str(plan.out / "tensorboard")),
    )
    distributed.check_launch(acc)
    return acc, ddp


def write_config(plan: Plan, variant: Variant) -> None:
    """``config.toml`` in the run folder: the job as resolved, with absolute paths, so it reruns from anywhere."""
    from kern.core.io import write_text

    resolved = plan.job.to_dict()
    resolved["model"]["variant"] = variant.name
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = resolved.get(section, {}).get(key)
        if value and (dotted not in MODEL_KEYS or Path(value).expanduser().exists()):  # a repo id stays one
            resolved[section][key] = str(Path(value).expanduser().resolve())
    write_text(plan.out / "config.toml", dump_toml(resolved))
