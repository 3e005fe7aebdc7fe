"""The kernel's own hook implementations, registered like a plugin and tried last.

They give every architecture the standard behaviour, which a plugin overrides by answering first.
"""

from __future__ import annotations

from typing import Any, Mapping

from kern.hookspecs import hookimpl


@hookimpl(trylast=True)
def sample_timesteps(
    arch: str, method: str, batch_size: int, latent_shape: tuple, generator: Any, options: Mapping[str, Any]
) -> Any:
    from kern.maths import timesteps

    return timesteps.sample(method, batch_size, latent_shape, generator, options)


@hookimpl(trylast=True)
def combine_guidance(arch: str, variant: str, cond: Any, uncond: Any, scale: float, options: Mapping[str, Any]) -> Any:
    return uncond + scale * (cond - uncond)
