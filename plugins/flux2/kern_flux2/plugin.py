"""Entry point of the FLUX.2 plugin: the hook implementations kern calls for ``arch == "flux2"``.

kern routes every architecture hook to the plugin that registered the architecture, so these answer for
FLUX.2 alone and need no ``if arch != ...`` check.
"""

from __future__ import annotations

import kern
import torch

ARCH = "flux2"

# Every Linear of the double and single blocks (160 modules on dev, 112 on klein 9B, 80 on klein 4B).
# The three shared modulations, embedders and final layer live outside the blocks and stay frozen.
DEFAULT_TARGETS = (
    r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)",
    r"double_blocks\.\d+\.(img|txt)_mlp\.(0|2)",
    r"single_blocks\.\d+\.linear(1|2)",
)

# Left in the model dtype under fp8 base weights (train.base_precision = "fp8"): the embedders, the shared
# modulations (double/single stream, the final layer's adaLN) and the final layer. Small (a few percent of the
# bytes) and sensitive: an error there shifts every token of every block.
KEEP_HIGH_PRECISION = (
    r"(^|\.)(img_in|txt_in|time_in|guidance_in)(\.|$)",
    r"modulation",
    r"(^|\.)final_layer(\.|$)",
)

# musubi-tuner's cache files (its dataset/cache_io.py): the text context as ctx_vec_<dtype> (512 tokens, fixed).
# Base and distilled klein of one size share an id (f2k4b / f2k9b) and so their caches, as in musubi.
CACHE_LAYOUT = kern.CacheLayout(text=(kern.TextCacheKey(name="ctx", key="ctx_vec"),))

VARIANTS = (
    kern.Variant(
        name="dev",
        aliases=("flux2-dev",),
        description="FLUX.2 [dev] 32B, guidance-distilled",
        steps=50,
        guidance=4.0,
        guidance_mode="embedded",
        cache_id="f2d",
        cache_name="flux_2_dev",
        modelspec="Flux.2-dev",
    ),
    kern.Variant(
        name="klein-4b",
        aliases=("flux2-klein-4b",),
        description="FLUX.2 [klein] 4B, step-distilled",
        steps=4,
        guidance=1.0,
        guidance_mode="none",
        cache_id="f2k4b",
        cache_name="flux_2_klein_4b",
        modelspec="Flux.2-klein-4b",
    ),
    kern.Variant(
        name="klein-9b",
        aliases=("flux2-klein-9b",),
        description="FLUX.2 [klein] 9B, step-distilled",
        steps=4,
        guidance=1.0,
        guidance_mode="none",
        cache_id="f2k9b",
        cache_name="flux_2_klein_9b",
        modelspec="Flux.2-klein-9b",
    ),
    kern.Variant(
        name="klein-base-4b",
        aliases=("flux2-klein-base-4b",),
        description="FLUX.2 [klein] base 4B, undistilled",
        steps=50,
        guidance=4.0,
        guidance_mode="cfg",
        cache_id="f2k4b",
        cache_name="flux_2_klein_4b",
        modelspec="Flux.2-klein-4b",
    ),
    kern.Variant(
        name="klein-base-9b",
        aliases=("flux2-klein-base-9b",),
        description="FLUX.2 [klein] base 9B, undistilled",
        steps=50,
        guidance=4.0,
        guidance_mode="cfg",
        cache_id="f2k9b",
        cache_name="flux_2_klein_9b",
        modelspec="Flux.2-klein-9b",
    ),
)


@kern.hookimpl
def register_architectures(register):
    register(
        kern.Architecture(
            name=ARCH,
            aliases=("flux.2", "flux-2"),
            description="FLUX.2 by Black Forest Labs: dev and klein 4B/9B, base and distilled",
            variants=VARIANTS,
            default_variant="dev",
            resolution_step=16,
            latent_channels=128,
            latent_downscale=16,  # 8x VAE, then 2x2 patchify into channels
            default_targets=DEFAULT_TARGETS,
            keep_high_precision=KEEP_HIGH_PRECISION,
            timestep_method="flux2_shift",
            required_files=("transformer", "vae", "text_encoder"),
            implementation="https://github.com/black-forest-labs/flux2",
            cache_layout=CACHE_LAYOUT,
            musubi_script="flux_2_train_network",
        )
    )


@kern.hookimpl
def load_model(arch, variant, part, path, dtype, device, options):
    from kern_flux2 import loader

    return loader.load_part(part, path, variant, dtype, device, fp8=bool(options.get("fp8")))


@kern.hookimpl
def detect_variant(arch, path):
    from kern_flux2 import loader

    return loader.detect_variant(path)


@kern.hookimpl
def encode_text(arch, variant, encoder, prompts, options):
    return encoder(list(prompts))


@kern.hookimpl
def encode_latents(arch, variant, vae, images):
    return vae.encode(images.to(dtype=next(vae.parameters()).dtype))


@kern.hookimpl
def decode_latents(arch, variant, vae, latents):
    return vae.decode(latents.to(dtype=next(vae.parameters()).dtype))


@kern.hookimpl
def predict_velocity(arch, variant, model, latents, timesteps, text, references, options):
    from kern_flux2 import geometry

    b, _, h, w = latents.shape
    dtype = next(model.parameters()).dtype
    img, img_ids, n_target = geometry.prepare_tokens(latents.to(dtype), [r.to(dtype) for r in references or []])
    txt = text["ctx"].to(dtype)
    txt_ids = geometry.text_ids(txt.shape[1])
    guidance = None
    if getattr(model, "params", None) is not None and model.params.guidance_embed:
        g = options.get("guidance")
        guidance = torch.full((b,), 1.0 if g is None else float(g), device=latents.device)
    out = model(
        img, img_ids.to(latents.device), txt, txt_ids.to(latents.device), timesteps.to(latents.device), guidance
    )
    return geometry.unpack(out[:, :n_target], h, w)


@kern.hookimpl
def generation_schedule(arch, variant, steps, latent_shape, options):
    from kern_flux2 import schedule

    h, w = latent_shape[-2:]
    return schedule.sigmas(steps, h * w, shift=options.get("shift"))


@kern.hookimpl
def sample_timesteps(arch, method, batch_size, latent_shape, generator, options):
    from kern_flux2 import timesteps

    return timesteps.sample(method, batch_size, latent_shape, generator, options)


@kern.hookimpl
def adapter_module_map(arch, variant, layout):
    if layout != "diffusers":
        return None
    from kern_flux2.adapter_map import flux2_module_map
    from kern_flux2.params import PARAMS_BY_VARIANT

    p = PARAMS_BY_VARIANT[variant or "dev"]
    return flux2_module_map(p.depth, p.depth_single, p.hidden_size)


# The official preprocessing caps references at 2024² pixels for one image and 1024² each for several.
REFERENCE_AREA_ONE, REFERENCE_AREA_MANY = 2024 * 2024, 1024 * 1024


@kern.hookimpl
def reference_sizes(arch, variant, sizes):
    cap = REFERENCE_AREA_ONE if len(sizes) == 1 else REFERENCE_AREA_MANY
    out = []
    for w, h in sizes:
        scale = min(1.0, (cap / (w * h)) ** 0.5)
        out.append((max(16, int(w * scale) // 16 * 16), max(16, int(h * scale) // 16 * 16)))
    return out


@kern.hookimpl
def identify_model_file(path, shapes, metadata):
    from kern_flux2 import identify

    return identify.identify(path, shapes, metadata)
