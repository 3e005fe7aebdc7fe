"""The hooks kern calls for the "toy" architecture.

kern calls a hook that takes ``arch`` only on the plugin that registered that architecture, so each hook here
is written for "toy" alone, with no check of ``arch``.
"""

from __future__ import annotations

import hashlib

import kern
import torch
import torch.nn.functional as F

from kern_toy.model import ToyTransformer

ARCH = "toy"
TEXT_DIM, TEXT_LEN, CHANNELS, STEP = 16, 8, 4, 8


@kern.hookimpl
def register_architectures(register):
    register(
        kern.Architecture(
            name=ARCH,
            aliases=("toy-dit",),
            description="A tiny diffusion transformer (example plugin)",
            variants=(kern.Variant(name="base", steps=8, guidance=1.0, guidance_mode="none", width=64, height=64),),
            resolution_step=STEP,
            latent_downscale=STEP,
            latent_channels=CHANNELS,
            default_targets=(r"blocks\.\d+\.(qkv|proj|mlp\.0|mlp\.2)",),
            # With fp8 base weights (train.base_precision = "fp8") the embedders stay in the model dtype.
            keep_high_precision=(r"(^|\.)(img_in|txt_in|time_in)(\.|$)",),
            timestep_method="uniform",
        )
    )


@kern.hookimpl
def load_model(arch, variant, part, path, dtype, device, options):
    if part == "transformer":
        with torch.random.fork_rng():  # without a checkpoint, the same fixed random weights every time
            torch.manual_seed(0)
            model = ToyTransformer(channels=CHANNELS, text_dim=TEXT_DIM)
        if path:
            from kern.core.io import load_file

            state, _ = load_file(path)
            model.load_state_dict(state)
        model.variant = "base"
        return model.to(device=device, dtype=dtype)
    return part  # the toy VAE and text encoder are parameter-free functions below


@kern.hookimpl
def encode_text(arch, variant, encoder, prompts, options):
    # A deterministic "text encoder": each word hashed to a fixed random vector.
    out = torch.zeros(len(prompts), TEXT_LEN, TEXT_DIM)
    for i, prompt in enumerate(prompts):
        for j, word in enumerate(prompt.split()[:TEXT_LEN]):
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
            out[i, j] = torch.randn(TEXT_DIM, generator=torch.Generator().manual_seed(seed))
    return {"ctx": out}


@kern.hookimpl
def encode_latents(arch, variant, vae, images):
    # "VAE": 8x8 average pooling of RGB plus a brightness channel, scaled to unit range.
    pooled = F.avg_pool2d(images, STEP)
    return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1) * 2.0


@kern.hookimpl
def decode_latents(arch, variant, vae, latents):
    return F.interpolate(latents[:, :3] / 2.0, scale_factor=STEP, mode="nearest").clamp(-1, 1)


@kern.hookimpl
def predict_velocity(arch, variant, model, latents, timesteps, text, references, options):
    return model(latents, timesteps, text["ctx"].to(latents.dtype))


@kern.hookimpl
def generation_schedule(arch, variant, steps, latent_shape, options):
    return torch.linspace(1.0, 0.0, steps + 1)
