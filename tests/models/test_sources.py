"""Model parts resolved once, at start: bundles (diffusers folder, repo id, ComfyUI models/ folder), part options
that override them, and files of the wrong kind refused with what they are and where they belong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from kern.core.plugins import get_manager
from kern.errors import ConfigError
from kern.models import sources
from safetensors.torch import save_file

OPTIONS = {"transformer": "--transformer", "vae": "--vae", "text_encoder": "--text-encoder", "path": "--model"}


def resolve(arch, bundle=None, variant=None, needed=sources.PARTS, **given):
    return sources.resolve_parts(
        given, bundle, needed, arch=arch, variant=variant, hook=get_manager().hook, options=OPTIONS
    )


def diffusers_layout(root: Path, bundle: dict) -> Path:
    (root / "transformer").mkdir(parents=True)
    shutil.copy(bundle["transformer"], root / "transformer" / "diffusion_pytorch_model.safetensors")
    (root / "vae").mkdir()
    shutil.copy(bundle["vae"], root / "vae" / "diffusion_pytorch_model.safetensors")
    shutil.copytree(bundle["text_encoder"], root / "text_encoder")
    return root


def test_a_diffusers_folder_names_every_part(tmp_path, tiny_bundle):
    root = diffusers_layout(tmp_path / "FLUX.2-klein-4B", tiny_bundle)
    got = resolve("flux2", bundle=str(root))
    assert got == {p: str(root / p) for p in sources.PARTS}


def test_a_part_option_overrides_the_bundle(tmp_path, tiny_bundle):
    root = diffusers_layout(tmp_path / "bundle", tiny_bundle)
    got = resolve("flux2", bundle=str(root), vae=str(tiny_bundle["vae"]))
    assert got["vae"] == str(tiny_bundle["vae"]) and got["transformer"] == str(root / "transformer")


def test_a_repo_id_bundle_fetches_each_part_from_the_cache(tmp_path, tiny_bundle, hub_cache, no_network):
    root = diffusers_layout(tmp_path / "src", tiny_bundle)
    hub_cache.add("black-forest-labs/FLUX.2-klein-4B", {p: root / p for p in sources.PARTS})
    got = resolve("flux2", bundle="black-forest-labs/FLUX.2-klein-4B")
    for part in sources.PARTS:
        assert Path(got[part]).name == part and "models--black-forest-labs--FLUX.2-klein-4B" in got[part]
        assert sorted(p.name for p in Path(got[part]).iterdir()) == sorted(p.name for p in (root / part).iterdir())
    assert no_network == []


def test_a_single_file_bundle_is_the_transformer(tiny_bundle):
    got = resolve("flux2", bundle=str(tiny_bundle["transformer"]), needed=("transformer", "vae"))
    assert got == {"transformer": str(tiny_bundle["transformer"]), "vae": None}


def test_a_comfyui_models_folder_gives_each_architecture_its_own_files(tmp_path, tiny_bundle, tiny_qwen):
    models = tmp_path / "ComfyUI" / "models"
    for folder, files in {
        "diffusion_models": (tiny_bundle["transformer"], tiny_qwen["transformer"]),
        "vae": (tiny_bundle["vae"], tiny_qwen["vae"]),
    }.items():
        (models / folder).mkdir(parents=True)
        for f in files:
            shutil.copy(f, models / folder / f.name)
    (models / "text_encoders").mkdir()
    needed = ("transformer", "vae")
    flux = resolve("flux2", bundle=str(tmp_path / "ComfyUI"), needed=needed)
    assert flux == {
        "transformer": str(models / "diffusion_models" / tiny_bundle["transformer"].name),
        "vae": str(models / "vae" / tiny_bundle["vae"].name),
    }
    qwen = resolve("qwen-image", bundle=str(models), needed=needed)
    assert qwen == {
        "transformer": str(models / "diffusion_models" / tiny_qwen["transformer"].name),
        "vae": str(models / "vae" / tiny_qwen["vae"].name),
    }
    shutil.copy(tiny_bundle["transformer"], models / "diffusion_models" / "copy.safetensors")
    with pytest.raises(ConfigError, match=r"several files fit the flux2 transformer \(copy.safetensors, flux-2"):
        resolve("flux2", bundle=str(models), needed=needed)


def test_a_folder_that_is_no_bundle_is_refused(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(ConfigError, match="neither a diffusers folder .* nor a ComfyUI models folder"):
        resolve("flux2", bundle=str(tmp_path / "stuff"))


# --------------------------------------------------------------------------- wrong kinds


def header_file(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path))
    return path


FOREIGN = {
    "clip_l.safetensors": (
        {"text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 1), "text_model.final_layer_norm.weight": (1,)},
        r"a CLIP-L text encoder, which kern does not use",
    ),
    "t5xxl_fp16.safetensors": (
        {"encoder.block.0.layer.0.SelfAttention.q.weight": (1, 4096), "shared.weight": (1, 1)},
        r"a T5-XXL text encoder, which kern does not use",
    ),
    "sd_xl_base_1.0.safetensors": (
        {
            "model.diffusion_model.input_blocks.0.0.weight": (1, 1),
            "model.diffusion_model.label_emb.0.0.weight": (1, 1),
            "conditioner.embedders.1.model.ln_final.weight": (1,),
            "first_stage_model.decoder.conv_out.weight": (1,),
        },
        r"a Stable Diffusion XL checkpoint, which kern does not use",
    ),
    "flux1_ae.safetensors": (
        {"encoder.conv_out.weight": (32, 1, 3, 3), "decoder.conv_in.weight": (1, 16, 3, 3)},
        r"a 16-channel VAE \(FLUX.1 / SD3's\), not the 32-channel FLUX.2 VAE",
    ),
    "flux1-dev.safetensors": (
        {"double_blocks.0.img_mod.lin.weight": (1, 1), "double_blocks.0.img_attn.qkv.weight": (3, 1)},
        r"a FLUX.1 transformer, which kern does not train",
    ),
    "my_lora.safetensors": (
        {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 8),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (24, 4),
        },
        r"a lora adapter \(kohya layout\), not the flux2 transformer: give adapters with --weights",
    ),
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_a_file_of_another_kind_is_named_as_what_it_is(tmp_path, name):
    shapes, message = FOREIGN[name]
    path = header_file(tmp_path / name, shapes)
    with pytest.raises(ConfigError, match=rf"--transformer {tmp_path}/{name}: it is {message}"):
        resolve("flux2", needed=("transformer",), transformer=str(path))


def test_a_part_of_the_other_architecture_says_where_it_belongs(tiny_bundle, tiny_qwen):
    with pytest.raises(
        ConfigError,
        match=r"it is a Qwen-Image transformer, not the flux2 transformer: give it as "
        r"model.transformer \(--transformer\) with --arch qwen-image",
    ):
        resolve("flux2", needed=("transformer",), transformer=str(tiny_qwen["transformer"]))
    with pytest.raises(
        ConfigError,
        match=r"--transformer .*ae.safetensors: it is the FLUX.2 VAE, not the flux2 "
        r"transformer: give it as model.vae \(--vae\)$",
    ):
        resolve("flux2", needed=("transformer",), transformer=str(tiny_bundle["vae"]))
    with pytest.raises(
        ConfigError,
        match=r"it is the Qwen-Image VAE, not the flux2 VAE: give it as model.vae "
        r"\(--vae\) with --arch qwen-image",
    ):
        resolve("flux2", needed=("vae",), vae=str(tiny_qwen["vae"]))


def test_a_layered_vae_is_refused_for_the_plain_variants(tmp_path):
    from kern_qwen_image import tiny

    rgba = tiny.write_vae(tmp_path / "layered_vae.safetensors", rgba=True)
    assert resolve("qwen-image", variant="layered", needed=("vae",), vae=str(rgba))["vae"] == str(rgba)
    with pytest.raises(
        ConfigError, match=r"the Qwen-Image Layered \(RGBA\) VAE, which fits qwen-image layered, not t2i"
    ):
        resolve("qwen-image", variant="t2i", needed=("vae",), vae=str(rgba))


def test_a_quantisation_kern_cannot_read_is_refused_when_the_parts_are_resolved(tmp_path):
    from kern.errors import ModelFileError

    from tests.kernel.test_fp8_checkpoints import _nvfp4_file

    path = tmp_path / "flux2_dev_nvfp4.safetensors"
    _nvfp4_file(path, via_metadata=False)
    with pytest.raises(ModelFileError, match=r"'blocks.0.qkv'.*nvfp4"):
        resolve("flux2", needed=("transformer",), transformer=str(path))


def test_a_file_that_is_not_safetensors_is_left_to_its_loader(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    assert resolve("flux2", needed=("transformer",), transformer=str(path)) == {"transformer": str(path)}
