"""Training on the tiny FLUX.2 klein bundle end to end on the CPU: LoRA and LoHa learn and reload,
references reach the model in batches, and the caches are reused by the driver and by `kern cache`."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import kern.data as data
import numpy as np
import pytest
import torch
from kern.core import config
from kern.core.io import load_file
from kern.core.plugins import get_manager
from kern.data import cache
from kern.data.prompts import Request
from kern.generate.driver import Setup, run_batch
from kern.train import driver as train
from PIL import Image

from tests.conftest import run_kern
from tests.helpers import make_dataset

# As the demo job (examples/tiny/job.toml): a random tiny base needs its input and output projections
# adapted to learn visibly.
TARGETS = ["img_in", "txt_in", "final_layer\\.linear", "double_blocks\\..*", "single_blocks\\..*"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def overrides(bundle, dataset, out, **over):
    base = {
        "model.arch": "flux2-klein-4b",
        "model.transformer": str(bundle["transformer"]),
        "model.vae": str(bundle["vae"]),
        "model.text_encoder": str(bundle["text_encoder"]),
        "model.dtype": "float32",
        "network.type": "lora",
        "network.rank": 8,
        "network.alpha": 8.0,
        "network.targets": TARGETS,
        "dataset.config": str(dataset),
        "save.out": str(out),
        "train.steps": 2,
        "train.learning_rate": 2e-2,
        "train.mixed_precision": "no",
        "train.device": "cpu",
        "train.gradient_checkpointing": False,
        "sample.prompts": [],
    }
    base.update(over)
    return base


def job(bundle, dataset, out, **over):
    return config.load_job(None, overrides(bundle, dataset, out, **over))


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


class Spy:
    """Wraps hooks of the global plugin manager (the one train.run and generate use) and records calls."""

    def __init__(self, monkeypatch, *names: str) -> None:
        self.manager = get_manager()
        self.calls: dict[str, list[dict]] = {n: [] for n in names}
        self.results: dict[str, list] = {n: [] for n in names}
        for name in names:
            real = getattr(self.manager.hook, name)

            def wrapper(_name=name, _real=real, **kw):
                self.calls[_name].append(kw)
                result = _real(**kw)
                self.results[_name].append(result)
                return result

            monkeypatch.setattr(self.manager.hook, name, wrapper)

    def count(self, name: str) -> int:
        return len(self.calls[name])

    def prompts(self) -> list[str]:
        return [p for kw in self.calls["encode_text"] for p in kw["prompts"]]


def fresh_transformer(bundle):
    return get_manager().hook.load_model(
        arch="flux2",
        variant="klein-4b",
        part="transformer",
        path=str(bundle["transformer"]),
        dtype=torch.float32,
        device=torch.device("cpu"),
        options={},
    )


def velocity(model, latents, t, text, references=None):
    with torch.no_grad():
        return get_manager().hook.predict_velocity(
            arch="flux2",
            variant="klein-4b",
            model=model,
            latents=latents,
            timesteps=t,
            text=text,
            references=references,
            options={"guidance": 1.0},
        )


# --------------------------------------------------------------------------- LoRA and LoHa


@pytest.mark.parametrize("network", ["lora", "loha"])
def test_loss_falls_and_the_saved_adapter_reproduces_the_trained_model(tiny_bundle, tmp_path, monkeypatch, network):
    from kern.adapters.weights import apply_adapters

    dataset = make_dataset(tmp_path / "data", n=2, size=(32, 32), batch_size=2)
    out = tmp_path / "run"
    spy = Spy(monkeypatch, "make_network")
    steps = 60
    # LoHa's update has rank up to rank², and each of its steps costs more.
    rank, lr = {"lora": (16, 1e-2), "loha": (4, 2e-2)}[network]
    adapter = train.run(
        job(
            tiny_bundle,
            dataset,
            out,
            **{
                "network.type": network,
                "network.rank": rank,
                "network.alpha": float(rank),
                "train.learning_rate": lr,
                "train.steps": steps,
                "sample.prompts": ["a red square"],
                "sample.width": 32,
                "sample.height": 32,
                "sample.steps": 2,
                "sample.seed": 5,
            },
        )
    )

    # The loss falls on a dataset of two flat images the adapter can overfit.
    curve = losses(out)
    assert len(curve) == steps and all(map(torch.isfinite, torch.tensor(curve)))
    first, last = sum(curve[:15]) / 15, sum(curve[-15:]) / 15
    assert last < 0.9 * first, (first, last, curve)

    # The file says what it is.
    tensors, meta = load_file(adapter)
    assert meta["modelspec.architecture"] == "Flux.2-klein-4b/lora"
    assert meta["ss_network_module"] == network
    assert meta["kern.arch"] == "flux2" and meta["kern.variant"] == "klein-4b" and meta["ss_steps"] == str(steps)
    assert all(v.dtype == torch.float32 for v in tensors.values())
    marker = "lora_up" if network == "lora" else "hada_w1_a"
    assert any(marker in k for k in tensors) and any(k.startswith("lora_unet_img_in") for k in tensors)

    # The network the driver trained, still attached to its transformer.
    assert spy.count("make_network") == 1
    trained_model = spy.calls["make_network"][0]["model"]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 128, 2, 2, generator=g)
    text = {"ctx": torch.randn(2, 12, 48, generator=g)}
    t = torch.tensor([0.3, 0.8])
    expected = velocity(trained_model, latents, t, text)

    # The saved file applied to a freshly loaded transformer gives the same velocities.
    fresh = fresh_transformer(tiny_bundle)
    base = velocity(fresh, latents, t, text)
    networks = apply_adapters(fresh, [(str(adapter), 1.0)], arch="flux2")
    assert len(networks) == 1 and len(networks[0]) == len(spy.results["make_network"][0])
    reloaded = velocity(fresh, latents, t, text)
    assert (expected - base).abs().max() > 1e-2  # training changed the model, so the comparison means something
    torch.testing.assert_close(reloaded, expected, rtol=1e-5, atol=1e-5)

    # The run's final sample image is what `kern generate` makes with the saved adapter.
    sample = out / "samples" / f"step-{steps:06d}_00.png"
    generated = run_batch(
        Setup(
            arch="flux2-klein-4b",
            transformer=str(tiny_bundle["transformer"]),
            vae=str(tiny_bundle["vae"]),
            text_encoder=str(tiny_bundle["text_encoder"]),
            dtype="float32",
            device="cpu",
            out=tmp_path / "gen",
            weights=[(str(adapter), 1.0)],
            width=32,
            height=32,
            steps=2,
        ),
        [Request(prompt="a red square", seed=5)],
    )
    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (sample, generated[0]))
    assert a.shape == (32, 32, 3) and np.abs(a - b).max() <= 1


# --------------------------------------------------------------------------- references


def test_batches_of_two_items_with_two_references_each_reach_the_model(tiny_bundle, tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path / "data", n=4, size=(64, 64), refs=2, batch_size=2)
    spy = Spy(monkeypatch, "predict_velocity", "encode_latents")
    out = tmp_path / "run"
    adapter = train.run(job(tiny_bundle, dataset, out, **{"train.steps": 3}))
    assert adapter.is_file() and len(losses(out)) == 3

    # Latents for 4 targets and 2 x 4 controls were encoded.
    assert sum(kw["images"].shape[0] for kw in spy.calls["encode_latents"]) == 4 * 3
    assert spy.count("predict_velocity") == 3
    specs = data.load_dataset_config(dataset)
    items = data.scan_items(specs, 16)
    cached = {}
    for item in items:
        _, controls = cache._load_latents(cache.latent_cache_path(item, "f2k4b"))
        cached[item.key] = controls
    for kw in spy.calls["predict_velocity"]:
        assert kw["latents"].shape == (2, 128, 4, 4)
        refs = kw["references"]
        assert isinstance(refs, list) and len(refs) == 2
        assert [tuple(r.shape) for r in refs] == [(2, 128, 4, 4)] * 2
        # Each row is the cached control latent of one item, control 0 first, then control 1.
        for row in range(2):
            owner = [key for key, c in cached.items() if torch.equal(refs[0][row], c[0])]
            assert len(owner) == 1, "reference 0 of a batch row is no item's control 0"
            assert torch.equal(refs[1][row], cached[owner[0]][1])


def test_mixed_reference_counts_go_to_different_buckets_and_train(tiny_bundle, tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path / "data", n=4, size=(32, 32), refs=2, batch_size=2)
    for i in (0, 2):  # img0 and img2 keep one control, img1 and img3 two
        (tmp_path / "data" / "controls" / f"img{i}_1.png").unlink()
    specs = data.load_dataset_config(dataset)
    items = data.scan_items(specs, 16)
    assert {i.stem: len(i.control_paths) for i in items} == {"img0": 1, "img1": 2, "img2": 1, "img3": 2}
    assert data.batch_key(items[0]) != data.batch_key(items[1]) and data.batch_key(items[0]) == data.batch_key(items[2])
    for epoch in range(3):
        order = data.batch_order(items, specs, seed=42, epoch=epoch)
        assert sorted(i for b in order for i in b) == [0, 1, 2, 3]
        for batch in order:
            assert len(batch) == 2 and len({len(items[i].control_paths) for i in batch}) == 1, order

    spy = Spy(monkeypatch, "predict_velocity")
    train.run(job(tiny_bundle, dataset, tmp_path / "run", **{"train.steps": 4}))
    counts = Counter(len(kw["references"]) for kw in spy.calls["predict_velocity"])
    assert counts == {1: 2, 2: 2}  # two epochs of one 1-control and one 2-control batch
    for kw in spy.calls["predict_velocity"]:
        assert all(tuple(r.shape) == (2, 128, 2, 2) for r in kw["references"])


# --------------------------------------------------------------------------- caches


def test_second_run_reuses_the_caches_and_a_changed_caption_reencodes_only_its_text(tiny_bundle, tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path / "data", n=3, size=(32, 32))
    spy = Spy(monkeypatch, "encode_text", "encode_latents")
    train.run(job(tiny_bundle, dataset, tmp_path / "a"))
    assert sorted(spy.prompts()) == sorted(
        ["", "a red square", "a green square", "a blue square"]
    )  # "" for caption dropout
    assert sum(kw["images"].shape[0] for kw in spy.calls["encode_latents"]) == 3

    spy.calls = {n: [] for n in spy.calls}
    train.run(job(tiny_bundle, dataset, tmp_path / "b"))
    assert spy.prompts() == [] and spy.count("encode_latents") == 0

    (tmp_path / "data" / "images" / "img1.txt").write_text("a green circle")
    train.run(job(tiny_bundle, dataset, tmp_path / "c"))
    assert spy.prompts() == ["a green circle"] and spy.count("encode_latents") == 0
    _, meta = load_file(tmp_path / "data" / "cache" / "img1_f2k4b_te.safetensors")
    assert meta["caption1"] == "a green circle"


def test_rerunning_the_run_folders_config_reuses_caches_made_with_relative_paths(tiny_bundle, tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path / "data", n=2, size=(32, 32))
    monkeypatch.chdir(tmp_path)

    def rel(p):
        return os.path.relpath(p, tmp_path)  # as typed on the command line, from the cwd

    first = overrides(
        tiny_bundle,
        rel(dataset),
        "run",
        **{
            "model.transformer": rel(tiny_bundle["transformer"]),
            "model.vae": rel(tiny_bundle["vae"]),
            "model.text_encoder": rel(tiny_bundle["text_encoder"]),
        },
    )
    train.run(config.load_job(None, first))
    spy = Spy(monkeypatch, "encode_text", "encode_latents")
    # The documented way to rerun a run: `kern train --config runs/x/config.toml` (paths there are absolute).
    train.run(config.load_job(tmp_path / "run" / "config.toml", {"save.out": str(tmp_path / "again")}))
    assert spy.prompts() == [] and spy.count("encode_latents") == 0


def test_kern_cache_all_fills_the_caches_that_training_then_reuses(tiny_bundle, tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path / "data", n=2, size=(32, 32))
    folder = tmp_path / "job"
    folder.mkdir()

    def rel(p):
        return Path(os.path.relpath(p, folder)).as_posix()  # relative to the job file, as documented

    job_file = folder / "job.toml"
    job_file.write_text(
        "[model]\n"
        'arch = "flux2-klein-4b"\n'
        f'transformer = "{rel(tiny_bundle["transformer"])}"\n'
        f'vae = "{rel(tiny_bundle["vae"])}"\n'
        f'text_encoder = "{rel(tiny_bundle["text_encoder"])}"\n'
        'dtype = "float32"\n\n'
        "[network]\n"
        'type = "lora"\nrank = 4\nalpha = 4.0\n\n'
        "[dataset]\n"
        f'config = "{rel(dataset)}"\n\n'
        "[train]\n"
        'steps = 1\nmixed_precision = "no"\ndevice = "cpu"\ngradient_checkpointing = false\n\n'
        "[sample]\nprompts = []\n\n"
        "[save]\n"
        'out = "run"\n'
    )
    proc = run_kern("cache", "all", "--config", str(job_file), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "text: 2 encoded, 0 reused" in proc.stdout and "latents: 2 encoded, 0 reused" in proc.stdout, proc.stdout
    cache_dir = tmp_path / "data" / "cache"
    assert sorted(p.name for p in cache_dir.iterdir()) == [
        "_empty_f2k4b_te.safetensors",
        "img0_0032x0032_f2k4b.safetensors",
        "img0_f2k4b_te.safetensors",
        "img1_0032x0032_f2k4b.safetensors",
        "img1_f2k4b_te.safetensors",
    ]

    spy = Spy(monkeypatch, "encode_text", "encode_latents")
    adapter = train.run(config.load_job(job_file))
    assert adapter == folder / "run" / "adapter.safetensors" and adapter.is_file()
    assert spy.prompts() == [] and spy.count("encode_latents") == 0
