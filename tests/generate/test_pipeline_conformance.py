"""kern's denoising loop against the diffusers pipelines' loops, end to end, on the same random weights, noise and
text embeddings (fp32, CPU): FLUX.2 klein (distilled, no guidance), FLUX.2 dev (embedded guidance) and Qwen-Image
T2I (true CFG with the norm rescale). This checks together what the unit tests check apart: schedule (mu from the
token count, Qwen's terminal stretch), timestep convention, Euler update, packing and guidance."""

from __future__ import annotations

import pytest
import torch
from kern.core.plugins import get_manager
from kern.generate.denoise import euler_denoise

diffusers = pytest.importorskip("diffusers")


def _final_latents(pipe, **kwargs) -> torch.Tensor:
    """The pipeline's packed latents after its last step (before any decoding or un-normalising)."""
    seen = {}

    def grab(pipeline, i, t, tensors):
        seen["latents"] = tensors["latents"]
        return tensors

    pipe.set_progress_bar_config(disable=True)
    pipe(output_type="latent", callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"], **kwargs)
    return seen["latents"]


def _scheduler(**config):
    return diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential", **config)


@pytest.mark.parametrize("variant", ["klein-4b", "dev"])
def test_flux2_loop_equals_the_diffusers_pipeline(variant):
    from kern_flux2 import geometry
    from kern_flux2.params import tiny_params

    from tests.flux2.test_transformer import pair

    torch.manual_seed(0)
    dev = variant == "dev"
    ours, theirs = pair(tiny_params(guidance_embed=dev), seed=3)
    # The FLUX.2 pipelines undo the latents' BatchNorm after the loop; a narrow VAE supplies those statistics only.
    vae = diffusers.AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    scheduler = _scheduler(base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    if dev:
        pipe = diffusers.Flux2Pipeline(
            scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=theirs
        )
    else:
        pipe = diffusers.Flux2KleinPipeline(
            scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=theirs, is_distilled=True
        )
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 24, ours.params.context_in_dim, generator=g)
    noise = torch.randn(1, ours.params.in_channels, 6, 8, generator=g)  # 96 x 128 pixels
    steps, guidance = 4, 3.5

    manager = get_manager()
    arch, _ = manager.resolve_arch("flux2")
    mine = euler_denoise(manager.hook, "flux2", arch.variant(variant), ours, {"ctx": ctx}, noise, steps, guidance)
    kwargs = {"guidance_scale": guidance} if dev else {}
    # The FLUX.2 pipelines take the noise unpacked (B, 128, h, w) and pack it themselves.
    theirs_out = _final_latents(
        pipe, prompt_embeds=ctx, latents=noise, height=96, width=128, num_inference_steps=steps, **kwargs
    )
    torch.testing.assert_close(geometry.pack(mine), theirs_out, rtol=1e-4, atol=1e-5)


def test_qwen_image_true_cfg_loop_equals_the_diffusers_pipeline():
    from kern_qwen_image import geometry
    from kern_qwen_image.params import tiny_params

    from tests.qwen_image.test_transformer import pair

    ours, theirs = pair(tiny_params(), seed=3)
    ours.variant = "t2i"
    scheduler = _scheduler(
        base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift=1.0, shift_terminal=0.02
    )
    pipe = diffusers.QwenImagePipeline(
        scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=theirs
    )
    g = torch.Generator().manual_seed(1)
    dim = ours.params.joint_attention_dim
    cond, uncond = torch.randn(1, 12, dim, generator=g), torch.randn(1, 5, dim, generator=g)
    noise = torch.randn(1, 16, 8, 12, generator=g)  # 64 x 96 pixels
    steps, scale = 5, 4.0

    manager = get_manager()
    arch, _ = manager.resolve_arch("qwen-image")
    ones = lambda t: torch.ones(t.shape[:2], dtype=torch.long)  # noqa: E731
    mine = euler_denoise(
        manager.hook,
        "qwen-image",
        arch.variant("t2i"),
        ours,
        {"ctx": cond, "mask": ones(cond)},
        noise,
        steps,
        scale,
        negative_text={"ctx": uncond, "mask": ones(uncond)},
    )
    theirs_out = _final_latents(
        pipe,
        prompt_embeds=cond,
        prompt_embeds_mask=ones(cond),
        negative_prompt_embeds=uncond,
        negative_prompt_embeds_mask=ones(uncond),
        true_cfg_scale=scale,
        latents=geometry.pack(noise),
        height=64,
        width=96,
        num_inference_steps=steps,
    )
    torch.testing.assert_close(geometry.pack(mine), theirs_out, rtol=1e-4, atol=1e-5)


def test_qwen_image_edit_2511_generation_equals_the_edit_plus_pipeline(tmp_path):
    """`kern generate --arch qwen-image-edit-2511 --ref control.png` against ``QwenImageEditPlusPipeline`` on the
    same tiny weights (files written once, loaded by both), the same text embeddings and noise: the control goes
    through the VAE at the pipelines' 1024² area, follows the target tokens with its own RoPE frame, is modulated
    at t = 0 (2511's ``zero_cond_t``), and true CFG combines the two passes. (The text encoding with images is
    checked against ``encode_prompt`` in tests/qwen_image/test_text_encoder.py; here both sides get embeddings.)"""
    from kern.core.io import load_file
    from kern.data.prompts import Request
    from kern.generate.driver import Generator, Setup
    from kern_qwen_image import geometry, tiny
    from kern_qwen_image.params import tiny_params
    from kern_qwen_image.vae import tiny_vae_params
    from PIL import Image

    from tests.qwen_image.test_transformer import diffusers_model
    from tests.qwen_image.test_vae import diffusers_vae

    transformer = tiny.write_transformer(tmp_path / "qwen-image-edit-2511-tiny.safetensors", variant="edit-2511")
    vae_file = tiny.write_vae(tmp_path / "vae.safetensors")
    theirs = diffusers_model(tiny_params(joint_attention_dim=tiny.TE_HIDDEN, zero_cond_t=True)).eval()
    theirs.load_state_dict(load_file(transformer)[0], strict=True)
    vae = diffusers_vae(tiny_vae_params()).eval()
    vae.load_state_dict(load_file(vae_file)[0], strict=True)
    scheduler = _scheduler(
        base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift=1.0, shift_terminal=0.02
    )
    pipe = diffusers.QwenImageEditPlusPipeline(
        scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, processor=None, transformer=theirs
    )

    # 1024 x 1024: the edit pipelines' VAE size already, so neither side resizes (their resize and kern's
    # cover-crop differ by design for other sizes).
    control = tmp_path / "control.png"
    g = torch.Generator().manual_seed(5)
    Image.fromarray((torch.rand(8, 8, 3, generator=g) * 255).byte().numpy()).resize((1024, 1024), Image.BILINEAR).save(
        control
    )
    cond, uncond = torch.randn(1, 12, tiny.TE_HIDDEN, generator=g), torch.randn(1, 6, tiny.TE_HIDDEN, generator=g)
    ones = lambda t: torch.ones(t.shape[:2], dtype=torch.long)  # noqa: E731
    steps, scale, size = 3, 4.0, 64

    gen = Generator(
        Setup(
            arch="qwen-image",
            transformer=str(transformer),
            vae=str(vae_file),
            dtype="float32",
            device="cpu",
            references=[str(control)],
            width=size,
            height=size,
            steps=steps,
            guidance=scale,
            seed=11,
        )
    )
    (image,) = gen.plan([Request(prompt="p")])
    assert gen.variant.name == "edit-2511" and image.reference_sizes == ((1024, 1024),)
    texts = {
        gen._text_key("p", image): {"ctx": cond, "mask": ones(cond)},
        gen._text_key(gen.variant.negative_prompt, image): {"ctx": uncond, "mask": ones(uncond)},
    }
    gen.denoise([image], texts, references=gen.encode_references([image]))

    from kern.generate.denoise import seeded_noise

    noise = seeded_noise([11], (16, size // 8, size // 8))
    theirs_out = _final_latents(
        pipe,
        image=[Image.open(control).convert("RGB")],
        prompt_embeds=cond,
        prompt_embeds_mask=ones(cond),
        negative_prompt_embeds=uncond,
        negative_prompt_embeds_mask=ones(uncond),
        true_cfg_scale=scale,
        latents=geometry.pack(noise),
        height=size,
        width=size,
        num_inference_steps=steps,
    )
    torch.testing.assert_close(geometry.pack(image.latents[None]), theirs_out, rtol=1e-4, atol=1e-4)
