"""Preview images during training: the job's ``[sample]`` section (its name and keys kept for the user), made with
the models the run holds. Not to be confused with sampling timesteps or a denoising sampler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kern.errors import UsageError
from kern.records import Variant
from kern.train.setup import DTYPES, Plan


class Previews:
    """The ``[sample]`` images of a run, made by ``kern.generate.driver.Generator`` with the models the run holds.

    Preview prompts are prompt lines (``--w --h --d --s --g --n --ci``) from ``sample.prompts`` and the lines of
    ``sample.prompt_file`` (``kern generate --from-file``'s syntax), with ``__name__`` wildcards from the
    ``sample.wildcards`` folder: parsed, expanded and checked when the run starts (an error names the job key or
    ``file:line``), encoded while the text encoder is loaded for the cache, and denoised with the training
    transformer (adapters active) whenever previews are due. Wildcards are expanded once, seeded by each image's
    seed (``sample.seed``, or the line's ``--d``), so every step's previews show the same prompts.
    """

    def __init__(self, plan: Plan, variant: Variant, device: Any, dtype: torch.dtype) -> None:
        # The generation driver, a sideways import between the two drivers: only when a run has previews.
        from kern.data.prompts import parse_line, read_prompt_file
        from kern.generate.driver import Generator, Setup

        job = plan.job
        s = job.sample
        if s.wildcards and not Path(s.wildcards).is_dir():
            raise UsageError(
                f"{job.source}: sample.wildcards = {s.wildcards}: no such folder; name the folder that holds the"
                " NAME.txt wildcard files"
            )
        names = {v: k for k, v in DTYPES.items()}
        setup = Setup(
            arch=plan.arch.name,
            variant=variant.name,
            vae=job.model.vae,
            text_encoder=job.model.text_encoder,
            dtype=names[dtype],
            device=str(device),
            width=s.width,
            height=s.height,
            steps=s.steps,
            guidance=s.guidance,
            seed=s.seed,
            fp8_text_encoder=job.model.fp8_text_encoder,
            wildcards=s.wildcards,
        )
        self.generator = Generator(setup, plan.manager)
        requests = [parse_line(p, f"{job.source}: sample.prompts[{i}]") for i, p in enumerate(job.sample.prompts)]
        if s.prompt_file:
            requests += read_prompt_file(s.prompt_file)  # the same reader as kern generate --from-file
        self.images = self.generator.plan([r for r in requests if r is not None])  # wildcards expanded here, once
        self.texts: dict[Any, Any] = {}
        self.references: dict[Any, Any] | None = None

    def to(self, device: Any) -> Previews:
        """Denoise on ``device`` (the prompts are parsed before the device is known)."""
        self.generator.device = device
        return self

    def encode(self, encoder: Any) -> None:
        self.generator.text_encoder = encoder
        self.texts = self.generator.encode(self.images)
        self.generator.text_encoder = None

    def run(self, transformer: nn.Module, vae: Any, folder: Path, step: int, save: bool = True) -> list[Path]:
        """Denoise every preview with ``transformer`` and, when ``save``, decode and write them."""
        gen = self.generator
        gen.setup.out = folder
        gen.transformer, gen.vae = transformer, vae.to(gen.device) if isinstance(vae, nn.Module) else vae
        try:
            if self.references is None:
                self.references = gen.encode_references(self.images)
            gen.denoise(self.images, self.texts, references=self.references)
            if not save:
                return []
            return gen.decode_and_save(
                self.images,
                name=lambda im, layer: (
                    f"step-{step:06d}_{im.index:02d}" + (f"_layer{layer}" if layer is not None else "")
                ),
            )
        finally:
            if isinstance(vae, nn.Module):
                vae.to("cpu")
            gen.transformer = gen.vae = None
