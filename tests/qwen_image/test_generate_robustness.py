"""`kern generate` robustness on tiny Qwen-Image models (CPU, fp32): batches whose prompts and negative prompts
encode to different lengths (true CFG, variable-length text) give the images made one at a time; Layered needs
the Qwen2.5-VL processor files only to caption; missing model options fail before any work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from kern.core.plugins import get_manager
from kern.data.prompts import read_prompt_file
from kern.errors import ModelFileError
from kern.generate.driver import Generator, Setup, run_batch
from PIL import Image

from tests.conftest import run_kern


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def layered(tiny_qwen, tmp_path_factory):
    """A Layered transformer, the RGBA VAE, and a copy of the text encoder folder without the processor files."""
    from kern_qwen_image import tiny

    folder = tmp_path_factory.mktemp("tiny-qwen-layered")
    te = folder / "models" / "text_encoder"  # no processor/ folder beside it either
    shutil.copytree(tiny_qwen["text_encoder"], te, ignore=shutil.ignore_patterns("preprocessor_config.json"))
    return {
        "transformer": tiny.write_transformer(folder / "qwen-image-layered-tiny.safetensors", variant="layered"),
        "vae": tiny.write_vae(folder / "vae-rgba.safetensors", rgba=True),
        "text_encoder": te,
    }


def _spy(monkeypatch, name):
    hook = get_manager().hook
    real = getattr(hook, name)
    calls = []

    def spy(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(hook, name, spy)
    return calls


def _latents(models, requests, cards, batch_size):
    gen = Generator(
        Setup(
            arch="qwen-image",
            transformer=str(models["transformer"]),
            vae=str(models["vae"]),
            text_encoder=str(models["text_encoder"]),
            dtype="float32",
            device="cpu",
            wildcards=str(cards),
            width=32,
            height=32,
            steps=2,
            batch_size=batch_size,
        )
    )
    images = gen.plan(requests)
    texts = gen.encode(images)
    gen.denoise(images, texts)
    return images, texts, gen


def test_batches_with_negative_prompts_of_different_lengths_equal_single_images(tiny_qwen, tmp_path, monkeypatch):
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "neg.txt").write_text("blurry\nvery ugly, low quality, deformed hands, bad anatomy, extra fingers\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text(
        'a red fox --n "blurry" --d 1\n'
        'a red fox --n "very ugly, low quality, deformed hands and bad anatomy" --d 2\n'
        'a red fox --n "blurry" --d 3\n'
        'a red fox --n "__neg__" --d 10 --f 4\n'
        'a lighthouse standing on a rock in a storm at night --n "blurry" --d 4\n'
    )
    requests = read_prompt_file(prompts)
    calls = _spy(monkeypatch, "predict_velocity")
    batched, texts, gen = _latents(tiny_qwen, requests, cards, batch_size=4)
    negatives = {im.negative for im in batched}
    assert (
        len({texts[gen._text_key(n, im)]["ctx"].shape[1] for im in batched for n in negatives}) >= 2
    )  # the case that crashed
    assert max(kw["latents"].shape[0] for kw in calls) >= 2  # images with matching text shapes were batched
    for kw in calls:  # every batch: one prompt length and one negative length
        assert kw["text"]["ctx"].shape[0] == kw["latents"].shape[0]
    alone, _, _ = _latents(tiny_qwen, requests, cards, batch_size=1)
    assert [im.seed for im in batched] == [im.seed for im in alone] == [1, 2, 3, 10, 11, 12, 13, 4]
    for a, b in zip(batched, alone):
        torch.testing.assert_close(a.latents, b.latents, rtol=1e-5, atol=1e-5)


def test_cli_prompt_file_with_different_negatives_and_batch_size(tiny_qwen, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text('a cat --n "blurry"\na cat --n "very ugly, low quality, deformed hands and bad anatomy"\n')
    out = tmp_path / "out"
    proc = run_kern(
        "generate",
        "--arch",
        "qwen-image",
        "--transformer",
        str(tiny_qwen["transformer"]),
        "--vae",
        str(tiny_qwen["vae"]),
        "--text-encoder",
        str(tiny_qwen["text_encoder"]),
        "--from-file",
        str(prompts),
        "--batch-size",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "1",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000_0.png", "00001_1.png"]


def test_cli_missing_vae_option_fails_before_loading(tiny_qwen, tmp_path):
    out = tmp_path / "out"
    proc = run_kern(
        "generate",
        "--arch",
        "qwen-image",
        "--transformer",
        str(tiny_qwen["transformer"]),
        "--text-encoder",
        str(tiny_qwen["text_encoder"]),
        "-p",
        "a cat",
        "--width",
        "32",
        "--height",
        "32",
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    assert proc.returncode == 2, proc.stderr
    assert "qwen-image needs its vae checkpoint: give --vae" in proc.stderr
    assert not out.exists()  # the output folder is made after every check, right before the first model loads


def test_layered_with_a_prompt_needs_no_processor_files(layered, tmp_path):
    source = tmp_path / "input.png"
    Image.new("RGBA", (32, 32), (10, 200, 30, 200)).save(source)
    setup = Setup(
        arch="qwen-image",
        transformer=str(layered["transformer"]),
        vae=str(layered["vae"]),
        text_encoder=str(layered["text_encoder"]),
        dtype="float32",
        device="cpu",
        out=tmp_path / "o",
        steps=1,
        width=32,
        height=32,
        references=[str(source)],
        layers=1,
        auto_caption="en",
    )
    paths = run_batch(setup, read_prompt_file(_write(tmp_path / "p.txt", "a green square\n")))
    assert [p.name for p in paths] == ["00000_0_layer0.png", "00000_0_layer1.png"]
    assert json.loads(Image.open(paths[0]).text["kern"])["prompt"] == "a green square"


def test_layered_captioning_without_processor_files_fails_before_denoising(layered, tmp_path, monkeypatch):
    velocities = _spy(monkeypatch, "predict_velocity")
    source = tmp_path / "input.png"
    Image.new("RGBA", (32, 32), (10, 200, 30, 200)).save(source)
    setup = Setup(
        arch="qwen-image",
        transformer=str(layered["transformer"]),
        vae=str(layered["vae"]),
        text_encoder=str(layered["text_encoder"]),
        dtype="float32",
        device="cpu",
        out=tmp_path / "o",
        steps=1,
        width=32,
        height=32,
        references=[str(source)],
        layers=1,
        auto_caption="en",
    )
    with pytest.raises(ModelFileError, match="preprocessor_config.json") as err:
        run_batch(setup, [read_prompt_file(_write(tmp_path / "p.txt", "--d 3\n"), base_prompt="")[0]])
    assert str(layered["text_encoder"]) in str(err.value) and "--auto-caption-lang" in str(err.value)
    assert velocities == [] and not (tmp_path / "o").exists()


def _write(path, text):
    path.write_text(text)
    return path
