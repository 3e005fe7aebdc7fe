"""Qwen-Image end to end on the tiny bundle (kern_qwen_image.tiny), on the CPU: loading through the plugin
manager, a T2I LoRA training run through ``kern.train.driver.run`` and generation through ``kern.generate.driver.run_batch``
with true CFG."""

from __future__ import annotations

import json

import pytest
import torch
from kern.core import config
from kern.core.io import load_file, save_file
from kern.core.plugins import get_manager
from kern.data.prompts import read_prompt_file
from kern.errors import ModelFileError
from kern.generate.driver import Setup, run_batch
from kern.train import driver as train
from PIL import Image

from tests.helpers import make_dataset

CPU = torch.device("cpu")
# The block Linears (attention and MLPs), plus the input projections a random tiny base needs to learn visibly.
TARGETS = ["img_in", "txt_in", r"transformer_blocks\.\d+\.(attn|img_mlp|txt_mlp)\..*"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def load(part, path, variant=None):
    return get_manager().hook.load_model(
        arch="qwen-image", variant=variant, part=part, path=str(path), dtype=torch.float32, device=CPU, options={}
    )


# --------------------------------------------------------------------------- loading


def test_all_parts_load_through_the_plugin_manager(tiny_qwen):
    from kern_qwen_image.tiny import TE_HIDDEN
    from kern_qwen_image.transformer import QwenImageTransformer
    from kern_qwen_image.vae import QwenImageVAE

    hook = get_manager().hook
    assert hook.detect_variant(arch="qwen-image", path=str(tiny_qwen["transformer"])) == "t2i"
    model = load("transformer", tiny_qwen["transformer"])
    assert isinstance(model, QwenImageTransformer) and model.variant == "t2i"
    assert model.params.joint_attention_dim == TE_HIDDEN and model.params.axes_dim == (8, 12, 12)
    vae = load("vae", tiny_qwen["vae"])
    assert isinstance(vae, QwenImageVAE)
    encoder = load("text_encoder", tiny_qwen["text_encoder"], variant="t2i")
    assert encoder.hidden_size == TE_HIDDEN and not encoder.has_vision

    # The pieces fit together: text -> velocity, image -> latents -> image.
    with torch.no_grad():
        text = hook.encode_text(
            arch="qwen-image", variant="t2i", encoder=encoder, prompts=["a red square", ""], options={}
        )
        assert text["ctx"].shape[0] == 2 and text["mask"].shape == text["ctx"].shape[:2]
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        latents = hook.encode_latents(arch="qwen-image", variant="t2i", vae=vae, images=images)
        assert latents.shape == (2, 16, 4, 4)
        # The tiny VAE is calibrated: normalised latents of images are about unit-variance.
        assert 0.3 < latents.std().item() < 3.0
        v = hook.predict_velocity(
            arch="qwen-image",
            variant="t2i",
            model=model,
            latents=latents,
            timesteps=torch.tensor([0.3, 0.7]),
            text=text,
            references=None,
            options={},
        )
        assert v.shape == latents.shape and torch.isfinite(v).all()
        decoded = hook.decode_latents(arch="qwen-image", variant="t2i", vae=vae, latents=latents)
        assert decoded.shape == (2, 3, 32, 32)


def test_flux2_checkpoint_is_refused_clearly(tmp_path_factory):
    from kern_flux2 import tiny as flux_tiny

    folder = tmp_path_factory.mktemp("flux2-as-qwen")
    path = flux_tiny.write_transformer(folder / "flux-2-klein-4b-tiny.safetensors")
    with pytest.raises(ModelFileError, match=r"not a Qwen-Image transformer.*looks like FLUX"):
        load("transformer", path)


def test_missing_keys_give_one_error_listing_them(tiny_qwen, tmp_path):
    tensors, meta = load_file(tiny_qwen["transformer"])
    gone = ["transformer_blocks.1.attn.to_k.weight", "transformer_blocks.0.img_mlp.net.2.bias"]
    for key in gone:
        del tensors[key]
    broken = tmp_path / "qwen-image-broken.safetensors"
    save_file(tensors, broken, metadata=meta)
    with pytest.raises(ModelFileError) as info:
        load("transformer", broken)
    message = str(info.value)
    assert "2 missing" in message and all(key in message for key in gone)


# --------------------------------------------------------------------------- training


def test_t2i_lora_training_run(tiny_qwen, tmp_path):
    dataset = make_dataset(tmp_path / "data", n=2, size=(32, 32))
    out = tmp_path / "run"
    steps = 4
    job = config.load_job(
        None,
        {
            "model.arch": "qwen-image",
            "model.transformer": str(tiny_qwen["transformer"]),
            "model.vae": str(tiny_qwen["vae"]),
            "model.text_encoder": str(tiny_qwen["text_encoder"]),
            "model.dtype": "float32",
            "network.type": "lora",
            "network.rank": 4,
            "network.alpha": 4.0,
            "network.targets": TARGETS,
            "dataset.config": str(dataset),
            "save.out": str(out),
            "train.steps": steps,
            "train.learning_rate": 1e-2,
            "train.mixed_precision": "no",
            "train.device": "cpu",
            "train.gradient_checkpointing": False,
            "sample.prompts": [],
        },
    )
    adapter = train.run(job)

    curve = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(curve) == steps and all(torch.isfinite(torch.tensor(curve)))
    tensors, meta = load_file(adapter)
    assert meta["modelspec.architecture"] == "Qwen-Image/lora"
    assert meta["kern.arch"] == "qwen-image" and meta["kern.variant"] == "t2i"
    assert any("lora_up" in k for k in tensors)
    for part in ("attn_to_q", "attn_add_k_proj", "img_mlp_net_0_proj", "txt_mlp_net_2"):
        assert any(f"transformer_blocks_1_{part}" in k for k in tensors), part

    # The text cache, as musubi's: each caption's tokens without padding (B dimension dropped) as
    # varlen_vl_embed_<dtype>, no mask (rebuilt at load), one file per caption.
    files = sorted((tmp_path / "data" / "cache").glob("*_te.safetensors"))
    assert len(files) == 3  # two captions and the empty one
    lengths = {}
    for f in files:
        cached, _ = load_file(f)
        (key,) = cached
        ctx = cached[key]
        assert key == "varlen_vl_embed_float32" and ctx.ndim == 2 and ctx.shape[1] == 32
        lengths[f.name] = ctx.shape[0]
    assert len(set(lengths.values())) > 1, lengths  # "" and the captions differ in length


# --------------------------------------------------------------------------- generation


def test_generation_with_true_cfg_prompt_file_and_wildcards(tiny_qwen, tmp_path, monkeypatch):
    manager = get_manager()
    calls = []
    real = manager.hook.predict_velocity
    combined = []
    real_combine = manager.hook.combine_guidance

    def spy(**kw):
        calls.append(kw["text"]["ctx"].shape)
        return real(**kw)

    def spy_combine(**kw):
        combined.append(kw["scale"])
        return real_combine(**kw)

    monkeypatch.setattr(manager.hook, "predict_velocity", spy)
    monkeypatch.setattr(manager.hook, "combine_guidance", spy_combine)

    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "color.txt").write_text("red\nblue\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# tiny Qwen-Image\na __color__ square --d 5\n--w 32 --h 32 --d 9\n")
    requests = read_prompt_file(prompts, base_prompt="a __color__ circle")
    setup = Setup(
        arch="qwen-image",
        transformer=str(tiny_qwen["transformer"]),
        vae=str(tiny_qwen["vae"]),
        text_encoder=str(tiny_qwen["text_encoder"]),
        dtype="float32",
        device="cpu",
        out=tmp_path / "a",
        wildcards=str(cards),
        steps=2,
        width=32,
        height=32,
    )
    first = run_batch(setup, requests)
    assert len(first) == 2
    assert len(calls) == 2 * 2 * 2  # 2 images x 2 steps x (cond + uncond)
    assert combined == [4.0] * 4  # the variant's true-CFG scale, once per step
    infos = [json.loads(Image.open(p).text["kern"]) for p in first]
    assert [Image.open(p).size for p in first] == [(32, 32)] * 2
    assert infos[0]["prompt"] in ("a red square", "a blue square") and infos[0]["seed"] == 5
    assert infos[1]["prompt"] in ("a red circle", "a blue circle") and infos[1]["seed"] == 9
    assert infos[0]["negative_prompt"] == " " and (infos[0]["arch"], infos[0]["variant"]) == ("qwen-image", "t2i")

    # Same seeds, same images.
    import attrs

    second = run_batch(
        attrs.evolve(setup, out=tmp_path / "b"), read_prompt_file(prompts, base_prompt="a __color__ circle")
    )
    for a, b in zip(first, second):
        assert Image.open(a).tobytes() == Image.open(b).tobytes()
    assert Image.open(first[0]).tobytes() != Image.open(first[1]).tobytes()
