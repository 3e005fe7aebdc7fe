"""`kern generate` end to end on the example toy architecture (the FLUX.2 run is in tests/flux2)."""

from __future__ import annotations

import json

import pytest
from kern.data.prompts import Request, read_prompt_file
from kern.errors import AdapterError, UsageError
from kern.generate.driver import Setup, run_batch, run_interactive
from PIL import Image


@pytest.fixture
def toy(monkeypatch):
    from kern.core import plugins

    from tests.conftest import REPO

    monkeypatch.setenv(plugins.ENV_DENY, "toy")  # an in-tree build may have left an entry point for it
    monkeypatch.syspath_prepend(str(REPO / "examples" / "plugins" / "kern-toy"))
    import kern_toy.plugin as toy_plugin

    manager = plugins.build_manager(extra=[("toy", toy_plugin)])
    monkeypatch.setattr(plugins, "_MANAGER", manager)
    return manager


def setup(tmp_path, **kw):
    return Setup(arch="toy", dtype="float32", device="cpu", out=tmp_path / "out", **kw)


def meta(path):
    return json.loads(Image.open(path).text["kern"])


def test_same_seed_same_image_and_different_seeds_differ(tmp_path, toy):
    a = run_batch(setup(tmp_path / "a"), [Request(prompt="a red cube", seed=7)])
    b = run_batch(setup(tmp_path / "b"), [Request(prompt="a red cube", seed=7)])
    c = run_batch(setup(tmp_path / "c"), [Request(prompt="a red cube", seed=8)])
    pix = [Image.open(p[0]).tobytes() for p in (a, b, c)]
    assert pix[0] == pix[1] and pix[0] != pix[2]
    info = meta(a[0])
    assert info["prompt"] == "a red cube" and info["seed"] == 7 and (info["arch"], info["variant"]) == ("toy", "base")
    assert info["steps"] == 8


def test_prompt_file_with_options_and_wildcards(tmp_path, toy):
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "color.txt").write_text("red:2\nblue\n__shade__ green\n")
    (cards / "shade.txt").write_text("dark\nlight\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# comment line\n"
        "a __color__ ball --w 32 --h 48 --d 5\n"
        "\n"
        "--w 64 --h 16 --f 2\n"
        'a __color__ cube --n "__shade__ shadows" --s 3\n'
    )
    requests = read_prompt_file(prompts, base_prompt="a plain __color__ disc")
    paths = run_batch(setup(tmp_path, wildcards=str(cards), grid=True, batch_size=2), requests)
    images, grid = paths[:-1], paths[-1]
    assert len(images) == 4 and grid.name == "grid.png"
    sizes = [Image.open(p).size for p in images]
    assert sizes == [(32, 48), (64, 16), (64, 16), (64, 64)]
    infos = [meta(p) for p in images]
    for info in infos:
        assert "__" not in info["prompt"] and "__" not in info["negative_prompt"]
    assert infos[0]["prompt"].startswith("a ") and infos[0]["prompt"].endswith(" ball")
    assert infos[1]["prompt"].startswith("a plain ") and infos[1]["source"].endswith("prompts.txt:4")
    assert infos[3]["negative_prompt"].endswith(" shadows") and infos[3]["steps"] == 3
    assert infos[1]["seed"] != infos[2]["seed"]


def test_batch_of_several_prompts_with_count_keeps_every_image(tmp_path, toy):
    requests = [
        Request(prompt="one", width=32, height=32, count=3),
        Request(prompt="two", width=48, height=16, count=2),
    ]
    paths = run_batch(setup(tmp_path, batch_size=4), requests)
    assert [Image.open(p).size for p in paths] == [(32, 32)] * 3 + [(48, 16)] * 2
    assert len({Image.open(p).tobytes() for p in paths[:3]}) == 3  # each image its own seed


def test_interactive_mode_through_a_stream(tmp_path, toy):
    said = []
    lines = ["a cat --w 32 --h 32 --d 1\n", "--bogus 3\n", "a __missing__ dog\n", "a dog --w 16 --h 16\n", "exit\n"]
    made = run_interactive(setup(tmp_path), iter(lines), None, said.append)
    assert [Image.open(p).size for p in made] == [(32, 32), (16, 16)]
    errors = [s for s in said if s.startswith("error:")]
    assert len(errors) == 2 and "<stdin>:2: this line has only options" in errors[0] and "__missing__" in errors[1]


def test_size_not_on_the_step_is_an_error_naming_the_line(tmp_path, toy):
    with pytest.raises(UsageError, match="p.txt:3: size 30x32 is not a multiple of 8"):
        run_batch(setup(tmp_path), [Request(prompt="x", width=30, height=32, source="p.txt:3")])


def test_adapter_for_another_architecture_is_refused_before_loading(tmp_path, toy):
    import torch
    from kern.core.io import save_file

    adapter = tmp_path / "flux_lora.safetensors"
    save_file(
        {"lora_unet_x.lora_down.weight": torch.zeros(1, 1)},
        adapter,
        {"kern.arch": "flux2", "modelspec.architecture": "Flux.2-dev/lora"},
    )
    with pytest.raises(AdapterError, match="made for 'flux2', not for 'toy'"):
        run_batch(setup(tmp_path, weights=[(str(adapter), 1.0)]), [Request(prompt="x")])
