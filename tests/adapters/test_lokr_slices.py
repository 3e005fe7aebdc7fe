"""A LoKr that LyCORIS trained on diffusers' FLUX.2 module names, on kern's natively named (fused) FLUX.2.

diffusers splits what FLUX.2 computes fused: ``transformer_blocks.N.attn.to_q/to_k/to_v`` are row slices of
``double_blocks.N.img_attn.qkv`` (``add_*_proj`` of ``txt_attn.qkv``). LoRA / LoHa fuse such parts into one adapter
exactly; a Kronecker product cannot, so each part stays an adapter of its own rows
(``kern.adapters.network.names.RowSlice``): unmerged it adds into its rows of the fused layer's output, merged its
ΔW goes into those rows of the weight. The reference is LyCORIS itself (``create_lycoris`` on diffusers'
``Flux2Transformer2DModel``, its own ``save_weights``), its forward and its ΔW (``get_weight``: γ applied once; the
installed LyCORIS' ``merge_to`` applies α/r twice, see test_lokr.py, so it is compared only at α = r).
"""

from __future__ import annotations

import types

import kern
import pytest
import torch
from kern.adapters.convert import convert
from kern.adapters.merge import merge
from kern.adapters.network.names import RowSlice
from kern.adapters.weights import apply_adapters, detect
from kern.core.io import load_file, save_file
from kern.core.plugins import build_manager
from kern_flux2 import keys
from kern_flux2.adapter_map import flux2_module_map

from tests.adapters import comfyui_oracle as comfy
from tests.adapters.test_interop_flux2 import PARAMS, diffusers_model, inputs, kern_model, rel_err, run_diffusers

lycoris = pytest.importorskip("lycoris")

ARCH = "tinyflux2slices"
# Fused parts (q/k/v of both streams) and whole modules (out projections, MLP, single blocks' fused projection).
TARGETS = [
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)$",
    r"transformer_blocks\.\d+\.ff\.linear_in$",
    r"single_transformer_blocks\.\d+\.attn\.to_qkv_mlp_proj$",
]
MAP = flux2_module_map(PARAMS.depth, PARAMS.depth_single, PARAMS.hidden_size)
TO_NATIVE = {o: (n, r) for n, others in MAP for o, r in others}


def arch_plugin():
    mod = types.ModuleType("tinyflux2slices_plugin")

    @kern.hookimpl
    def register_architectures(register):
        register(kern.Architecture(name=ARCH, variants=(kern.Variant(name="tiny"),)))

    @kern.hookimpl
    def adapter_module_map(arch, variant, layout):
        return MAP if layout == "diffusers" else None

    mod.register_architectures, mod.adapter_module_map = register_architectures, adapter_module_map
    return mod


def lycoris_network(model, rank, alpha, monkeypatch):
    """LyCORIS' LoKr on the listed modules of a diffusers model (its preset machinery: class attributes, restored)."""
    from lycoris import LycorisNetwork, create_lycoris, wrapper

    for attr in ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP"):
        monkeypatch.setattr(LycorisNetwork, attr, getattr(LycorisNetwork, attr))  # restored after the test
    monkeypatch.setitem(
        wrapper.PRESET, "kern_flux2_parts", {"enable_conv": False, "target_module": [], "target_name": TARGETS}
    )
    net = create_lycoris(model, 1.0, linear_dim=rank, linear_alpha=alpha, algo="lokr", preset="kern_flux2_parts")
    net.apply_to()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lokr_slices")
    model = kern_model()
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(base_state, tmp / "base.safetensors")
    return dict(tmp=tmp, base=base_state, x=inputs(), manager=build_manager(extra=[(ARCH, arch_plugin())]))


@pytest.mark.parametrize("rank,alpha", [(4, 4.0), (2, 0.5)], ids=["alpha=rank", "alpha<rank"])
def test_lycoris_lokr_on_diffusers_names_applies_and_merges(setup, monkeypatch, rank, alpha):
    tmp, base, x, manager = setup["tmp"], setup["base"], setup["x"], setup["manager"]
    ref = diffusers_model(base)
    net = lycoris_network(ref, rank, alpha, monkeypatch)
    path = tmp / f"lokr-{rank}.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    with torch.no_grad():
        expected_out = run_diffusers(ref, x)  # diffusers with LyCORIS' forward applied

    tensors, meta = load_file(path)
    assert "lycoris_transformer_blocks_0_attn_to_q.lokr_w1" in tensors
    claim = detect(tensors.keys(), meta, manager)
    assert (claim.network_type, claim.layout) == ("lokr", "lycoris")

    # Unmerged on kern's fused model: q/k/v on row slices of qkv, the rest on whole layers.
    model = kern_model()
    (applied,) = apply_adapters(model, [(path, 1.0)], arch=ARCH, manager=manager)
    by_path = applied.modules_by_path()
    q = by_path["transformer_blocks.0.attn.to_q"]
    assert isinstance(q.org, RowSlice) and q.org.layer is model.double_blocks[0].img_attn.qkv
    assert (q.org.start, q.org.stop) == (0, PARAMS.hidden_size)
    assert "double_blocks.0.img_attn.proj" in by_path and "single_blocks.0.linear1" in by_path
    with torch.no_grad():
        out = model(**x)
        assert rel_err(out, expected_out) < 1e-5
        assert rel_err(out, kern_model()(**x)) > 1e-3  # the adapter does something
        applied.multiplier = 0.0
        torch.testing.assert_close(model(**x), kern_model()(**x))
    applied.remove()
    assert "forward" not in model.double_blocks[0].img_attn.qkv.__dict__  # layers restored

    # ΔW as LyCORIS' forward applies it, into the rows of kern's fused weights.
    want = {k: v.clone() for k, v in base.items()}
    for lm in net.loras:
        name = lm.lora_name.removeprefix("lycoris_")
        other = next(o for o in TO_NATIVE if o.replace(".", "_") == name)
        native, rows = TO_NATIVE[other]
        start, stop = rows or (0, base[f"{native}.weight"].shape[0])
        shape = (stop - start, base[f"{native}.weight"].shape[1])
        want[f"{native}.weight"][start:stop] += lm.get_weight(shape).detach()
    merge(
        tmp / "base.safetensors", [(path, 1.0)], tmp / "merged.safetensors", arch=ARCH, manager=manager, overwrite=True
    )
    merged, _ = load_file(tmp / "merged.safetensors")
    assert merged.keys() == base.keys()
    for k in base:
        torch.testing.assert_close(merged[k], want[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(merged["double_blocks.1.txt_attn.qkv.weight"], base["double_blocks.1.txt_attn.qkv.weight"])
    if alpha == rank:  # γ applied once either way: LyCORIS' own merge gives the same weights
        net.restore()
        net.merge_to(1.0)
        theirs = keys.diffusers_to_bfl({k: v.detach() for k, v in ref.state_dict().items()})
        for k in base:
            torch.testing.assert_close(merged[k], theirs[k], rtol=1e-5, atol=1e-6)

    # Merged into the model ("--merge" generation): the same output as unmerged.
    model = kern_model()
    apply_adapters(model, [(path, 1.0)], arch=ARCH, manager=manager, merge=True)
    with torch.no_grad():
        assert rel_err(model(**x), expected_out) < 1e-5
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6)


def test_convert_to_comfyui_keeps_slices_in_diffusers_spelling(setup, monkeypatch):
    """``kern convert --to comfyui``: fused-layer parts keep ComfyUI's diffusers spelling (``transformer.<name>``),
    whole modules get native names; ComfyUI (the oracle) loads every key, its ΔW equals kern's merge, and kern
    reads the converted file back to the same weights."""
    tmp, base, manager = setup["tmp"], setup["base"], setup["manager"]
    net = lycoris_network(diffusers_model(base), 2, 1.0, monkeypatch)
    src = tmp / "lokr-convert.safetensors"
    net.save_weights(str(src), torch.float32, {})
    out = tmp / "lokr-comfyui.safetensors"
    convert(src, out, "comfyui", ARCH, manager=manager, overwrite=True)
    tensors, _ = load_file(out)
    names = {k.rpartition(".")[0] for k in tensors}
    assert "transformer.transformer_blocks.0.attn.to_q" in names
    assert (
        "diffusion_model.double_blocks.0.img_attn.proj" in names and "diffusion_model.single_blocks.1.linear1" in names
    )
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    report = comfy.check(tensors, shapes, comfy.FLUX)
    assert report.clean, report
    theirs = comfy.weight_deltas(tensors, shapes, comfy.FLUX)
    merged = {}
    for name, f in (("from-lycoris", src), ("from-comfyui", out)):
        merge(
            tmp / "base.safetensors",
            [(f, 1.0)],
            tmp / f"{name}.safetensors",
            arch=ARCH,
            manager=manager,
            overwrite=True,
        )
        merged[name], _ = load_file(tmp / f"{name}.safetensors")
    for k in base:
        torch.testing.assert_close(merged["from-comfyui"][k], merged["from-lycoris"][k], rtol=1e-5, atol=1e-6)
    assert theirs.keys() == {k for k in base if not torch.equal(merged["from-lycoris"][k], base[k])}
    for k, d in theirs.items():
        torch.testing.assert_close(d, merged["from-lycoris"][k] - base[k], rtol=1e-4, atol=1e-6)


def test_a_lycoris_lokr_on_real_shapes_fits_convert(setup):
    """The row check reads a LoKr's output rows through ``weight_shape`` (a·c), not a factor's first dimension."""
    manager = setup["manager"]
    t = {"lokr_w1": torch.zeros(4, 8), "lokr_w2_a": torch.zeros(24, 2), "lokr_w2_b": torch.zeros(2, 16)}
    assert manager.hook.weight_shape(network_type="lokr", tensors=t) == (96, 128)
    lora = {"lora_A.weight": torch.zeros(2, 16), "lora_B.weight": torch.zeros(40, 2)}
    assert manager.hook.weight_shape(network_type="lora", tensors=lora) == (40, 16)
    loha = {k: torch.zeros(s) for k, s in (("hada_w1_a", (40, 2)), ("hada_w1_b", (2, 16)))}
    loha |= {k: torch.zeros(s) for k, s in (("hada_w2_a", (40, 2)), ("hada_w2_b", (2, 16)))}
    assert manager.hook.weight_shape(network_type="loha", tensors=loha) == (40, 16)
