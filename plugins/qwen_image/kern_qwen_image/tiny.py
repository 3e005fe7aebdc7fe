"""A tiny Qwen-Image bundle in the real file formats, for the demo and the tests.

``python -m kern_qwen_image.tiny DIR`` writes, deterministically from seeds:

* ``DIR/qwen-image-tiny.safetensors`` — a T2I transformer in diffusers naming (Qwen-Image's own), with the
  ``kern.axes_dim`` metadata a head_dim other than 128 needs, and ``kern.variant = "t2i"``;
* ``DIR/vae.safetensors`` — a narrow Wan-style VAE in diffusers naming (real 8x downscale, 16 latent channels),
  calibrated so that its latents, after the real per-channel ``latents_mean`` / ``latents_std`` normalisation,
  have about zero mean and unit variance on smooth images;
* ``DIR/text_encoder/`` — a tiny Qwen2.5-VL (text width ``TE_HIDDEN``, 2 layers, a 2-block vision tower with
  the real 14-px patches and 2x2 merge) with a byte-level BPE tokenizer carrying the Qwen chat special tokens
  (trained on the prompt templates, so that, as with the real tokenizer, the T2I / Edit template prefixes are
  exactly 34 / 64 tokens) and a Qwen2-VL image processor (so the edit modes load too).

Everything loads through the same code paths as the official checkpoints; only the sizes differ.
``tokenizer``, ``te_config`` and ``write_text_encoder`` are the text-encoder construction that
tests/qwen_image/test_text_encoder.py builds inline (it could import them from here).
"""

from __future__ import annotations

from pathlib import Path

import torch
from kern.models.tiny import (
    build_bundle,
    bundle_main,
    byte_level_bpe,
    gains_near_one,
    save_seeded_pretrained,
    smooth_images,
    write_random_model,
)

TE_HIDDEN = 32  # the transformer's joint_attention_dim
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2.5-VL), followed by byte-level mapping.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
PROMPTS = [
    "a red fox jumping over the lazy dog",
    "Picture 1 in the style of an oil painting, very long prompt about many colorful things",
    "",
]


def tokenizer(padding_side: str = "right", extra_corpus: tuple[str, ...] = ()):
    """A byte-level BPE with Qwen2's split and the Qwen chat special tokens, trained on the templates."""
    from transformers import PreTrainedTokenizerFast

    from kern_qwen_image.text_encoder import CAPTION_PROMPTS, TEMPLATES

    corpus = [TEMPLATES["t2i"], TEMPLATES["edit"], CAPTION_PROMPTS["en"], *PROMPTS, *extra_corpus]
    tok = byte_level_bpe(corpus * 5, 1000, SPECIALS, split=QWEN_SPLIT, nfc=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side=padding_side
    )


def te_config(tok, hidden: int = TE_HIDDEN):
    """Tiny Qwen2.5-VL: 2 text layers (M-RoPE sections 1, 1, 2), a 2-block vision tower with the real patching."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    text = {
        "vocab_size": len(tok),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": 2,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "out_hidden_size": hidden,
        "fullatt_block_indexes": [1],
        "initializer_range": 0.2,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def write_text_encoder(folder: str | Path, seed: int = 0, padding_side: str = "right") -> Path:
    """Model weights + config, tokenizer and image processor, all in ``folder``."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = tokenizer(padding_side)
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)
    return save_seeded_pretrained(Qwen2_5_VLForConditionalGeneration, te_config(tok), folder, seed, tok, processor)


def write_comfy_text_encoder(folder: str | Path, path: str | Path, *, lm_head: bool = True) -> Path:
    """A transformers Qwen2.5-VL folder rewritten as ComfyUI's single file (``qwen_2.5_vl_7b.safetensors`` layout):
    ``model.*`` language model, ``visual.*`` vision tower, ``lm_head`` (unless ``lm_head=False``). Tiny sizes cannot
    be looked up, so the transformers config goes into the ``kern.config`` metadata, as only tiny test files have it."""
    import json

    from kern.core.io import save_file
    from safetensors.torch import load_file
    from transformers import AutoConfig

    state = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        for k, v in load_file(f).items():
            if k.startswith("model.language_model."):
                k = "model." + k[len("model.language_model.") :]
            elif k.startswith("model.visual."):
                k = k[len("model.") :]
            if lm_head or not k.startswith("lm_head."):
                state[k] = v
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    save_file(state, Path(path), metadata={"kern.config": json.dumps(config.to_dict())})
    return Path(path)


def is_gain(name: str, p: torch.Tensor) -> bool:
    """RMSNorm gains: the 1-D ``weight`` of a module named ``*norm*``."""
    parts = name.split(".")
    return p.dim() == 1 and len(parts) >= 2 and "norm" in parts[-2] and parts[-1] == "weight"


def write_transformer(path: str | Path, seed: int = 0, variant: str = "t2i") -> Path:
    """A tiny transformer of ``variant``: ``edit-2511`` sets ``zero_cond_t``, ``layered`` the Layered
    timestep condition and 3D RoPE (and writes its extra weight, by which the loader tells it apart)."""
    from kern_qwen_image.params import tiny_params
    from kern_qwen_image.transformer import QwenImageTransformer

    layered = variant == "layered"
    params = tiny_params(
        joint_attention_dim=TE_HIDDEN,
        zero_cond_t=variant == "edit-2511",
        use_additional_t_cond=layered,
        use_layer3d_rope=layered,
    )
    metadata = {
        "kern.axes_dim": ",".join(str(d) for d in params.axes_dim),
        "kern.variant": variant,
        "kern.note": "tiny random Qwen-Image for tests and the demo",
    }
    return write_random_model(QwenImageTransformer(params), path, seed, gains_near_one(is_gain), metadata)


def write_vae(path: str | Path, seed: int = 1, rgba: bool = False) -> Path:
    """A tiny VAE, RGB or (``rgba``, as Layered's) RGBA."""
    from kern.core.io import save_file

    from kern_qwen_image.vae import QwenImageVAE, tiny_vae_params

    params = tiny_vae_params(input_channels=4 if rgba else 3)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = QwenImageVAE(params).eval()
    # The statistics are config values (not in the file): fold a calibration into quant_conv instead, so that
    # (mean(E(x)) - latents_mean) / latents_std is about N(0, 1) per channel, and undo it in post_quant_conv so
    # the decoder sees what it saw before.
    images = smooth_images(16, params.input_channels, seed + 1)
    z = params.z_dim
    with torch.no_grad():
        raw = vae.quant_conv(vae.encoder(images))[:, :z]
        m, s = raw.mean(dim=(0, 2, 3)), raw.std(dim=(0, 2, 3)) + 1e-6
        mean, std = torch.tensor(params.latents_mean), torch.tensor(params.latents_std)
        a = std / s  # z_new = a * (raw - m) + mean
        qw, qb = vae.quant_conv.weight, vae.quant_conv.bias
        qw[:z] *= a.view(-1, 1, 1, 1, 1)
        qb[:z] = a * (qb[:z] - m) + mean
        # post_quant_conv(z_new) must equal the old post_quant_conv(raw), raw = m + (z_new - mean) / a.
        pw, pb = vae.post_quant_conv.weight, vae.post_quant_conv.bias
        w2 = pw[:, :, 0, 0, 0].clone()
        pb += w2 @ (m - mean / a)
        pw /= a.view(1, -1, 1, 1, 1)
    save_file(
        {k: v.contiguous() for k, v in vae.state_dict().items()},
        Path(path),
        metadata={"kern.note": "tiny random Qwen-Image VAE"},
    )
    return Path(path)


# The bundle: part -> (file or folder name, writer).
FILES = {
    "transformer": ("qwen-image-tiny.safetensors", write_transformer),
    "vae": ("vae.safetensors", write_vae),
    "text_encoder": ("text_encoder", write_text_encoder),
}


def build(folder: str | Path, force: bool = False) -> dict[str, Path]:
    """Write the tiny Qwen-Image bundle (transformer, VAE, Qwen2.5-VL text encoder folder) into ``folder``, unless it
    is already there, and return the three paths."""
    return build_bundle(folder, FILES, force)


if __name__ == "__main__":
    bundle_main(build, "kern_qwen_image.tiny")
