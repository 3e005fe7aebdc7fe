"""Repo ids resolved through the real huggingface_hub code against an offline cache in the hub's own layout."""

from __future__ import annotations

import pytest
from kern.core.repo_ids import RepoRef, parse
from kern.errors import ConfigError, ModelFileError
from kern.models import hub


@pytest.mark.parametrize(
    "spec, ref",
    [
        ("Qwen/Qwen-Image", RepoRef("Qwen/Qwen-Image")),
        ("org/name@v1.0", RepoRef("org/name", "v1.0")),
        ("org/name/transformer", RepoRef("org/name", None, "transformer")),
        (
            "Comfy-Org/Qwen-Image_ComfyUI@main/split_files/vae/qwen_image_vae.safetensors",
            RepoRef("Comfy-Org/Qwen-Image_ComfyUI", "main", "split_files/vae/qwen_image_vae.safetensors"),
        ),
        ("org/name@" + "a" * 40 + "/text_encoder", RepoRef("org/name", "a" * 40, "text_encoder")),
    ],
)
def test_repo_specs_parse(spec, ref):
    assert parse(spec) == ref
    assert str(parse(spec)) == spec


def test_file_or_folder_inside_a_repo():
    assert parse("org/name/split_files/vae/x.safetensors").is_file
    assert not parse("org/name/vae").is_file


@pytest.mark.parametrize(
    "spec",
    [
        "/abs/model",
        "./org/name",
        "~/org/name",
        "name",
        "C:\\models\\x",
        "org/../x",
        "org/name/../../x",
        "models/t.safetensors",
        "-org/name",
        "org/name@",
        "org--x/name",
        "",
    ],
)
def test_what_cannot_be_a_repo_id(spec):
    assert parse(spec) is None


def test_a_cached_folder_resolves_offline_without_a_network_call(hub_cache, no_network):
    commit = hub_cache.add("org/model", {"transformer/model.safetensors": b"weights", "vae/config.json": b"{}"})
    path = hub.resolve("org/model/transformer", option="--transformer")
    assert path.is_dir() and (path / "model.safetensors").read_bytes() == b"weights"
    assert path.parent.name == commit and "models--org--model" in str(path)
    assert no_network == []


def test_a_cached_file_and_revisions(hub_cache, no_network):
    hub_cache.add("org/model", {"a.safetensors": b"main"})
    tagged = hub_cache.add("org/model", {"a.safetensors": b"v1"}, revision="v1")
    assert hub.resolve("org/model/a.safetensors", option="--vae").read_bytes() == b"main"
    assert hub.resolve("org/model@v1/a.safetensors", option="--vae").read_bytes() == b"v1"
    assert hub.resolve(f"org/model@{tagged}/a.safetensors", option="--vae").read_bytes() == b"v1"
    assert no_network == []


def test_a_local_path_wins_over_a_repo_id_of_the_same_spelling(hub_cache, tmp_path, monkeypatch):
    hub_cache.add("org/model", {"x.safetensors": b"hub"})
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("org/model", option="--transformer").resolve() == tmp_path / "org" / "model"


def test_neither_a_path_nor_a_cached_repo_says_both_were_tried(hub_cache, no_network):
    with pytest.raises(ModelFileError) as err:
        hub.resolve("org/absent", option="--transformer")
    message = str(err.value)
    assert "--transformer org/absent: not a local file or folder" in message
    assert "Hugging Face repo org/absent" in message and "HF_HUB_OFFLINE" in message
    assert no_network == []
    with pytest.raises(ConfigError, match=r"--vae ./nope: no such file or folder \(and not a Hugging Face repo id"):
        hub.resolve("./nope", option="--vae")


def test_a_missing_path_inside_a_cached_repo_is_named(hub_cache):
    hub_cache.add("org/model", {"transformer/model.safetensors": b"w"})
    with pytest.raises(ModelFileError, match="it has no 'vae'"):
        hub.resolve("org/model/vae", option="--vae")


def test_only_the_files_a_part_needs_are_asked_for():
    ref = parse("org/model/text_encoder")
    patterns = hub.patterns_for(ref, ("tokenizer", "processor"))
    assert "text_encoder/*.safetensors" in patterns and "tokenizer/*.json" in patterns
    assert "processor/*.json" in patterns
    assert not any(p.endswith((".bin", ".pt", ".ckpt", ".pth")) for p in patterns)  # no pickles
    assert hub.patterns_for(parse("org/model/split/x.safetensors")) == ["split/x.safetensors"]
