"""kohya / Civitai / A1111 metadata of saved adapters (issue 16): ``sshs_*`` hashes computed exactly as sd-scripts
does, ``ss_datasets`` and ``ss_tag_frequency`` in sd-scripts' shape, the epoch keys as kern counts them.

The hash checks re-implement sd-scripts' algorithm here from its source (``library/train_util.py``:
``precalculate_safetensors_hashes``, ``addnet_hash_safetensors``, ``addnet_hash_legacy``; ``networks/lora.py``
``save_weights``), independently of kern's code, and run it on what kern wrote."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from kern.adapters.network.metadata import (
    DatasetFacts,
    TrainingFacts,
    adapter_metadata,
    base_model_version,
    datasets_metadata,
    safetensors_hashes,
    tag_frequency,
)
from kern.core.plugins import build_manager
from kern.records import TargetSpec, resolve_options
from safetensors import safe_open
from torch import nn


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-scripts' precalculate_safetensors_hashes, re-implemented: serialise in memory with the ss_* metadata only
    (a dict, possibly empty); model hash = SHA-256 of the bytes after the header; legacy = 8 hex digits of the
    SHA-256 of bytes 0x100000..0x110000."""
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = io.BytesIO(safetensors.torch.save(tensors, ss))
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    model = hashlib.sha256()
    for chunk in iter(lambda: b.read(1024 * 1024), b""):
        model.update(chunk)
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[0:8]
    return model.hexdigest(), legacy


def file_data_sha256(path: Path) -> str:
    """What A1111 / sd-webui-additional-networks compute from the file itself (``addnet_hash_safetensors``)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return hashlib.sha256(raw[8 + n :]).hexdigest()


def read_saved(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


class Wide(nn.Module):
    """Two square layers: a rank-160 LoRA on them is a file of about 2.6 MB, past the legacy hash's 1 MiB offset."""

    def __init__(self, d: int = 1024) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)


@pytest.fixture(scope="module")
def manager():
    return build_manager()


def network(manager, network_type, model, **given):
    options = resolve_options(manager.resolve_network(network_type).options, given, "test")
    net = manager.hook.make_network(network_type=network_type, model=model, targets=TargetSpec(), options=options)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net, options


FACTS = TrainingFacts(
    arch="toy",
    variant="base",
    base_model_version="flux_2_klein_4b",
    learning_rate=1e-4,
    lr_scheduler="constant",
    warmup_steps=0,
    max_train_steps=100,
    steps=40,
    seed=1,
    optimizer="adamw",
    mixed_precision="bf16",
    gradient_checkpointing=False,
    gradient_accumulation_steps=2,
    max_grad_norm=1.0,
    timestep_sampling="shift",
    started_at=1.0,
    output_name="style",
    num_batches_per_epoch=30,
)


@pytest.mark.parametrize(
    ("network_type", "dtype", "metadata"),
    [
        ("lora", torch.float32, {}),  # the network's ss_network_* keys only
        ("lora", torch.bfloat16, {"modelspec.title": "t"}),
        ("loha", torch.float16, None),  # the training facts
    ],
)
def test_sshs_hashes_are_what_sd_scripts_and_a1111_compute(tmp_path, manager, network_type, dtype, metadata):
    rank = 160 if network_type == "lora" else 96
    net, options = network(manager, network_type, Wide(), rank=rank, alpha=8.0)
    md = adapter_metadata(network_type, options, training=FACTS) if metadata is None else metadata
    path = net.save(tmp_path / "a.safetensors", dtype=dtype, metadata=md)
    assert path.stat().st_size > 0x110000  # the legacy hash reads real bytes
    tensors, saved = read_saved(path)
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {dtype}
    model_hash, legacy = kohya_hashes(tensors, saved)
    assert saved["sshs_model_hash"] == model_hash
    assert saved["sshs_legacy_hash"] == legacy
    assert saved["sshs_model_hash"] == file_data_sha256(path)  # A1111 / Civitai, from the file
    assert model_hash.islower() and len(model_hash) == 64 and len(legacy) == 8


def test_without_ss_keys_the_header_still_has_empty_metadata():
    """sd-scripts always passes a dict: ``"__metadata__": {}`` is in the hashed header, and moves the legacy bytes."""
    tensors = {"x.lora_down.weight": torch.arange(2**19, dtype=torch.float32).reshape(512, 1024)}
    hashes = safetensors_hashes(tensors, {"modelspec.title": "t"})
    assert (hashes["sshs_model_hash"], hashes["sshs_legacy_hash"]) == kohya_hashes(tensors, {})


def test_legacy_hash_of_a_small_file_is_that_of_nothing():
    """Under 1 MiB sd-scripts hashes no bytes at all: e3b0c442 for every small adapter."""
    hashes = safetensors_hashes({"x.lora_down.weight": torch.ones(2, 2)}, {"ss_seed": "1"})
    assert hashes["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"


def test_only_ss_keys_enter_the_hash(manager):
    """modelspec.* and kern.* keys may change after training (sd-scripts' reason); ss_* keys count for the legacy
    hash, whose bytes shift with the header's (8-byte padded) length."""
    net, _ = network(manager, "lora", Wide(), rank=160)
    tensors = net.adapter_state_dict(torch.float32)
    base = safetensors_hashes(tensors, {"ss_seed": "1"})
    assert safetensors_hashes(tensors, {"ss_seed": "1", "modelspec.title": "x", "kern.arch": "toy"}) == base
    other = safetensors_hashes(tensors, {"ss_seed": "1", "ss_training_comment": "a longer header" * 8})
    assert other["sshs_model_hash"] == base["sshs_model_hash"] and other["sshs_legacy_hash"] != base["sshs_legacy_hash"]


def test_tag_frequency_counts_as_sd_scripts():
    assert tag_frequency(["1girl, Red Hair,  smile", "1girl,,red hair, red hair", ""]) == {
        "1girl": 2,
        "red hair": 3,
        "smile": 1,
    }
    assert tag_frequency(["a photo of a cat"]) == {"a photo of a cat": 1}


def facts(**over):
    base = dict(
        directory="images",
        from_folder=True,
        control_directory=None,
        resolution=(1024, 768),
        batch_size=2,
        num_repeats=3,
        enable_bucket=True,
        bucket_no_upscale=False,
        min_bucket_reso=512,
        max_bucket_reso=1536,
        caption_extension=".txt",
        caption_dropout_rate=0.1,
        img_count=4,
        tag_frequency={"cat": 4, "sofa": 1},
        buckets=(((768, 1024), 3), ((1024, 768), 9)),
        mean_ar_error=0.01,
    )
    base.update(over)
    return DatasetFacts(**base)


# The keys sd-scripts' train_network.py writes per dataset and per subset (DreamBooth-style) with a dataset config.
SDS_DATASET_KEYS = {
    "is_dreambooth",
    "batch_size_per_device",
    "num_train_images",
    "num_reg_images",
    "resolution",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "tag_frequency",
    "bucket_info",
    "resize_interpolation",
    "subsets",
}
SDS_SUBSET_KEYS = {
    "img_count",
    "num_repeats",
    "color_aug",
    "flip_aug",
    "random_crop",
    "shuffle_caption",
    "keep_tokens",
    "keep_tokens_separator",
    "secondary_separator",
    "enable_wildcard",
    "caption_prefix",
    "caption_suffix",
    "resize_interpolation",
    "image_dir",
    "class_tokens",
    "is_reg",
}


def test_ss_datasets_has_sd_scripts_shape_and_musubi_keys():
    md = datasets_metadata(
        [facts(), facts(directory="more.jsonl", from_folder=False, enable_bucket=False, tag_frequency={"dog": 2})], 4
    )
    datasets = json.loads(md["ss_datasets"])
    first, second = datasets
    assert SDS_DATASET_KEYS <= set(first) and SDS_SUBSET_KEYS == set(first["subsets"][0])
    assert first["is_dreambooth"] is True and first["num_train_images"] == 12 and first["resolution"] == [1024, 768]
    assert first["tag_frequency"] == {"images": {"cat": 4, "sofa": 1}}
    assert first["bucket_info"] == {
        "buckets": {"0": {"resolution": [768, 1024], "count": 3}, "1": {"resolution": [1024, 768], "count": 9}},
        "mean_img_ar_error": 0.01,
    }
    assert first["subsets"][0]["image_dir"] == "images" and first["subsets"][0]["is_reg"] is False
    assert first["image_directory"] == "images" and first["num_repeats"] == 3  # musubi's own keys
    assert second["is_dreambooth"] is False and second["subsets"][0]["metadata_file"] == "more.jsonl"
    assert second["bucket_info"] is None  # sd-scripts records buckets only with bucketing
    assert json.loads(md["ss_tag_frequency"]) == {"images": {"cat": 4, "sofa": 1}, "more.jsonl": {"dog": 2}}
    assert json.loads(md["ss_dataset_dirs"]) == {
        "images": {"n_repeats": 3, "img_count": 4},
        "more.jsonl": {"n_repeats": 3, "img_count": 4},
    }
    assert md["ss_num_train_images"] == "24" and md["ss_num_reg_images"] == "0"
    assert md["ss_resolution"] == "(1024, 768)"  # str() of sd-scripts' (W, H) tuple
    assert md["ss_batch_size_per_device"] == "2" and md["ss_total_batch_size"] == "8"
    assert md["ss_enable_bucket"] == "True" and md["ss_caption_dropout_rate"] == "0.1"
    assert md["ss_min_bucket_reso"] == "512" and md["ss_max_bucket_reso"] == "1536"


def test_a_folder_used_twice_is_counted_once():
    md = datasets_metadata([facts(), facts(tag_frequency={"other": 1})])
    assert json.loads(md["ss_tag_frequency"]) == {"images": {"cat": 4, "sofa": 1}}
    assert set(json.loads(md["ss_dataset_dirs"])) == {"images", "images (2)"}


@pytest.mark.parametrize(
    ("steps", "epoch"),
    [(1, 0), (14, 0), (15, 1), (40, 2), (99, 6), (100, 7)],  # 2 micro-batches a step, 30 an epoch
)
def test_epochs_as_kern_counts_them(steps, epoch):
    import attrs

    md = attrs.evolve(FACTS, steps=steps).metadata()
    assert md["ss_epoch"] == str(epoch)
    assert md["ss_num_epochs"] == "7" and md["ss_num_batches_per_epoch"] == "30"
    assert md["ss_base_model_version"] == "flux_2_klein_4b"


# musubi-tuner's ss_base_model_version (dataset/architectures.py; flux_2/flux2_utils.py FLUX2_MODEL_INFO's
# architecture_full; qwen_image_train_network.py architecture_full_name).
MUSUBI_BASE_MODEL_VERSION = {
    ("flux2", "dev"): "flux_2_dev",
    ("flux2", "klein-4b"): "flux_2_klein_4b",
    ("flux2", "klein-base-4b"): "flux_2_klein_4b",
    ("flux2", "klein-9b"): "flux_2_klein_9b",
    ("flux2", "klein-base-9b"): "flux_2_klein_9b",
    ("qwen-image", "t2i"): "qwen_image",
    ("qwen-image", "edit"): "qwen_image_edit",
    ("qwen-image", "edit-2509"): "qwen_image_edit",
    ("qwen-image", "edit-2511"): "qwen_image_edit",
    ("qwen-image", "layered"): "qwen_image_layered",
}


def test_ss_base_model_version_is_musubis(manager):
    got = {}
    for arch in ("flux2", "qwen_image"):
        a, _ = manager.resolve_arch(arch)
        got.update({(a.name, v.name): base_model_version(a.name, v) for v in a.variants})
    assert got == MUSUBI_BASE_MODEL_VERSION
