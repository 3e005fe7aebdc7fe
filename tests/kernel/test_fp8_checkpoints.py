"""fp8 checkpoints (issue 15): plain fp8 casts, ComfyUI's legacy scaled fp8 (``scaled_fp8`` marker, ``scale_weight``,
``scale_input``) and its mixed files (``comfy_quant`` tensors or ``_quantization_metadata``, ``weight_scale``,
``input_scale``) read by ``kern.models.files`` (dequantised exactly: ``q.float() * scale``, one cast) and by
``kern.models.quantized.load_into`` (fp8 layers keep the file's bytes).

The writers here follow ComfyUI's recipe (``comfy/quant_ops.py`` ``TensorCoreFP8Layout.quantize``: one scale per
tensor, ``amax / finfo.max``) and its key names (``comfy/utils.py`` ``convert_old_quants``); the plugins' fp8 tests
reuse them on the tiny transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from kern.errors import ModelFileError
from kern.gpu.fp8 import (
    Float8MatmulLinear,
    Float8StorageLinear,
    fp8_matmul_supported,
    quantize_base,
    quantize_linears_,
)
from kern.models import files as model_files
from kern.models.files import e5m2_to_e4m3, load_tensors, read_shapes, read_state
from kern.models.quantized import load_into
from safetensors.torch import save_file
from torch import nn

E4M3 = getattr(torch, "float8_e4m3fn", None)
E5M2 = getattr(torch, "float8_e5m2", None)
pytestmark = pytest.mark.skipif(E4M3 is None or E5M2 is None, reason="this torch has no float8 dtypes")
LAYOUTS = ("plain", "scaled", "mixed", "metadata")
FORMAT_NAMES = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}


# --------------------------------------------------------------------------- writers (shared with the plugin tests)


def comfy_quantize(w: torch.Tensor, fp8: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's per-tensor fp8 quantisation: scale = amax / finfo.max, q = (w · (1/scale) in w's dtype) → fp8."""
    scale = (w.abs().amax() / torch.finfo(fp8).max).to(torch.float32)
    return (w * (1.0 / scale).to(w.dtype)).to(fp8), scale


def fp8_checkpoint(
    state: dict[str, torch.Tensor],
    layout: str,
    quantise: Callable[[str, torch.Tensor], bool],
    prefix: str = "",
    fp8: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor]]:
    """``state`` as an fp8 file in ``layout`` (the tensors ``quantise`` picks in fp8, the rest as they are), its
    metadata, and the reference: every tensor's exact value in float32 (``q.float() * scale``)."""
    fp8 = fp8 or E4M3
    fmt = {E4M3: "float8_e4m3fn", E5M2: "float8_e5m2"}[fp8]
    out: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, str]] = {}
    for k, v in state.items():
        if not quantise(k, v):
            out[prefix + k], reference[k] = v, v.float()
            continue
        layer = prefix + k[: -len(".weight")]
        q, scale = (v.to(fp8), torch.tensor(1.0)) if layout == "plain" else comfy_quantize(v, fp8)
        out[prefix + k], reference[k] = q, q.float() * scale
        if layout == "scaled":
            out[f"{layer}.scale_weight"], out[f"{layer}.scale_input"] = scale.reshape(()), torch.tensor(1.0)
        elif layout in ("mixed", "metadata"):
            out[f"{layer}.weight_scale"], out[f"{layer}.input_scale"] = scale, torch.tensor(0.25)
            if layout == "mixed":
                out[f"{layer}.comfy_quant"] = torch.tensor(
                    list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8
                )
            layers[layer] = {"format": fmt}
    metadata = {}
    if layout == "scaled":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=fp8)
    if layout == "metadata":
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    return out, metadata, reference


def write_fp8_checkpoint(path: Path, state, layout, quantise, metadata=None, **kw) -> dict[str, torch.Tensor]:
    """Write ``fp8_checkpoint`` to ``path`` (with ``metadata`` added); return the reference."""
    out, quant_metadata, reference = fp8_checkpoint(state, layout, quantise, **kw)
    save_file(out, str(path), metadata={**(metadata or {}), **quant_metadata})
    return reference


def fp8_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (Float8MatmulLinear, Float8StorageLinear))}


# --------------------------------------------------------------------------- a toy model


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32, bias=False)
        self.odd = nn.Linear(32, 20)  # out features not a multiple of 16: never an fp8 matmul layer

    def forward(self, h):
        h = h + self.proj(self.qkv(self.norm(h))[..., :32])
        return h + self.odd(h).sum(-1, keepdim=True)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_in = nn.Linear(16, 32)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.final_layer = nn.Linear(32, 16)

    def forward(self, x):
        h = self.img_in(x)
        for b in self.blocks:
            h = b(h)
        return self.final_layer(h)


KEEP = (r"(^|\.)img_in(\.|$)", r"final_layer")
MATMUL = {"blocks.0.qkv", "blocks.0.proj", "blocks.1.qkv", "blocks.1.proj"}  # in fp8 file, not kept, multiples of 16


def is_linear_weight(k: str, v: torch.Tensor) -> bool:
    return k.endswith(".weight") and v.dim() == 2


@pytest.fixture(scope="module")
def toy_state():
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in Toy().state_dict().items()}


@pytest.fixture(scope="module")
def toy_files(toy_state, tmp_path_factory):
    """One file per layout (bf16 source, every Linear weight in fp8, ``model.diffusion_model.`` prefix for the
    scaled file as ComfyUI writes full checkpoints): layout -> (path, reference)."""
    folder = tmp_path_factory.mktemp("fp8-toy")
    bf16 = {k: v.to(torch.bfloat16) for k, v in toy_state.items()}
    made = {}
    for layout in LAYOUTS:
        path = folder / f"toy-{layout}.safetensors"
        made[layout] = (path, write_fp8_checkpoint(path, bf16, layout, is_linear_weight))
    return made


def unprefixed(state):
    return {k.removeprefix("model.diffusion_model."): v for k, v in state.items()}


def reference_model(reference, dtype):
    with torch.device("meta"):
        model = Toy()
    model.load_state_dict({k: v.to(dtype) for k, v in reference.items()}, assign=True)
    return model


# --------------------------------------------------------------------------- reading: dequantised exactly


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_tensors_dequantises_exactly_and_consumes_the_quantisation_keys(toy_files, layout, dtype):
    path, reference = toy_files[layout]
    state = load_tensors([path], dtype, "cpu")
    assert set(state) == set(reference)  # no marker, scale, input scale or comfy_quant key left
    for k, v in state.items():
        assert v.dtype == dtype and torch.equal(v, reference[k].to(dtype)), k
    shapes, metadata = read_shapes([path])
    assert shapes == {k: tuple(v.shape) for k, v in reference.items()}
    # read_state keeps tensors as stored, except that fp8 ones come out as their float32 values.
    assert all(
        torch.equal(v, reference[k]) for k, v in read_state(path, "transformer").items() if k.endswith("qkv.weight")
    )


def test_scaled_files_with_a_prefix_and_layers_left_in_bf16(toy_state, tmp_path):
    """ComfyUI's scaled files: marker and scales under ``model.diffusion_model.``; layers without a scale (here the
    embedder and final layer, kept bf16 by the producer) load as stored."""
    bf16 = {k: v.to(torch.bfloat16) for k, v in toy_state.items()}
    path = tmp_path / "scaled.safetensors"
    pick = lambda k, v: is_linear_weight(k, v) and k.startswith("blocks.")  # noqa: E731
    reference = write_fp8_checkpoint(path, bf16, "scaled", pick, prefix="model.diffusion_model.")
    state = unprefixed(load_tensors([path], torch.bfloat16, "cpu"))
    assert set(state) == set(reference) and state["img_in.weight"].dtype == torch.bfloat16
    assert all(torch.equal(v, reference[k].to(torch.bfloat16)) for k, v in state.items())


def test_block_and_row_scales_and_e5m2(toy_state):
    """musubi's row ([out, 1]) and block ([out, blocks, 1]) scales; e5m2 to e4m3 exactly where every value fits."""
    w = toy_state["blocks.0.qkv.weight"]
    q = w.to(E4M3)
    rows = torch.rand(96, 1) + 0.5
    assert torch.equal(model_files.dequantize(q, rows, None), q.float() * rows)
    blocks = torch.rand(96, 4, 1) + 0.5
    assert torch.equal(model_files.dequantize(q, blocks, None), (q.float().view(96, 4, 8) * blocks).view(96, 32))
    q5 = w.to(E5M2)
    scale = torch.rand(96) + 0.5
    q4, s4 = e5m2_to_e4m3(q5, scale)
    assert q4.dtype == E4M3 and torch.equal(q4.float() * s4[:, None], q5.float() * scale[:, None])
    wide = torch.tensor([[2.0**15, 2.0**-14]]).to(E5M2)  # 29 binades: more than e4m3 holds
    assert e5m2_to_e4m3(wide, torch.ones(1)) is None


# --------------------------------------------------------------------------- refusals


def _nvfp4_file(path: Path, via_metadata: bool) -> None:
    state = {
        "blocks.0.qkv.weight": torch.zeros(96, 16, dtype=torch.uint8),  # two fp4 values per byte
        "blocks.0.qkv.weight_scale": torch.ones(96, 2).to(E4M3),
        "blocks.0.qkv.weight_scale_2": torch.tensor(1.0),
        "img_in.weight": torch.zeros(32, 16, dtype=torch.bfloat16),
    }
    metadata = {}
    if via_metadata:
        metadata["_quantization_metadata"] = json.dumps({"layers": {"blocks.0.qkv": {"format": "nvfp4"}}})
    else:
        state["blocks.0.qkv.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    save_file(state, str(path), metadata=metadata)


@pytest.mark.parametrize("via_metadata", [False, True])
def test_nvfp4_files_are_refused_naming_file_layer_and_format(tmp_path, via_metadata):
    path = tmp_path / "flux2_dev_nvfp4.safetensors"
    _nvfp4_file(path, via_metadata)
    for read in (lambda: read_shapes([path]), lambda: load_tensors([path], torch.bfloat16, "cpu")):
        with pytest.raises(ModelFileError) as err:
            read()
        msg = str(err.value)
        assert str(path) in msg and "'blocks.0.qkv'" in msg and "nvfp4" in msg
        assert "kern reads fp8 checkpoints" in msg and "use the bf16 or fp8 file" in msg


def test_int8_weights_with_a_scale_are_refused(tmp_path):
    path = tmp_path / "int8.safetensors"
    save_file({"a.weight": torch.zeros(4, 4, dtype=torch.int8), "a.weight_scale": torch.tensor(1.0)}, str(path))
    with pytest.raises(ModelFileError, match=r"'a' is quantised as I8"):
        read_shapes([path])


def test_mxfp8_block_scales_and_unknown_scale_shapes_are_refused(tmp_path):
    weight = torch.zeros(64, 64).to(E4M3)
    cases = [(torch.ones(64, 3), r"'a': a scale of shape \[64, 3\] for a weight of shape \[64, 64\]")]
    if hasattr(torch, "float8_e8m0fnu"):  # mxfp8: e4m3 values, one e8m0 scale per 32 of a row
        cases.append((torch.ones(64, 2).to(torch.float8_e8m0fnu), r"'a' is quantised as mxfp8"))
    for scale, message in cases:
        path = tmp_path / "odd.safetensors"
        save_file({"a.weight": weight, "a.weight_scale": scale}, str(path))
        with pytest.raises(ModelFileError, match=message):
            read_shapes([path])


def test_a_nan_in_an_fp8_weight_names_the_key(toy_state, tmp_path):
    bf16 = {k: v.to(torch.bfloat16) for k, v in toy_state.items()}
    out, metadata, _ = fp8_checkpoint(bf16, "mixed", is_linear_weight)
    out["blocks.1.proj.weight"][3, 3] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(out, str(path), metadata=metadata)
    for fp8 in (None, "matmul"):
        with torch.device("meta"):
            model = Toy()
        with pytest.raises(ModelFileError, match=r"'blocks.1.proj.weight' holds 1 NaN"):
            load_into(model, [path], dtype=torch.float32, device="cpu", fp8=fp8, keep=KEEP, what="toy", where=path)


# --------------------------------------------------------------------------- load_into


def _load(path, fp8, dtype=torch.float32, device="cpu", **kw):
    with torch.device("meta"):
        model = Toy()
    kw.setdefault("rename", unprefixed)
    return load_into(model, [path], dtype=dtype, device=device, fp8=fp8, keep=KEEP, what="the toy", where=path, **kw)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_into_matmul_keeps_the_files_bytes_and_gives_the_reference_output(toy_files, layout):
    path, reference = toy_files[layout]
    raw = unprefixed(model_files.read_tensors([path], None, "cpu", raw=[k for k in reference if "." in k])[1])
    model = _load(path, "matmul")
    assert set(fp8_linears(model)) == MATMUL
    for name in MATMUL:
        m = model.get_submodule(name)
        assert type(m) is Float8MatmulLinear and m.compute_dtype == torch.float32
        q, scale = raw[f"{name}.weight"]
        assert torch.equal(m.weight.view(torch.uint8), q.view(torch.uint8))  # the file's bytes
        assert m.weight_scale.shape == (m.out_features,) and torch.equal(m.weight_scale, scale)
        assert not m.weight_scale.requires_grad and (m.bias is None or m.bias.dtype == torch.float32)
    for name in ("img_in", "final_layer", "blocks.0.odd"):  # kept, or not a multiple of 16: dequantised
        assert type(model.get_submodule(name)) is nn.Linear
        assert torch.equal(model.get_submodule(name).weight, reference[f"{name}.weight"])
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        expected = reference_model(reference, torch.float32)(x)
        assert torch.equal(model(x), expected)  # on the CPU the layer dequantises, in float32 exactly
        assert torch.equal(_load(path, None)(x), expected)


def test_load_into_storage_converts_every_linear_not_kept(toy_files):
    path, reference = toy_files["scaled"]
    model = _load(path, "storage", dtype=torch.bfloat16)
    assert set(fp8_linears(model)) == MATMUL | {"blocks.0.odd", "blocks.1.odd"}
    assert all(type(m) is Float8StorageLinear for m in fp8_linears(model).values())
    assert model.blocks[0].qkv.bias.dtype == torch.bfloat16 and type(model.img_in) is nn.Linear
    assert quantize_linears_(model, exclude=KEEP) == 0  # the later pass leaves them as they are
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_model(reference, torch.bfloat16)(x), rtol=2e-2, atol=2e-2)


def test_load_into_never_dequantises_a_layer_that_stays_fp8(toy_files, monkeypatch):
    """No bf16 (or float32) copy of an fp8 layer is made: ``dequantize`` only sees the tensors that end up dequantised."""
    path, reference = toy_files["mixed"]
    seen = []
    real = model_files.dequantize

    def spy(q, scale, dtype):
        seen.append(tuple(q.shape))
        return real(q, scale, dtype)

    monkeypatch.setattr(model_files, "dequantize", spy)
    _load(path, "matmul", dtype=torch.bfloat16)
    # img_in, final_layer and the two odd layers: (32, 16), (16, 32), (20, 32) twice
    assert sorted(seen) == sorted([(32, 16), (16, 32), (20, 32), (20, 32)])


def test_bf16_weights_stay_bf16_for_quantize_base_which_keeps_file_fp8_layers(toy_state, tmp_path):
    """A mixed file holds some Linears in bf16: load_into leaves those to ``quantize_base``, which then also sets the
    matmul flags of the layers loaded in fp8 and counts them."""
    bf16 = {k: v.to(torch.bfloat16) for k, v in toy_state.items()}
    path = tmp_path / "mixed.safetensors"
    write_fp8_checkpoint(path, bf16, "mixed", lambda k, v: is_linear_weight(k, v) and k.startswith("blocks.0."))
    model = _load(path, "matmul", dtype=torch.bfloat16).requires_grad_(False)
    assert set(fp8_linears(model)) == {"blocks.0.qkv", "blocks.0.proj"}
    q = model.blocks[0].qkv.weight
    assert type(model.blocks[1].qkv) is nn.Linear and model.blocks[1].qkv.weight.dtype == torch.bfloat16
    assert quantize_base(model, skip=KEEP, backward="fp8") == 4
    assert set(fp8_linears(model)) == MATMUL and model.blocks[0].qkv.weight is q  # untouched
    assert all(m.fp8_backward for m in fp8_linears(model).values())


def test_fused_weights_are_dequantised_and_moved_ones_stay_fp8(toy_files):
    """A rename that computes a tensor (a fused q/k/v) gets dequantised inputs; pure key moves keep fp8."""
    path, reference = toy_files["plain"]

    def rename(sd):
        sd = dict(sd)
        for b in (0, 1):  # the file as if it held the first and last 16 rows of qkv separately
            w = sd.pop(f"blocks.{b}.qkv.weight")
            sd[f"blocks.{b}.qkv.weight"] = torch.cat([w[:48], w[48:]])
        return sd

    model = _load(path, "matmul", rename=rename)
    assert set(fp8_linears(model)) == {"blocks.0.proj", "blocks.1.proj"}
    assert model.blocks[0].qkv.weight.dtype == torch.float32
    assert torch.equal(model.blocks[0].qkv.weight, reference["blocks.0.qkv.weight"])


def test_e5m2_files(toy_state, tmp_path):
    bf16 = {k: v.to(torch.bfloat16) for k, v in toy_state.items()}
    path = tmp_path / "e5m2.safetensors"
    reference = write_fp8_checkpoint(path, bf16, "mixed", is_linear_weight, fp8=E5M2)
    assert all(torch.equal(v, reference[k]) for k, v in load_tensors([path], torch.float32, "cpu").items())
    model = _load(path, "matmul")
    assert set(fp8_linears(model)) == MATMUL  # converted to e4m3 exactly: the same values
    for name in MATMUL:
        m = model.get_submodule(name)
        assert m.weight.dtype == E4M3 and torch.equal(m.dequantized_weight(torch.float32), reference[f"{name}.weight"])


def test_shapes_are_checked_first_in_one_error(toy_files):
    path, _ = toy_files["scaled"]

    class Wider(Toy):
        def __init__(self):
            super().__init__()
            self.blocks[1].proj = nn.Linear(32, 48, bias=False)
            self.extra = nn.Linear(4, 4)

    with torch.device("meta"):
        model = Wider()
    with pytest.raises(ModelFileError) as err:
        load_into(model, [path], dtype=torch.float32, device="cpu", fp8="matmul", what="the toy", where=path)
    msg = str(err.value)
    assert (
        "2 missing: extra.bias, extra.weight" in msg and "blocks.1.proj.weight: file (32, 32) vs model (48, 32)" in msg
    )
    assert "unexpected" not in msg  # the scales and the marker are not keys the model lacks


@pytest.mark.skipif(not fp8_matmul_supported(), reason="needs a CUDA GPU with fp8 matmuls (compute capability 8.9+)")
def test_on_a_gpu_file_fp8_layers_run_scaled_mm_like_quantised_ones(toy_files):
    """Loaded onto the GPU in bf16, the file's fp8 layers take the ``_scaled_mm`` path (activation quantised per
    token: about 2.5 % · √2 error, see test_fp8.py), forward and fp8 backward."""
    path, reference = toy_files["mixed"]
    model = _load(path, "matmul", dtype=torch.bfloat16, device="cuda").requires_grad_(False)
    layers = fp8_linears(model)
    assert set(layers) == MATMUL and all(m.fast and m.weight.is_cuda and not m.fp8_backward for m in layers.values())
    assert quantize_base(model, skip=KEEP, backward="fp8") == 4
    assert all(m.fast and m.fp8_backward for m in layers.values())
    ref = reference_model(reference, torch.bfloat16).cuda().requires_grad_(False)
    x = torch.randn(4, 64, 16, device="cuda", dtype=torch.bfloat16)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    y, y_ref = model(xs[0]), ref(xs[1])
    (y.float().square().sum()).backward()
    (y_ref.float().square().sum()).backward()
    for a, b in ((y, y_ref), (xs[0].grad, xs[1].grad)):
        a, b = a.double(), b.double()
        assert ((a - b).norm() / b.norm()).item() < 0.08
