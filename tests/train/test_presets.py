"""Presets per card (issue 17 item 7): every preset is backed by a measured peak under its budget, ships with the
package, resolves against the tiny models, and sits under the job file's keys and --set."""

from __future__ import annotations

import re
import tomllib

import pytest
from kern.core import config
from kern.core.plugins import get_manager
from kern.errors import ConfigError
from kern.train import presets, setup

from tests.conftest import REPO

NAMES = presets.names()
ROOM_GIB = 1.0  # docs/memory.md: pick a setting that fits with 1-2 GiB to spare (allocator, a preview image)
MODEL_FILES = ("path", "transformer", "vae", "text_encoder")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """The tiny FLUX.2 and Qwen-Image bundles, by architecture name."""
    from kern_flux2 import tiny as flux2_tiny
    from kern_qwen_image import tiny as qwen_tiny

    return {
        "flux2": flux2_tiny.build(tmp_path_factory.mktemp("tiny-flux2")),
        "qwen-image": qwen_tiny.build(tmp_path_factory.mktemp("tiny-qwen")),
    }


def test_presets_exist_for_each_model_and_the_package_holds_the_examples_folder():
    assert presets.folder().resolve() == (REPO / "examples" / "presets").resolve()  # one copy, shipped as kern/presets
    assert len(NAMES) >= 10
    for prefix in ("flux2-klein-4b-", "flux2-klein-9b-", "flux2-dev-", "qwen-image-"):
        assert any(n.startswith(prefix) for n in NAMES), prefix


@pytest.mark.parametrize("name", NAMES)
def test_each_preset_has_a_measured_peak_under_its_budget(name):
    measured = presets.table()["presets"].get(name)
    assert measured, f"examples/presets/measured.json has no measurement for {name}"
    budget = int(re.fullmatch(r".*-(\d+)gb", name).group(1))
    assert measured["budget_gib"] == budget
    assert measured["peak_gib"] + ROOM_GIB <= budget, (
        f"{name}: measured peak {measured['peak_gib']} GiB leaves less than {ROOM_GIB} GiB of a {budget} GiB card "
        f"({measured['measured']})"
    )
    # the source line: a date, the device and the command that measured it
    assert re.search(r"\d{4}-\d{2}-\d{2}, NVIDIA ", measured["measured"]), measured["measured"]
    assert "bench/" in measured["measured"] and "GiB" in measured["measured"]
    text = (presets.folder() / f"{name}.toml").read_text()
    assert "Backed by:" in text and measured["measured"].split(",")[0] in text  # the file says which run backs it


def test_the_table_lists_no_preset_that_is_not_shipped_and_unmeasured_ones_have_no_file():
    table = presets.table()
    assert sorted(table["presets"]) == NAMES
    assert not set(table["not_measured"]) & set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_presets_set_memory_modes_and_the_architecture_only(name):
    data = tomllib.loads((presets.folder() / f"{name}.toml").read_text())
    assert set(data) <= {"model", "train"}, "a preset holds no dataset, run folder or sampling"
    assert set(data["model"]) == {"arch"}, "the user gives the model files"
    assert not set(data["model"]) & set(MODEL_FILES)
    assert data["train"], "a preset sets the memory modes"


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_resolves_against_the_tiny_models(name, bundles, tmp_path):
    arch, _ = get_manager().resolve_arch(presets.read_preset(name)["model"]["arch"])
    bundle = bundles[arch.name]
    overrides = {f"model.{part}": str(bundle[part]) for part in ("transformer", "vae", "text_encoder")}
    overrides.update({"preset": name, "dataset.config": str(tmp_path / "d.toml"), "save.out": str(tmp_path / "r")})
    job = config.load_job(None, overrides, presets.read_preset)
    plan = setup.prepare(job)
    setup.check_files(plan)
    variant = setup.resolve_variant(plan)
    setup.check_trainable(plan, variant)
    for key, value in presets.read_preset(name)["train"].items():
        assert getattr(job.train, key) == value, key
    assert job.preset == name and job.to_dict()["preset"] == name


def test_job_file_keys_and_set_override_the_preset(tmp_path):
    job_file = tmp_path / "job.toml"
    job_file.write_text('preset = "flux2-klein-4b-8gb"\n\n[train]\nblocks_to_swap = 3\nsteps = 5\n')
    job = config.load_job(job_file, {"train.steps": 7}, presets.read_preset)
    assert job.preset == "flux2-klein-4b-8gb"
    assert job.model.arch == "flux2" and job.train.base_precision == "fp8"  # from the preset
    assert job.train.blocks_to_swap == 3  # the job file over the preset
    assert job.train.steps == 7  # --set over both
    # --preset (an override) replaces the file's preset; the file's own keys still win over it
    job = config.load_job(job_file, {"preset": "flux2-klein-4b-12gb"}, presets.read_preset)
    assert job.preset == "flux2-klein-4b-12gb" and job.train.gradient_checkpointing == "selective"
    assert job.train.blocks_to_swap == 3


def test_a_preset_needs_the_reader_and_a_known_name(tmp_path):
    with pytest.raises(ConfigError, match="read by `kern train` only"):
        config.load_job(None, {"preset": "flux2-klein-4b-8gb"})
    with pytest.raises(ConfigError, match="no such preset; presets: .*flux2-klein-4b-12gb.*qwen-image-24gb"):
        config.load_job(None, {"preset": "klein-4b-12gb"}, presets.read_preset)
    with pytest.raises(ConfigError, match="not measured to fit yet"):
        config.load_job(None, {"preset": "flux2-dev-8gb"}, presets.read_preset)
    with pytest.raises(ConfigError, match="no such preset"):
        config.load_job(None, {"preset": "../measured"}, presets.read_preset)
    with pytest.raises(ConfigError, match="preset must be a preset's name"):
        config.load_job(None, {"preset": 3}, presets.read_preset)


def test_unknown_preset_at_the_cli_exits_2_listing_them(capsys):
    from kern_cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "flux2-dev-8gb", "--dataset", "d.toml"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "flux2-dev-8gb" in err and "not measured to fit yet" in err
    assert all(name in err for name in NAMES)
