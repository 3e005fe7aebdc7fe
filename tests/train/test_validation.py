"""Validation loss (issue 17 item 4) at the CLI on the toy architecture: the held-out data (``validation_split``,
``[[validation.datasets]]``), the loss every ``train.validate_every_n_steps`` and at the end, training untouched by
it, exact resume, the checks before any work, and ``loss.png``'s second series."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kern.core.io import load_file
from kern.data import cache
from kern.data.dataset_config import load_dataset_config
from kern.data.items import scan_items
from kern.train import checkpoints, plot, validation
from PIL import Image

from tests.helpers import make_dataset
from tests.train import test_run_folder as run_folder

BASE = (
    *run_folder.BASE,
    "--network-opt",
    "dropout=0.1",  # the training draws from torch's global generator too: validation must not
)


def train(kern_main, dataset: Path, out: Path, steps: int, *extra: str) -> tuple[int, str]:
    return kern_main("train", *BASE, "--dataset", str(dataset), "--out", str(out), "--steps", str(steps), *extra)


def every(n: int) -> tuple[str, str]:
    return ("--set", f"train.validate_every_n_steps={n}")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def val_lines(out: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["val_loss"]) for m in metrics(out) if "val_loss" in m]


def split_dataset(root: Path, n: int = 4, split: float = 0.25, seed: int | None = None) -> Path:
    toml = make_dataset(root, n=n)
    extra = f"validation_split = {split}\n" + (f"validation_seed = {seed}\n" if seed is not None else "")
    toml.write_text(toml.read_text() + extra)
    return toml


def add_validation_dataset(toml: Path, n: int = 2, extra: str = "") -> Path:
    folder = toml.parent / "held"
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (64, 64), (30 + 90 * i, 120, 200 - 60 * i)).save(folder / f"val{i}.png")
        (folder / f"val{i}.txt").write_text(f"a square number {i}")
    toml.write_text(
        toml.read_text()
        + f'\n[[validation.datasets]]\nimage_directory = "{folder}"\ncache_directory = "{toml.parent / "vcache"}"\n'
        + extra
    )
    return folder


@pytest.fixture
def trained_keys(monkeypatch):
    """The item keys of every training batch (validation batches are loaded without a generator)."""
    seen: list[str] = []
    real = cache.load_batch

    def spy(items, *args, **kwargs):
        if kwargs.get("generator") is not None:
            seen.extend(i.key for i in items)
        return real(items, *args, **kwargs)

    monkeypatch.setattr(cache, "load_batch", spy)
    return seen


@pytest.fixture
def plotted(monkeypatch):
    """What each run's ``loss.png`` was drawn from (:func:`kern.train.plot.loss_plot`'s return value)."""
    drawn: list[dict] = []
    real = plot.loss_plot

    def spy(*args, **kwargs):
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(plot, "loss_plot", spy)
    return drawn


# --------------------------------------------------------------------------- the split


def test_the_split_is_deterministic_disjoint_and_seeded(tmp_path):
    toml = split_dataset(tmp_path / "a", n=10, split=0.3)
    specs = load_dataset_config(toml)
    items = scan_items(specs, 8)
    train, held = validation.split(specs, items, seed=42)
    again = validation.split(specs, items, seed=42)
    assert [i.key for i in again[0]] == [i.key for i in train] and [i.key for i in again[1]] == [i.key for i in held]
    assert len(held) == 3 and len(train) == 7
    assert {i.key for i in train}.isdisjoint(i.key for i in held)
    assert sorted(i.key for i in [*train, *held]) == sorted(i.key for i in items)
    other = validation.split(specs, items, seed=7)[1]
    assert {i.key for i in other} != {i.key for i in held}  # the seed picks the items
    # validation_seed in the dataset config wins over the job's seed
    seeded = load_dataset_config(split_dataset(tmp_path / "b", n=10, split=0.3, seed=7))
    assert [i.stem for i in validation.split(seeded, scan_items(seeded, 8), seed=42)[1]] == [i.stem for i in other]


def test_noise_seeds_depend_on_the_seed_and_the_stem_only():
    assert validation.noise_seed(3, "img1") == validation.noise_seed(3, "img1")
    assert len({validation.noise_seed(3, "img1"), validation.noise_seed(4, "img1"), validation.noise_seed(3, "x")}) == 3


# --------------------------------------------------------------------------- runs


def test_val_loss_at_the_right_steps_and_held_out_items_are_not_trained(tmp_path, kern_main, trained_keys, plotted):
    toml = split_dataset(tmp_path / "data", n=6, split=0.34)
    out = tmp_path / "run"
    code, err = train(kern_main, toml, out, 5, *every(2))
    assert code == 0, err
    vals = val_lines(out)
    assert [s for s, _ in vals] == [2, 4, 5]  # every 2 steps, and the last
    assert all(v > 0 for _, v in vals)
    assert len(metrics(out)) == 5  # one line per step: val_loss joins the step's line

    all_keys, held = held_out_keys(toml)
    assert len(held) == 2 and trained_keys
    assert set(trained_keys) == all_keys - held  # every training item trained on, no held-out one

    # loss.png: the training loss of every step and the validation loss as the second series
    assert (out / "loss.png").is_file()
    (drawn,) = plotted
    assert [s for s, _ in drawn["loss"]] == list(range(1, 6))
    assert [v for _, v in drawn["loss"]] == [m["loss"] for m in metrics(out)]
    assert drawn["val_loss"] == vals


def test_training_is_the_same_with_validation_on_or_off(tmp_path, kern_main):
    toml = split_dataset(tmp_path / "data")
    runs = {}
    for name, n in (("off", 0), ("every2", 2), ("every3", 3)):
        code, err = train(kern_main, toml, tmp_path / name, 6, *every(n))
        assert code == 0, err
        runs[name] = tmp_path / name
    losses = {name: [m["loss"] for m in metrics(out)] for name, out in runs.items()}
    assert losses["off"] == losses["every2"] == losses["every3"]
    a, _ = load_file(runs["off"] / "adapter.safetensors")
    for name in ("every2", "every3"):
        b, _ = load_file(runs[name] / "adapter.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert val_lines(runs["off"]) == []
    # fixed timesteps and noise: the same weights give the same number, however often validation ran before
    v2, v3 = dict(val_lines(runs["every2"])), dict(val_lines(runs["every3"]))
    assert sorted(v2) == [2, 4, 6] and sorted(v3) == [3, 6]
    assert v2[6] == v3[6]


def test_validation_survives_resume_exactly(tmp_path, kern_main, monkeypatch):
    toml = split_dataset(tmp_path / "data")
    opts = (*every(2), "--set", "save.every_n_steps=3", "--set", "save.keep_last=5")
    code, err = train(kern_main, toml, tmp_path / "full", 6, *opts)
    assert code == 0, err

    real_save = checkpoints.save_checkpoint

    def save_then_die(out, step, *args, **kwargs):
        path = real_save(out, step, *args, **kwargs)
        if step == 3:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    code, err = train(kern_main, toml, tmp_path / "part", 6, *opts)
    assert code != 0  # interrupted after the step-3 checkpoint, between two validations
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    assert [p.name for p in checkpoints.checkpoint_dirs(tmp_path / "part")] == ["step-000003"]
    assert [s for s, _ in val_lines(tmp_path / "part")] == [2]

    drawn = []
    monkeypatch.setattr(plot, "loss_plot", lambda *a, **k: drawn.append(plot.series(a[0], a[2])))
    code, err = train(kern_main, toml, tmp_path / "part", 6, *opts, "--resume")
    assert code == 0, err
    assert val_lines(tmp_path / "part") == val_lines(tmp_path / "full")
    assert [s for s, _ in val_lines(tmp_path / "full")] == [2, 4, 6]
    assert [m["loss"] for m in metrics(tmp_path / "part")] == [m["loss"] for m in metrics(tmp_path / "full")]
    # the resumed run's plot has the validation points from before the interruption too
    assert drawn[-1]["val_loss"] == val_lines(tmp_path / "full")


def test_validation_datasets_are_held_out_whole_and_cached(tmp_path, kern_main, trained_keys):
    toml = make_dataset(tmp_path / "data", n=2)
    add_validation_dataset(toml, n=2)
    out = tmp_path / "run"
    code, err = train(kern_main, toml, out, 4, *every(2))
    assert code == 0, err
    assert [s for s, _ in val_lines(out)] == [2, 4]
    assert set(trained_keys) == {"0/img0", "0/img1"}  # the validation dataset's items are never trained on
    cached = {p.name for p in (tmp_path / "data" / "vcache").iterdir()}
    assert any("val0" in n for n in cached) and any("val1" in n for n in cached), cached
    # [general] applies to the validation tables: its resolution and caption extension were used
    extra = validation.hold_out(_plan(toml), load_dataset_config(toml), [])[1].items
    assert [i.stem for i in extra] == ["val0", "val1"] and all(i.bucket == (64, 64) for i in extra)


def held_out_keys(toml: Path) -> tuple[set[str], set[str]]:
    """Every item's key, and the held-out ones' (the job's seed is the default 42)."""
    specs = load_dataset_config(toml)
    items = scan_items(specs, 8)
    return {i.key for i in items}, {i.key for i in validation.split(specs, items, seed=42)[1]}


def _plan(toml: Path):
    from kern.core import config
    from kern.train.setup import prepare

    return prepare(config.load_job(None, {"model.arch": "toy", "dataset.config": str(toml)}))


def test_validation_data_without_validate_every_n_steps_warns_and_stays_held_out(tmp_path, kern_main, trained_keys):
    toml = split_dataset(tmp_path / "data")
    code, err = train(kern_main, toml, tmp_path / "run", 3)
    assert code == 0, err
    assert "held-out items are not trained on" in err and "validate_every_n_steps" in err
    all_keys, held = held_out_keys(toml)
    assert len(held) == 1 and set(trained_keys) == all_keys - held and val_lines(tmp_path / "run") == []


@pytest.mark.parametrize(
    "case, message",
    [
        ("split_none", "validation_split': 0.01 of 6 item(s) holds out none"),
        ("split_all", "validation_split': 0.95 of 6 item(s) leaves no training item"),
        ("split_one", "validation_split': must be at least 0 and below 1"),
        ("no_data", "train.validate_every_n_steps = 2 but the dataset config"),
        ("empty_folder", "validation.datasets[0]: no usable images"),
        ("validation_table_split", "validation.datasets[0] key 'validation_split': a validation dataset is held out"),
        ("shared_cache", "validation.datasets[0] key 'cache_directory'"),
        ("bad_section", "'validation' holds only [[validation.datasets]] tables"),
    ],
)
def test_bad_configurations_exit_2_before_any_work(tmp_path, kern_main, case, message):
    data = tmp_path / "data"
    toml = make_dataset(data, n=6)
    text = toml.read_text()
    if case.startswith("split_"):
        toml.write_text(
            text
            + {"split_none": "validation_split = 0.01\n", "split_all": "validation_split = 0.95\n"}.get(
                case, "validation_split = 1.0\n"
            )
        )
    elif case == "empty_folder":
        (data / "held").mkdir()
        toml.write_text(text + f'\n[[validation.datasets]]\nimage_directory = "{data / "held"}"\n')
    elif case == "validation_table_split":
        add_validation_dataset(toml, extra="validation_split = 0.5\n")
    elif case == "shared_cache":
        add_validation_dataset(toml)
        toml.write_text(toml.read_text().replace(str(data / "vcache"), str(data / "cache")))
    elif case == "bad_section":
        toml.write_text("validation = 3\n" + text)
    out = tmp_path / "run"
    code, err = train(kern_main, toml, out, 4, *every(2))
    assert code == 2, err
    assert message in err, err
    assert not (data / "cache").exists() or not list((data / "cache").glob("*.safetensors"))  # nothing cached
    assert not (out / "metrics.jsonl").exists()


def test_series_is_what_the_plot_draws(tmp_path):
    drawn = plot.loss_plot([3.0, 2.0, 1.0], tmp_path / "loss.png", [(2, 2.5), (3, 1.5)])
    assert drawn["loss"] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert drawn["val_loss"] == [(2, 2.5), (3, 1.5)] and len(drawn["smoothed"]) == 3
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.loss_plot([], tmp_path / "empty.png") == {"loss": [], "smoothed": [], "val_loss": []}


def test_kern_cache_caches_the_validation_items_too(tmp_path, kern_main):
    toml = split_dataset(tmp_path / "data")
    add_validation_dataset(toml, n=1)
    code, err = kern_main("cache", "all", "--arch", "toy", "--dataset", str(toml))
    assert code == 0, err
    names = {p.name for p in (tmp_path / "data" / "cache").iterdir()}
    assert {f"img{i}_0064x0064_toy-base.safetensors" for i in range(4)} <= names  # the held-out image's too
    assert {f"img{i}_toy-base_te.safetensors" for i in range(4)} <= names
    held = {p.name for p in (tmp_path / "data" / "vcache").iterdir()}
    assert {"val0_0064x0064_toy-base.safetensors", "val0_toy-base_te.safetensors"} <= held


def test_two_processes_share_the_validation_items(tmp_path, toy_site):
    from tests.train.test_ddp import _launch

    toml = make_dataset(tmp_path / "data", n=4)
    add_validation_dataset(toml, n=3)  # 2 + 1 items: the processes' shares differ in size
    out = tmp_path / "run"
    proc = _launch(toy_site, toml, out, *every(2), steps=4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [s for s, _ in val_lines(out)] == [2, 4]
