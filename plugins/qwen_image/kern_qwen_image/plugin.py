"""Entry point of the Qwen-Image plugin.

This release declares the architecture (names, variants, defaults, adapter targets) and its module
naming, so Qwen-Image adapters can be detected, converted and merged. The model itself (transformer,
VAE, text encoder) lands with the Qwen-Image architecture work; until then `load_model` answers
with a clear error instead of silently declining.
"""

from __future__ import annotations

import kern

ARCH = "qwen-image"
NUM_LAYERS = 60

# The 12 attention and MLP Linears of every block (720 modules): musubi's intended default and
# OneTrainer's preset. The per-block modulations (img_mod.1 / txt_mod.1, 3072 -> 18432) are left out
# by default; add them with [network] targets (musubi trains them in practice, see docs/adapters.md).
DEFAULT_TARGETS = (r"transformer_blocks\.\d+\.(attn|img_mlp|txt_mlp)\..*",)

VARIANTS = (
    kern.Variant(name="t2i", aliases=("qwen-image-t2i",), description="Qwen-Image text-to-image (2508 and 2512)",
                 steps=50, guidance=4.0, guidance_mode="cfg", negative_prompt=" ", width=1328, height=1328, cache_id="qi", modelspec="Qwen-Image"),
    kern.Variant(name="edit", aliases=("qwen-image-edit",), description="Qwen-Image-Edit (2508), one control image",
                 steps=50, guidance=4.0, guidance_mode="cfg", negative_prompt=" ", cache_id="qie", modelspec="Qwen-Image-Edit"),
    kern.Variant(name="edit-2509", aliases=("qwen-image-edit-plus", "qwen-image-edit-2509"),
                 description="Qwen-Image-Edit-2509 (Edit-Plus), several control images",
                 steps=40, guidance=4.0, guidance_mode="cfg", negative_prompt=" ", cache_id="qie", modelspec="Qwen-Image-Edit-Plus"),
    kern.Variant(name="edit-2511", aliases=("qwen-image-edit-2511",), description="Qwen-Image-Edit-2511 (zero_cond_t)",
                 steps=40, guidance=4.0, guidance_mode="cfg", negative_prompt=" ", cache_id="qie", modelspec="Qwen-Image-Edit-2511"),
    kern.Variant(name="layered", aliases=("qwen-image-layered",), description="Qwen-Image-Layered (RGBA layers)",
                 steps=50, guidance=4.0, guidance_mode="cfg", negative_prompt=" ", width=640, height=640, cache_id="qil", modelspec="Qwen-Image-Layered"),
)


@kern.hookimpl
def register_architectures(register):
    register(
        kern.Architecture(
            name=ARCH,
            aliases=("qwen_image", "qwenimage"),
            description="Qwen-Image by Qwen: T2I, Edit, Edit-Plus (2509 / 2511), Layered",
            variants=VARIANTS,
            default_variant="t2i",
            resolution_step=16,
            latent_channels=16,
            latent_downscale=8,
            default_targets=DEFAULT_TARGETS,
            timestep_method="qwen_shift",
            implementation="https://github.com/QwenLM/Qwen-Image",
        )
    )


@kern.hookimpl
def load_model(arch, variant, part, path, dtype, device, options):
    if arch != ARCH:
        return None
    raise kern.UsageError(
        "this kern-qwen-image release declares Qwen-Image for adapter detection, conversion and merging; "
        "its model code (training and generation) is not in this release yet"
    )


@kern.hookimpl
def adapter_module_map(arch, variant, layout):
    if arch != ARCH or layout != "diffusers":
        return None
    from kern_qwen_image.adapter_map import qwen_module_map

    return qwen_module_map(NUM_LAYERS)


@kern.hookimpl
def generation_schedule(arch, variant, steps, latent_shape, options):
    if arch != ARCH:
        return None
    from kern_qwen_image import schedule

    h, w = latent_shape[-2:]
    tokens = (h // 2) * (w // 2)  # 2x2 patches of the 8x latent: target tokens only
    if variant == "layered":
        return schedule.layered_sigmas(steps, tokens)
    return schedule.sigmas(steps, tokens, shift=options.get("shift"))


@kern.hookimpl
def combine_guidance(arch, variant, cond, uncond, scale, options):
    if arch != ARCH:
        return None
    from kern_qwen_image import schedule

    # Layered's pipeline defaults cfg_normalize to False; every other variant rescales.
    return schedule.true_cfg(cond, uncond, scale, normalize=bool(options.get("cfg_normalize", variant != "layered")))
