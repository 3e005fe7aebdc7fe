"""Qwen-Image-Layered training at the CLI on tiny models, on the CPU: musubi's multiple_target datasets (directory
and JSONL naming), musubi-named caches (``qil``, the composite and its layers as the frames of one latent), a run
whose loss falls, previews of the layers during training, an adapter that reloads exactly, and the datasets
refused before any work (exit 2)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from kern.core.io import load_file
from kern.core.plugins import get_manager
from kern.data import load_dataset_config, scan_items
from kern.errors import DatasetError
from PIL import Image

SIZE = 32
LAYERS = 2
STEPS = 30
TARGETS = ["img_in", "txt_in", r"transformer_blocks\.\d+\.(attn|img_mlp|txt_mlp)\..*"]
COLORS = [(220, 40, 40), (40, 200, 60), (40, 60, 220)]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def layered_models(tiny_variants):
    """A Layered transformer and the RGBA VAE, next to the T2I bundle's text encoder."""
    v = tiny_variants
    return {
        "text_encoder": v["text_encoder"],
        "transformer": v["layered"],
        "t2i": v["transformer"],
        "vae": v["rgba_vae"],
    }


def layer_picture(i: int, n: int) -> Image.Image:
    """Layer ``n`` of item ``i``: a coloured band on a transparent background."""
    img = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    band = SIZE // LAYERS
    img.paste((*COLORS[(i + n) % len(COLORS)], 255), (0, (n - 1) * band, SIZE, n * band))
    return img


def make_layered(root, n=2, layers=LAYERS, jsonl=False, extra=""):
    """``n`` composites (RGB) with captions and their RGBA layers ``img<i>_<k>.png``, musubi's naming, plus the TOML."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        parts = [layer_picture(i, k) for k in range(1, layers + 1)]
        composite = Image.new("RGBA", (SIZE, SIZE), (255, 255, 255, 255))
        for p in parts:
            composite = Image.alpha_composite(composite, p)
        composite.convert("RGB").save(images / f"img{i}.png")
        caption = f"{['red', 'green', 'blue'][i % 3]} and {['green', 'blue', 'red'][i % 3]} bands"
        record = {"image_path_0": str(images / f"img{i}.png"), "caption": caption}
        if not jsonl:
            (images / f"img{i}.txt").write_text(caption)
        for k, p in enumerate(parts, 1):
            p.save(images / f"img{i}_{k}.png")
            record[f"image_path_{k}"] = str(images / f"img{i}_{k}.png")
        lines.append(json.dumps(record))
    source = f'image_jsonl_file = "{root / "items.jsonl"}"\n' if jsonl else f'image_directory = "{images}"\n'
    if jsonl:
        (root / "items.jsonl").write_text("\n".join(lines) + "\n")
    toml = root / "dataset.toml"
    toml.write_text(
        f'[general]\nresolution = [{SIZE}, {SIZE}]\ncaption_extension = ".txt"\nbatch_size = 1\n\n'
        f'[[datasets]]\n{source}cache_directory = "{root / "cache"}"\nmultiple_target = true\n{extra}'
    )
    return toml


def kern(*args):
    """``kern ARGS`` in this process; returns the exit code (0 when main returns normally)."""
    from kern_cli.main import main

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        main(list(args))
    except SystemExit as exc:
        return exc.code or 0
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    return 0


def job_file(models, path, transformer="transformer", **extra):
    """A job TOML for the tiny models; ``extra`` adds ``"section.key": value`` lines."""
    values = {
        "model.arch": "qwen-image",
        "model.transformer": str(models[transformer]),
        "model.vae": str(models["vae"]),
        "model.text_encoder": str(models["text_encoder"]),
        "model.dtype": "float32",
        "network.type": "lora",
        "network.rank": 4,
        "network.alpha": 4.0,
        "network.targets": TARGETS,
        "train.learning_rate": 1e-2,
        "train.mixed_precision": "no",
        "train.device": "cpu",
        "train.gradient_checkpointing": False,
        "sample.prompts": [],
        **extra,
    }
    sections: dict[str, list[str]] = {}
    for dotted, value in values.items():
        section, key = dotted.split(".")
        sections.setdefault(section, []).append(f"{key} = {json.dumps(value)}")
    path.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n\n" for s, lines in sections.items()))
    return path


def _spy(name, calls):
    hook = get_manager().hook
    real = getattr(hook, name)

    def spy(**kw):
        out = real(**kw)
        calls.append((kw, out))
        return out

    setattr(hook, name, spy)


def _velocity(model, batch, noise, t):
    x0 = batch["latents"]
    noisy = (1 - t) * x0 + t * noise
    with torch.no_grad():
        return get_manager().hook.predict_velocity(
            arch="qwen-image",
            variant="layered",
            model=model,
            latents=noisy,
            timesteps=torch.full((x0.shape[0],), t),
            text=batch["text"],
            references=batch["references"],
            options={},
        )


def test_layered_run_learns_caches_as_musubi_previews_and_reloads_exactly(layered_models, tmp_path):
    from kern.adapters.weights import apply_adapters
    from kern.data import cache
    from kern_qwen_image.plugin import CACHE_LAYOUT

    dataset = make_layered(tmp_path / "data", n=2)
    composite = tmp_path / "data" / "images" / "img0.png"
    job = job_file(
        layered_models,
        tmp_path / "job.toml",
        **{
            "train.steps": STEPS,
            "train.learning_rate": 2e-2,
            "sample.prompts": [f"red and green bands --ci {composite} --layers {LAYERS} --w {SIZE} --h {SIZE}"],
            "sample.steps": 1,
        },
    )
    made: list = []
    velocities: list = []
    _spy("make_network", made)
    _spy("predict_velocity", velocities)
    out = tmp_path / "run"
    assert kern("train", "--config", str(job), "--dataset", str(dataset), "--out", str(out)) == 0

    # The transformer saw (B, layers + 1, 16, h, w) and the clean composite as its one reference.
    first, _ = velocities[0]
    assert first["latents"].shape == (1, LAYERS + 1, 16, SIZE // 8, SIZE // 8)
    (ref,) = first["references"]
    assert ref.shape == (1, 16, SIZE // 8, SIZE // 8)

    # The loss falls: the mean of the last ten steps well under the first ten's.
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10, losses

    # Caches as musubi names them: qil, the composite and its layers as the frames of one latent (C, F, h, w).
    cache_dir = tmp_path / "data" / "cache"
    names = sorted(p.name for p in cache_dir.glob("img*"))
    assert names == [
        f"img{i}_{s}" for i in range(2) for s in (f"{SIZE:04d}x{SIZE:04d}_qil.safetensors", "qil_te.safetensors")
    ]
    tensors, meta = load_file(cache_dir / f"img0_{SIZE:04d}x{SIZE:04d}_qil.safetensors")
    key = f"latents_{LAYERS + 1}x{SIZE // 8}x{SIZE // 8}_float32"
    assert list(tensors) == [key] and tensors[key].shape == (16, LAYERS + 1, SIZE // 8, SIZE // 8)
    assert meta["architecture"] == "qwen_image" and (meta["width"], meta["height"]) == (str(SIZE), str(SIZE))
    text, _ = load_file(cache_dir / "img0_qil_te.safetensors")
    assert list(text) == ["varlen_vl_embed_float32"]

    # The preview made during training: the composite and each layer, RGBA.
    samples = sorted((out / "samples").glob(f"step-{STEPS:06d}_00_layer*.png"))
    assert len(samples) == LAYERS + 1
    assert all(Image.open(p).mode == "RGBA" and Image.open(p).size == (SIZE, SIZE) for p in samples)

    # The adapter reloads exactly: a fresh transformer with the saved file predicts what the trained one did.
    adapter = out / "adapter.safetensors"
    saved, meta = load_file(adapter)
    assert meta["kern.variant"] == "layered" and meta["modelspec.architecture"] == "Qwen-Image-Layered/lora"
    ((kw, network),) = made
    trained = kw["model"]
    hook = get_manager().hook
    fresh = hook.load_model(
        arch="qwen-image",
        variant="layered",
        part="transformer",
        path=str(layered_models["transformer"]),
        dtype=torch.float32,
        device=torch.device("cpu"),
        options={},
    )
    items = scan_items(load_dataset_config(dataset), 16)
    batch = cache.load_batch(items[:1], "qil", layout=CACHE_LAYOUT)
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))
    base = _velocity(fresh, batch, noise, 0.5)
    (reloaded,) = apply_adapters(fresh, [(adapter, 1.0)], arch="qwen-image", variant="layered")
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, network.state_dict()[name]), name
    expected = _velocity(trained, batch, noise, 0.5)
    assert torch.equal(_velocity(fresh, batch, noise, 0.5), expected)
    # And the trained adapter fits the data better than the base at a fixed noise and timestep.
    target = noise - batch["latents"]
    assert ((expected - target) ** 2).mean() < ((base - target) ** 2).mean()


# --------------------------------------------------------------------------- datasets


def test_jsonl_and_directory_name_the_same_layers(tmp_path):
    folder = scan_items(load_dataset_config(make_layered(tmp_path / "dir", n=2)), 16)
    lines = scan_items(load_dataset_config(make_layered(tmp_path / "jsonl", n=2, jsonl=True)), 16)
    for items in (folder, lines):
        assert [i.image_path.name for i in items] == ["img0.png", "img1.png"]
        assert [[p.name for p in i.target_paths] for i in items] == [
            ["img0_1.png", "img0_2.png"],
            ["img1_1.png", "img1_2.png"],
        ]


def test_longer_stems_claim_their_layers_first_and_order_is_numeric(tmp_path):
    toml = make_layered(tmp_path / "d", n=2)
    images = tmp_path / "d" / "images"
    # img1's layers, and img10 (captioned) with layers 2 and 10: numeric order, never img1's.
    (images / "img10.txt").write_text("ten")
    Image.new("RGB", (SIZE, SIZE)).save(images / "img10.png")
    layer_picture(0, 1).save(images / "img10_10.png")
    layer_picture(0, 2).save(images / "img10_2.png")
    items = {i.stem: [p.name for p in i.target_paths] for i in scan_items(load_dataset_config(toml), 16)}
    assert items == {
        "img0": ["img0_1.png", "img0_2.png"],
        "img1": ["img1_1.png", "img1_2.png"],
        "img10": ["img10_2.png", "img10_10.png"],
    }


def _break_count(root):
    (root / "images" / "img1_2.png").unlink()


def _break_alpha(root):
    Image.new("RGB", (SIZE, SIZE), "white").save(root / "images" / "img1_2.png")


def _break_none(root):
    for k in (1, 2):
        (root / "images" / f"img1_{k}.png").unlink()


def _break_jsonl_gap(root):
    lines = [json.loads(line) for line in (root / "items.jsonl").read_text().splitlines()]
    lines[1]["image_path_3"] = lines[1].pop("image_path_2")
    (root / "items.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def _break_suffix(root):
    layer_picture(0, 1).save(root / "images" / "img0_top.png")


@pytest.mark.parametrize(
    ("breaks", "jsonl", "message"),
    [
        (_break_count, False, "same number of layers; img0.png has 2, img1.png has 1"),
        (_break_alpha, False, "img1_2.png of img1.png has no alpha channel"),
        (_break_none, False, "img1.png has no layers"),
        (_break_jsonl_gap, True, "items.jsonl:2 key 'image_path_2': missing"),
        (_break_suffix, False, "suffix 'top' is not a number"),
    ],
)
def test_bad_layered_datasets_exit_2_before_any_work(layered_models, tmp_path, capsys, breaks, jsonl, message):
    dataset = make_layered(tmp_path / "data", n=2, jsonl=jsonl)
    breaks(tmp_path / "data")
    job = job_file(layered_models, tmp_path / "job.toml")
    code = kern("train", "--config", str(job), "--dataset", str(dataset), "--out", str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not list((tmp_path / "data").glob("cache/*.safetensors")) and not (tmp_path / "run").exists()


def test_multiple_target_needs_a_layered_variant_and_layered_needs_it(layered_models, tmp_path, capsys):
    dataset = make_layered(tmp_path / "data", n=1)
    t2i = job_file(layered_models, tmp_path / "t2i.toml", transformer="t2i")
    code = kern("train", "--config", str(t2i), "--dataset", str(dataset), "--out", str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2 and "key 'multiple_target': qwen-image t2i trains on one target image per item" in err, err

    plain = make_layered(tmp_path / "plain", n=1)
    plain.write_text(plain.read_text().replace("multiple_target = true\n", ""))
    job = job_file(layered_models, tmp_path / "job.toml")
    code = kern("cache", "all", "--config", str(job), "--dataset", str(plain))
    err = capsys.readouterr().err
    assert code == 2 and "qwen-image layered cannot be trained on" in err and "multiple_target = true" in err, err
    assert not (tmp_path / "plain" / "cache").exists() and not (tmp_path / "data" / "cache").exists()

    with pytest.raises(DatasetError, match="a multiple_target dataset has no control images"):
        load_dataset_config(make_layered(tmp_path / "ctl", n=1, extra=f'control_directory = "{tmp_path}"\n'))


def test_a_validation_dataset_of_a_layered_run_needs_multiple_target_too(layered_models, tmp_path, capsys):
    dataset = make_layered(tmp_path / "data", n=1)
    held = make_layered(tmp_path / "held", n=1)  # its images, but in a table without multiple_target
    dataset.write_text(
        dataset.read_text()
        + f'\n[[validation.datasets]]\nimage_directory = "{held.parent / "images"}"\n'
        + f'cache_directory = "{tmp_path / "vcache"}"\n'
    )
    job = job_file(layered_models, tmp_path / "job.toml")
    code = kern("train", "--config", str(job), "--dataset", str(dataset), "--out", str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2 and "layered cannot be trained on" in err and "validation.datasets[0]" in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "vcache").exists()
