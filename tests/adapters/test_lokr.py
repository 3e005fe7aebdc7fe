"""The LoKr plugin against LyCORIS (lycoris-lora): factor plan, ΔW, forward, files LyCORIS wrote, and training.

LyCORIS is the reference: its ``factorization``, its ``LokrModule`` (shapes it makes, ``get_weight``), its
``lycoris.functional.lokr.diff_weight`` and files its network saves. Note: the installed LyCORIS' ``LokrModule``
``get_diff_weight`` / ``merge_to`` multiply by α/r twice (``get_weight`` already applies it), while its forward,
its functional API and ComfyUI apply it once; kern follows the latter, and the ``merge_to`` comparison uses α = r.
"""

from __future__ import annotations

import json

import pytest
import torch
from kern.adapters.weights import apply_adapters, detect
from kern.core.io import load_file
from kern.core.plugins import build_manager
from kern_lokr.module import LoKrModule, factorization, lokr_delta
from safetensors.torch import save_file
from torch import nn

from tests.conftest import run_kern

lycoris = pytest.importorskip("lycoris")
from lycoris.functional.general import factorization as ly_factorization  # noqa: E402
from lycoris.functional.lokr import diff_weight  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

# (layer, rank, alpha, factor, decompose_both, full_matrix): every branch of LyCORIS' plan.
CASES = [
    ("linear", 4, 2.0, -1, False, False),  # 48×64 → W1 6×8 full, W2 8×8 full (r ≥ 8/2): γ = 1
    ("linear_big", 4, 2.0, -1, False, False),  # 192×256: W2 12×16 low rank
    ("linear_big", 2, 1.0, 4, True, False),  # factor 4: W1 4×4 full (2 < 2 false), W2 48×64 low rank
    ("linear_big", 2, 3.0, 16, True, False),  # W1 12×16 low rank, W2 16×16 low rank
    ("linear_big", 2, 1.0, 8, False, True),  # full_matrix: both full, γ = 1 whatever α
    ("linear_odd", 3, 1.5, -1, True, False),  # 126×90
    ("conv", 2, 1.0, -1, False, False),  # conv 32→48 3×3: W2 low rank with flattened kernel
    ("conv", 8, 4.0, 4, True, True),  # conv full matrices
]


def make_layer(kind: str) -> nn.Module:
    torch.manual_seed(1)
    return {
        "linear": lambda: nn.Linear(64, 48),
        "linear_big": lambda: nn.Linear(256, 192),
        "linear_odd": lambda: nn.Linear(90, 126),
        "conv": lambda: nn.Conv2d(32, 48, 3, padding=1),
    }[kind]()


def pair(case):
    """A LyCORIS ``LokrModule`` with random factors and kern's ``LoKrModule`` holding the same tensors."""
    kind, rank, alpha, factor, both, full = case
    layer = make_layer(kind)
    ly = LokrModule("m", layer, lora_dim=rank, alpha=alpha, factor=factor, decompose_both=both, full_matrix=full)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ly.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    sd = {k: v.detach().clone() for k, v in ly.custom_state_dict().items()}
    kern_m = LoKrModule("m", "m", layer, rank, alpha, factor=factor, decompose_both=both, full_matrix=full, init=False)
    return layer, ly, sd, kern_m


@pytest.mark.parametrize("dim", [1, 7, 64, 90, 126, 127, 128, 192, 250, 256, 360, 1024, 3072])
@pytest.mark.parametrize("factor", [-1, 2, 4, 8, 16])
def test_factorization_is_lycoris(dim, factor):
    assert factorization(dim, factor) == ly_factorization(dim, factor)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-r{c[1]}-f{c[3]}-both{c[4]}-full{c[5]}" for c in CASES])
def test_same_factors_and_delta_as_lycoris(case):
    layer, ly, sd, m = pair(case)
    # The same plan: the same keys with the same shapes.
    assert {k: tuple(v.shape) for k, v in m.factors().items()} == {
        k: tuple(v.shape) for k, v in sd.items() if k in FACTORS
    }
    m.load_kohya_tensors(sd)
    assert m.scale == pytest.approx(ly.scale)
    assert float(m.alpha) == pytest.approx(float(sd["alpha"]))
    w_shape = tuple(layer.weight.shape)
    ref = ly.get_weight(w_shape).detach()  # LyCORIS' ΔW (γ applied once), as its forward uses it
    torch.testing.assert_close(m.delta_weight(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.delta().detach(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lokr_delta(sd, w_shape), ref, rtol=1e-5, atol=1e-5)
    if case[0] != "conv":  # functional's conv w2_b is unflattened; the module's (and files') is flattened
        args = [sd.get(k) for k in FACTORS] + [None]
        func = diff_weight(*args, gamma=sd["alpha"], backend="torch")
        torch.testing.assert_close(lokr_delta(sd, w_shape), func.reshape(w_shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-r{c[1]}-f{c[3]}-both{c[4]}-full{c[5]}" for c in CASES])
def test_forward_is_the_dense_update_and_grads_agree(case):
    layer, ly, sd, m = pair(case)
    m.load_kohya_tensors(sd)
    dw = lokr_delta(sd, tuple(layer.weight.shape))
    g = torch.Generator().manual_seed(3)
    x = (
        torch.randn(2, 5, layer.in_features, generator=g)
        if case[0] != "conv"
        else torch.randn(2, 32, 6, 6, generator=g)
    )
    if case[0] == "conv":
        dense = layer._conv_forward(x, layer.weight + 0.5 * dw, layer.bias)
    else:
        dense = x @ (layer.weight + 0.5 * dw).T + layer.bias
    out = m.add_to(layer(x), x, 0.5)
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)
    # LyCORIS' own forward of the same module (its rebuild path) gives the same output at multiplier 1.
    with torch.no_grad():
        torch.testing.assert_close(m.add_to(layer(x), x, 1.0), ly._rebuild_forward(x), rtol=1e-4, atol=1e-4)
    # The Kronecker forward's gradients are those of the materialised ΔW.
    fast = torch.autograd.grad(m.adapter_forward(x).square().sum(), list(m.factors().values()))
    if case[0] == "conv":
        slow_y = layer._conv_forward(x, m.delta(), None)
    else:
        slow_y = x @ m.delta().T
    slow = torch.autograd.grad(slow_y.square().sum(), list(m.factors().values()))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_fresh_module_starts_at_zero_and_can_learn():
    layer = nn.Linear(256, 192)
    m = LoKrModule("m", "m", layer, 4, 1.0)
    assert set(m.factors()) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    assert m.delta_weight().abs().max() == 0
    x = torch.randn(3, 256)
    grads = torch.autograd.grad(m.adapter_forward(x).sum(), [m.lokr_w2_b])
    assert grads[0].abs().max() > 0


def test_tucker_delta_is_lycoris():
    """A Tucker (lokr_t2) conv LoKr as LyCORIS' module makes it: kern's merge ΔW equals its ``get_weight``. (Its
    functional ``diff_weight`` reads the rank of a Tucker w2_a (r × c) off the wrong axis; the module and ComfyUI
    use γ = α / r.)"""
    layer = nn.Conv2d(32, 48, 3)
    ly = LokrModule("m", layer, lora_dim=2, alpha=1.0, use_tucker=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ly.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    t = {k: v.detach() for k, v in ly.custom_state_dict().items()}
    assert "lokr_t2" in t
    torch.testing.assert_close(lokr_delta(t, layer.weight.shape), ly.get_weight(layer.weight.shape).detach())


# --------------------------------------------------------------------------- files LyCORIS wrote


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(256, 192), "out": nn.Linear(192, 64)})])
        self.conv = nn.Conv2d(16, 32, 3)


def lycoris_file(path, model, *, alpha, rank, **kw):
    from lycoris import create_lycoris

    net = create_lycoris(model, 1.0, linear_dim=rank, linear_alpha=alpha, algo="lokr", **kw)
    net.apply_to()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return net


@pytest.mark.parametrize(
    "rank,alpha,kw",
    [(4, 4.0, {"factor": 8}), (2, 1.0, {"factor": 8, "decompose_both": True}), (4, 4.0, {"full_matrix": True})],
    ids=["alpha=rank", "alpha<rank-decompose_both", "full_matrix"],
)
def test_lycoris_file_is_detected_applied_and_merged(tmp_path, rank, alpha, kw):
    torch.manual_seed(0)
    model = Tiny()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    net = lycoris_file(tmp_path / "lokr.safetensors", model, rank=rank, alpha=alpha, **kw)
    tensors, meta = load_file(tmp_path / "lokr.safetensors")
    assert any(k.startswith("lycoris_blocks_0_proj.lokr_") for k in tensors)

    claim = detect(tensors.keys(), meta, build_manager())
    assert (claim.network_type, claim.layout) == ("lokr", "lycoris")
    assert len(claim.modules) == 3

    # LyCORIS' merged weights: W + ΔW as its forward applies it (see the module docstring for merge_to).
    expected = {}
    for lm in net.loras:
        key = {"lycoris_blocks_0_proj": "blocks.0.proj", "lycoris_blocks_0_out": "blocks.0.out"}.get(lm.lora_name)
        key = key or "conv"
        expected[f"{key}.weight"] = base[f"{key}.weight"] + lm.get_weight(tuple(base[f"{key}.weight"].shape)).detach()
    if alpha == rank or kw.get("full_matrix"):  # γ = 1: LyCORIS' own merge_to agrees
        net.merge_to(1.0)
        for k, v in expected.items():
            torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-5)

    proc = run_kern(
        "merge",
        "--model",
        str(tmp_path / "base.safetensors"),
        "--weights",
        str(tmp_path / "lokr.safetensors"),
        "--out",
        str(tmp_path / "merged.safetensors"),
    )
    assert proc.returncode == 0, proc.stderr
    merged, _ = load_file(tmp_path / "merged.safetensors")
    for k, v in expected.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged["blocks.0.proj.bias"], base["blocks.0.proj.bias"])

    # Applied unmerged to a fresh copy of the base, the file gives the merged model's outputs.
    fresh = Tiny()
    fresh.load_state_dict(base)
    (applied,) = apply_adapters(fresh, [(str(tmp_path / "lokr.safetensors"), 1.0)])
    ref = Tiny()
    ref.load_state_dict({**base, **{k: merged[k] for k in expected}})
    x = torch.randn(3, 256)
    with torch.no_grad():
        h, h_ref = fresh.blocks[0]["proj"](x), ref.blocks[0]["proj"](x)
        torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fresh.blocks[0]["out"](h), ref.blocks[0]["out"](h_ref), rtol=1e-4, atol=1e-4)
        img = torch.randn(1, 16, 8, 8)
        torch.testing.assert_close(fresh.conv(img), ref.conv(img), rtol=1e-4, atol=1e-4)
    applied.remove()


def test_kern_saves_lycoris_layout_and_reloads_exactly(tmp_path):
    """A kern-made LoKr network saves lokr_* + alpha under kohya names, and LyCORIS' loader reads the same ΔW."""
    from kern.adapters.network import Network
    from kern.records import TargetSpec
    from kern_lokr.plugin import LOKR

    torch.manual_seed(0)
    model = Tiny()
    net = LOKR.make_network(
        model, TargetSpec(targets=(r"blocks\..*",)), {"rank": 2, "alpha": 1.0, "factor": 8, "decompose_both": True}
    )
    assert isinstance(net, Network) and len(net) == 2
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    path = tmp_path / "kern_lokr.safetensors"
    net.save(str(path))
    tensors, meta = load_file(path)
    proj = "lora_unet_blocks_0_proj"
    assert {k for k in tensors if k.startswith(proj + ".")} == {
        f"{proj}.{s}" for s in ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha")
    }
    assert meta["ss_network_module"] == "lokr" and json.loads(meta["ss_network_args"])["factor"] == 8
    # LyCORIS rebuilds the module from the file's tensors and gets the same ΔW.
    for m in net.adapters.values():
        t = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(m.name + ".")}
        args = [t.get(k) for k in FACTORS]
        with torch.no_grad():
            ly = LokrModule.make_module_from_state_dict(m.name, m.org, *args, None, None, t["alpha"], None)
        torch.testing.assert_close(ly.get_weight(tuple(m.org.weight.shape)).detach(), m.delta_weight().detach())


def test_refuses_tucker_unmerged_and_incomplete_modules():
    from kern.errors import AdapterError
    from kern_lokr.module import normalise

    with pytest.raises(AdapterError, match="Tucker LoKr"):
        LoKrModule.from_tensors("x", "x", nn.Conv2d(4, 4, 3), {"lokr_t2": torch.zeros(1), "lokr_w1": torch.zeros(2, 2)})
    with pytest.raises(AdapterError, match="incomplete: no lokr_w2 or lokr_w2_a"):
        normalise(
            {"a.lokr_w1": torch.zeros(2, 2), "a.lokr_w2_a": torch.zeros(2, 1)}, {"a": ["a.lokr_w1", "a.lokr_w2_a"]}
        )
    with pytest.raises(AdapterError, match="do not fit the base weight"):
        lokr_delta({"lokr_w1": torch.zeros(3, 3), "lokr_w2": torch.zeros(5, 5)}, (16, 16))


# --------------------------------------------------------------------------- training on the tiny FLUX.2 klein


@pytest.fixture(scope="module")
def tiny_flux2(tmp_path_factory):
    from kern_flux2 import tiny

    return tiny.build(tmp_path_factory.mktemp("tiny-flux2-lokr"))


def test_kern_train_network_lokr_learns_and_reloads_exactly(tiny_flux2, tmp_path, monkeypatch):
    from kern.train import driver as train

    from tests.flux2.test_train_flux2 import Spy, fresh_transformer, job, losses, velocity
    from tests.helpers import make_dataset

    torch.set_num_threads(2)
    dataset = make_dataset(tmp_path / "data", n=2, size=(32, 32), batch_size=2)
    out = tmp_path / "run"
    spy = Spy(monkeypatch, "make_network")
    steps = 20
    over = {"network.type": "lokr", "network.rank": 4, "network.alpha": 4.0}
    adapter = train.run(job(tiny_flux2, dataset, out, **over, **{"train.learning_rate": 5e-2, "train.steps": steps}))

    # The loss falls (the tiny random base learns slowly with LoKr; 20 steps give about 5 %).
    curve = losses(out)
    assert len(curve) == steps
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < 0.97 * first, (first, last, curve)
    tensors, meta = load_file(adapter)
    assert meta["ss_network_module"] == "lokr"
    assert any(k.endswith(".lokr_w1") for k in tensors) and any(k.endswith(".lokr_w2_b") for k in tensors)

    trained = spy.calls["make_network"][0]["model"]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 128, 2, 2, generator=g)
    text = {"ctx": torch.randn(2, 12, 48, generator=g)}
    t = torch.tensor([0.3, 0.8])
    expected = velocity(trained, latents, t, text)
    fresh = fresh_transformer(tiny_flux2)
    base = velocity(fresh, latents, t, text)
    (net,) = apply_adapters(fresh, [(str(adapter), 1.0)], arch="flux2")
    assert len(net) == len(spy.results["make_network"][0])
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(velocity(fresh, latents, t, text), expected, rtol=1e-5, atol=1e-5)


def test_kern_train_cli_with_network_lokr(tiny_flux2, tmp_path):
    """The acceptance command line: `kern train --arch flux2-klein-4b --network lokr ...` on the tiny model."""
    from tests.flux2.test_train_flux2 import overrides
    from tests.helpers import make_dataset

    dataset = make_dataset(tmp_path / "data", n=2, size=(32, 32), batch_size=2)
    out = tmp_path / "run"
    o = overrides(tiny_flux2, dataset, out)
    lines = ["[model]"] + [
        f"{k[6:]} = {json.dumps(v)}" for k, v in o.items() if k.startswith("model.") and k != "model.arch"
    ]
    lines += ["[network]", f"targets = {json.dumps(o['network.targets'])}"]
    lines += ["[train]"] + [
        f"{k[6:]} = {json.dumps(v)}" for k, v in o.items() if k.startswith("train.") and "learning" not in k
    ]
    lines += ["[sample]", "prompts = []"]
    (tmp_path / "job.toml").write_text("\n".join(lines).replace("false", "false") + "\n")
    proc = run_kern(
        "train", "--config", str(tmp_path / "job.toml"), "--arch", "flux2-klein-4b", "--network", "lokr",
        "--network-opt", "rank=4", "--network-opt", "factor=4", "--network-opt", "decompose_both=true",
        "--dataset", str(dataset), "--out", str(out), "--steps", "3", "--lr", "1e-2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (adapter,) = [p for p in out.glob("*.safetensors")]
    tensors, meta = load_file(adapter)
    assert meta["ss_network_module"] == "lokr" and json.loads(meta["ss_network_args"])["factor"] == 4
    assert detect(tensors.keys(), meta, build_manager()).network_type == "lokr"
    assert all(torch.isfinite(v).all() for v in tensors.values())


def test_kern_plugins_lists_lokr():
    proc = run_kern("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    text = json.dumps(data)
    assert '"lokr"' in text and "kern-lokr" in text


def test_lokr_file_without_the_plugin_is_named(monkeypatch):
    """With the lokr plugin disabled, a LoKr file is still refused with a message saying what it is and what to do."""
    from kern.errors import AdapterError

    monkeypatch.setenv("KERN_DISABLE_PLUGINS", "lokr")
    manager = build_manager()
    keys = {"lora_unet_x.lokr_w1", "lora_unet_x.lokr_w2", "lora_unet_x.alpha"}
    with pytest.raises(AdapterError, match="a LoKr adapter .*install the lokr plugin"):
        detect(keys, {}, manager, path="x.safetensors")
