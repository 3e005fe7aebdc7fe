"""What a checkpoint is, for ``identify_model_file``: Qwen-Image transformers and VAEs in every layout kern loads
(diffusers folders and files, ComfyUI's prefixed and fp8 files, Wan-layout VAE files), the Qwen2.5-VL text
encoder (``te_files``), and neighbours people take for them. From keys and shapes only."""

from __future__ import annotations

from collections.abc import Mapping

from kern import ModelFile
from kern.models.identify import identify_parts

ARCH = "qwen-image"
NOT_LAYERED = ("t2i", "edit", "edit-2509", "edit-2511")
LAYERED_KEY = "time_text_embed.addition_t_embedding.weight"


def identify(path: str, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> ModelFile | None:
    from kern_qwen_image import te_files

    return identify_parts(ARCH, path, shapes, transformer=_transformer, vae=_vae, te_files=te_files)


def _transformer(s: Mapping[str, tuple[int, ...]]) -> ModelFile | None:
    if "transformer_blocks.0.img_mod.1.weight" in s and "txt_norm.weight" in s:
        layered = LAYERED_KEY in s
        return ModelFile(
            what=f"a Qwen-Image {'Layered ' if layered else ''}transformer",
            arch=ARCH,
            part="transformer",
            variants=("layered",) if layered else NOT_LAYERED,
        )
    if "txt_in.text_norm.weight" in s and "modulation.1.weight" in s:
        return ModelFile(what="a Qwen-Image-2.1 transformer, which this kern does not load yet")
    return None


def _vae(s: Mapping[str, tuple[int, ...]]) -> ModelFile | None:
    if "decoder.upsamples.0.upsamples.0.residual.2.weight" in s:
        return ModelFile(what="a Wan 2.2 VAE (48 latent channels), not the Qwen-Image VAE")
    conv_in = s.get("encoder.conv1.weight") or s.get("encoder.conv_in.weight")
    wan_like = "decoder.middle.0.residual.0.gamma" in s or "decoder.mid_block.resnets.0.norm1.gamma" in s
    if conv_in is None or len(conv_in) != 5 or not wan_like:  # Qwen-Image's VAE has 3-D (video) convolutions
        return None
    rgba = conv_in[1] == 4
    return ModelFile(
        what=f"the Qwen-Image {'Layered (RGBA) ' if rgba else ''}VAE",
        arch=ARCH,
        part="vae",
        variants=("layered",) if rgba else NOT_LAYERED,
    )
