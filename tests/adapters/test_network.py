"""The Network runtime: target selection, wrapping, multiplier, save → load, metadata, LoRA+, merge into the model."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import torch
from kern.adapters.network import (
    attached_adapters,
    kohya_name,
    modelspec_metadata,
    select_targets,
    ss_metadata,
)
from kern.adapters.weights import apply_adapters
from kern.core.io import read_header
from kern.core.plugins import build_manager
from kern.errors import AdapterError, UsageError
from kern.records import TargetSpec
from torch import nn

from tests.adapters.helpers import LayerTree, close, random_loha, random_lora, write


def make(network, model, spec=TargetSpec(), **options):
    manager = build_manager()
    resolved = {o.name: o.default for o in manager.resolve_network(network).options}
    resolved.update(options)
    return manager.hook.make_network(network_type=network, model=model, targets=spec, options=resolved)


def randomise(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_kohya_name():
    assert kohya_name("double_blocks.0.img_attn.qkv") == "lora_unet_double_blocks_0_img_attn_qkv"


def test_select_targets_fullmatch_and_include_overrides_exclude():
    model = LayerTree()
    spec = TargetSpec(
        targets=(r"double_blocks\.\d+\..*",), exclude=(r".*mlp.*",), include=(r"double_blocks\.1\.img_mlp\.0",)
    )
    got = [p for p, _ in select_targets(model, spec)]
    assert "double_blocks.0.img_attn.qkv" in got
    assert "double_blocks.0.img_mlp.0" not in got and "double_blocks.1.img_mlp.0" in got
    assert not any(p.startswith(("single_blocks", "final_layer", "img_in")) for p in got)
    # fullmatch, not search: "img_attn" alone matches nothing
    assert select_targets(model, TargetSpec(targets=("img_attn",))) == []
    with pytest.raises(UsageError, match="not a valid regular expression"):
        select_targets(model, TargetSpec(targets=("(",)))


def test_select_targets_conv_only_when_allowed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    assert [p for p, _ in select_targets(model, TargetSpec())] == ["2"]
    assert [p for p, _ in select_targets(model, TargetSpec(), conv=True)] == ["0", "2"]


def test_fp8_linear_is_a_target_and_merges():
    from kern.gpu.fp8 import Float8StorageLinear

    layer = Float8StorageLinear.from_linear(nn.Linear(16, 8), compute_dtype=torch.float32)
    model = nn.Sequential(layer)
    net = make("lora", model, rank=2)
    assert len(net) == 1
    randomise(net)
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = model(x)
    net.merge_into_model()
    assert attached_adapters(layer) == []
    assert torch.allclose(model(x), y, atol=0.1 * float(y.abs().max()))  # re-quantised to e4m3


@pytest.mark.parametrize("network", ["lora", "loha"])
def test_make_network_is_a_no_op_then_save_load_round_trip(tmp_path, network):
    model = LayerTree()
    xs = model.inputs()
    y0 = model(xs)
    net = make(network, model, TargetSpec(targets=(r"(double|single)_blocks\..*",)), rank=3, alpha=2.0)
    assert close(model(xs), y0, atol=0)  # one zero factor
    randomise(net)
    y1 = model(xs)
    assert not close(y1, y0)
    path = net.save(tmp_path / "a.safetensors", metadata={"modelspec.title": "t"})
    net.remove()
    assert close(model(xs), y0, atol=0)  # original forwards restored
    assert all("forward" not in m.__dict__ for m in model.layers().values())

    (loaded,) = apply_adapters(model, [(path, 1.0)])
    assert loaded.network_type == network and len(loaded) == len(net)
    assert close(model(xs), y1, atol=1e-6)
    loaded.multiplier = 0.5
    half = model(xs)
    for k in y0:
        assert torch.allclose(half[k], y0[k] + 0.5 * (y1[k] - y0[k]), atol=1e-5)
    loaded.enabled = False
    assert close(model(xs), y0, atol=0)


def test_bf16_save_keeps_alpha_fp32(tmp_path):
    model = LayerTree()
    net = make("lora", model, rank=2, alpha=0.3)
    net.save(tmp_path / "b.safetensors", dtype=torch.bfloat16)
    header, _ = read_header(tmp_path / "b.safetensors")
    assert {v["dtype"] for k, v in header.items() if k.endswith(".weight")} == {"BF16"}
    assert {v["dtype"] for k, v in header.items() if k.endswith(".alpha")} == {"F32"}


def test_lora_and_loha_mixed_on_the_same_layers(tmp_path):
    model = LayerTree()
    xs = model.inputs()
    y0 = model(xs)
    paths = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1"]
    a = write(tmp_path / "lora.safetensors", random_lora(model, paths))
    b = write(tmp_path / "loha.safetensors", random_loha(model, paths, seed=5))
    (na,) = apply_adapters(model, [(a, 1.0)])
    ya = model(xs)
    na.remove()
    (nb,) = apply_adapters(model, [(b, 1.0)])
    yb = model(xs)
    nb.remove()
    nets = apply_adapters(model, [(a, 0.7), (b, -0.4)])
    assert [n.network_type for n in nets] == ["lora", "loha"]
    y = model(xs)
    for k in y0:
        assert torch.allclose(y[k], y0[k] + 0.7 * (ya[k] - y0[k]) - 0.4 * (yb[k] - y0[k]), atol=1e-5)
    nets[0].remove()  # out of order removal keeps the other one working
    for k in y0:
        assert torch.allclose(model(xs)[k], y0[k] - 0.4 * (yb[k] - y0[k]), atol=1e-5)
    nets[1].remove()
    assert close(model(xs), y0, atol=0)


@pytest.mark.parametrize("network", ["lora", "loha"])
def test_merge_into_model_equals_unmerged(network):
    model = LayerTree()
    xs = model.inputs()
    net = make(network, model, rank=2, alpha=1.0)
    randomise(net, seed=3)
    net.multiplier = 0.8
    y = model(xs)
    net.merge_into_model()
    assert net.merged and not any(attached_adapters(m) for m in model.layers().values())
    assert close(model(xs), y, atol=1e-5)


def test_loraplus_param_groups():
    model = LayerTree()
    net = make("lora", model, rank=2, loraplus_lr_ratio=16.0)
    groups = net.optimizer_param_groups(1e-4)
    assert [g["lr"] for g in groups] == [1e-4, pytest.approx(1.6e-3)]
    n = len(net)
    assert len(groups[0]["params"]) == n and len(groups[1]["params"]) == n
    ups = {id(m.lora_up.weight) for m in net.adapters.values()}
    assert {id(p) for p in groups[1]["params"]} == ups
    plain = make("lora", LayerTree(), rank=2).optimizer_param_groups(1e-4)
    assert len(plain) == 1 and len(plain[0]["params"]) == 2 * n
    loha = make("loha", LayerTree(), rank=2).optimizer_param_groups(1e-4)
    assert len(loha) == 1 and len(loha[0]["params"]) == 4 * n


def test_rank_pattern_and_rslora():
    model = LayerTree()
    net = make(
        "lora", model, rank=4, alpha=4.0, rank_pattern=[r".*img_attn\.qkv=8", r"single_blocks\..*=2"], use_rslora=True
    )
    ranks = {m.path: m.rank for m in net.adapters.values()}
    assert ranks["double_blocks.0.img_attn.qkv"] == 8 and ranks["single_blocks.0.linear1"] == 2 and ranks["img_in"] == 4
    m = net.adapters[kohya_name("img_in")]
    assert m.scale == pytest.approx(4.0 / 2.0) and float(m.alpha) == pytest.approx(8.0)


def test_bad_options_are_usage_errors():
    with pytest.raises(UsageError, match="rank_dropout"):
        make("lora", LayerTree(), rank_dropout=1.5)
    with pytest.raises(UsageError, match="no Linear/Conv2d module"):
        make("loha", LayerTree(), TargetSpec(targets=("nothing",)))
    with pytest.raises(UsageError, match="regex=rank"):
        make("lora", LayerTree(), rank_pattern=["nonsense"])


def test_metadata_modelspec_and_ss_keys(tmp_path):
    model = LayerTree()
    net = make("lora", model, rank=4, alpha=1.0)
    md = modelspec_metadata(
        architecture="Flux.2-klein-4b",
        implementation="https://github.com/black-forest-labs/flux2",
        title="my-style",
        resolution=(1024, 768),
        date=dt.datetime(2026, 1, 24, 12, 34, 56, 789),
    )
    md.update(
        ss_metadata(
            {"base_model_version": "flux_2_klein_4b", "learning_rate": 1e-4, "datasets": [{"resolution": [1024, 1024]}]}
        )
    )
    net.save(tmp_path / "m.safetensors", metadata=md)
    _, got = read_header(tmp_path / "m.safetensors")
    assert got["modelspec.sai_model_spec"] == "1.0.0"
    assert got["modelspec.architecture"] == "Flux.2-klein-4b/lora"
    assert got["modelspec.implementation"] == "https://github.com/black-forest-labs/flux2"
    assert got["modelspec.title"] == "my-style"
    assert got["modelspec.resolution"] == "1024x768"
    assert got["modelspec.date"] == "2026-01-24T12:34:56"
    assert got["ss_base_model_version"] == "flux_2_klein_4b"
    assert got["ss_learning_rate"] == "0.0001"
    assert json.loads(got["ss_datasets"]) == [{"resolution": [1024, 1024]}]
    # The network's keys are the ones a trained adapter has (kern.adapters.network.metadata owns them all).
    assert got["ss_network_module"] == "lora" and got["ss_network_dim"] == "4" and got["ss_network_alpha"] == "1.0"
    assert json.loads(got["ss_network_args"])["use_rslora"] is False and "rank" not in json.loads(
        got["ss_network_args"]
    )
    assert len(got["sshs_model_hash"]) == 64 and len(got["sshs_legacy_hash"]) == 8
    defaults = modelspec_metadata(architecture="Qwen-Image", implementation="https://github.com/QwenLM/Qwen-Image")
    assert defaults["modelspec.resolution"] == "1280x720" and defaults["modelspec.title"].startswith("LoRA@")


def test_sshs_model_hash_matches_sd_scripts_definition(tmp_path):
    """sd-scripts: SHA-256 of everything after the header of the file saved with only ss_* metadata."""
    import hashlib

    from safetensors.torch import save_file as st_save

    model = LayerTree()
    net = make("lora", model, rank=2)
    randomise(net)
    net.save(tmp_path / "h.safetensors", metadata={"ss_seed": "1", "modelspec.title": "x"})
    _, md = read_header(tmp_path / "h.safetensors")
    ss = {k: v for k, v in md.items() if k.startswith("ss_")}
    st_save(
        {k: v.contiguous() for k, v in net.adapter_state_dict(torch.float32).items()},
        str(tmp_path / "ss.safetensors"),
        metadata=ss,
    )
    raw = (tmp_path / "ss.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert md["sshs_model_hash"] == hashlib.sha256(raw[8 + n :]).hexdigest()


def test_load_network_unmatched_and_wrong_shape_errors(tmp_path):
    model = LayerTree()
    sd = random_lora(model, ["double_blocks.0.img_attn.qkv"])
    sd.update(random_lora(LayerTree(d=16), ["double_blocks.0.img_attn.proj"]))  # wrong shape for this model
    with pytest.raises(
        AdapterError,
        match=r"w\.safetensors.*lora_unet_double_blocks_0_img_attn_proj.*shape \(3, 16\) does not fit layer",
    ):
        apply_adapters(model, [(write(tmp_path / "w.safetensors", sd), 1.0)])
    nothing = random_lora(LayerTree(depth=4), ["double_blocks.3.img_attn.qkv", "double_blocks.0.img_attn.qkv"])
    with pytest.raises(AdapterError, match=r"n\.safetensors: 1 of 2 LoRA modules match no layer.*double_blocks_3"):
        apply_adapters(model, [(write(tmp_path / "n.safetensors", nothing), 1.0)])
    assert not any(attached_adapters(m) for m in model.layers().values())


def test_failed_second_adapter_removes_the_first(tmp_path):
    model = LayerTree()
    ok = write(tmp_path / "ok.safetensors", random_lora(model, ["img_in"]))
    bad = write(tmp_path / "bad.safetensors", {"x.weight": torch.zeros(2, 2)})
    with pytest.raises(AdapterError, match="full model checkpoint"):
        apply_adapters(model, [(ok, 1.0), (bad, 1.0)])
    assert not any(attached_adapters(m) for m in model.layers().values())


def test_network_apply_keeps_module_apply_semantics():
    model = LayerTree()
    net = make("lora", model, rank=2)
    seen = []
    assert net.apply(lambda m: seen.append(m)) is net
    assert len(seen) > len(net)
    net.remove()
    assert net.apply() is net and net.attached


def test_apply_adapters_merge_for_speed(tmp_path):
    model = LayerTree()
    xs = model.inputs()
    a = write(tmp_path / "a.safetensors", random_lora(model, ["double_blocks.0.img_attn.qkv", "img_in"]))
    b = write(tmp_path / "b.safetensors", random_loha(model, ["double_blocks.0.img_attn.qkv"], seed=3))
    nets = apply_adapters(model, [(a, 0.5), (b, 1.0)])
    with torch.no_grad():
        unmerged = model(xs)
    for n in nets:
        n.remove()
    merged = apply_adapters(model, [(a, 0.5), (b, 1.0)], merge=True)
    assert all(n.merged for n in merged)
    assert not any(attached_adapters(m) for m in model.layers().values())
    with torch.no_grad():
        assert close(model(xs), unmerged, atol=1e-5)
