"""Issue 15's acceptance on the tiny FLUX.2 klein bundle: `kern train` and `kern generate` take the same weights as
(a) repo ids resolved from an offline Hugging Face cache, (b) one ComfyUI models/ folder of single files and (c) a
diffusers folder, and give the same outputs from each."""

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
from kern_flux2 import tiny
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file

from tests.conftest import run_kern
from tests.flux2.test_train_flux2 import overrides
from tests.helpers import make_dataset

REPO = "black-forest-labs/FLUX.2-klein-4B"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def layouts(tiny_bundle, tmp_path_factory):
    """The tiny bundle's weights as a diffusers folder and as a ComfyUI models/ folder (prefixed transformer)."""
    root = tmp_path_factory.mktemp("layouts")
    diffusers = root / "FLUX.2-klein-4B"
    (diffusers / "transformer").mkdir(parents=True)
    shutil.copy(tiny_bundle["transformer"], diffusers / "transformer" / "diffusion_pytorch_model.safetensors")
    (diffusers / "vae").mkdir()
    shutil.copy(tiny_bundle["vae"], diffusers / "vae" / "diffusion_pytorch_model.safetensors")
    te = Path(tiny_bundle["text_encoder"])
    shutil.copytree(te, diffusers / "text_encoder")
    shutil.copytree(te, diffusers / "tokenizer", ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    comfy = root / "ComfyUI" / "models"
    for folder in ("diffusion_models", "vae", "text_encoders"):
        (comfy / folder).mkdir(parents=True)
    state = st_load(str(tiny_bundle["transformer"]))
    save_file(
        {f"model.diffusion_model.{k}": v for k, v in state.items()},
        comfy / "diffusion_models" / "flux-2-klein-4b.safetensors",
    )
    shutil.copy(tiny_bundle["vae"], comfy / "vae" / "flux2-vae.safetensors")
    tiny.write_comfy_text_encoder(te, comfy / "text_encoders" / "qwen_3_4b.safetensors")
    return {"diffusers": diffusers, "comfy": comfy}


def generate(out: Path, **parts) -> np.ndarray:
    setup = Setup(
        arch="flux2-klein-4b", dtype="float32", device="cpu", out=out, width=32, height=32, steps=2, seed=3, **parts
    )
    (path,) = run_batch(setup, [Request(prompt="a red square")])
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_generation_is_the_same_from_a_repo_id_a_diffusers_folder_and_the_files(
    tiny_bundle, layouts, hub_cache, no_network, tmp_path
):
    hub_cache.add(REPO, {p: layouts["diffusers"] / p for p in ("transformer", "vae", "text_encoder", "tokenizer")})
    files = generate(tmp_path / "files", **{p: str(tiny_bundle[p]) for p in ("transformer", "vae", "text_encoder")})
    folder = generate(tmp_path / "folder", path=str(layouts["diffusers"]))
    repo = generate(tmp_path / "repo", path=REPO)
    mixed = generate(tmp_path / "mixed", path=REPO, vae=str(tiny_bundle["vae"]), transformer=f"{REPO}/transformer")
    for other in (folder, repo, mixed):
        assert np.array_equal(files, other)
    assert no_network == []


def test_generation_is_the_same_from_a_comfyui_models_folder(tiny_bundle, layouts, hub_cache, no_network, tmp_path):
    # ComfyUI's text-encoder file has no tokenizer: it comes from the klein repo, here an offline cache.
    hub_cache.add(REPO, {"tokenizer": layouts["diffusers"] / "tokenizer"})
    files = generate(tmp_path / "files", **{p: str(tiny_bundle[p]) for p in ("transformer", "vae", "text_encoder")})
    comfy = generate(tmp_path / "comfy", path=str(layouts["comfy"].parent))
    assert np.array_equal(files, comfy)
    assert no_network == []


@pytest.fixture(scope="module")
def fp8_comfy(layouts, tmp_path_factory):
    """A ComfyUI models/ folder whose transformer and text encoder are ComfyUI scaled fp8 files, and one holding the
    same weights dequantised (what the fp8 files mean, as plain files)."""
    from tests.kernel.test_fp8_checkpoints import fp8_checkpoint

    root = tmp_path_factory.mktemp("fp8-comfy")
    made = {}
    for name in ("fp8", "dequantised"):
        for folder in ("diffusion_models", "vae", "text_encoders"):
            (root / name / "models" / folder).mkdir(parents=True)
        shutil.copy(layouts["comfy"] / "vae" / "flux2-vae.safetensors", root / name / "models" / "vae")
        made[name] = root / name / "models"
    sources = {
        ("diffusion_models", "flux-2-klein-4b_fp8_scaled.safetensors"): (
            layouts["comfy"] / "diffusion_models" / "flux-2-klein-4b.safetensors",
            lambda k, v: k.endswith(".weight") and v.dim() == 2 and (".double_blocks." in k or ".single_blocks." in k),
        ),
        ("text_encoders", "qwen_3_4b_fp8_scaled.safetensors"): (
            layouts["comfy"] / "text_encoders" / "qwen_3_4b.safetensors",
            lambda k, v: v.dim() == 2 and k.startswith("model.layers.") and k.endswith("proj.weight"),
        ),
    }
    for (folder, name), (src, quantise) in sources.items():
        state = st_load(str(src))
        with safe_open(str(src), "pt") as f:
            metadata = f.metadata() or {}
        out, quant_metadata, reference = fp8_checkpoint(state, "scaled", quantise)
        save_file(out, made["fp8"] / folder / name, metadata={**metadata, **quant_metadata})
        plain = {k: reference[k].to(state[k].dtype) if k in reference else v for k, v in state.items()}
        save_file(plain, made["dequantised"] / folder / name.replace("_fp8_scaled", ""), metadata=metadata)
    return made


def test_comfyui_fp8_files_give_what_their_dequantised_weights_give(
    fp8_comfy, layouts, hub_cache, no_network, tmp_path
):
    hub_cache.add(REPO, {"tokenizer": layouts["diffusers"] / "tokenizer"})
    fp8 = generate(tmp_path / "fp8", path=str(fp8_comfy["fp8"]))
    reference = generate(tmp_path / "reference", path=str(fp8_comfy["dequantised"]))
    assert np.array_equal(fp8, reference)
    assert no_network == []


def test_kern_train_runs_on_a_comfyui_fp8_folder_with_an_fp8_base(fp8_comfy, layouts, hub_cache, tmp_path):
    hub_cache.add(REPO, {"tokenizer": layouts["diffusers"] / "tokenizer"})
    dataset = make_dataset(tmp_path / "data", n=2, size=(32, 32))
    proc = run_kern(
        "train",
        "--arch",
        "flux2-klein-4b",
        "--model",
        str(fp8_comfy["fp8"]),
        "--dataset",
        str(dataset),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "2",
        "--set",
        "train.base_precision=fp8",
        "--set",
        "model.fp8_text_encoder=true",
        "--set",
        "train.device=cpu",
        "--set",
        "train.mixed_precision=no",
        "--set",
        "train.gradient_checkpointing=false",
        "--set",
        "model.dtype=float32",
        env=hub_cache.env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
    assert "flux-2-klein-4b_fp8_scaled.safetensors" in (tmp_path / "run" / "config.toml").read_text()


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter.safetensors")[0]


def test_training_is_the_same_from_a_repo_id_and_from_the_files(tiny_bundle, layouts, hub_cache, no_network, tmp_path):
    hub_cache.add(REPO, {p: layouts["diffusers"] / p for p in ("transformer", "vae", "text_encoder", "tokenizer")})
    runs = {}
    for name, parts in {
        "files": {},
        "repo": {"model.path": REPO, "model.transformer": None, "model.vae": None, "model.text_encoder": None},
    }.items():
        dataset = make_dataset(tmp_path / f"data-{name}")
        over = overrides(tiny_bundle, dataset, tmp_path / name)
        over.update(parts)
        over = {k: v for k, v in over.items() if v is not None}
        train.run(config.load_job(None, over))
        runs[name] = adapter(tmp_path / name)
    assert runs["files"].keys() == runs["repo"].keys()
    for key, value in runs["files"].items():
        assert torch.equal(value, runs["repo"][key]), key
    assert no_network == []
    written = (tmp_path / "repo" / "config.toml").read_text()
    assert f'path = "{REPO}"' in written and "models--black-forest-labs--FLUX.2-klein-4B" in written


def test_the_cli_takes_a_repo_id_offline_and_names_what_it_tried(layouts, hub_cache, tmp_path):
    hub_cache.add(REPO, {p: layouts["diffusers"] / p for p in ("transformer", "vae", "text_encoder", "tokenizer")})
    args = (
        "generate",
        "--arch",
        "flux2-klein-4b",
        "-p",
        "a cat",
        "-W",
        "32",
        "-H",
        "32",
        "--steps",
        "1",
        "--dtype",
        "float32",
    )
    proc = run_kern(*args, "--model", REPO, "--out", str(tmp_path / "o"), env=hub_cache.env())
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "o").glob("*.png"))) == 1
    proc = run_kern(
        *args, "--model", "black-forest-labs/FLUX.2-klein-9B", "--out", str(tmp_path / "p"), env=hub_cache.env()
    )
    assert proc.returncode == 1, proc.stderr
    assert (
        "--model (transformer) black-forest-labs/FLUX.2-klein-9B/transformer: not a local file or folder" in proc.stderr
    )
    assert "taken as the Hugging Face repo black-forest-labs/FLUX.2-klein-9B" in proc.stderr
    assert "HF_HUB_OFFLINE" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "p").exists()
