"""Entry point of the Qwen-Image plugin: the hook implementations kern calls for ``arch == "qwen-image"``.

kern routes every architecture hook to the plugin that registered the architecture, so these answer for
Qwen-Image alone and need no ``if arch != ...`` check.
"""

from __future__ import annotations

import kern

ARCH = "qwen-image"
NUM_LAYERS = 60

# The 12 attention and MLP Linears of every block (720 modules): musubi's intended default and
# OneTrainer's preset. The per-block modulations (img_mod.1 / txt_mod.1, 3072 -> 18432) are left out
# by default; add them with [network] targets (musubi trains them in practice, see docs/adapters.md).
DEFAULT_TARGETS = (r"transformer_blocks\.\d+\.(attn|img_mlp|txt_mlp)\..*",)

# Left in the model dtype under fp8 base weights (train.base_precision = "fp8"): the embedders, every block's
# modulation (img_mod / txt_mod) and the output layers. Small and sensitive: an error there shifts every token.
KEEP_HIGH_PRECISION = (
    r"(^|\.)(img_in|txt_in|time_text_embed)(\.|$)",
    r"(^|\.)(img_mod|txt_mod)(\.|$)",
    r"(^|\.)(norm_out|proj_out)(\.|$)",
)

# musubi-tuner's cache files (its dataset/cache_io.py): "architecture" is qwen_image for every variant (ids qi, qie,
# qil); latents (16, F, h, w) with F = 1 for an image; the text as varlen_vl_embed_<dtype>, each caption's tokens
# without padding (the mask is rebuilt at load).
CACHE_NAME = "qwen_image"
CACHE_LAYOUT = kern.CacheLayout(
    text=(kern.TextCacheKey(name="ctx", key="vl_embed", mask="mask"),),
    latent_frames=True,
)
# The VLM reads the control images with the prompt; musubi's ss_base_model_version is qwen_image_edit for every Edit.
# Controls are optional: without any, the edit model generates from text alone (see encode_text, docs/training.md).
_EDIT = {"references": "optional", "text_images": True, "base_model_version": "qwen_image_edit"}
VARIANTS = (
    kern.Variant(
        name="t2i",
        aliases=("qwen-image-t2i",),
        description="Qwen-Image text-to-image (2508 and 2512)",
        steps=50,
        guidance=4.0,
        guidance_mode="cfg",
        negative_prompt=" ",
        width=1328,
        height=1328,
        cache_id="qi",
        cache_name=CACHE_NAME,
        modelspec="Qwen-Image",
        references="none",
        musubi_version="original",
    ),
    kern.Variant(
        name="edit",
        aliases=("qwen-image-edit",),
        description="Qwen-Image-Edit (2508), one control image",
        steps=50,
        guidance=4.0,
        guidance_mode="cfg",
        negative_prompt=" ",
        cache_id="qie",
        cache_name=CACHE_NAME,
        modelspec="Qwen-Image-Edit",
        **_EDIT,
    ),
    kern.Variant(
        name="edit-2509",
        aliases=("qwen-image-edit-plus", "qwen-image-edit-2509"),
        description="Qwen-Image-Edit-2509 (Edit-Plus), several control images",
        steps=40,
        guidance=4.0,
        guidance_mode="cfg",
        negative_prompt=" ",
        cache_id="qie",
        cache_name=CACHE_NAME,
        modelspec="Qwen-Image-Edit-Plus",
        **_EDIT,
    ),
    kern.Variant(
        name="edit-2511",
        aliases=("qwen-image-edit-2511",),
        description="Qwen-Image-Edit-2511 (zero_cond_t)",
        steps=40,
        guidance=4.0,
        guidance_mode="cfg",
        negative_prompt=" ",
        cache_id="qie",
        cache_name=CACHE_NAME,
        modelspec="Qwen-Image-Edit-2511",
        **_EDIT,
    ),
    kern.Variant(
        name="layered",
        aliases=("qwen-image-layered",),
        description="Qwen-Image-Layered (RGBA layers)",
        steps=50,
        guidance=4.0,
        guidance_mode="cfg",
        negative_prompt=" ",
        width=640,
        height=640,
        cache_id="qil",
        cache_name=CACHE_NAME,
        modelspec="Qwen-Image-Layered",
        base_model_version="qwen_image_layered",
        references="required",
        image_mode="RGBA",
        # musubi's multiple_target datasets: the composite, then its RGBA layers; the composite is also the
        # condition image (see predict_velocity and docs/qwen_image.md).
        multiple_targets=True,
    ),
)
DEFAULT_LAYERS = 4  # Layered: output layers besides the composite (the pipelines' default)
EDIT_VAE_AREA = 1024 * 1024  # Edit / Edit-Plus: the VAE sees each control at about this area


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
            keep_high_precision=KEEP_HIGH_PRECISION,
            timestep_method="qwen_shift",
            required_files=("transformer", "vae", "text_encoder"),
            implementation="https://github.com/QwenLM/Qwen-Image",
            cache_layout=CACHE_LAYOUT,
            musubi_script="qwen_image_train_network",
        )
    )


@kern.hookimpl
def detect_variant(arch, path):
    from kern_qwen_image import loader

    return loader.detect_variant(path)


@kern.hookimpl
def load_model(arch, variant, part, path, dtype, device, options):
    from kern_qwen_image import loader

    # The edit variants read their controls with the VLM; Layered needs the vision parts only to caption its
    # input (options["caption"], set by `kern generate --auto-caption-lang` for an empty prompt).
    need_vision = (variant or "t2i") not in ("t2i", "layered") or bool(options.get("caption"))
    return loader.load_part(part, path, variant, dtype, device, fp8=bool(options.get("fp8")), need_vision=need_vision)


def _mode(variant: str | None) -> str:
    return {"t2i": "t2i", "layered": "layered", "edit": "edit"}.get(variant or "t2i", "edit_plus")


@kern.hookimpl
def encode_text(arch, variant, encoder, prompts, options):
    mode = _mode(variant)
    if not mode.startswith("edit"):
        return encoder(list(prompts), mode=mode)
    from kern_qwen_image import edit_text

    # One list of control images per prompt; an empty list (or none at all) is a text-only prompt.
    images = options.get("images") or [[] for _ in prompts]
    if len(images) != len(prompts):
        raise kern.UsageError(f"Qwen-Image {variant}: {len(prompts)} prompts but {len(images)} control image lists")
    return edit_text.encode(encoder, list(prompts), [list(i or ()) for i in images], mode)


@kern.hookimpl
def encode_latents(arch, variant, vae, images):
    return vae.encode(images.to(dtype=next(vae.parameters()).dtype))


@kern.hookimpl
def decode_latents(arch, variant, vae, latents):
    dtype = next(vae.parameters()).dtype
    if latents.ndim == 5:  # Layered (B, frames, 16, h, w): every frame is an image
        b, f = latents.shape[:2]
        pixels = vae.decode(latents.flatten(0, 1).to(dtype=dtype))
        return pixels.unflatten(0, (b, f))
    return vae.decode(latents.to(dtype=dtype))


@kern.hookimpl
def latent_shape(arch, variant, width, height, options):
    if variant != "layered":
        return None
    layers = int(options.get("layers") or DEFAULT_LAYERS)
    if layers < 1:
        raise kern.UsageError(f"Qwen-Image-Layered: layers must be at least 1, got {layers}")
    return (layers + 1, 16, height // 8, width // 8)  # the composite first, then the layers


@kern.hookimpl
def reference_sizes(arch, variant, sizes, target):
    if variant == "t2i":
        return None
    from kern_qwen_image.geometry import calculate_dimensions

    # Layered sizes its input to the requested area (the pipelines' 640² or 1024² "resolution"); the edit
    # pipelines give the VAE every control at about 1024², whatever the output size.
    area = target[0] * target[1] if variant == "layered" else EDIT_VAE_AREA
    return [calculate_dimensions(area, w / h) for w, h in sizes]


@kern.hookimpl
def caption_image(arch, variant, encoder, image, language):
    return encoder.caption_image(image, lang=language, resolution=None)


@kern.hookimpl
def predict_velocity(arch, variant, model, latents, timesteps, text, references, options):
    import torch

    from kern_qwen_image import geometry

    dtype = next(model.parameters()).dtype
    refs = [r.to(dtype) for r in references or []]
    extra = 0 if model.params.use_additional_t_cond else None  # Layered: is_rgb = 0, as the pipelines pass
    if latents.ndim == 5:  # Layered: (B, frames, 16, h, w), the input image as the one reference
        b, frames, _, h, w = latents.shape
        if len(refs) != 1:
            raise kern.UsageError(f"Qwen-Image-Layered splits one input image; got {len(refs)}")
        cond = refs[0] if refs[0].ndim == 4 else refs[0][None]
        img = torch.cat([geometry.pack(latents.to(dtype)), geometry.pack(cond).expand(b, -1, -1)], dim=1)
        shapes = geometry.layered_img_shapes((h, w), frames - 1, tuple(cond.shape[-2:]))
        n_target = frames * (h // 2) * (w // 2)
        out = model(
            img, text["ctx"].to(dtype), text.get("mask"), timesteps.to(latents.device), shapes, additional_t_cond=extra
        )
        return geometry.unpack(out[:, :n_target], h, w, frames=frames)
    b, _, h, w = latents.shape
    img, shapes, n_target = geometry.prepare_tokens(latents.to(dtype), refs)
    out = model(
        img, text["ctx"].to(dtype), text.get("mask"), timesteps.to(latents.device), shapes, additional_t_cond=extra
    )
    return geometry.unpack(out[:, :n_target], h, w)


@kern.hookimpl
def adapter_module_map(arch, variant, layout):
    if layout != "diffusers":
        return None
    from kern_qwen_image.adapter_map import qwen_module_map

    return qwen_module_map(NUM_LAYERS)


@kern.hookimpl
def sample_timesteps(arch, method, batch_size, latent_shape, generator, options):
    from kern_qwen_image import timesteps

    return timesteps.sample(method, batch_size, latent_shape, generator, options)


@kern.hookimpl
def generation_schedule(arch, variant, steps, latent_shape, options):
    from kern_qwen_image import schedule

    h, w = latent_shape[-2:]
    tokens = (h // 2) * (w // 2)  # 2x2 patches of the 8x latent: target tokens only
    if variant == "layered":
        return schedule.layered_sigmas(steps, tokens)
    return schedule.sigmas(steps, tokens, shift=options.get("shift"))


@kern.hookimpl
def combine_guidance(arch, variant, cond, uncond, scale, options):
    from kern_qwen_image import schedule

    # Layered's pipeline defaults cfg_normalize to False; every other variant rescales.
    return schedule.true_cfg(cond, uncond, scale, normalize=bool(options.get("cfg_normalize", variant != "layered")))


@kern.hookimpl
def identify_model_file(path, shapes, metadata):
    from kern_qwen_image import identify

    return identify.identify(path, shapes, metadata)
