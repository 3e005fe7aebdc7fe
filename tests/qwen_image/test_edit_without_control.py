"""Edit training without control images (issue 17 item 9), on tiny models on the CPU.

An item without controls trains the edit model as it sees text alone: the text-only template of the variant
(Edit-Plus: diffusers' ``encode_prompt(image=None)``; Edit 2508: the T2I template, as ComfyUI) and no
reference latents. Mixed datasets batch each kind apart; the text cache is keyed on the controls; a control
folder missing files is an error unless the dataset allows it; generation without --ref uses the adapter.
"""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from kern.core.io import load_file
from kern.core.plugins import get_manager
from kern.data import batch_order, load_dataset_config, scan_items
from kern.errors import DatasetError
from PIL import Image

from tests.helpers import make_dataset
from tests.qwen_image.test_text_encoder import (
    PROMPTS,
    _assert_same,
    _edit_plus_pipe,
    _image,
    _repo,
    _t2i_pipe,
)

TARGETS = ["img_in", "txt_in", r"transformer_blocks\.\d+\.(attn|img_mlp|txt_mlp)\..*"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def models(tiny_variants):
    """Here ``edit`` is the 2508 model."""
    return {**tiny_variants, "edit": tiny_variants["edit-2508"]}


def kern(*args: str) -> int:
    """``kern ARGS`` in this process (hook spies see it); the logging set-up it makes is put back after."""
    import logging

    from kern_cli.main import main

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    return exit_.value.code


def write_job(path, models, variant, dataset, out, steps=3, samples=()):
    prompts = ", ".join(json.dumps(p) for p in samples)
    path.write_text(
        textwrap.dedent(f"""
        [model]
        arch = "qwen-image"
        transformer = "{models[variant]}"
        vae = "{models["vae"]}"
        text_encoder = "{models["text_encoder"]}"
        dtype = "float32"
        [network]
        type = "lora"
        rank = 4
        alpha = 4.0
        targets = {json.dumps(TARGETS)}
        [dataset]
        config = "{dataset}"
        [save]
        out = "{out}"
        [train]
        steps = {steps}
        learning_rate = 1e-2
        mixed_precision = "no"
        device = "cpu"
        gradient_checkpointing = false
        [sample]
        prompts = [{prompts}]
        """)
        + ("steps = 1\n" if samples else "")
    )
    return path


def spy(mp, name):
    hook = get_manager().hook
    real, calls = getattr(hook, name), []

    def wrapper(**kw):
        calls.append(kw)
        return real(**kw)

    mp.setattr(hook, name, wrapper)
    return calls


def text_encoder(models, variant):
    return get_manager().hook.load_model(
        arch="qwen-image",
        variant=variant,
        part="text_encoder",
        path=str(models["text_encoder"]),
        dtype=torch.float32,
        device=torch.device("cpu"),
        options={},
    )


def cached_ctx(path):
    tensors, _ = load_file(path)
    return next(v for k, v in tensors.items() if k.startswith("varlen_vl_embed_"))  # the caption's rows, unpadded


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the text-only conditioning


@pytest.fixture(scope="module")
def te_repo(tmp_path_factory):
    return _repo(tmp_path_factory.mktemp("qwen_image_te"))


def test_text_only_conditioning_is_what_the_pipelines_encode_for_no_image(te_repo):
    from kern_qwen_image.text_encoder import load_text_encoder

    enc = load_text_encoder(te_repo / "text_encoder", torch.float32, "cpu", need_vision=True)
    hook = get_manager().hook

    def encode(variant, prompts, images=None):
        options = {} if images is None else {"images": images}
        return hook.encode_text(arch="qwen-image", variant=variant, encoder=enc, prompts=prompts, options=options)

    prompt = PROMPTS[0]
    # Edit-Plus (2509, 2511): diffusers' encode_prompt with image=None, the edit template without labels, bit for bit.
    with torch.no_grad():
        ref, ref_mask = _edit_plus_pipe(te_repo).encode_prompt(prompt, image=None, device="cpu")
    for variant in ("edit-2509", "edit-2511"):
        _assert_same(encode(variant, [prompt], [[]]), ref, ref_mask)
        _assert_same(encode(variant, [prompt]), ref, ref_mask)  # no images given at all: the same
    # Edit 2508: the T2I template (ComfyUI's TextEncodeQwenImageEdit without an image; musubi's text-only items).
    with torch.no_grad():
        t2i, t2i_mask = _t2i_pipe(te_repo).encode_prompt(prompt, device="cpu")
    _assert_same(encode("edit", [prompt], [[]]), t2i, t2i_mask)
    assert t2i.shape[1] != ref.shape[1] or not torch.equal(t2i, ref)

    # A batch mixing prompts with and without a control: each row is its own encoding (2508 encodes the two
    # kinds in their own templates and puts the rows back in order, zero-padded).
    img = _image(64, 48, 4)
    for variant in ("edit", "edit-2509"):
        mixed = encode(variant, [PROMPTS[1], prompt], [[img], []])
        for row, (p, images) in enumerate([(PROMPTS[1], [img]), (prompt, [])]):
            alone = encode(variant, [p], [images])
            n = alone["ctx"].shape[1]
            assert mixed["mask"][row].tolist() == [1] * n + [0] * (mixed["ctx"].shape[1] - n)
            torch.testing.assert_close(mixed["ctx"][row, :n], alone["ctx"][0], rtol=0, atol=1e-5)
            assert not mixed["ctx"][row, n:].any()
        assert mixed["ctx"].shape[1] > encode(variant, [prompt], [[]])["ctx"].shape[1]  # the image tokens


# --------------------------------------------------------------------------- training and generation


@pytest.fixture(scope="module")
def plus_run(models, tmp_path_factory):
    """An Edit-Plus run at the CLI on a dataset without any control image, with a sample prompt without --ci."""
    root = tmp_path_factory.mktemp("plus-run")
    dataset = make_dataset(root / "data", n=2, size=(32, 32))
    out = root / "run"
    job = write_job(root / "job.toml", models, "edit-2509", dataset, out, samples=["a red square --w 32 --h 32"])
    with pytest.MonkeyPatch.context() as mp:
        encodes, velocities = spy(mp, "encode_text"), spy(mp, "predict_velocity")
        code = kern("train", "--config", str(job))
    return {"code": code, "out": out, "root": root, "encodes": encodes, "velocities": velocities}


def test_edit_plus_trains_on_a_dataset_without_control_images(models, plus_run):
    assert plus_run["code"] == 0
    out = plus_run["out"]
    values = losses(out)
    assert len(values) == 3 and all(math.isfinite(v) for v in values)
    tensors, meta = load_file(out / "adapter.safetensors")
    assert meta["kern.variant"] == "edit-2509" and any("lora_up" in k for k in tensors)

    # The transformer sees no reference latents, in training and in the sample (its two true-CFG forwards).
    velocities = plus_run["velocities"]
    assert len(velocities) == 3 + 2 and all(v["references"] is None for v in velocities)
    sample = Image.open(out / "samples" / "step-000003_00.png")
    assert sample.size == (32, 32) and json.loads(sample.text["kern"])["references"] == []
    # Each caption was encoded with an empty image list: the text-only form.
    cached = [c for c in plus_run["encodes"] if c["prompts"] not in ([" "], ["a red square"])]
    assert cached and all(c["options"]["images"] == [[]] * len(c["prompts"]) for c in cached)

    # The cached conditioning is the encoder's text-only encoding of the caption.
    enc = text_encoder(models, "edit-2509")
    hook = get_manager().hook
    for stem, caption in (("img0", "a red square"), ("img1", "a green square")):
        want = hook.encode_text(
            arch="qwen-image", variant="edit-2509", encoder=enc, prompts=[caption], options={"images": [[]]}
        )
        got = cached_ctx(plus_run["root"] / "data" / "cache" / f"{stem}_qie_te.safetensors")
        torch.testing.assert_close(got, want["ctx"][0], rtol=0, atol=1e-5)


def test_generation_without_ref_applies_the_trained_adapter(models, plus_run, tmp_path):
    assert plus_run["code"] == 0
    adapter = plus_run["out"] / "adapter.safetensors"
    common = (
        "generate",
        "--arch",
        "qwen-image",
        "--transformer",
        str(models["edit-2509"]),
        "--vae",
        str(models["vae"]),
        "--text-encoder",
        str(models["text_encoder"]),
        "-p",
        "a red square",
        "-W",
        "32",
        "--height",
        "32",
        "--steps",
        "2",
        "--dtype",
        "float32",
        "--device",
        "cpu",
    )
    assert kern(*common, "--weights", str(adapter), "--out", str(tmp_path / "lora")) == 0
    assert kern(*common, "--out", str(tmp_path / "base")) == 0
    (with_lora,), (base,) = sorted((tmp_path / "lora").glob("*.png")), sorted((tmp_path / "base").glob("*.png"))
    info = json.loads(Image.open(with_lora).text["kern"])
    assert info["variant"] == "edit-2509" and info["references"] == [] and Image.open(with_lora).size == (32, 32)
    assert Image.open(with_lora).tobytes() != Image.open(base).tobytes()  # the adapter changed the image


def _mixed_dataset(root):
    """Four items, batch size 2; img1 and img3 lose their control image."""
    dataset = make_dataset(root, n=4, size=(32, 32), refs=1, batch_size=2)
    for i in (1, 3):
        (root / "controls" / f"img{i}_0.png").unlink()
    return dataset


def test_a_control_folder_missing_files_is_an_error_unless_allowed(tmp_path):
    dataset = _mixed_dataset(tmp_path / "data")
    with pytest.raises(DatasetError, match=r"key 'control_directory': 2 image\(s\) have no control") as err:
        scan_items(load_dataset_config(dataset), 16)
    assert "(img1.png, img3.png)" in str(err.value) and "allow_missing_control = true" in str(err.value)
    dataset.write_text(dataset.read_text() + "allow_missing_control = true\n")
    items = scan_items(load_dataset_config(dataset), 16)
    assert {i.stem: len(i.control_paths) for i in items} == {"img0": 1, "img1": 0, "img2": 1, "img3": 0}


def test_mixed_dataset_batches_each_kind_apart_and_keys_the_text_cache_on_the_controls(
    models, tmp_path, monkeypatch, capsys
):
    from kern.core import config
    from kern.train import driver as train

    dataset = _mixed_dataset(tmp_path / "data")
    job_file = write_job(tmp_path / "job.toml", models, "edit-2509", dataset, tmp_path / "run", steps=4)
    assert kern("train", "--config", str(job_file)) == 2  # the missing controls: refused before any work
    assert "2 image(s) have no control image" in capsys.readouterr().err
    assert not (tmp_path / "run" / "adapter.safetensors").exists()

    dataset.write_text(dataset.read_text() + "allow_missing_control = true\n")
    specs = load_dataset_config(dataset)
    items = scan_items(specs, 16)
    for epoch in range(3):
        for batch in batch_order(items, specs, seed=0, epoch=epoch):
            assert len(batch) == 2 and len({len(items[i].control_paths) for i in batch}) == 1

    encodes, velocities = spy(monkeypatch, "encode_text"), spy(monkeypatch, "predict_velocity")
    assert kern("train", "--config", str(job_file)) == 0
    assert all(math.isfinite(v) for v in losses(tmp_path / "run"))
    # Two epochs of one batch of each kind: text-only batches get no references, the others one control each.
    kinds = sorted(0 if v["references"] is None else len(v["references"]) for v in velocities)
    assert kinds == [0, 0, 1, 1] and all(v["latents"].shape[0] == 2 for v in velocities)
    # One caching call with all four items: images for two, none for the others.
    (call,) = encodes
    assert sorted(len(i) for i in call["options"]["images"]) == [0, 0, 1, 1]

    # Text-only and with-control encodings differ (templates, image tokens) and the cache is keyed on the
    # controls: giving img1 a control re-encodes its caption only.
    cache = tmp_path / "data" / "cache"
    assert (
        cached_ctx(cache / "img1_qie_te.safetensors").shape[0] < cached_ctx(cache / "img0_qie_te.safetensors").shape[0]
    )
    job = config.load_job(job_file)
    assert train.cache_only(job, latents=False)["text"] == (0, 4)
    before = cached_ctx(cache / "img1_qie_te.safetensors").shape[0]
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "data" / "controls" / "img1_0.png")
    assert train.cache_only(job, latents=False)["text"] == (1, 4)
    assert cached_ctx(cache / "img1_qie_te.safetensors").shape[0] > before  # now with its image's tokens
