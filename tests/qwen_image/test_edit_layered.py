"""Qwen-Image Edit and Layered end to end on tiny models, on the CPU: edit training (control images reach the
text encoder and the transformer; text caches are keyed on them), batch generation with controls, a prompt
file, wildcards and option-only lines, Layered generation with automatic captions (N + 1 RGBA images), and
the errors for missing inputs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from kern.core import config
from kern.core.io import load_file
from kern.core.plugins import get_manager
from kern.data.prompts import Request, read_prompt_file
from kern.errors import UsageError
from kern.generate.driver import Generator, Setup, run_batch
from kern.train import driver as train
from PIL import Image

from tests.helpers import make_dataset

TARGETS = ["img_in", "txt_in", r"transformer_blocks\.\d+\.(attn|img_mlp|txt_mlp)\..*"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _spy(monkeypatch, name):
    hook = get_manager().hook
    real = getattr(hook, name)
    calls = []

    def spy(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(hook, name, spy)
    return calls


def _edit_job(models, dataset, out, **extra):
    return config.load_job(
        None,
        {
            "model.arch": "qwen-image",
            "model.transformer": str(models["edit"]),
            "model.vae": str(models["vae"]),
            "model.text_encoder": str(models["text_encoder"]),
            "model.dtype": "float32",
            "network.type": "lora",
            "network.rank": 4,
            "network.alpha": 4.0,
            "network.targets": TARGETS,
            "dataset.config": str(dataset),
            "save.out": str(out),
            "train.steps": 3,
            "train.learning_rate": 1e-2,
            "train.mixed_precision": "no",
            "train.device": "cpu",
            "train.gradient_checkpointing": False,
            "sample.prompts": [],
            **extra,
        },
    )


# --------------------------------------------------------------------------- edit


def test_edit_training_then_batch_generation(tiny_variants, tmp_path, monkeypatch):
    encodes = _spy(monkeypatch, "encode_text")
    velocities = _spy(monkeypatch, "predict_velocity")
    dataset = make_dataset(tmp_path / "data", n=2, size=(32, 32), refs=1)
    sample_control = tmp_path / "data" / "controls" / "img0_0.png"
    adapter = train.run(
        _edit_job(
            tiny_variants,
            dataset,
            tmp_path / "run",
            **{"sample.prompts": [f"make it blue --ci {sample_control} --w 32 --h 32"], "sample.steps": 1},
        )
    )
    # The in-training sample takes its control image like `kern generate` does.
    sample = Image.open(tmp_path / "run" / "samples" / "step-000003_00.png")
    assert sample.size == (32, 32) and json.loads(sample.text["kern"])["references"] == [str(sample_control)]

    # Training: the variant is detected from the file, each caption is encoded with its control image, and
    # the transformer sees the control latents as references.
    tensors, meta = load_file(adapter)
    assert meta["kern.variant"] == "edit-2511" and meta["modelspec.architecture"] == "Qwen-Image-Edit-2511/lora"
    assert any("lora_up" in k for k in tensors)
    cached = [c for c in encodes if c["prompts"] not in ([" "], ["make it blue"])]
    assert len(cached) == 1 and all(len(c["options"]["images"]) == len(c["prompts"]) for c in cached)
    assert all(len(images) == 1 and images[0].size == (32, 32) for c in cached for images in c["options"]["images"])
    trained = velocities[:3]  # then the sample's two forwards (true CFG) at the edit pipelines' 1024² control size
    assert all(v["references"] and v["references"][0].shape[-2:] == (4, 4) for v in trained)
    assert [v["references"][0].shape[-2:] for v in velocities[3:]] == [(128, 128)] * 2
    text_files = sorted((tmp_path / "data" / "cache").glob("*_qie_te.safetensors"))
    assert [f.name for f in text_files] == [
        "img0_qie_te.safetensors",
        "img1_qie_te.safetensors",
    ]  # no shared empty caption

    # The text cache is keyed on the control files: a changed control re-encodes its caption only.
    job = _edit_job(tiny_variants, dataset, tmp_path / "run2")
    loads = _spy(monkeypatch, "load_model")
    assert train.cache_only(job, latents=False)["text"] == (0, 2)
    assert not loads  # everything cached: the text encoder is not even loaded
    control = tmp_path / "data" / "controls" / "img1_0.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(control)
    os.utime(control, ns=(1, 1))  # a different stamp even on coarse file-system clocks
    assert train.cache_only(job, latents=False)["text"] == (1, 2)

    # Generation: prompt file with a wildcard, an option-only line and a per-line control; the adapter applied.
    encodes.clear()
    velocities.clear()
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "color.txt").write_text("red\nblue\n")
    prompts = tmp_path / "prompts.txt"
    other = tmp_path / "other.png"
    Image.new("RGB", (48, 32), (9, 99, 199)).save(other)
    prompts.write_text(f"# edits\nmake it __color__ --d 5\n--d 9 --ci {other}\n")
    setup = Setup(
        arch="qwen-image",
        transformer=str(tiny_variants["edit"]),
        vae=str(tiny_variants["vae"]),
        text_encoder=str(tiny_variants["text_encoder"]),
        dtype="float32",
        device="cpu",
        out=tmp_path / "gen",
        wildcards=str(cards),
        steps=2,
        width=32,
        height=32,
        weights=[(str(adapter), 1.0)],
        references=[str(tmp_path / "data" / "controls" / "img0_0.png")],
    )
    paths = run_batch(setup, read_prompt_file(prompts, base_prompt="turn it __color__"))
    assert len(paths) == 2 and [Image.open(p).size for p in paths] == [(32, 32)] * 2
    infos = [json.loads(Image.open(p).text["kern"]) for p in paths]
    assert infos[0]["prompt"] in ("make it red", "make it blue") and infos[0]["variant"] == "edit-2511"
    assert infos[1]["prompt"] in ("turn it red", "turn it blue") and infos[1]["references"] == [str(other)]
    # Prompt and negative prompt are both encoded with the image's control, one set per distinct (prompt, controls).
    assert all(len(c["options"]["images"]) == 1 and len(c["options"]["images"][0]) == 1 for c in encodes)
    assert {c["options"]["images"][0][0].size for c in encodes} == {(32, 32), (48, 32)}
    assert len(encodes) == 4  # 2 prompts + the negative " " once per control set
    # References reach the VAE at the edit pipelines' ≈1024² area (a multiple of 32, aspect kept).
    ref_hw = {tuple(v["references"][0].shape[-2:]) for v in velocities}
    assert ref_hw == {(128, 128), (104, 156)}  # 1024x1024 and 1248x832 pixels, in latents


def test_edit_default_output_size_follows_the_last_control(tiny_variants, tmp_path):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), "white").save(wide)
    gen = Generator(Setup(arch="qwen-image", variant="edit-2509", references=[str(wide)]))
    (image,) = gen.plan([Request(prompt="x")])
    assert (image.width, image.height) == (1248, 832) and image.reference_sizes == ((1248, 832),)
    (sized,) = gen.plan([Request(prompt="x", width=512, height=512)])
    assert (sized.width, sized.height) == (512, 512) and sized.reference_sizes == ((1248, 832),)


def test_edit_errors(tiny_variants, tmp_path):
    # Without a control image an edit model generates from text alone (test_edit_without_control.py).
    (text_only,) = Generator(Setup(arch="qwen-image", variant="edit-2511")).plan([Request(prompt="x")])
    assert text_only.references == () and (text_only.width, text_only.height) == (1024, 1024)
    picture = tmp_path / "p.png"
    Image.new("RGB", (32, 32)).save(picture)
    with pytest.raises(UsageError, match="t2i takes no reference images"):
        Generator(Setup(arch="qwen-image", variant="t2i", references=[str(picture)])).plan([Request(prompt="x")])
    with pytest.raises(UsageError, match=r"missing\.png: cannot read it"):
        Generator(Setup(arch="qwen-image", variant="edit", references=[str(tmp_path / "missing.png")])).plan(
            [Request(prompt="x")]
        )

    # Edit 2508 encodes exactly one control per prompt.
    hook = get_manager().hook
    with pytest.raises(UsageError, match="takes one control image per prompt, got 2"):
        hook.encode_text(
            arch="qwen-image",
            variant="edit",
            encoder=None,
            prompts=["x"],
            options={"images": [[Image.new("RGB", (8, 8))] * 2]},
        )
    # Training on targets without controls: tests/qwen_image/test_edit_without_control.py (issue 17).


def test_edit_caption_dropout_uses_each_items_empty_caption_with_its_controls(tiny_variants, tmp_path, monkeypatch):
    from kern.data import cache

    encodes = _spy(monkeypatch, "encode_text")
    dataset = make_dataset(tmp_path / "drop", n=2, size=(32, 32), refs=1)
    dataset.write_text(dataset.read_text() + "caption_dropout_rate = 0.5\n")
    train.run(_edit_job(tiny_variants, dataset, tmp_path / "run"))
    empties = [c for c in encodes if c["prompts"] == ["", ""]]
    assert len(empties) == 1 and [len(i) for i in empties[0]["options"]["images"]] == [1, 1]
    names = sorted(p.name for p in (tmp_path / "drop" / "cache").glob("*_te.safetensors"))
    assert names == [
        "img0_qie_empty_te.safetensors",
        "img0_qie_te.safetensors",
        "img1_qie_empty_te.safetensors",
        "img1_qie_te.safetensors",
    ]
    # A dropped item's text is its own empty-caption encoding (the controls differ per item, so must the text).
    from kern.data import load_dataset_config, scan_items

    items = scan_items(load_dataset_config(dataset), 16)
    from kern_qwen_image.plugin import CACHE_LAYOUT

    always = cache.load_batch(
        [items[0]], "qie", torch.Generator().manual_seed(0), caption_dropout_rate=1.0, layout=CACHE_LAYOUT
    )
    own, _ = load_file(tmp_path / "drop" / "cache" / "img0_qie_empty_te.safetensors")
    ctx = next(v for k, v in own.items() if k.startswith("varlen_vl_embed_"))  # musubi's key, the tokens unpadded
    assert always["captions"] == [""] and torch.equal(always["text"]["ctx"][0, : ctx.shape[0]], ctx)


# --------------------------------------------------------------------------- layered


def test_layered_generation_with_automatic_caption(tiny_variants, tmp_path, monkeypatch):
    captions = _spy(monkeypatch, "caption_image")
    velocities = _spy(monkeypatch, "predict_velocity")
    source = tmp_path / "input.png"
    rgba = Image.new("RGBA", (96, 64), (200, 30, 30, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 48, 64))  # half transparent: the alpha must reach the RGBA VAE
    rgba.save(source)
    setup = Setup(
        arch="qwen-image",
        transformer=str(tiny_variants["layered"]),
        vae=str(tiny_variants["rgba_vae"]),
        text_encoder=str(tiny_variants["text_encoder"]),
        dtype="float32",
        device="cpu",
        out=tmp_path / "layers",
        steps=2,
        width=64,
        height=64,
        references=[str(source)],
        layers=2,
        auto_caption="en",
    )
    paths = run_batch(setup, [Request(prompt="")])

    assert len(paths) == 3  # the composite and 2 layers
    assert [p.name for p in paths] == ["00000_0_layer0.png", "00000_0_layer1.png", "00000_0_layer2.png"]
    pictures = [Image.open(p) for p in paths]
    assert all(p.mode == "RGBA" and p.size == (64, 64) for p in pictures)
    info = json.loads(pictures[0].text["kern"])
    assert [json.loads(p.text["kern"])["layer"] for p in pictures] == [0, 1, 2]
    assert info["auto_caption"] == "en" and info["variant"] == "layered"
    # The caption was asked once, of the input sized as the model sees it (64² area at 3:2 -> 64x64, multiples
    # of 32), in RGBA, and became the prompt.
    assert len(captions) == 1 and captions[0]["language"] == "en"
    assert captions[0]["image"].mode == "RGBA" and captions[0]["image"].size == (64, 64)
    assert info["prompt"] == captions[0]["encoder"].caption_image(captions[0]["image"], lang="en", resolution=None)
    # 5-D latents: (B, layers + 1, 16, h, w) with the input image as the one reference.
    assert all(v["latents"].shape == (1, 3, 16, 8, 8) and len(v["references"]) == 1 for v in velocities)


def test_layered_prompt_file_sets_layers_per_line(tiny_variants, tmp_path):
    source = tmp_path / "input.png"
    Image.new("RGBA", (32, 32), (10, 200, 30, 128)).save(source)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a green square --layers 1\n")
    setup = Setup(
        arch="qwen-image",
        transformer=str(tiny_variants["layered"]),
        vae=str(tiny_variants["rgba_vae"]),
        text_encoder=str(tiny_variants["text_encoder"]),
        dtype="float32",
        device="cpu",
        out=tmp_path / "o",
        steps=1,
        width=32,
        height=32,
        references=[str(source)],
    )
    paths = run_batch(setup, read_prompt_file(prompts))
    assert len(paths) == 2 and json.loads(Image.open(paths[0]).text["kern"])["prompt"] == "a green square"


def test_layered_errors(tiny_variants, tmp_path):
    with pytest.raises(UsageError, match="layered needs the image to split into layers; give --ref IMAGE"):
        Generator(Setup(arch="qwen-image", variant="layered")).plan([Request(prompt="x")])
    with pytest.raises(UsageError, match="captions the input image, but this prompt has none"):
        Generator(Setup(arch="flux2", variant="klein-4b", auto_caption="en")).plan([Request(prompt="")])
    with pytest.raises(UsageError, match="--layers must be at least 1"):
        read_prompt_file(_write(tmp_path / "p.txt", "x --layers 0\n"))


def _write(path, text):
    path.write_text(text)
    return path
