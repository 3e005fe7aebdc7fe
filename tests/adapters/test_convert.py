"""Layout conversion: kohya ↔ ComfyUI ↔ diffusers, exact in ΔW, FLUX.2 qkv split / fuse, LoHa limits.

ΔW is checked with an independent reading of each layout (below), not with kern's own loaders.
"""

from __future__ import annotations

import json

import pytest
import torch
from kern.adapters.convert import convert
from kern.core.io import load_file
from kern.errors import AdapterError, UsageError
from kern_flux2.adapter_map import flux2_module_map

from tests.adapters.helpers import (
    ALL_PATHS,
    ARCH,
    BLOCK_PATHS,
    DEPTH,
    SINGLE,
    D,
    LayerTree,
    manager_with_arch,
    random_loha,
    random_lora,
    write,
)
from tests.adapters.test_metadata import file_data_sha256, kohya_hashes

NATIVE = ALL_PATHS
FLAT = {p.replace(".", "_"): p for p in NATIVE}
MAP = flux2_module_map(DEPTH, SINGLE, D)
DIFFUSERS = {o: (n, r) for n, others in MAP for o, r in others}
DIFFUSERS_FLAT = {o.replace(".", "_"): o for o in DIFFUSERS}


def _module_deltas(tensors: dict) -> dict[str, torch.Tensor]:
    """{dotted module path (native or diffusers): ΔW} read straight from the keys, for every layout."""
    groups: dict[str, dict] = {}
    for k, v in tensors.items():
        for suffix in (
            "lora_down.weight",
            "lora_up.weight",
            "lora_A.weight",
            "lora_B.weight",
            "alpha",
            "hada_w1_a",
            "hada_w1_b",
            "hada_w2_a",
            "hada_w2_b",
        ):
            if k.endswith("." + suffix):
                groups.setdefault(k[: -len(suffix) - 1], {})[suffix] = v.float()
    out = {}
    for name, t in groups.items():
        if name.startswith("lora_unet_"):
            path = FLAT[name[len("lora_unet_") :]]
        elif name.startswith("lycoris_"):
            path = DIFFUSERS_FLAT[name[len("lycoris_") :]]
        else:
            path = name.removeprefix("diffusion_model.").removeprefix("transformer.")
        if "hada_w1_a" in t:
            r = t["hada_w1_b"].shape[0]
            d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        else:
            a = t.get("lora_down.weight", t.get("lora_A.weight"))
            b = t.get("lora_up.weight", t.get("lora_B.weight"))
            r = a.shape[0]
            d = b @ a
        out[path] = d * (float(t["alpha"]) / r if "alpha" in t else 1.0)
    return out


def native_deltas(tensors: dict) -> dict[str, torch.Tensor]:
    """ΔW per native module; diffusers q/k/v row slices are stacked back into the fused qkv."""
    out, parts = {}, {}
    for path, d in _module_deltas(tensors).items():
        if path in DIFFUSERS and path not in NATIVE:
            native, rows = DIFFUSERS[path]
            if rows is None:
                out[native] = d
            else:
                parts.setdefault(native, {})[rows] = d
        else:
            out[path] = d
    for native, slices in parts.items():
        full = torch.zeros(3 * D, slices[next(iter(slices))].shape[1])
        for (s, e), d in slices.items():
            full[s:e] = d
        out[native] = full
    return out


def assert_same_deltas(a: dict, b: dict, atol=1e-5):
    da, db = native_deltas(a), native_deltas(b)
    assert da.keys() == db.keys()
    for k in da:
        assert torch.allclose(da[k], db[k], atol=atol), (k, float((da[k] - db[k]).abs().max()))


@pytest.fixture
def manager():
    return manager_with_arch()


def test_kohya_to_comfyui_folds_alpha(tmp_path, manager):
    model = LayerTree()
    src = random_lora(model, NATIVE, rank=3, alpha=1.5)
    write(tmp_path / "k.safetensors", src)
    result = convert(tmp_path / "k.safetensors", tmp_path / "c.safetensors", "comfyui", ARCH, manager=manager)
    assert result["variant"] == "base"  # "wide" is tried first and does not fit the qkv rows
    out, md = load_file(tmp_path / "c.safetensors")
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in out)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in out
    assert "diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight" in out
    assert md["kern.converted_from"] == "kohya"
    assert md["sshs_model_hash"] == file_data_sha256(tmp_path / "c.safetensors")  # its own hashes, as kohya's
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == kohya_hashes(out, md)
    assert_same_deltas(src, out)
    # and back: α = r (scale 1) in kohya
    convert(tmp_path / "c.safetensors", tmp_path / "k2.safetensors", "kohya", ARCH, manager=manager)
    back, _ = load_file(tmp_path / "k2.safetensors")
    assert set(back) == set(src)
    assert float(back["lora_unet_img_in.alpha"]) == 3.0
    assert_same_deltas(src, back)


def test_kohya_to_diffusers_splits_qkv_and_back_is_exact(tmp_path, manager):
    model = LayerTree()
    src = random_lora(model, BLOCK_PATHS + ["img_in", "final_layer.linear"], rank=3, alpha=2.0, seed=1)
    write(tmp_path / "k.safetensors", src)
    convert(tmp_path / "k.safetensors", tmp_path / "d.safetensors", "diffusers", ARCH, manager=manager)
    out, md = load_file(tmp_path / "d.safetensors")
    assert all(k.startswith("transformer.") for k in out)
    for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
        assert f"transformer.transformer_blocks.1.attn.{proj}.lora_A.weight" in out
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B.weight" in out
    assert "transformer.x_embedder.lora_A.weight" in out and "transformer.proj_out.lora_B.weight" in out
    assert not any(k.endswith(".alpha") for k in out)
    cfg = json.loads(md["lora_adapter_metadata"])
    assert cfg["transformer.r"] == 3 and cfg["transformer.lora_alpha"] == 3
    assert_same_deltas(src, out)

    convert(tmp_path / "d.safetensors", tmp_path / "k2.safetensors", "kohya", ARCH, manager=manager)
    back, _ = load_file(tmp_path / "k2.safetensors")
    assert set(back) == set(src)
    # The three A of a split qkv are equal, so the fused module comes back at rank r, not 3r.
    assert back["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 3
    assert_same_deltas(src, back)


def test_independent_q_k_v_fuse_to_rank_3r_block_diagonal_and_split_back(tmp_path, manager):
    g = torch.Generator().manual_seed(2)
    src = {}
    for proj, rank in (("to_q", 2), ("to_k", 3), ("to_v", 2)):  # different ranks and alphas
        src[f"transformer.transformer_blocks.0.attn.{proj}.lora_A.weight"] = torch.randn(rank, D, generator=g)
        src[f"transformer.transformer_blocks.0.attn.{proj}.lora_B.weight"] = torch.randn(D, rank, generator=g)
    src["transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight"] = torch.randn(2, D, generator=g)  # k only
    src["transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight"] = torch.randn(D, 2, generator=g)
    write(tmp_path / "d.safetensors", src)
    convert(tmp_path / "d.safetensors", tmp_path / "k.safetensors", "kohya", ARCH, manager=manager)
    fused, _ = load_file(tmp_path / "k.safetensors")
    assert fused["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (7, D)
    assert fused["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (3 * D, 7)
    assert_same_deltas(src, fused)
    convert(tmp_path / "k.safetensors", tmp_path / "d2.safetensors", "diffusers", ARCH, manager=manager)
    again, _ = load_file(tmp_path / "d2.safetensors")
    assert again["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"].shape == (
        3,
        D,
    )  # block-diagonal → rank r back
    assert_same_deltas(src, again)


def test_loha_comfyui_keeps_hada_and_alpha_and_diffusers_is_refused(tmp_path, manager):
    model = LayerTree()
    src = random_loha(model, BLOCK_PATHS, rank=2, alpha=1.0, seed=3)
    write(tmp_path / "h.safetensors", src)
    convert(tmp_path / "h.safetensors", tmp_path / "c.safetensors", "comfyui", ARCH, manager=manager)
    out, _ = load_file(tmp_path / "c.safetensors")
    assert "diffusion_model.double_blocks.0.img_attn.qkv.hada_w2_b" in out
    assert float(out["diffusion_model.double_blocks.0.img_attn.qkv.alpha"]) == 1.0
    assert_same_deltas(src, out)
    with pytest.raises(
        AdapterError, match=r"h\.safetensors: a LoHa .* cannot be written in the diffusers layout.*comfyui"
    ):
        convert(tmp_path / "h.safetensors", tmp_path / "d.safetensors", "diffusers", ARCH, manager=manager)
    assert not (tmp_path / "d.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "h.safetensors"]


def test_loha_with_diffusers_names_fuses_into_native_qkv(tmp_path, manager):
    g = torch.Generator().manual_seed(4)
    src = {}
    for proj in ("to_q", "to_k", "to_v"):
        name = f"lycoris_transformer_blocks_1_attn_{proj}"
        src[f"{name}.hada_w1_a"] = torch.randn(D, 2, generator=g)
        src[f"{name}.hada_w1_b"] = torch.randn(2, D, generator=g)
        src[f"{name}.hada_w2_a"] = torch.randn(D, 2, generator=g)
        src[f"{name}.hada_w2_b"] = torch.randn(2, D, generator=g)
        src[f"{name}.alpha"] = torch.tensor({"to_q": 1.0, "to_k": 2.0, "to_v": 0.5}[proj])
    write(tmp_path / "l.safetensors", src)
    convert(tmp_path / "l.safetensors", tmp_path / "k.safetensors", "kohya", ARCH, manager=manager)
    out, _ = load_file(tmp_path / "k.safetensors")
    assert out["lora_unet_double_blocks_1_img_attn_qkv.hada_w1_a"].shape == (3 * D, 6)
    assert_same_deltas(src, out)


def test_module_without_diffusers_equivalent(tmp_path, manager):
    src = random_lora(LayerTree(), ["final_layer.adaLN_modulation.1", "img_in"])
    write(tmp_path / "f.safetensors", src)
    with pytest.raises(AdapterError, match=r"final_layer_adaLN_modulation_1 .*no diffusers equivalent"):
        convert(tmp_path / "f.safetensors", tmp_path / "d.safetensors", "diffusers", ARCH, manager=manager)
    convert(tmp_path / "f.safetensors", tmp_path / "c.safetensors", "comfyui", ARCH, manager=manager)


def test_comfyui_with_alpha_keeps_its_scale(tmp_path, manager):
    src = {
        "diffusion_model.img_in.lora_A.weight": torch.randn(2, 4),
        "diffusion_model.img_in.lora_B.weight": torch.randn(D, 2),
        "diffusion_model.img_in.alpha": torch.tensor(0.5),
    }
    write(tmp_path / "c.safetensors", src)
    convert(tmp_path / "c.safetensors", tmp_path / "k.safetensors", "kohya", ARCH, manager=manager)
    out, _ = load_file(tmp_path / "k.safetensors")
    assert float(out["lora_unet_img_in.alpha"]) == 0.5
    assert_same_deltas(src, out)


def test_usage_errors(tmp_path, manager):
    write(tmp_path / "k.safetensors", random_lora(LayerTree(), ["img_in"]))
    with pytest.raises(UsageError, match="unknown architecture"):
        convert(tmp_path / "k.safetensors", tmp_path / "o.safetensors", "comfyui", "nope", manager=manager)
    with pytest.raises(UsageError, match="unknown layout"):
        convert(tmp_path / "k.safetensors", tmp_path / "o.safetensors", "a1111", ARCH, manager=manager)
    # Issue 16: row counts no longer decide (they are read off the file); a module the map lacks still does.
    with pytest.raises(AdapterError, match=r"does not fit tinyflux.*wide.*not in the module map"):
        write(tmp_path / "q.safetensors", random_lora(LayerTree(), ["double_blocks.0.img_attn.qkv"]) | extra_module())
        convert(
            tmp_path / "q.safetensors", tmp_path / "o.safetensors", "diffusers", ARCH, variant="wide", manager=manager
        )
    assert not (tmp_path / "o.safetensors").exists()


def extra_module() -> dict[str, torch.Tensor]:
    """A LoRA module the FLUX.2 module map does not have."""
    return {
        "lora_unet_double_blocks_0_img_attn_extra.lora_down.weight": torch.randn(2, D),
        "lora_unet_double_blocks_0_img_attn_extra.lora_up.weight": torch.randn(D, 2),
    }


def test_rows_are_read_from_the_file(tmp_path, manager):
    """A variant of another hidden size still converts: the fused qkv's slices come from the file's rows."""
    src = random_lora(LayerTree(), BLOCK_PATHS, rank=2, alpha=1.0, seed=5)
    write(tmp_path / "k.safetensors", src)
    result = convert(
        tmp_path / "k.safetensors", tmp_path / "d.safetensors", "diffusers", ARCH, variant="wide", manager=manager
    )
    assert result["variant"] == "wide"
    out, _ = load_file(tmp_path / "d.safetensors")
    assert out["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"].shape == (D, 2)
    assert_same_deltas(src, out)
    convert(tmp_path / "d.safetensors", tmp_path / "k2.safetensors", "kohya", ARCH, variant="wide", manager=manager)
    back, _ = load_file(tmp_path / "k2.safetensors")
    assert back["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (3 * D, 2)
    assert_same_deltas(src, back)


# --------------------------------------------------------------------------- the real plugins on tiny models


def _tiny_flux2():
    from kern_flux2.params import tiny_params
    from kern_flux2.transformer import Flux2Transformer

    return Flux2Transformer(tiny_params(False, depth=2, depth_single=2))


def _tiny_qwen():
    from kern_qwen_image.params import tiny_params
    from kern_qwen_image.transformer import QwenImageTransformer

    return QwenImageTransformer(tiny_params(num_layers=2))


TINY = {"flux2": _tiny_flux2, "qwen-image": _tiny_qwen}


@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory):
    """Adapters on every Linear of the tiny FLUX.2 / Qwen-Image models (the tiny bundles' shapes), kohya layout."""
    from kern.core.plugins import get_manager
    from kern.records import TargetSpec

    tmp = tmp_path_factory.mktemp("tiny-convert")
    manager = get_manager()
    out = {}
    for arch, make in TINY.items():
        model = make()
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for network in ("lora", "loha"):
            opts = {o.name: o.default for o in manager.resolve_network(network).options} | {"rank": 2, "alpha": 0.75}
            net = manager.hook.make_network(
                network_type=network, model=model, targets=TargetSpec(targets=(".*",)), options=opts
            )
            g = torch.Generator().manual_seed(11)
            with torch.no_grad():
                for p in net.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            out[arch, network] = (net.save(tmp / f"{arch}-{network}.safetensors"), shapes)
            net.remove()
    return tmp, manager, out


@pytest.mark.parametrize("network", ["lora", "loha"])
@pytest.mark.parametrize("arch", ["flux2", "qwen-image"])
def test_tiny_model_adapters_convert_every_way_and_back(tiny_adapters, arch, network):
    """kern convert on adapters of the tiny models (not a real variant's sizes) with the real plugins' maps:
    kohya → comfyui / diffusers → kohya, ΔW of every weight preserved (read with the ComfyUI oracle)."""
    from tests.adapters import comfyui_oracle as comfy

    tmp, manager, files = tiny_adapters
    src, shapes = files[arch, network]
    family = {"flux2": comfy.FLUX, "qwen-image": comfy.QWEN_IMAGE}[arch]
    want = comfy.weight_deltas(load_file(src)[0], shapes, family)
    layouts = ["comfyui", "diffusers"] if network == "lora" else ["comfyui"]
    for layout in layouts:
        mid = tmp / f"{arch}-{network}-{layout}.safetensors"
        stem = src
        if (
            arch == "flux2" and layout == "diffusers"
        ):  # diffusers has no counterpart for the final adaLN (swapped halves)
            tensors, md = load_file(src)
            stem = write(
                tmp / f"{arch}-{network}-nofinal.safetensors",
                {k: v for k, v in tensors.items() if "final_layer_adaLN" not in k},
                md,
            )
        convert(stem, mid, layout, arch, manager=manager, overwrite=True)
        back = tmp / f"{arch}-{network}-{layout}-back.safetensors"
        convert(mid, back, "kohya", arch, manager=manager, overwrite=True)
        expected = comfy.weight_deltas(load_file(stem)[0], shapes, family) if stem != src else want
        got = comfy.weight_deltas(load_file(back)[0], shapes, family)
        assert got.keys() == expected.keys()
        for k in got:
            assert torch.allclose(got[k], expected[k], atol=1e-6, rtol=1e-5), (layout, k)
        if layout == "comfyui":  # and ComfyUI reads the converted file as it is, to the same ΔW
            direct = comfy.weight_deltas(load_file(mid)[0], shapes, family)
            assert all(torch.allclose(direct[k], want[k], atol=1e-6, rtol=1e-5) for k in want)
    if network == "loha":
        with pytest.raises(UsageError, match="diffusers cannot load LoHa.*--to comfyui.*kern merge"):
            convert(src, tmp / "never.safetensors", "diffusers", arch, manager=manager)
        assert not (tmp / "never.safetensors").exists()
