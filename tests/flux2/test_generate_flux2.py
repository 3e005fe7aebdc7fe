"""`kern generate` end to end on the tiny FLUX.2 klein bundle on the CPU: seeds, prompt files with
options and wildcards, batches, interactive mode, adapters (unmerged and merged), true CFG, the CLI."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from kern.core.plugins import get_manager
from kern.data.prompts import Request, Wildcards, expand_request, read_prompt_file
from kern.generate.driver import Setup, run_batch, run_interactive
from PIL import Image

from tests.conftest import run_kern

TARGETS = ("img_in", "txt_in", "final_layer\\.linear", "double_blocks\\..*", "single_blocks\\..*")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def setup(bundle, out, **kw):
    kw = {"width": 32, "height": 32, "steps": 2, **kw}
    return Setup(
        arch="flux2-klein-4b",
        transformer=str(bundle["transformer"]),
        vae=str(bundle["vae"]),
        text_encoder=str(bundle["text_encoder"]),
        dtype="float32",
        device="cpu",
        out=out,
        **kw,
    )


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def meta(path) -> dict:
    """kern's JSON of the image (kern.generate.pnginfo; the A1111 text is tested in tests/generate/test_png_metadata.py)."""
    with Image.open(path) as im:
        return json.loads(im.text["kern"])


def spy(monkeypatch, name: str) -> list[dict]:
    """Record every call of hook ``name`` of the global plugin manager (what the generator calls)."""
    manager = get_manager()
    real = getattr(manager.hook, name)
    calls: list[dict] = []

    def wrapper(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(manager.hook, name, wrapper)
    return calls


def test_same_seed_same_image_and_different_seeds_differ(tiny_bundle, tmp_path):
    a = run_batch(setup(tiny_bundle, tmp_path / "a"), [Request(prompt="a red circle", seed=7)])
    b = run_batch(setup(tiny_bundle, tmp_path / "b"), [Request(prompt="a red circle", seed=7)])
    c = run_batch(setup(tiny_bundle, tmp_path / "c"), [Request(prompt="a red circle", seed=8)])
    assert [p.name for p in a + c] == ["00000_7.png", "00000_8.png"]
    assert np.array_equal(pixels(a[0]), pixels(b[0]))
    assert np.abs(pixels(a[0]) - pixels(c[0])).mean() > 1.0
    info = meta(a[0])
    assert info["prompt"] == "a red circle" and info["seed"] == 7
    assert (info["arch"], info["variant"]) == ("flux2", "klein-4b")
    assert (info["steps"], info["width"], info["height"]) == (2, 32, 32)
    assert info["transformer"] == str(tiny_bundle["transformer"])


def test_prompt_file_with_line_options_and_nested_weighted_wildcards(tiny_bundle, tmp_path):
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "color.txt").write_text("__shade__ red:3\n__shade__ blue\ngreen:0\n")  # weight 0: never chosen
    (cards / "shade.txt").write_text("dark\nlight:2\n# a comment\n")
    (cards / "shape.txt").write_text("__color__ disc\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# comment line\n"
        "a __color__ ball --w 32 --h 48 --d 5 --s 3\n"
        "\n"
        "--w 64 --h 16 --f 2\n"
        "   # indented comment\n"
        "a cube --w 16 --h 32 --d 9 --s 2 --f 1\n"
    )
    requests = read_prompt_file(prompts, base_prompt="a plain __shape__")
    assert len(requests) == 3
    paths = run_batch(setup(tiny_bundle, tmp_path / "out", wildcards=str(cards), seed=100), requests)
    assert len(paths) == 4
    sizes = [Image.open(p).size for p in paths]
    assert sizes == [(32, 48), (64, 16), (64, 16), (16, 32)]
    infos = [meta(p) for p in paths]
    assert [i["source"] for i in infos] == [f"{prompts}:2", f"{prompts}:4", f"{prompts}:4", f"{prompts}:6"]
    assert [i["seed"] for i in infos] == [5, 101, 102, 9]
    assert [i["steps"] for i in infos] == [3, 2, 2, 2]
    assert [(int(i["width"]), int(i["height"])) for i in infos] == sizes
    shades = {f"{s} {c}" for s in ("dark", "light") for c in ("red", "blue")}
    ball, plain1, plain2, cube = (i["prompt"] for i in infos)
    assert ball.startswith("a ") and ball.endswith(" ball") and ball[2:-5] in shades
    for plain in (plain1, plain2):
        assert plain.startswith("a plain ") and plain.endswith(" disc") and plain[8:-5] in shades
    assert cube == "a cube"
    # The stored prompt is the expansion chosen by the image's own seed.
    cards_ = Wildcards(cards)
    assert ball == expand_request(requests[0], cards_, 5).prompt
    assert plain2 == expand_request(requests[1], cards_, 102).prompt
    assert infos[1]["prompt"] == plain1


def test_batch_of_several_prompts_with_count_keeps_every_image_at_its_size(tiny_bundle, tmp_path, monkeypatch):
    calls = spy(monkeypatch, "predict_velocity")
    requests = [
        Request(prompt="a red circle", width=32, height=32, count=4, seed=10),
        Request(prompt="a blue square", width=48, height=16, count=2, seed=20),
        Request(prompt="a green triangle", width=32, height=32, seed=30),
    ]
    paths = run_batch(setup(tiny_bundle, tmp_path / "batch", batch_size=3), requests)
    assert [p.name for p in paths] == [
        "00000_10.png",
        "00001_11.png",
        "00002_12.png",
        "00003_13.png",
        "00004_20.png",
        "00005_21.png",
        "00006_30.png",
    ]
    assert [Image.open(p).size for p in paths] == [(32, 32)] * 4 + [(48, 16)] * 2 + [(32, 32)]
    assert len({pixels(p).tobytes() for p in paths}) == 7
    # 32x32: five images in batches of 3 and 2; 48x16: one batch of 2; two steps each.
    assert sorted(kw["latents"].shape[0] for kw in calls) == [2, 2, 2, 2, 3, 3]
    assert {tuple(kw["latents"].shape[2:]) for kw in calls} == {(2, 2), (1, 3)}

    # An image made in a batch is the image made alone (its own seed, its own prompt).
    for request, name, index in (
        (requests[2], "00006_30.png", 6),
        (Request(prompt="a blue square", width=48, height=16, seed=21), "00005_21.png", 5),
    ):
        alone = run_batch(setup(tiny_bundle, tmp_path / f"alone{index}"), [request])
        assert alone[0].name == name.replace(f"{index:05d}", "00000")
        assert np.abs(pixels(alone[0]) - pixels(tmp_path / "batch" / name)).max() <= 1


def test_interactive_mode_loads_each_model_once(tiny_bundle, tmp_path, monkeypatch):
    loads = spy(monkeypatch, "load_model")
    said: list[str] = []
    lines = [
        "a red circle --w 32 --h 32 --d 1\n",
        "--bogus 3\n",
        "a blue square --w 48 --h 16 --d 2 --s 3\n",
        "a __missing__ dog\n",
        "--f 2\n",
        "exit\n",
        "never read --w 64 --h 64\n",
    ]
    made = run_interactive(setup(tiny_bundle, tmp_path / "out"), iter(lines), "a cat", said.append)
    assert [Image.open(p).size for p in made] == [(32, 32), (48, 16), (32, 32), (32, 32)]
    assert [meta(p)["prompt"] for p in made] == ["a red circle", "a blue square", "a cat", "a cat"]
    assert Counter(kw["part"] for kw in loads) == {"text_encoder": 1, "transformer": 1, "vae": 1}
    errors = [s for s in said if s.startswith("error:")]
    assert len(errors) == 2 and "--bogus" in errors[0] and "__missing__" in errors[1]
    assert [s for s in said if s.startswith("saved ")] == [f"saved {p}" for p in made]


@pytest.fixture
def lora_file(tiny_bundle, tmp_path):
    """A LoRA on the tiny transformer with random (non-zero) up and down weights, as a musubi-made file looks."""
    from kern.adapters.network import modelspec_metadata
    from kern.records import TargetSpec, resolve_options

    manager = get_manager()
    model = manager.hook.load_model(
        arch="flux2",
        variant="klein-4b",
        part="transformer",
        path=str(tiny_bundle["transformer"]),
        dtype=torch.float32,
        device=torch.device("cpu"),
        options={},
    )
    options = resolve_options(manager.resolve_network("lora").options, {"rank": 4, "alpha": 4.0}, "test")
    network = manager.hook.make_network(
        network_type="lora", model=model, targets=TargetSpec(targets=TARGETS), options=options
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    path = tmp_path / "a.safetensors"
    network.save(
        path,
        metadata=modelspec_metadata(
            architecture="Flux.2-klein-4b", implementation="https://github.com/kohya-ss/musubi-tuner"
        ),
    )
    return path


def test_adapter_changes_the_image_and_merged_matches_unmerged(tiny_bundle, tmp_path, lora_file, monkeypatch):
    from kern.adapters.weights import parse_weights_arg

    request = [Request(prompt="a red circle", seed=4)]
    base = run_batch(setup(tiny_bundle, tmp_path / "base"), request)[0]
    weights = [parse_weights_arg(f"{lora_file}:1.0")]
    unmerged = run_batch(setup(tiny_bundle, tmp_path / "unmerged", weights=weights), request)[0]
    merged = run_batch(setup(tiny_bundle, tmp_path / "merged", weights=weights, merge=True), request)[0]
    off = run_batch(setup(tiny_bundle, tmp_path / "off", weights=[(str(lora_file), 0.0)]), request)[0]

    assert np.abs(pixels(unmerged) - pixels(base)).mean() > 2.0
    assert np.abs(pixels(merged) - pixels(unmerged)).max() <= 1
    assert np.abs(pixels(off) - pixels(base)).max() <= 1
    assert [(a["path"], a["multiplier"]) for a in meta(unmerged)["adapters"]] == [(str(lora_file), 1.0)]


def test_klein_base_uses_true_cfg_two_forwards_per_step(tiny_bundle, tmp_path, monkeypatch):
    calls = spy(monkeypatch, "predict_velocity")
    run_batch(setup(tiny_bundle, tmp_path / "distilled", steps=3), [Request(prompt="a red circle", seed=1)])
    assert len(calls) == 3  # klein 4B is distilled: one forward per step

    calls.clear()
    paths = run_batch(
        setup(tiny_bundle, tmp_path / "base", variant="klein-base-4b", steps=3),
        [Request(prompt="a red circle", seed=1, negative="blurry")],
    )
    assert len(calls) == 6
    assert all(kw["variant"] == "klein-base-4b" for kw in calls)
    cond, uncond = calls[0]["text"]["ctx"], calls[1]["text"]["ctx"]
    assert not torch.equal(cond, uncond)  # the second forward of a step sees the negative prompt
    assert all(torch.equal(calls[i]["text"]["ctx"], cond) for i in (2, 4))
    info = meta(paths[0])
    assert info["variant"] == "klein-base-4b" and info["guidance"] == 4.0 and info["negative_prompt"] == "blurry"

    calls.clear()
    run_batch(
        setup(tiny_bundle, tmp_path / "g1", variant="klein-base-4b", steps=3, guidance=1.0),
        [Request(prompt="a red circle", seed=1)],
    )
    assert len(calls) == 3  # guidance 1: the unconditional forward is skipped


def test_cli_generate_writes_a_png(tiny_bundle, tmp_path):
    out = tmp_path / "cli"
    proc = run_kern(
        "generate",
        "--arch",
        "flux2-klein-4b",
        "--transformer",
        str(tiny_bundle["transformer"]),
        "--vae",
        str(tiny_bundle["vae"]),
        "--text-encoder",
        str(tiny_bundle["text_encoder"]),
        "-p",
        "a red circle",
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["00000_0.png"]
    assert str(pngs[0]) in proc.stdout
    assert Image.open(pngs[0]).size == (32, 32)
    info = meta(pngs[0])
    assert info["prompt"] == "a red circle" and info["steps"] == 2 and info["variant"] == "klein-4b"


def test_compiled_blocks_give_the_eager_image(tiny_bundle, tmp_path):
    """`kern generate --compile`: the repeated blocks compiled make the image the eager blocks make, to rounding."""
    from kern.gpu import accel

    request = [Request(prompt="a red circle", seed=3)]
    eager = run_batch(setup(tiny_bundle, tmp_path / "eager"), request)
    graphs = accel.compiled_graphs()
    try:
        compiled = run_batch(setup(tiny_bundle, tmp_path / "compiled", compile="blocks"), request)
    finally:
        accel.reset_attention()
    assert accel.compiled_graphs() > graphs  # the blocks did run compiled
    assert np.abs(pixels(eager[0]) - pixels(compiled[0])).max() <= 1  # 8-bit pixels: a last-bit difference at most
    assert meta(compiled[0])["prompt"] == "a red circle"
