"""Relative paths of a dataset config (and of its JSONL lines) are looked up from the config's (JSONL's) folder and
from the working directory, so a config written for musubi-tuner (which reads them from the working directory) works
with kern from the same folder; a path that names two places is refused (docs/datasets.md §1, Paths)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from kern.data.dataset_config import AmbiguousPathError, load_dataset_config
from kern.data.items import scan_items
from kern.errors import ConfigError, DatasetError
from PIL import Image


def images(folder: Path, n: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (10 * i, 20, 30)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"caption {i}")
    return folder


def config(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dataset.toml"
    path.write_text('[general]\nresolution = 32\ncaption_extension = ".txt"\n\n[[datasets]]\n' + textwrap.dedent(body))
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder (the working directory) with the config in configs/, as musubi users lay it out."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.chdir(root)
    return root


def test_a_musubi_config_run_from_its_project_folder_works(project):
    # musubi reads these from the working directory; kern finds them there too.
    images(project / "data" / "images")
    images(project / "data" / "controls")
    (project / "cache").mkdir()
    cfg = config(
        project / "configs",
        """
        image_directory = "data/images"
        control_directory = "data/controls"
        cache_directory = "cache"
        """,
    )
    (spec,) = load_dataset_config(cfg)
    assert spec.image_directory == project / "data" / "images"
    assert spec.control_directory == project / "data" / "controls"
    assert spec.cache_directory == project / "cache"
    (item,) = scan_items([spec], 16)
    assert item.control_paths == (project / "data" / "controls" / "img0.png",)


def test_paths_from_the_configs_folder_work_from_anywhere(project, tmp_path):
    folder = tmp_path / "elsewhere"
    images(folder / "images")
    cfg = config(folder, 'image_directory = "images"\ncache_directory = "cache"\n')
    (spec,) = load_dataset_config(cfg)
    assert spec.image_directory == folder / "images"
    assert spec.cache_directory == folder / "cache"  # exists nowhere yet: beside the images' base, the config's folder


def test_a_cache_folder_not_made_yet_goes_beside_images_found_from_the_working_directory(project):
    images(project / "data" / "images")
    cfg = config(project / "configs", 'image_directory = "data/images"\ncache_directory = "cache"\n')
    (spec,) = load_dataset_config(cfg)
    assert spec.cache_directory == project / "cache"  # where musubi makes it, so either tool finds the other's files


def test_a_cache_folder_not_made_yet_with_absolute_images_goes_in_the_configs_folder(project, tmp_path):
    folder = images(tmp_path / "photos")
    cfg = config(project / "configs", f'image_directory = "{folder.as_posix()}"\ncache_directory = "cache"\n')
    (spec,) = load_dataset_config(cfg)
    assert spec.cache_directory == project / "configs" / "cache"


def test_a_cache_folder_that_exists_in_one_place_is_used_there(project):
    images(project / "configs" / "images")  # images from the config's folder ...
    (project / "cache").mkdir()  # ... a cache (musubi's) in the working directory
    cfg = config(project / "configs", 'image_directory = "images"\ncache_directory = "cache"\n')
    (spec,) = load_dataset_config(cfg)
    assert spec.cache_directory == project / "cache"


@pytest.mark.parametrize(
    ("key", "value"), [("image_directory", "images"), ("cache_directory", "cache"), ("control_directory", "controls")]
)
def test_a_relative_path_that_names_two_places_is_refused(project, tmp_path, key, value):
    for base in (project, project / "configs"):
        images(base / value)
    photos = images(tmp_path / "photos")
    body = {"image_directory": f'"{photos.as_posix()}"', key: f'"{value}"'}
    cfg = config(project / "configs", "".join(f"{k} = {v}\n" for k, v in body.items()))
    with pytest.raises(AmbiguousPathError) as info:
        load_dataset_config(cfg)
    message = str(info.value)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, DatasetError)
    assert str(cfg) in message and repr(key) in message and "absolute path" in message
    assert str(project / value) in message and str(project / "configs" / value) in message


def test_the_same_folder_from_both_is_not_ambiguous(project):
    images(project / "images")
    cfg = config(project, 'image_directory = "images"\n')  # the config in the working directory
    (spec,) = load_dataset_config(cfg)
    assert spec.image_directory == project / "images" and spec.cache_directory == project / "images"


def test_a_path_found_nowhere_is_the_existing_error_naming_both_lookups(project):
    cfg = config(project / "configs", 'image_directory = "missing"\n')
    (spec,) = load_dataset_config(cfg)
    with pytest.raises(DatasetError, match=r"'image_directory'.*configs/missing does not exist.*working directory"):
        scan_items([spec], 16)


def test_jsonl_file_and_its_lines_follow_the_same_rule(project):
    images(project / "data" / "images")
    jsonl = project / "data" / "items.jsonl"
    jsonl.write_text(json.dumps({"image_path": "data/images/img0.png", "caption": "from the cwd"}) + "\n")
    cfg = config(project / "configs", 'image_jsonl_file = "data/items.jsonl"\ncache_directory = "cache"\n')
    (spec,) = load_dataset_config(cfg)
    assert spec.image_jsonl_file == jsonl and spec.cache_directory == project / "cache"
    (item,) = scan_items([spec], 16)
    assert item.image_path == project / "data" / "images" / "img0.png"

    # from the JSONL's own folder (kern's rule before) still works
    jsonl.write_text(json.dumps({"image_path": "images/img0.png", "caption": "from the JSONL's folder"}) + "\n")
    (item,) = scan_items([spec], 16)
    assert item.image_path == project / "data" / "images" / "img0.png"

    # both: refused, naming the line
    images(project / "images")
    with pytest.raises(AmbiguousPathError, match=r"items.jsonl:1 key 'image_path'.*two places.*absolute path"):
        scan_items([spec], 16)
