"""The metadata of kern's PNGs, read by a parser that is not ours (``sd-parsers``, as image browsers and Civitai-style
tools read A1111 images), for every architecture and mode; kern's own JSON makes the same image again
(``kern generate --from-png``)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from kern.data.prompts import Request
from kern.errors import UsageError
from kern.generate import pnginfo
from kern.generate.driver import Setup, run_batch
from PIL import Image
from sd_parsers import ParserManager

from tests.flux2.conftest import tiny_bundle  # noqa: F401  (session fixtures of the architectures' tests)
from tests.qwen_image.conftest import tiny_qwen  # noqa: F401

TRICKY = 'a "quoted" cat, sitting: on a mat\nsecond line, with "more: text"'
TRICKY_NEGATIVE = 'blurry, "low: quality"\nwatermark'


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture
def toy(monkeypatch):
    from kern.core import plugins

    from tests.conftest import REPO

    monkeypatch.setenv(plugins.ENV_DENY, "toy")
    monkeypatch.syspath_prepend(str(REPO / "examples" / "plugins" / "kern-toy"))
    import kern_toy.plugin as toy_plugin

    manager = plugins.build_manager(extra=[("toy", toy_plugin)])
    monkeypatch.setattr(plugins, "_MANAGER", manager)
    return manager


@pytest.fixture(scope="module")
def qwen_variants(tiny_qwen, tmp_path_factory):  # noqa: F811
    from kern_qwen_image import tiny

    folder = tmp_path_factory.mktemp("png-qwen-variants")
    return {
        **tiny_qwen,
        "edit": tiny.write_transformer(folder / "qwen-image-edit-tiny.safetensors", variant="edit-2511"),
        "layered": tiny.write_transformer(folder / "qwen-image-layered-tiny.safetensors", variant="layered"),
        "rgba_vae": tiny.write_vae(folder / "vae-rgba.safetensors", rgba=True),
    }


@pytest.fixture(scope="module")
def flux_lora(tiny_bundle, tmp_path_factory):  # noqa: F811
    """A LoRA on the tiny transformer with random non-zero weights (its file carries sshs_model_hash)."""
    from kern.adapters.network import modelspec_metadata
    from kern.core.plugins import build_manager
    from kern.records import TargetSpec, resolve_options

    manager = build_manager()
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
        network_type="lora", model=model, targets=TargetSpec(targets=["double_blocks.*"]), options=options
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("png-lora") / "my, lora: v1.safetensors"  # A1111 strips , and : from names
    network.save(path, metadata=modelspec_metadata(architecture="Flux.2-klein-4b", implementation="kern"))
    return path


def read(path):
    """What sd-parsers reads from a PNG: (prompt, negative, sampler parameters, metadata, model)."""
    info = ParserManager().parse(path)
    assert info is not None, f"sd-parsers found nothing in {path}"
    assert info.generator.name == "AUTOMATIC1111"
    (sampler,) = info.samplers
    return info, sampler


def check(path, prompt, negative, seed, steps, guidance, size):
    info, sampler = read(path)
    assert info.full_prompt == prompt.strip()
    assert info.full_negative_prompt == negative.strip()
    assert sampler.name == "Euler"
    params = sampler.parameters
    assert (int(params["seed"]), int(params["steps"]), float(params["cfg_scale"])) == (seed, steps, guidance)
    assert info.metadata["Size"] == f"{size[0]}x{size[1]}"
    assert Image.open(path).size == size
    text = Image.open(path).text
    assert "prompt" not in text  # ComfyUI reads a `prompt` chunk as its node graph
    return info, sampler, json.loads(text["kern"])


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im)


# --------------------------------------------------------------------------- the text, read by A1111's rules


def a1111_parse(text: str) -> dict[str, str]:
    """A1111's own reading of the last line (interop.md §5): quoted values json-decoded."""
    last = text.strip().split("\n")[-1]
    pairs = re.findall(r"\s*(\w[\w \-/]+):\s*(\"(?:\\.|[^\\\"])+\"|[^,]*)(?:,|$)", last)
    assert len(pairs) >= 3
    return {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}


def test_parameters_text_follows_a1111():
    meta = {
        "version": "0.1.0",
        "arch": "qwen-image",
        "variant": "t2i",
        "model": "Qwen/Qwen-Image@main",
        "transformer": "/nonexistent/transformer",
        "transformer_sha256": "0123456789abcdef" * 4,
        "prompt": TRICKY,
        "negative_prompt": TRICKY_NEGATIVE,
        "guidance_mode": "cfg",
        "seed": 42,
        "steps": 20,
        "guidance": 4.0,
        "width": 64,
        "height": 32,
        "adapters": [
            {"name": "style, v2", "hash": "abcdef0123456789", "multiplier": 0.8},
            {"name": "b", "hash": "fedcba", "multiplier": 1.0},
        ],
        "references": ["/x/a.png", "/y/b, c.png"],
    }
    text = pnginfo.a1111_parameters(meta)
    assert text.startswith(TRICKY + "\nNegative prompt: " + TRICKY_NEGATIVE + "\nSteps: 20, Sampler: Euler, ")
    fields = a1111_parse(text)
    assert list(fields)[:7] == ["Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model"]
    assert fields["Model hash"] == "0123456789" and fields["Model"] == "Qwen-Image" and fields["CFG scale"] == "4"
    assert fields["Lora hashes"] == "style v2: abcdef012345, b: fedcba"
    assert fields["Lora weights"] == "style v2: 0.8, b: 1"
    assert fields["References"] == "a.png, b, c.png"
    assert fields["Guidance"] == "true CFG" and fields["Architecture"] == "qwen-image t2i"
    assert list(fields)[-1] == "Version" and fields["Version"] == "kern 0.1.0"
    # A model that takes no negative prompt shows none.
    assert "Negative prompt" not in pnginfo.a1111_parameters({**meta, "guidance_mode": "embedded"})


def test_model_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    import hashlib
    import os

    monkeypatch.setattr(pnginfo, "CHUNK", 7)  # streamed in chunks
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x" * 100)
    pnginfo._sha256.cache_clear()
    assert pnginfo.file_sha256(str(model)) == hashlib.sha256(b"x" * 100).hexdigest()
    assert pnginfo.file_sha256(str(model)) == hashlib.sha256(b"x" * 100).hexdigest()
    assert pnginfo._sha256.cache_info().misses == 1
    model.write_bytes(b"y" * 101)
    os.utime(model, ns=(1, 1))
    assert pnginfo.file_sha256(str(model)) == hashlib.sha256(b"y" * 101).hexdigest()
    assert pnginfo.file_sha256(str(tmp_path)) is None  # a folder (diffusers model): no Model hash


# --------------------------------------------------------------------------- every architecture and mode


def test_toy_architecture(tmp_path, toy):
    setup = Setup(arch="toy", dtype="float32", device="cpu", out=tmp_path / "out", negative="unused")
    (path,) = run_batch(setup, [Request(prompt=TRICKY, seed=7, width=32, height=16, guidance=2.5)])
    info, _, meta = check(path, TRICKY, "", seed=7, steps=8, guidance=2.5, size=(32, 16))
    assert info.metadata["Guidance"] == "unused" and info.metadata["Version"].startswith("kern ")
    assert (meta["arch"], meta["variant"], meta["prompt"]) == ("toy", "base", TRICKY)


def flux_setup(bundle, out, **kw):
    return Setup(
        arch="flux2-klein-4b",
        transformer=str(bundle["transformer"]),
        vae=str(bundle["vae"]),
        text_encoder=str(bundle["text_encoder"]),
        dtype="float32",
        device="cpu",
        out=out,
        steps=2,
        width=32,
        height=32,
        **kw,
    )


def test_flux2_klein_with_adapter_and_from_png(tiny_bundle, flux_lora, tmp_path):  # noqa: F811
    import hashlib

    from kern.core.io import read_header

    setup = flux_setup(tiny_bundle, tmp_path / "a", weights=[(str(flux_lora), 0.7)], guidance=3.5)
    (path,) = run_batch(setup, [Request(prompt=TRICKY, seed=11)])
    info, sampler, meta = check(path, TRICKY, "", seed=11, steps=2, guidance=3.5, size=(32, 32))
    sha = hashlib.sha256(tiny_bundle["transformer"].read_bytes()).hexdigest()
    assert sampler.model.hash == sha[:10] and sampler.model.name == "flux-2-klein-4b-tiny"
    assert meta["transformer_sha256"] == sha
    own = read_header(flux_lora)[1]["sshs_model_hash"]
    text = Image.open(path).text["parameters"]
    fields = a1111_parse(text)
    assert fields["Lora hashes"] == f"my lora v1: {own[:12]}" and fields["Lora weights"] == "my lora v1: 0.7"
    assert fields["Guidance"] == "unused" and fields["Architecture"] == "flux2 klein-4b"  # distilled
    assert meta["adapters"] == [{"path": str(flux_lora), "multiplier": 0.7, "name": flux_lora.stem, "hash": own}]

    # The kern JSON makes the same image again; options given now override the stored ones.
    again = cli(["--from-png", str(path), "--out", str(tmp_path / "b"), "--device", "cpu"])
    assert again.exit_code == 0, again.output
    (remade,) = sorted((tmp_path / "b").glob("*.png"))
    assert np.array_equal(pixels(remade), pixels(path))
    assert json.loads(Image.open(remade).text["kern"])["prompt"] == TRICKY
    other = cli(["--from-png", str(path), "--out", str(tmp_path / "c"), "--device", "cpu", "--seed", "12"])
    assert other.exit_code == 0, other.output
    (changed,) = sorted((tmp_path / "c").glob("*.png"))
    assert json.loads(Image.open(changed).text["kern"])["seed"] == 12
    assert not np.array_equal(pixels(changed), pixels(path))


def cli(args):
    from click.testing import CliRunner
    from kern_cli.commands.generate import command

    return CliRunner().invoke(command, args, standalone_mode=False)


def qwen_setup(models, out, transformer="transformer", vae="vae", **kw):
    return Setup(
        arch="qwen-image",
        transformer=str(models[transformer]),
        vae=str(models[vae]),
        text_encoder=str(models["text_encoder"]),
        dtype="float32",
        device="cpu",
        out=out,
        steps=2,
        width=32,
        height=32,
        **kw,
    )


def test_qwen_image_t2i_true_cfg(qwen_variants, tmp_path):
    (path,) = run_batch(
        qwen_setup(qwen_variants, tmp_path / "t2i"), [Request(prompt=TRICKY, negative=TRICKY_NEGATIVE, seed=3)]
    )
    info, _, meta = check(path, TRICKY, TRICKY_NEGATIVE, seed=3, steps=2, guidance=4.0, size=(32, 32))
    assert info.metadata["Guidance"] == "true CFG" and meta["negative_prompt"] == TRICKY_NEGATIVE
    # The default negative prompt (" ") is what the run used; A1111 shows an empty one as none.
    (default,) = run_batch(qwen_setup(qwen_variants, tmp_path / "default"), [Request(prompt="a cat", seed=3)])
    check(default, "a cat", "", seed=3, steps=2, guidance=4.0, size=(32, 32))


def test_qwen_image_edit_with_references_and_from_png(qwen_variants, tmp_path, monkeypatch):
    import kern_qwen_image.plugin

    monkeypatch.setattr(kern_qwen_image.plugin, "EDIT_VAE_AREA", 64 * 64)  # not ≈1024²: fast on a CPU
    refs = [tmp_path / "one.png", tmp_path / "two, b.png"]
    Image.new("RGB", (32, 32), (200, 20, 20)).save(refs[0])
    Image.new("RGB", (48, 32), (20, 20, 200)).save(refs[1])
    setup = qwen_setup(qwen_variants, tmp_path / "edit", "edit", references=[str(r) for r in refs], guidance=2.0)
    (path,) = run_batch(setup, [Request(prompt="make it blue", negative="red", seed=5)])
    info, _, meta = check(path, "make it blue", "red", seed=5, steps=2, guidance=2.0, size=(32, 32))
    assert info.metadata["Architecture"] == "qwen-image edit-2511"
    assert a1111_parse(Image.open(path).text["parameters"])["References"] == "one.png, two, b.png"
    assert meta["references"] == [str(r) for r in refs] and len(meta["reference_sizes"]) == 2

    again = cli(["--from-png", str(path), "--out", str(tmp_path / "again"), "--device", "cpu"])
    assert again.exit_code == 0, again.output
    (remade,) = sorted((tmp_path / "again").glob("*.png"))
    assert np.array_equal(pixels(remade), pixels(path))


def test_qwen_image_layered_every_output(qwen_variants, tmp_path):
    source = tmp_path / "input.png"
    Image.new("RGBA", (32, 32), (10, 200, 30, 128)).save(source)
    setup = qwen_setup(qwen_variants, tmp_path / "layers", "layered", "rgba_vae", references=[str(source)], layers=2)
    paths = run_batch(setup, [Request(prompt=TRICKY, negative="dark", seed=9)])
    assert len(paths) == 3
    for frame, path in enumerate(paths):
        info, _, meta = check(path, TRICKY, "dark", seed=9, steps=2, guidance=4.0, size=(32, 32))
        assert info.metadata["Layer"] == str(frame) and info.metadata["Layers"] == "2" and meta["layer"] == frame

    # Any one of the PNGs makes the whole set again, from the same input image (a reference).
    again = cli(["--from-png", str(paths[1]), "--out", str(tmp_path / "again"), "--device", "cpu"])
    assert again.exit_code == 0, again.output
    remade = sorted((tmp_path / "again").glob("*.png"))
    assert len(remade) == 3 and all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(remade, paths))


# --------------------------------------------------------------------------- refusals


def test_from_png_refuses_an_image_without_kern_metadata(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    result = cli(["--from-png", str(plain), "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, UsageError)
    assert f"--from-png {plain}: the image has no kern metadata" in str(result.exception)
    broken = tmp_path / "broken.png"
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("kern", "{not json")
    Image.new("RGB", (8, 8)).save(broken, pnginfo=info)
    with pytest.raises(UsageError, match=r"broken\.png: its 'kern' metadata is not kern's JSON"):
        pnginfo.read_meta(broken)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(UsageError, match=r"notes\.png: cannot read it as an image"):
        pnginfo.read_meta(text)
    assert not (tmp_path / "o").exists()


def test_arch_is_required_without_from_png(tmp_path):
    result = cli(["-p", "x", "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, UsageError) and "give --arch" in str(result.exception)
