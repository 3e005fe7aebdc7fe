"""The metadata of the adapters a training run saves (issue 16): kohya's dataset and epoch keys, the modelspec keys
and sd-scripts' ``sshs_*`` hashes, in the final adapter and in every checkpoint's."""

from __future__ import annotations

import json

import pytest
from kern.train import driver as train

from tests.adapters.test_metadata import file_data_sha256, kohya_hashes, read_saved
from tests.helpers import make_dataset
from tests.train.test_train_toy import job


@pytest.fixture
def trained(tmp_path, toy_plugin):
    """A toy run: 3 images, repeated twice, batch 2 ⇒ 3 batches an epoch; 7 steps, a checkpoint every 3."""
    dataset = make_dataset(tmp_path / "data", n=3, batch_size=2)
    dataset.write_text(dataset.read_text() + "num_repeats = 2\n")
    (tmp_path / "data" / "images" / "img0.txt").write_text("Red, square, red,  shiny")
    out = tmp_path / "run"
    final = train.run(job(tmp_path, dataset, out, **{"train.steps": 7, "save.every_n_steps": 3, "save.keep_last": 0}))
    return out, final


def test_final_and_checkpoint_adapters_carry_kohya_metadata(trained):
    out, final = trained
    saved = {
        "final": final,
        "step 3": out / "checkpoints" / "step-000003" / "adapter.safetensors",
        "step 6": out / "checkpoints" / "step-000006" / "adapter.safetensors",
    }
    metas = {}
    for name, path in saved.items():
        tensors, md = read_saved(path)
        assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == kohya_hashes(tensors, md), name
        assert md["sshs_model_hash"] == file_data_sha256(path), name
        metas[name] = md

    md = metas["final"]
    datasets = json.loads(md["ss_datasets"])
    assert len(datasets) == 1
    (ds,) = datasets
    assert ds["is_dreambooth"] is True and ds["num_train_images"] == 6 and ds["batch_size_per_device"] == 2
    assert ds["resolution"] == [64, 64] and ds["enable_bucket"] is True
    assert ds["subsets"][0]["image_dir"] == "images" and ds["subsets"][0]["img_count"] == 3
    assert ds["bucket_info"]["buckets"] == {"0": {"resolution": [64, 64], "count": 6}}
    tags = {"red": 2, "square": 1, "shiny": 1, "a green square": 1, "a blue square": 1}
    assert ds["tag_frequency"] == {"images": tags}
    assert json.loads(md["ss_tag_frequency"]) == {"images": tags}
    assert md["ss_num_train_images"] == "6" and md["ss_resolution"] == "(64, 64)"
    assert md["ss_batch_size_per_device"] == "2" and md["ss_total_batch_size"] == "2"
    assert md["ss_enable_bucket"] == "True" and md["ss_caption_dropout_rate"] == "0.0"
    assert md["ss_num_batches_per_epoch"] == "3" and md["ss_num_epochs"] == "3"
    assert md["ss_steps"] == "7" and md["ss_epoch"] == "3"  # the last save: epochs begun, as sd-scripts' final one
    assert (metas["step 3"]["ss_epoch"], metas["step 6"]["ss_epoch"]) == ("1", "2")  # epochs completed
    assert md["ss_output_name"] == "adapter" and md["ss_network_module"] == "lora"
    assert float(md["ss_training_finished_at"]) >= float(md["ss_training_started_at"])
    assert md["ss_discrete_flow_shift"] and md["ss_weighting_scheme"] == "none"
    assert md["modelspec.title"] == "adapter" and md["modelspec.resolution"] == "64x64"
    assert md["modelspec.architecture"] == "toy-base/lora" and "modelspec.implementation" in md
    assert md["modelspec.date"] and md["modelspec.sai_model_spec"] == "1.0.0"
    assert md["ss_session_id"] == metas["step 3"]["ss_session_id"]  # one training session
