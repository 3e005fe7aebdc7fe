"""FLUX.2 fp8 transformer files (issue 15): ComfyUI's scaled and mixed fp8 files (BFL names under
``model.diffusion_model.``), plain casts and a diffusers-layout fp8 file, made from the tiny klein transformer with
ComfyUI's per-tensor recipe. Loaded dequantised they equal the exact reference; loaded for an fp8 base the
block Linears keep the file's bytes and give the reference's velocities; training runs on them."""

from __future__ import annotations

import pytest
import torch
from kern.core.io import load_file
from kern.gpu.fp8 import Float8MatmulLinear
from kern_flux2 import keys, loader
from kern_flux2.plugin import KEEP_HIGH_PRECISION
from safetensors.torch import save_file

from tests.flux2.test_train_flux2 import Spy, job, velocity
from tests.helpers import make_dataset
from tests.kernel.test_fp8_checkpoints import E4M3, fp8_checkpoint, fp8_linears, write_fp8_checkpoint

pytestmark = pytest.mark.skipif(E4M3 is None, reason="this torch has no float8 dtypes")
PREFIX = "model.diffusion_model."


def in_blocks(k: str, v: torch.Tensor) -> bool:
    """What ComfyUI's fp8 files quantise: the blocks' Linear weights (embedders, modulations, final layer bf16)."""
    return k.endswith(".weight") and v.dim() == 2 and k.startswith(("double_blocks.", "single_blocks."))


@pytest.fixture(scope="module")
def source(tiny_bundle):
    state, _ = load_file(tiny_bundle["transformer"])
    return {k: v.to(torch.bfloat16) for k, v in state.items()}


@pytest.fixture(scope="module")
def fp8_files(source, tmp_path_factory):
    """layout -> (path, float32 reference in BFL names)."""
    folder = tmp_path_factory.mktemp("flux2-fp8")
    made = {}
    for layout, prefix in (("scaled", PREFIX), ("mixed", PREFIX), ("plain", "")):
        path = folder / f"flux2_klein_fp8_{layout}.safetensors"
        made[layout] = (path, write_fp8_checkpoint(path, source, layout, in_blocks, prefix=prefix))
    return made


def expected_fp8_layers(model) -> set[str]:
    import re

    keep = [re.compile(p) for p in KEEP_HIGH_PRECISION]
    return {
        n
        for n, m in model.named_modules()
        if type(m) in (torch.nn.Linear, Float8MatmulLinear)
        and n.startswith(("double_blocks.", "single_blocks."))
        and not any(p.search(n) for p in keep)
        and m.in_features % 16 == 0
        and m.out_features % 16 == 0
    }


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 128, 2, 2, generator=g), torch.tensor([0.4]), {"ctx": torch.randn(1, 7, 48, generator=g)}


@pytest.mark.parametrize("layout", ["scaled", "mixed", "plain"])
def test_dequantised_load_is_the_exact_reference_and_the_variant_is_detected(fp8_files, layout):
    path, reference = fp8_files[layout]
    assert loader.detect_variant(path) == "klein-4b"
    for dtype in (torch.bfloat16, torch.float32):
        model = loader.load_transformer(path, None, dtype, "cpu")
        state = model.state_dict()
        assert set(state) == set(reference)
        assert all(torch.equal(v, reference[k].to(dtype)) for k, v in state.items())


@pytest.mark.parametrize("layout", ["scaled", "mixed"])
def test_fp8_base_load_keeps_the_files_bytes_and_the_velocities(fp8_files, layout):
    path, reference = fp8_files[layout]
    model = loader.load_transformer(path, None, torch.float32, "cpu", fp8=True)
    converted = fp8_linears(model)
    assert converted and set(converted) == expected_fp8_layers(model)
    raw, _ = load_file(path)
    for name, m in converted.items():
        assert torch.equal(m.weight.view(torch.uint8), raw[PREFIX + name + ".weight"].view(torch.uint8))
    dequantised = loader.load_transformer(path, None, torch.float32, "cpu")
    latents, t, text = inputs()
    torch.testing.assert_close(
        velocity(model, latents, t, text), velocity(dequantised, latents, t, text), rtol=0, atol=0
    )


def test_diffusers_layout_fp8_dequantises_only_the_fused_qkv(source, tmp_path):
    """diffusers splits the double blocks' q / k / v, each with its own scale: the fused BFL weight is dequantised
    (``quantize_base`` quantises it per row later), every other fp8 weight stays fp8."""
    diffusers = keys.bfl_to_diffusers(source)
    pick = lambda k, v: k.endswith(".weight") and v.dim() == 2 and "transformer_blocks." in k  # noqa: E731
    out, metadata, reference = fp8_checkpoint(diffusers, "mixed", pick)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(out, str(path), metadata=metadata)
    assert loader.detect_variant(path) == "klein-4b"
    bfl_reference = keys.diffusers_to_bfl(reference)
    model = loader.load_transformer(path, None, torch.float32, "cpu", fp8=True)
    fused = {n for n in expected_fp8_layers(model) if n.endswith("attn.qkv")}
    assert fused and set(fp8_linears(model)) == expected_fp8_layers(model) - fused
    for name in fused:
        assert torch.equal(model.get_submodule(name).weight, bfl_reference[f"{name}.weight"])
    plain = loader.load_transformer(path, None, torch.float32, "cpu")
    assert all(torch.equal(v, bfl_reference[k]) for k, v in plain.state_dict().items())


def test_nvfp4_transformer_is_refused_before_loading(source, tmp_path):
    out = {PREFIX + k: v for k, v in source.items()}
    out[PREFIX + "double_blocks.0.img_mlp.0.comfy_quant"] = torch.tensor(list(b'{"format":"nvfp4"}'), dtype=torch.uint8)
    path = tmp_path / "flux2_dev_nvfp4.safetensors"
    save_file(out, str(path))
    from kern.errors import ModelFileError

    with pytest.raises(ModelFileError, match=r"double_blocks.0.img_mlp.0'.*nvfp4.*use the bf16 or fp8 file"):
        loader.detect_variant(path)


def test_training_an_fp8_base_from_an_fp8_file(tiny_bundle, fp8_files, tmp_path, monkeypatch):
    path, _ = fp8_files["scaled"]
    dataset = make_dataset(tmp_path / "data", n=2, size=(32, 32), batch_size=2)
    out = tmp_path / "run"
    spy = Spy(monkeypatch, "make_network")
    run = job(tiny_bundle, dataset, out, **{"model.transformer": str(path), "train.base_precision": "fp8"})
    from kern.train import driver as train

    adapter = train.run(run)
    assert adapter.exists()
    model = spy.calls["make_network"][0]["model"]
    raw, _ = load_file(path)
    layers = fp8_linears(model)
    assert layers and set(layers) == expected_fp8_layers(model)
    for name, m in layers.items():  # the file's bytes, not a re-quantised copy
        assert torch.equal(m.weight.view(torch.uint8), raw[PREFIX + name + ".weight"].view(torch.uint8))
