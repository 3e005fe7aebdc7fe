"""The training driver: a job config in, an adapter (and checkpoints, samples, logs) out.

It asks hooks for everything architecture- or network-specific and never names either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import structlog

from kern.config import JobConfig
from kern.errors import ConfigError, UsageError
from kern.plugins import KernPluginManager, get_manager
from kern.records import Architecture, NetworkType, resolve_options

log = structlog.get_logger(__name__)


@attrs.define
class Plan:
    """A job with every name resolved and every plugin option checked: what the loop runs."""

    job: JobConfig
    arch: Architecture
    variant: str | None  # None: detected from the checkpoint when the model loads
    network: NetworkType
    network_options: dict[str, Any]
    timestep_method: str
    out: Path


def prepare(job: JobConfig, manager: KernPluginManager | None = None) -> Plan:
    """Resolve architecture, variant, network type and their options; errors name the key and file."""
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
    return Plan(
        job=job,
        arch=arch,
        variant=variant,
        network=network,
        network_options=options,
        timestep_method=job.timesteps.method or arch.timestep_method,
        out=Path(job.save.out),
    )


def run(job: JobConfig, resume: bool = False) -> Path:
    """Train as ``job`` says; return the path of the final adapter."""
    plan = prepare(job)
    log.info("training", arch=plan.arch.name, variant=plan.variant, network=plan.network.name, out=str(plan.out))
    if not job.dataset.config:
        raise UsageError(f"{job.source}: dataset.config is not set; pass --dataset dataset.toml")
    raise UsageError("the training loop is not installed in this build")
