"""Loading FLUX.2 checkpoints: BFL and diffusers layouts, variant detection, clear errors."""

from __future__ import annotations

import pytest
import torch
from kern.core.io import load_file, save_file
from kern.errors import ModelFileError
from kern_flux2 import keys, loader
from kern_flux2.params import tiny_params
from kern_flux2.transformer import Flux2Transformer


def write(path, sd, metadata=None):
    save_file(sd, path, metadata)
    return path


@pytest.fixture
def tiny_sd():
    torch.manual_seed(0)
    return Flux2Transformer(tiny_params(guidance_embed=True)).state_dict()


def test_bfl_file_loads_with_variant_detected(tmp_path, tiny_sd):
    path = write(tmp_path / "flux2-tiny.safetensors", tiny_sd)
    assert loader.detect_variant(path) == "dev"  # non-standard width: the guidance embedding decides
    model = loader.load_transformer(path, None, torch.float32, "cpu")
    assert model.variant == "dev" and model.params.guidance_embed
    for k, v in model.state_dict().items():
        assert torch.equal(v, tiny_sd[k])


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_prefixed_single_files_load(tmp_path, tiny_sd, prefix):
    path = write(tmp_path / "prefixed.safetensors", {prefix + k: v for k, v in tiny_sd.items()})
    model = loader.load_transformer(path, None, torch.bfloat16, "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert torch.equal(model.state_dict()["img_in.weight"], tiny_sd["img_in.weight"].bfloat16())


def test_diffusers_folder_loads(tmp_path, tiny_sd):
    folder = tmp_path / "FLUX.2-tiny" / "transformer"
    folder.mkdir(parents=True)
    write(folder / "diffusion_pytorch_model.safetensors", keys.bfl_to_diffusers(dict(tiny_sd)))
    model = loader.load_transformer(tmp_path / "FLUX.2-tiny", None, torch.float32, "cpu")
    for k, v in model.state_dict().items():
        assert torch.equal(v, tiny_sd[k]), k


def test_klein_base_is_named_from_the_file_name_and_metadata(tmp_path):
    sd = Flux2Transformer(tiny_params(guidance_embed=False)).state_dict()
    assert loader.detect_variant(write(tmp_path / "flux-2-klein-base-tiny.safetensors", sd)) == "klein-base-4b"
    assert loader.detect_variant(write(tmp_path / "x.safetensors", sd, {"kern.variant": "klein-9b"})) == "klein-9b"


def test_real_widths_detect_their_variant(tmp_path):
    # Headers are all detection reads, so a file of meta-shaped zeros stands in for the real one.
    for hidden, variant in ((3072, "klein-4b"), (4096, "klein-9b")):
        shapes = {
            "img_in.weight": torch.zeros(hidden, 1),
            "txt_in.weight": torch.zeros(hidden, 1),
            "double_blocks.0.img_attn.qkv.weight": torch.zeros(1, 1),
            "single_stream_modulation.lin.weight": torch.zeros(1, 1),
        }
        assert loader.detect_variant(write(tmp_path / f"{variant}.safetensors", shapes)) == variant


def test_truncated_file_is_named(tmp_path, tiny_sd):
    path = write(tmp_path / "cut.safetensors", tiny_sd)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="cut.safetensors: truncated"):
        loader.load_transformer(path, None, torch.float32, "cpu")


def test_qwen_image_checkpoint_is_named_as_such(tmp_path):
    sd = {
        "transformer_blocks.0.img_mod.1.weight": torch.zeros(4, 2),
        "transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2),
        "img_in.weight": torch.zeros(2, 2),
        "txt_norm.weight": torch.zeros(2),
    }
    path = write(tmp_path / "qwen_image.safetensors", sd)
    with pytest.raises(ModelFileError, match="qwen_image.safetensors: not a FLUX.2 transformer.*Qwen-Image"):
        loader.load_transformer(path, None, torch.float32, "cpu")


def test_missing_and_misshaped_keys_are_listed_with_the_variant(tmp_path, tiny_sd):
    broken = dict(tiny_sd)
    del broken["single_blocks.1.linear2.weight"]
    broken["double_blocks.0.img_mlp.0.weight"] = torch.zeros(3, 3)
    path = write(tmp_path / "broken.safetensors", broken)
    with pytest.raises(ModelFileError) as err:
        loader.load_transformer(path, None, torch.float32, "cpu")
    message = str(err.value)
    assert "broken.safetensors" in message and "FLUX.2 dev" in message
    assert "1 missing: single_blocks.1.linear2.weight" in message
    assert "double_blocks.0.img_mlp.0.weight: file (3, 3)" in message


def test_vae_and_its_errors(tmp_path, tiny_bundle):
    vae = loader.load_vae(tiny_bundle["vae"], torch.float32, "cpu")
    images = torch.rand(1, 3, 32, 48) * 2 - 1
    assert vae.encode(images).shape == (1, 128, 2, 3)
    state, _ = load_file(tiny_bundle["vae"])
    del state["bn.running_var"], state["bn.running_mean"]
    with pytest.raises(ModelFileError, match="no_bn.safetensors: VAE without bn.running_mean"):
        loader.load_vae(write(tmp_path / "no_bn.safetensors", state), torch.float32, "cpu")
    with pytest.raises(ModelFileError, match="not a VAE"):
        loader.load_vae(tiny_bundle["transformer"], torch.float32, "cpu")
