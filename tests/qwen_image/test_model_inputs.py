"""Issue 15's acceptance on the tiny Qwen-Image bundle: the same weights given as (a) repo ids from an offline
Hugging Face cache, (b) a ComfyUI models/ folder of single files (prefixed transformer, Wan-layout VAE, the
single-file Qwen2.5-VL) and (c) a diffusers folder give the same images and the same trained adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from kern.core import config
from kern.core.io import load_file
from kern.data.prompts import Request
from kern.generate.driver import Setup, run_batch
from kern.train import driver as train
from kern_qwen_image import tiny
from PIL import Image
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file

from tests.helpers import make_dataset

REPO = "Qwen/Qwen-Image"
PARTS = ("transformer", "vae", "text_encoder")
TARGETS = ["img_in", "txt_in", "proj_out", "transformer_blocks\\..*"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def layouts(tiny_qwen, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-layouts")
    diffusers = root / "Qwen-Image"
    for part in ("transformer", "vae"):
        (diffusers / part).mkdir(parents=True)
        shutil.copy(tiny_qwen[part], diffusers / part / "diffusion_pytorch_model.safetensors")
    te = Path(tiny_qwen["text_encoder"])
    shutil.copytree(te, diffusers / "text_encoder")
    shutil.copytree(te, diffusers / "tokenizer", ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    comfy = root / "ComfyUI" / "models"
    for folder in ("diffusion_models", "vae", "text_encoders"):
        (comfy / folder).mkdir(parents=True)
    state = st_load(str(tiny_qwen["transformer"]))
    save_file(
        {f"model.diffusion_model.{k}": v for k, v in state.items()},
        comfy / "diffusion_models" / "qwen_image_bf16.safetensors",
        metadata={"kern.axes_dim": "8,12,12"},
    )
    shutil.copy(tiny_qwen["vae"], comfy / "vae" / "qwen_image_vae.safetensors")
    tiny.write_comfy_text_encoder(te, comfy / "text_encoders" / "qwen_2.5_vl_7b.safetensors")
    return {"diffusers": diffusers, "comfy": comfy}


def generate(out: Path, **parts) -> np.ndarray:
    setup = Setup(
        arch="qwen-image", dtype="float32", device="cpu", out=out, width=32, height=32, steps=2, seed=5, **parts
    )
    (path,) = run_batch(setup, [Request(prompt="a red square")])
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_generation_is_the_same_from_every_form(tiny_qwen, layouts, hub_cache, no_network, tmp_path):
    hub_cache.add(REPO, {p: layouts["diffusers"] / p for p in (*PARTS, "tokenizer")})
    files = generate(tmp_path / "files", **{p: str(tiny_qwen[p]) for p in PARTS})
    for name, parts in {
        "folder": {"path": str(layouts["diffusers"])},
        "repo": {"path": REPO},
        "parts": {p: f"{REPO}/{p}" for p in PARTS},
        "comfy": {"path": str(layouts["comfy"])},
    }.items():
        assert np.array_equal(files, generate(tmp_path / name, **parts)), name
    assert no_network == []


def test_training_is_the_same_from_a_comfyui_folder_and_the_files(tiny_qwen, layouts, hub_cache, tmp_path):
    hub_cache.add(REPO, {"tokenizer": layouts["diffusers"] / "tokenizer"})
    adapters = {}
    for name, model in {
        "files": {f"model.{p}": str(tiny_qwen[p]) for p in PARTS},
        "comfy": {"model.path": str(layouts["comfy"].parent)},
    }.items():
        over = {
            "model.arch": "qwen-image",
            "model.dtype": "float32",
            "network.type": "lora",
            "network.rank": 4,
            "network.targets": TARGETS,
            "dataset.config": str(make_dataset(tmp_path / f"data-{name}", n=2, size=(32, 32))),
            "save.out": str(tmp_path / name),
            "train.steps": 2,
            "train.learning_rate": 1e-2,
            "train.mixed_precision": "no",
            "train.device": "cpu",
            "train.gradient_checkpointing": False,
            **model,
        }
        adapters[name] = load_file(train.run(config.load_job(None, over)))[0]
    assert adapters["files"].keys() == adapters["comfy"].keys()
    for key, value in adapters["files"].items():
        assert torch.equal(value, adapters["comfy"][key]), key
