"""Starting from weights at the CLI on the tiny FLUX.2 klein bundle: ``network.init_weights`` (the first loss is the
source adapter's, from any layout; the rank comes from the file) and ``model.base_weights`` (the same first loss as
a base that ``kern merge`` merged); bad files are refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kern.core.io import load_file, save_file
from kern_cli.main import main

from tests.helpers import make_dataset

TARGETS = ["img_in", "txt_in", "final_layer\\.linear", "double_blocks\\..*", "single_blocks\\..*"]


def kern(*args: str) -> int:
    """``kern ARGS`` in this process; its exit code."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    return exit_.value.code or 0


def first_loss(out: Path) -> float:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """The tiny bundle, a dataset, a job file, and run A (rank 4, α 2, one step): the adapter others start from."""
    from kern_flux2 import tiny

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("warm")
    bundle = tiny.build(root / "bundle")
    dataset = make_dataset(root / "data", n=2, size=(32, 32))
    job = root / "job.toml"
    job.write_text(
        "[model]\n"
        'arch = "flux2-klein-4b"\n'
        f'transformer = "{bundle["transformer"]}"\n'
        f'vae = "{bundle["vae"]}"\n'
        f'text_encoder = "{bundle["text_encoder"]}"\n'
        'dtype = "float32"\n'
        "[network]\n"
        'type = "lora"\n'
        f"targets = {json.dumps(TARGETS)}\n"
        "[dataset]\n"
        f'config = "{dataset}"\n'
        "[train]\n"
        'steps = 1\nlearning_rate = 2e-2\nmixed_precision = "no"\ndevice = "cpu"\ngradient_checkpointing = false\n'
        "seed = 7\n"
    )
    code = kern("train", "--config", job, "--out", root / "A", "--steps", 1, "--network-opt", "rank=4",
                "--network-opt", "alpha=2.0")  # fmt: skip
    assert code == 0
    return {"root": root, "bundle": bundle, "job": job, "A": root / "A" / "adapter.safetensors"}


def train(setting, name: str, *sets: str) -> int:
    args = ["train", "--config", setting["job"], "--out", setting["root"] / name]
    for s in sets:
        args += ["--set", s]
    return kern(*args)


@pytest.fixture(scope="module")
def merged_with_a(setting):
    """The reference: loss with A applied, computed independently: a run on a base that `kern merge` merged A into,
    with a fresh (zero ΔW) adapter; the first loss is taken before any update."""
    root = setting["root"]
    merged = root / "merged_a.safetensors"
    assert kern("merge", "--model", setting["bundle"]["transformer"], "--weights", setting["A"], "--out", merged) == 0
    assert train(setting, "C", f"model.transformer={merged}") == 0
    return first_loss(root / "C")


def test_warm_start_begins_with_the_source_adapters_loss(setting, merged_with_a):
    assert train(setting, "B", f"network.init_weights={setting['A']}") == 0
    b = setting["root"] / "B"
    assert first_loss(b) == pytest.approx(merged_with_a, rel=1e-5, abs=1e-6)
    assert first_loss(b) != pytest.approx(first_loss(setting["root"] / "A"), rel=1e-3)  # A's own start was elsewhere
    # The rank (and α) came from the file: B's adapter has A's.
    tensors, meta = load_file(b / "adapter.safetensors")
    a, _ = load_file(setting["A"])
    assert tensors.keys() == a.keys()
    assert all(tensors[k].shape == a[k].shape for k in a)
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0
    assert float(tensors["lora_unet_img_in.alpha"]) == 2.0


@pytest.mark.parametrize("layout", ["comfyui", "diffusers"])
def test_warm_start_from_another_layout(setting, merged_with_a, layout):
    converted = setting["root"] / f"a_{layout}.safetensors"
    assert kern("convert", setting["A"], "--to", layout, "--arch", "flux2-klein-4b", "--out", converted) == 0
    assert train(setting, f"B_{layout}", f"network.init_weights={converted}") == 0
    assert first_loss(setting["root"] / f"B_{layout}") == pytest.approx(merged_with_a, rel=1e-5, abs=1e-6)


def test_base_weights_equal_a_merged_base(setting):
    root = setting["root"]
    merged = root / "merged_half.safetensors"
    assert kern("merge", "--model", setting["bundle"]["transformer"], "--weights", f"{setting['A']}:0.5",
                "--out", merged) == 0  # fmt: skip
    assert train(setting, "E", f"model.transformer={merged}") == 0
    assert train(setting, "D", f'model.base_weights=["{setting["A"]}:0.5"]') == 0
    assert first_loss(root / "D") == first_loss(root / "E")  # the same merge maths, the same float32 weights
    assert first_loss(root / "D") != first_loss(root / "A")
    config = (root / "D" / "config.toml").read_text()
    assert str(setting["A"]) in config  # the resolved job names the merged file


def refused(setting, capsys, name: str, *sets: str) -> str:
    capsys.readouterr()
    assert train(setting, name, *sets) == 2
    assert not (setting["root"] / name).exists()  # checked before any work: no run folder
    return capsys.readouterr().err


def test_an_explicit_rank_that_disagrees_is_refused(setting, capsys):
    err = refused(setting, capsys, "R", f"network.init_weights={setting['A']}", "network.rank=8")
    assert "network.rank = 8" in err and "rank 4" in err and "leave network.rank out" in err


def test_an_explicit_alpha_that_disagrees_is_refused(setting, capsys):
    err = refused(setting, capsys, "R", f"network.init_weights={setting['A']}", "network.alpha=4.0")
    assert "network.alpha = 4.0" in err and "alpha is 2" in err


def test_a_loha_file_for_a_lora_job_is_refused(setting, capsys):
    loha = setting["root"] / "loha.safetensors"
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_img_in"
    save_file(
        {
            f"{name}.hada_w1_a": torch.randn(32, 2, generator=g),
            f"{name}.hada_w1_b": torch.randn(2, 16, generator=g),
            f"{name}.hada_w2_a": torch.randn(32, 2, generator=g),
            f"{name}.hada_w2_b": torch.randn(2, 16, generator=g),
            f"{name}.alpha": torch.tensor(2.0),
        },
        loha,
    )
    err = refused(setting, capsys, "R", f"network.init_weights={loha}")
    assert "loha adapter" in err and "network.type = 'loha'" in err


def test_missing_files_are_refused_naming_the_key(setting, capsys):
    missing = setting["root"] / "nope.safetensors"
    err = refused(setting, capsys, "R", f"network.init_weights={missing}")
    assert "network.init_weights" in err and "no such file" in err
    err = refused(setting, capsys, "R", f'model.base_weights=["{missing}:0.5"]')
    assert "model.base_weights[0]" in err and "no such file" in err


def test_a_file_for_another_model_is_refused(setting, capsys):
    other = setting["root"] / "other.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attn_to_q.lora_down.weight": torch.zeros(4, 16),
            "lora_unet_down_blocks_0_attn_to_q.lora_up.weight": torch.zeros(16, 4),
        },
        other,
    )
    err = refused(setting, capsys, "R", f"network.init_weights={other}")
    assert "none of its 1 modules" in err and "flux2" in err


def test_file_and_network_must_agree_on_modules(setting, capsys):
    root = setting["root"]
    # The file adapts modules the network leaves out: refused once the network is built, before training.
    capsys.readouterr()
    assert train(setting, "N", f"network.init_weights={setting['A']}", 'network.targets=["img_in"]') == 2
    err = capsys.readouterr().err
    assert "are not in the network" in err and "double_blocks" in err
    assert not (root / "N" / "metrics.jsonl").exists()
    # The file covers a part of the network: those modules start from it, the rest fresh, with a warning.
    a, meta = load_file(setting["A"])
    part = root / "part.safetensors"
    save_file({k: v for k, v in a.items() if k.startswith("lora_unet_img_in.")}, part, meta)
    assert train(setting, "P", f"network.init_weights={part}") == 0
    err = capsys.readouterr().err
    assert "covers only part of the network" in err and "covered=1" in err


# --------------------------------------------------------------------------- LoKr and DoRA (issue 18)


@pytest.fixture(scope="module")
def other_types(setting):
    """Runs L (LoKr, factor 4) and R (DoRA), one step each from fresh, and each merged into the base by `kern merge`:
    the first loss of a fresh adapter on that merged base is what a run started from L / R must begin with."""
    root = setting["root"]
    made = {"lokr": ["--network", "lokr", "--network-opt", "rank=2", "--network-opt", "factor=4"],
            "dora": ["--network-opt", "rank=4", "--network-opt", "alpha=2.0", "--network-opt", "dora=true"]}  # fmt: skip
    out = {}
    for kind, args in made.items():
        assert kern("train", "--config", setting["job"], "--out", root / kind, "--steps", 1, *args) == 0
        adapter = root / kind / "adapter.safetensors"
        merged = root / f"merged_{kind}.safetensors"
        assert kern("merge", "--model", setting["bundle"]["transformer"], "--weights", adapter, "--out", merged) == 0
        assert train(setting, f"ref_{kind}", f"model.transformer={merged}") == 0
        out[kind] = (adapter, first_loss(root / f"ref_{kind}"))
    return out


def test_warm_start_from_a_lokr_takes_its_rank(setting, other_types):
    adapter, expected = other_types["lokr"]
    name = "from_lokr"
    assert train(setting, name, "network.type=lokr", "network.factor=4", f"network.init_weights={adapter}") == 0
    assert first_loss(setting["root"] / name) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    tensors, _ = load_file(setting["root"] / name / "adapter.safetensors")
    source, _ = load_file(adapter)
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in source.items()}  # rank 2 from the file


def test_a_lokr_file_made_with_another_factor_is_refused_naming_the_shapes(setting, other_types, capsys):
    err = refused(setting, capsys, "R", "network.type=lokr", f"network.init_weights={other_types['lokr'][0]}")
    assert "network.init_weights" in err and "other [network] options" in err and "lokr_w1" in err


def test_warm_start_from_a_dora(setting, other_types):
    adapter, expected = other_types["dora"]
    assert train(setting, "from_dora", "network.dora=true", f"network.init_weights={adapter}") == 0
    assert first_loss(setting["root"] / "from_dora") == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_a_dora_job_from_a_plain_lora_starts_where_the_lora_is(setting, merged_with_a):
    """Each magnitude starts at ‖W + s·B·A‖, so W' = W + s·B·A: the LoRA's model, the same first loss."""
    assert train(setting, "dora_from_a", "network.dora=true", f"network.init_weights={setting['A']}") == 0
    assert first_loss(setting["root"] / "dora_from_a") == pytest.approx(merged_with_a, rel=1e-5, abs=1e-6)
    tensors, _ = load_file(setting["root"] / "dora_from_a" / "adapter.safetensors")
    assert any(k.endswith(".dora_scale") for k in tensors)


def test_a_plain_lora_job_from_a_dora_file_is_refused(setting, other_types, capsys):
    err = refused(setting, capsys, "R", f"network.init_weights={other_types['dora'][0]}")
    assert "dora_scale" in err and "other [network] options" in err


@pytest.mark.parametrize("kind", ["lokr", "dora"])
def test_base_weights_of_other_types_equal_a_merged_base(setting, other_types, kind):
    root, adapter = setting["root"], other_types[kind][0]
    merged = root / f"merged_half_{kind}.safetensors"
    assert kern("merge", "--model", setting["bundle"]["transformer"], "--weights", f"{adapter}:0.5",
                "--out", merged) == 0  # fmt: skip
    assert train(setting, f"E_{kind}", f"model.transformer={merged}") == 0
    assert train(setting, f"D_{kind}", f'model.base_weights=["{adapter}:0.5"]') == 0
    assert first_loss(root / f"D_{kind}") == first_loss(root / f"E_{kind}")
