"""A tiny FLUX.2 klein bundle in the real file formats, for the demo job and the tests.

``python -m kern_flux2.tiny DIR`` writes, deterministically from a seed:

* ``DIR/flux-2-klein-4b-tiny.safetensors`` — a transformer in BFL single-file layout;
* ``DIR/ae.safetensors`` — a VAE in BFL ``ae`` layout with BatchNorm statistics;
* ``DIR/text_encoder/`` — a Qwen3 causal LM folder (config, safetensors, tokenizer with the chat
  template), deep enough for the layers 9 / 18 / 27 that klein reads.

Everything loads through the same code paths as the official checkpoints; only the sizes differ.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import torch
from kern.models.tiny import (
    build_bundle,
    bundle_main,
    byte_level_bpe,
    gains_near_one,
    init_random_,
    save_seeded_pretrained,
    smooth_images,
    write_random_model,
)

TE_HIDDEN = 16  # the transformer's context_in_dim is 3 x this
TE_LAYERS = 28  # klein reads hidden states 9, 18 and 27
QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
CORPUS = (
    "a photo of red green blue yellow purple orange teal grey circle square triangle on the cream background "
    "painting style dog cat bird in snow at dusk lighthouse"
)


def is_gain(name: str, p: torch.Tensor) -> bool:
    """The norm gains of the BFL modules (RMSNorm ``scale``, the VAE's GroupNorm ``norm*.weight``)."""
    return name.endswith(("scale", "norm.weight")) or ".norm" in name and p.dim() == 1


def write_transformer(path: Path, seed: int = 0) -> Path:
    from kern_flux2.params import tiny_params
    from kern_flux2.transformer import Flux2Transformer

    params = attrs.evolve(tiny_params(guidance_embed=False), context_in_dim=3 * TE_HIDDEN)
    metadata = {"kern.variant": "klein-4b", "kern.note": "tiny random FLUX.2 for tests and the demo"}
    return write_random_model(Flux2Transformer(params), path, seed, gains_near_one(is_gain), metadata)


def write_vae(path: Path, seed: int = 1) -> Path:
    from kern.core.io import save_file

    from kern_flux2.vae import AutoEncoder, AutoEncoderParams

    # The real geometry (3 downsamples, 32 latent channels -> 128 after patchify, 16 px per token),
    # with narrow layers: the registered FLUX.2 architecture's latent shape holds for it.
    vae = AutoEncoder(AutoEncoderParams(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=32))
    init_random_(vae, seed, gains_near_one(is_gain, std=0.1))
    # Calibrate the BatchNorm statistics as the real ones are: normalised latents of images have
    # about zero mean and unit variance per channel.
    state = vae.state_dict()
    state["bn.running_mean"].zero_()
    state["bn.running_var"].fill_(1.0)
    with torch.no_grad():
        latents = vae.encode(smooth_images(16, 3, seed + 1))
    state["bn.running_mean"].copy_(latents.mean(dim=(0, 2, 3)))
    state["bn.running_var"].copy_(latents.var(dim=(0, 2, 3)) + 1e-4)
    save_file({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    return path


def write_text_encoder(folder: Path, seed: int = 2) -> Path:
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    bpe = byte_level_bpe([CORPUS] * 3, 400, QWEN3_SPECIALS)  # byte-level like Qwen3's: any prompt tokenizes
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        chat_template=QWEN3_TEMPLATE,
    )
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TE_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=TE_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        initializer_range=0.2,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    return save_seeded_pretrained(Qwen3ForCausalLM, config, folder, seed, tokenizer)


def write_comfy_text_encoder(folder: Path, path: Path, *, tekken: bytes | None = None) -> Path:
    """A transformers text-encoder folder (Qwen3 or Mistral3) rewritten as ComfyUI's single file: ``model.*`` decoder
    keys only (no lm_head, no vision tower); a Mistral one pruned to the 30 layers FLUX.2 reads, without its final
    norm, with ``tekken`` as its ``tekken_model`` (uint8). Tiny sizes cannot be looked up, so the transformers
    (text) config goes into the ``kern.config`` metadata, as only tiny test files have it."""
    import json

    from kern.core.io import save_file
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    mistral = config.model_type == "mistral3"
    text = config.get_text_config()
    state = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        for k, v in load_file(f).items():
            for prefix in ("model.language_model.", "language_model.model."):
                if k.startswith(prefix):
                    k = "model." + k[len(prefix) :]
            if not k.startswith("model.") or k.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
                continue  # lm_head, the vision tower
            if mistral and (
                k.startswith("model.norm.") or k.startswith("model.layers.") and int(k.split(".")[2]) >= 30
            ):
                continue
            state[k] = v
    if mistral:
        text.num_hidden_layers = 30
        if getattr(text, "layer_types", None) is not None:
            text.layer_types = list(text.layer_types)[:30]
        state["tekken_model"] = torch.frombuffer(bytearray(tekken or b"{}"), dtype=torch.uint8)
    save_file(state, Path(path), metadata={"kern.config": json.dumps(text.to_dict())})
    return Path(path)


# The bundle: part -> (file or folder name, writer).
FILES = {
    "transformer": ("flux-2-klein-4b-tiny.safetensors", write_transformer),
    "vae": ("ae.safetensors", write_vae),
    "text_encoder": ("text_encoder", write_text_encoder),
}


def build(folder: str | Path, force: bool = False) -> dict[str, Path]:
    """Write the tiny FLUX.2 klein bundle (transformer, VAE, Qwen3 text encoder folder) into ``folder``, unless it is
    already there, and return the three paths."""
    return build_bundle(folder, FILES, force)


if __name__ == "__main__":
    bundle_main(build, "kern_flux2.tiny")
