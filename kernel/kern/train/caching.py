"""The caching phases of a run, and ``kern cache``: every caption and image encoded once, before training.

1. text: load the text encoder, fill the text cache (and encode the preview prompts), free it;
2. latents: load the VAE, fill the latent cache (the VAE stays on the CPU for the preview images).

One model at a time, freed before the next loads, so peak memory is the largest single model, not their sum.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kern.core.config import JobConfig
from kern.errors import UsageError
from kern.log import get_logger
from kern.records import Variant
from kern.train.setup import DTYPES, Plan, check_files, check_trainable, prepare, resolve_variant

log = get_logger(__name__)


def release_memory() -> None:
    """Return freed model memory to the system/driver (call after dropping the last reference)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _abs(path: str | None) -> str:
    """A model path as the cache fingerprint sees it: the same file named two ways is one setting."""
    return str(Path(path).resolve()) if path else ""


def cache_id(plan: Plan, variant: Variant) -> str:
    return variant.cache_id or f"{plan.arch.name}-{variant.name}"


def cache_name(plan: Plan, variant: Variant) -> str:
    """The ``architecture`` written in (and expected of) the variant's cache files."""
    return variant.cache_name or cache_id(plan, variant)


def load_items(plan: Plan) -> tuple[list[Any], list[Any]]:
    """The dataset's specs and items: every image probed and every caption read (no model yet)."""
    import kern.data as data
    from kern.core.io import remove_orphans
    from kern.data import targets

    job = plan.job
    if not job.dataset.config:
        raise UsageError(f"{job.source}: dataset.config is not set; pass --dataset dataset.toml")
    specs = data.load_dataset_config(job.dataset.config)
    targets.check_variant(specs, plan.arch.name, plan.arch.variant(plan.variant), job.source)
    items = data.scan_items(specs, plan.arch.resolution_step)
    for folder in sorted({s.cache_directory for s in specs}):  # shared folders: only temp files over an hour old
        remove_orphans(folder)
    log.info("dataset", items=len(items), datasets=len(specs))
    return specs, items


def text_phase(
    plan: Plan,
    variant: Variant,
    items: list[Any],
    device: Any,
    with_encoder: Callable[[Any], None] | None = None,
    write: bool = True,
    caption_dropout: bool = False,
) -> int:
    """Fill the text cache (when ``write``) and call ``with_encoder(encoder)`` (the preview prompts' encoding),
    loading the text encoder only when something is to be encoded, and freeing it afterwards.

    Returns the number of items encoded. For a variant whose text encoder reads the control images
    (``Variant.text_images``), each item is encoded with its controls (an item without any: text-only), and with ``caption_dropout`` its
    empty caption too (with the same controls).
    """
    from kern.data import cache
    from kern.data.images import open_picture

    job, hook = plan.job, plan.hook
    settings = {
        "text_encoder": _abs(job.model.text_encoder),
        "dtype": job.model.dtype,
        "fp8": job.model.fp8_text_encoder,
    }
    if variant.text_images:
        _log_text_only(variant, items)
    loaded: list[Any] = []

    def encoder() -> Any:
        if not loaded:
            loaded.append(
                hook.load_model(
                    arch=plan.arch.name,
                    variant=variant.name,
                    part="text_encoder",
                    path=job.model.text_encoder,
                    dtype=DTYPES[job.model.dtype],
                    device=device,
                    options={"fp8": job.model.fp8_text_encoder},
                )
            )
        return loaded[0]

    def encode(prompts: list[str], images: list[list[Any]] | None = None) -> dict[str, torch.Tensor]:
        options = {"images": images} if images is not None else {}
        with torch.no_grad():
            result = hook.encode_text(
                arch=plan.arch.name, variant=variant.name, encoder=encoder(), prompts=prompts, options=options
            )
        return {k: v.detach().to("cpu") for k, v in result.items()}

    encoded = 0
    if write:
        controls = (lambda item: [open_picture(p) for p in item.control_paths]) if variant.text_images else None
        encoded = cache.ensure_text_cache(
            items,
            cache_id(plan, variant),
            encode,
            settings=settings,
            arch_name=cache_name(plan, variant),
            images=controls,
            caption_dropout=caption_dropout,
            layout=plan.arch.cache_layout,
        )
        log.info("text cache ready", encoded=encoded, reused=len(items) - encoded)
    if with_encoder is not None:
        with_encoder(encoder())
    loaded.clear()  # the last reference: the encoder's memory goes back before the next phase loads
    release_memory()
    return encoded


def _log_text_only(variant: Variant, items: list[Any]) -> None:
    """Items without control images train an edit variant text-only (docs/training.md): say how many."""
    text_only = [i for i in items if not i.control_paths]
    if text_only:
        log.info(
            "items without control images: trained text-only, as the edit model generates without references",
            variant=variant.name,
            items=len(text_only),
            of=len(items),
            first=str(text_only[0].image_path),
        )


def latent_phase(plan: Plan, variant: Variant, items: list[Any], device: Any, write: bool = True):
    """Load the VAE and fill the latent cache; return (number encoded, the VAE moved to the CPU)."""
    from kern.data import cache

    job, hook = plan.job, plan.hook
    vae = hook.load_model(
        arch=plan.arch.name,
        variant=variant.name,
        part="vae",
        path=job.model.vae,
        dtype=torch.float32,
        device=device,
        options={},
    )
    encoded = 0
    if write:

        def encode(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return hook.encode_latents(
                    arch=plan.arch.name, variant=variant.name, vae=vae, images=images.to(device)
                ).cpu()

        encoded = cache.ensure_latent_cache(
            items,
            cache_id(plan, variant),
            encode,
            dtype=torch.float32,
            settings={"vae": _abs(job.model.vae)},
            arch_name=cache_name(plan, variant),
            layout=plan.arch.cache_layout,
            grid=(plan.arch.latent_channels, plan.arch.latent_downscale),
            mode=variant.image_mode,
        )
        log.info("latent cache ready", encoded=encoded, reused=len(items) - encoded)
    if isinstance(vae, nn.Module):
        vae = vae.to("cpu")
    return encoded, vae


def cache_only(job: JobConfig, text: bool = True, latents: bool = True) -> dict[str, tuple[int, int]]:
    """``kern cache``: fill the caches a training run would, without training."""
    plan = prepare(job)
    check_files(plan, (("text_encoder",) if text else ()) + (("vae",) if latents else ()))
    variant = resolve_variant(plan)
    check_trainable(plan, variant)
    specs, items = load_items(plan)
    from kern.train.validation import hold_out

    train, held = hold_out(plan, specs, items)
    items = [*train, *held.items]  # the validation items are cached with the training ones
    device = torch.device(job.train.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = {}
    if text:
        out["text"] = (
            text_phase(plan, variant, items, device, caption_dropout=any(s.caption_dropout_rate > 0 for s in specs)),
            len(items),
        )
    if latents:
        out["latents"] = (latent_phase(plan, variant, items, device)[0], len(items))
    return out
