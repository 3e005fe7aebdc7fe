"""What a checkpoint is, for ``identify_model_file``: FLUX.2 transformers and VAEs in every layout kern loads
(BFL single files, ComfyUI's prefixed and fp8 files, diffusers folders), the text encoders (``te_files``), and the
FLUX.1 files people take for FLUX.2 ones. From keys and shapes only."""

from __future__ import annotations

from collections.abc import Mapping

from kern import ModelFile
from kern.models.identify import identify_parts

ARCH = "flux2"
WIDTH_TO_VARIANTS = {3072: ("klein-4b", "klein-base-4b"), 4096: ("klein-9b", "klein-base-9b"), 6144: ("dev",)}
LABEL = {3072: "klein 4B", 4096: "klein 9B", 6144: "dev"}


def identify(path: str, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> ModelFile | None:
    from kern_flux2 import te_files

    return identify_parts(ARCH, path, shapes, transformer=_transformer, vae=_vae, te_files=te_files)


def _transformer(s: Mapping[str, tuple[int, ...]]) -> ModelFile | None:
    if "double_blocks.0.img_attn.qkv.weight" in s and "single_stream_modulation.lin.weight" in s:
        width = s["img_in.weight"][0] if "img_in.weight" in s else 0
        label = LABEL.get(width, "")
        return ModelFile(
            what=f"a FLUX.2 {label + ' ' if label else ''}transformer".replace("  ", " "),
            arch=ARCH,
            part="transformer",
            variants=WIDTH_TO_VARIANTS.get(width, ()),
        )
    if "single_stream_modulation.linear.weight" in s and any(k.startswith("transformer_blocks.") for k in s):
        width = s["x_embedder.weight"][0] if "x_embedder.weight" in s else 0
        return ModelFile(
            what="a FLUX.2 transformer (diffusers layout)",
            arch=ARCH,
            part="transformer",
            variants=WIDTH_TO_VARIANTS.get(width, ()),
        )
    if "double_blocks.0.img_mod.lin.weight" in s:
        return ModelFile(
            what="a FLUX.1 transformer, which kern does not train (FLUX.2 files have no per-block img_mod)"
        )
    if "transformer_blocks.0.norm1.linear.weight" in s and "single_transformer_blocks.0.norm.linear.weight" in s:
        return ModelFile(what="a FLUX.1 transformer (diffusers layout), which kern does not train")
    return None


def _vae(s: Mapping[str, tuple[int, ...]]) -> ModelFile | None:
    if not any(k.startswith(("encoder.", "decoder.")) for k in s):
        return None
    if "bn.running_mean" in s:
        return ModelFile(what="the FLUX.2 VAE", arch=ARCH, part="vae")
    out = s.get("encoder.conv_out.weight")
    if out and out[0] == 32 and len(out) == 4:  # 16 latent channels (mean and log-variance)
        return ModelFile(what="a 16-channel VAE (FLUX.1 / SD3's), not the 32-channel FLUX.2 VAE (ae.safetensors)")
    return None
