"""ComfyUI accepts every adapter file kern writes, checked with an oracle written from ComfyUI's loader source
(``tests/adapters/comfyui_oracle.py``), not from kern's code.

* Real shapes: for every architecture and variant, every registered network type and every save layout (kohya as
  training saves it, ``kern convert --to comfyui``; and ``--to diffusers`` for LoRA), an adapter on **every** Linear
  of the transformer (modulation, embedders and final layers included), built on the meta device, written at rank
  1: ComfyUI loads every key (no "lora key not loaded", no "NOT LOADED"), and each ΔW fits the weight (or the
  qkv slice) it patches.
* Small shapes: the ΔW ComfyUI adds (its formulas, slices and functions) equals kern's own merge (``kern merge``)
  to float32 tolerance, for LoRA and LoHa, alpha ≠ rank, fused qkv written fused (kohya / comfyui) and split
  (diffusers q/k/v slices).
"""

from __future__ import annotations

import pytest
import torch
from kern.adapters.convert import convert
from kern.adapters.merge import merge
from kern.core.io import load_file, save_file
from kern.core.plugins import get_manager
from kern.records import TargetSpec
from kern_flux2.params import PARAMS_BY_VARIANT, tiny_params
from kern_flux2.transformer import Flux2Transformer
from kern_qwen_image.params import QWEN_IMAGE, QWEN_IMAGE_LAYERED
from kern_qwen_image.params import tiny_params as qwen_tiny_params
from kern_qwen_image.transformer import QwenImageTransformer

from tests.adapters import comfyui_oracle as comfy

EVERYTHING = TargetSpec(targets=(".*",))
FAMILY = {"flux2": comfy.FLUX, "qwen-image": comfy.QWEN_IMAGE}
# Every variant with its own shapes (klein base variants share the distilled ones'), and Layered's extra modules.
MODELS = {
    ("flux2", "dev"): lambda: Flux2Transformer(PARAMS_BY_VARIANT["dev"]),
    ("flux2", "klein-9b"): lambda: Flux2Transformer(PARAMS_BY_VARIANT["klein-9b"]),
    ("flux2", "klein-4b"): lambda: Flux2Transformer(PARAMS_BY_VARIANT["klein-4b"]),
    ("qwen-image", "t2i"): lambda: QwenImageTransformer(QWEN_IMAGE),
    ("qwen-image", "layered"): lambda: QwenImageTransformer(QWEN_IMAGE_LAYERED),
}
NETWORKS = sorted(get_manager().networks)  # every registered network type (`kern plugins`)
# ComfyUI maps FLUX.2 diffusers names through flux_to_diffusers, which lists only FLUX.1's time / modulation names.
NO_DIFFUSERS = "lora_unet_final_layer_adaLN_modulation_1."
COMFY_UNKNOWN_FLUX2_DIFFUSERS = ("time_guidance_embed.", "double_stream_modulation_", "single_stream_modulation.")


def test_every_network_type_is_covered():
    assert {"lora", "loha"} <= set(NETWORKS)


def options(manager, network: str, rank: int, alpha: float) -> dict:
    return {o.name: o.default for o in manager.resolve_network(network).options} | {"rank": rank, "alpha": alpha}


def save_random(net, path, seed: int = 0, scale: float = 0.1):
    """Fill a network's factors with random values and save it the way training does (``Network.save``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net.save(path)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(arch, variant, network) → {layout: file, "shapes": model state-dict shapes, "paths": adapted modules}."""
    manager = get_manager()
    cache: dict = {}

    def build(arch: str, variant: str, network: str) -> dict:
        key = (arch, variant, network)
        if key in cache:
            return cache[key]
        tmp = tmp_path_factory.mktemp(f"{arch}-{variant}-{network}")
        with torch.device("meta"):
            model = MODELS[(arch, variant)]()
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        net = manager.hook.make_network(
            network_type=network, model=model, targets=EVERYTHING, options=options(manager, network, 1, 0.5)
        )
        net.to_empty(device="cpu")  # only the adapter becomes real (rank 1: a few MB at the largest)
        for m in net.adapters.values():
            m.alpha.fill_(0.5)
        files = {"kohya": save_random(net, tmp / "kohya.safetensors")}
        files["comfyui"] = tmp / "comfyui.safetensors"
        convert(files["kohya"], files["comfyui"], "comfyui", arch, variant, manager=manager)
        if network == "lora":
            # diffusers stores FLUX.2's final adaLN halves swapped: kern refuses that module there (test_convert).
            tensors, md = load_file(files["kohya"])
            save_file({k: v for k, v in tensors.items() if NO_DIFFUSERS not in k}, tmp / "kohya-d.safetensors", md)
            files["diffusers"] = tmp / "diffusers.safetensors"
            convert(tmp / "kohya-d.safetensors", files["diffusers"], "diffusers", arch, variant, manager=manager)
        cache[key] = dict(files=files, shapes=shapes, paths={m.path for m in net.adapters.values()})
        return cache[key]

    return build


CASES = [(a, v, n) for (a, v) in MODELS for n in NETWORKS]


@pytest.mark.parametrize("layout", ["kohya", "comfyui"])
@pytest.mark.parametrize("arch,variant,network", CASES)
def test_comfyui_loads_every_key_at_real_shapes(real, arch, variant, network, layout):
    built = real(arch, variant, network)
    tensors, _ = load_file(built["files"][layout])
    report = comfy.check(tensors, built["shapes"], FAMILY[arch])
    assert report.not_loaded == []
    assert report.not_applied == [] and report.errors == []
    # Every Linear of the model is adapted, modulation and final layers included, each exactly once.
    assert set(report.targets) == {f"{p}.weight" for p in built["paths"]}
    assert all(len(t) == 1 for t in report.targets.values())
    linears = {k[: -len(".weight")] for k, s in built["shapes"].items() if k.endswith(".weight") and len(s) == 2}
    embeddings = {"time_text_embed.addition_t_embedding"}  # Layered's nn.Embedding: not a Linear, not adaptable
    assert built["paths"] == linears - embeddings
    if arch == "flux2":
        assert {
            "double_stream_modulation_img.lin",
            "single_stream_modulation.lin",
            "final_layer.adaLN_modulation.1",
        } <= built["paths"]
    else:
        assert {"transformer_blocks.0.img_mod.1", "transformer_blocks.59.txt_mod.1", "norm_out.linear"} <= built[
            "paths"
        ]


@pytest.mark.parametrize("arch,variant", list(MODELS))
def test_comfyui_and_the_diffusers_layout_at_real_shapes(real, arch, variant):
    """ComfyUI also reads kern's diffusers layout, except FLUX.2's time / modulation names (FLUX.1's are listed)."""
    built = real(arch, variant, "lora")
    tensors, _ = load_file(built["files"]["diffusers"])
    report = comfy.check(tensors, built["shapes"], FAMILY[arch])
    assert report.not_applied == [] and report.errors == []
    if arch == "flux2":
        assert report.not_loaded and all(
            k.removeprefix("transformer.").startswith(COMFY_UNKNOWN_FLUX2_DIFFUSERS) for k in report.not_loaded
        )
    else:
        assert report.not_loaded == []


# --------------------------------------------------------------------------- ΔW on small shapes


def tiny_model(arch: str):
    torch.manual_seed(0)
    if arch == "flux2":
        return Flux2Transformer(tiny_params(True, depth=2, depth_single=2))
    return QwenImageTransformer(qwen_tiny_params(num_layers=2, use_additional_t_cond=True))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    manager = get_manager()
    out = {}
    for arch in ("flux2", "qwen-image"):
        model = tiny_model(arch)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
        base = {f"diffusion_model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
        save_file(base, tmp / f"{arch}-base.safetensors")
        out[arch] = dict(model=model, base=base, base_file=tmp / f"{arch}-base.safetensors")
        for network in NETWORKS:
            net = manager.hook.make_network(
                network_type=network, model=model, targets=EVERYTHING, options=options(manager, network, 3, 1.25)
            )
            out[arch][network] = save_random(net, tmp / f"{arch}-{network}.safetensors", seed=7, scale=0.2)
            net.remove()
    return dict(tmp=tmp, manager=manager, **out)


def kern_merged_deltas(tiny, arch: str, adapter) -> dict[str, torch.Tensor]:
    out = tiny["tmp"] / f"merged-{adapter.name}"
    merge(
        tiny[arch]["base_file"],
        [(adapter, 1.0)],
        out,
        out_dtype="float32",
        arch=arch,
        manager=tiny["manager"],
        overwrite=True,
    )
    merged, _ = load_file(out)
    base = tiny[arch]["base"]
    return {
        k.removeprefix("diffusion_model."): merged[k] - base[k] for k in base if not torch.equal(merged[k], base[k])
    }


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("arch", ["flux2", "qwen-image"])
@pytest.mark.parametrize("layout", ["kohya", "comfyui", "diffusers"])
def test_comfyui_delta_equals_kern_merge(tiny, arch, network, layout):
    """ComfyUI's ΔW (alpha/rank = 1.25/3, fused qkv whole or as q/k/v slices) equals kern's merge, per weight."""
    src = tiny[arch][network]
    manager = tiny["manager"]
    if network in ("loha", "lokr") and layout == "diffusers":
        pytest.skip(f"diffusers cannot hold {network} (test_convert: refused with exit code 2)")
    if arch == "flux2" and layout == "diffusers":  # no diffusers counterpart for the final adaLN (swapped halves)
        tensors, md = load_file(src)
        src = tiny["tmp"] / f"{arch}-{network}-nofinal.safetensors"
        save_file({k: v for k, v in tensors.items() if NO_DIFFUSERS not in k}, src, md)
    path = src
    if layout != "kohya":
        # The tiny model is not a real variant: convert reads the shapes from the file.
        path = tiny["tmp"] / f"{arch}-{network}-{layout}.safetensors"
        convert(src, path, layout, arch, manager=manager, overwrite=True)
    tensors, _ = load_file(path)
    model = tiny[arch]["model"]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    report = comfy.check(tensors, shapes, FAMILY[arch])
    if arch == "flux2" and layout == "diffusers":
        # FLUX.2's diffusers time / modulation names are unknown to ComfyUI; compare the rest.
        tensors = {k: v for k, v in tensors.items() if k not in report.not_loaded}
        report = comfy.check(tensors, shapes, FAMILY[arch])
    assert report.clean, report
    if layout == "diffusers" and arch == "flux2":
        qkv = report.targets["double_blocks.0.img_attn.qkv.weight"]
        assert sorted(t[1] for t in qkv) == [(0, 0, 64), (0, 64, 64), (0, 128, 64)]  # three slices of the fused qkv
    ours = comfy.weight_deltas(tensors, shapes, FAMILY[arch])
    theirs = kern_merged_deltas(tiny, arch, src)
    if arch == "flux2" and layout == "diffusers":
        theirs = {k: v for k, v in theirs.items() if k in ours}
    assert ours.keys() == theirs.keys()
    assert "double_blocks.0.img_attn.qkv.weight" in ours or "transformer_blocks.0.attn.to_q.weight" in ours
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=1e-4), (k, float((ours[k] - theirs[k]).abs().max()))


def test_oracle_norm_out_swap_and_qkv_slices():
    """The oracle itself: diffusers' norm_out.linear lands on adaLN_modulation.1 with its halves swapped, and
    to_q / to_k / to_v on the rows of the fused qkv; a leftover key and a wrong shape are reported."""
    d = 4
    shapes = {
        "img_in.weight": (d, 3),
        "double_blocks.0.img_attn.qkv.weight": (3 * d, d),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
    }
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(2 * d, 1, generator=g), torch.randn(1, d, generator=g)
    qu, qd = torch.randn(d, 2, generator=g), torch.randn(2, d, generator=g)
    lora = {
        "transformer.norm_out.linear.lora_B.weight": up,
        "transformer.norm_out.linear.lora_A.weight": down,
        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": qu,
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": qd,
        "transformer.transformer_blocks.0.attn.to_k.alpha": torch.tensor(1.0),
    }
    deltas = comfy.weight_deltas(lora, shapes, comfy.FLUX)
    full = up @ down
    assert torch.equal(deltas["final_layer.adaLN_modulation.1.weight"], torch.cat([full[d:], full[:d]]))
    qkv = deltas["double_blocks.0.img_attn.qkv.weight"]
    assert torch.allclose(qkv[d : 2 * d], 0.5 * qu @ qd) and not qkv[:d].any() and not qkv[2 * d :].any()
    bad = comfy.check(
        {
            **lora,
            "lora_unet_nothing.lora_up.weight": up,
            "diffusion_model.img_in.lora_A.weight": down,
            "diffusion_model.img_in.lora_B.weight": up,
        },
        shapes,
        comfy.FLUX,
    )
    assert bad.not_loaded == ["lora_unet_nothing.lora_up.weight"]
    assert bad.errors and "does not fit diffusion_model.img_in.weight" in bad.errors[0]
