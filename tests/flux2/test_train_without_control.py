"""FLUX.2 (klein / dev take optional references): a dataset mixing items with and without control images trains,
each kind in its own batches, the items without controls with no reference latents (issue 17 item 9)."""

from __future__ import annotations

import math

import torch
from kern.data import batch_order, load_dataset_config, scan_items
from kern.train import driver as train

from tests.flux2.test_train_flux2 import Spy, job, losses
from tests.helpers import make_dataset


def test_items_without_controls_train_without_references(tiny_bundle, tmp_path, monkeypatch):
    torch.set_num_threads(2)
    dataset = make_dataset(tmp_path / "data", n=4, size=(32, 32), refs=1, batch_size=2)
    for i in (1, 3):
        (tmp_path / "data" / "controls" / f"img{i}_0.png").unlink()
    dataset.write_text(dataset.read_text() + "allow_missing_control = true\n")
    specs = load_dataset_config(dataset)
    items = scan_items(specs, 16)
    assert {i.stem: len(i.control_paths) for i in items} == {"img0": 1, "img1": 0, "img2": 1, "img3": 0}
    for batch in batch_order(items, specs, seed=0, epoch=0):
        assert len({len(items[i].control_paths) for i in batch}) == 1

    spy = Spy(monkeypatch, "predict_velocity")
    adapter = train.run(job(tiny_bundle, dataset, tmp_path / "run", **{"train.steps": 2}))
    assert adapter.is_file() and all(math.isfinite(v) for v in losses(tmp_path / "run"))
    refs = sorted(0 if kw["references"] is None else len(kw["references"]) for kw in spy.calls["predict_velocity"])
    assert refs == [0, 1]  # one epoch: one batch of each kind
    assert all(kw["latents"].shape[0] == 2 for kw in spy.calls["predict_velocity"])
