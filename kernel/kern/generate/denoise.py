"""The denoising loop shared by ``kern generate`` and the training driver's sample images.

Pure orchestration over hooks: the schedule comes from ``generation_schedule``, the velocity from
``predict_velocity``; the guidance mode of the variant decides one or two forwards per step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from kern.records import Variant


def euler_denoise(
    hook: Any,
    arch: str,
    variant: Variant,
    model: Any,
    text: Mapping[str, torch.Tensor],
    noise: torch.Tensor,
    steps: int,
    guidance: float,
    negative_text: Mapping[str, torch.Tensor] | None = None,
    references: list[torch.Tensor] | None = None,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    options: Mapping[str, Any] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Denoise ``noise`` (B, C, h, w) with Euler steps on the flow ODE; return the clean latents (float32).

    Draw the noise on the CPU with ``seeded_noise`` so the same seed gives the same image on any device.
    ``guidance_mode`` "embedded" passes ``guidance`` to the model, "cfg" combines a conditional and
    an unconditional forward (``negative_text``) through the ``combine_guidance`` hook when ``g != 1``.
    """
    options = dict(options or {})
    sigmas = hook.generation_schedule(
        arch=arch, variant=variant.name, steps=steps, latent_shape=tuple(noise.shape[1:]), options=options
    )
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    x = noise.to(device=device, dtype=torch.float32)
    batch = noise.shape[0]
    use_cfg = variant.guidance_mode == "cfg" and guidance != 1.0 and negative_text is not None
    call_options = {**options, "guidance": guidance if variant.guidance_mode == "embedded" else None}

    def velocity(cond: Mapping[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        v = hook.predict_velocity(
            arch=arch,
            variant=variant.name,
            model=model,
            latents=x.to(dtype),
            timesteps=t,
            text=cond,
            references=references,
            options=call_options,
        )
        return v.float()

    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            t = sigmas[i].expand(batch).to(device)
            v = velocity(text, t)
            if use_cfg:
                v_uncond = velocity(negative_text, t)
                v = hook.combine_guidance(
                    arch=arch, variant=variant.name, cond=v, uncond=v_uncond, scale=guidance, options=options
                )
            x = x + (sigmas[i + 1] - sigmas[i]).to(device) * v
            if on_step is not None:
                on_step(i)
    return x


def seeded_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One (C, h, w) noise tensor per seed, stacked: image i depends only on its own seed."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=torch.float32) for s in seeds]
    )


def to_pil(images: torch.Tensor) -> list[Any]:
    """Images in [-1, 1] (B, 3, H, W) to Pillow RGB images; (B, 4, H, W) to RGBA."""
    from PIL import Image

    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p, mode="RGBA" if p.shape[-1] == 4 else "RGB") for p in pixels]
