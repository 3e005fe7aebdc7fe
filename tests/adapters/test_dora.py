"""DoRA (``network.dora = true`` of the lora plugin) against PEFT's ``LoraConfig(use_dora=True)`` on the same weights:
forward, gradients and merged weight in fp32 to round-off; a file PEFT wrote is detected, applied and merged by
``kern merge`` without flags; kern's own files reload exactly; training on the tiny FLUX.2 klein model."""

from __future__ import annotations

import json

import pytest
import torch
from kern.adapters.weights import apply_adapters, detect
from kern.core.io import load_file, save_file
from kern.core.plugins import build_manager
from kern.errors import AdapterError
from kern.records import TargetSpec
from kern_lora.plugin import LORA
from torch import nn

IN, OUT, RANK, ALPHA = 16, 12, 4, 8.0
TOL = {"rtol": 1e-5, "atol": 1e-6}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT)
        self.out = nn.Linear(OUT, 6, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.proj(x)))


def base_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def random_factors(seed: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    """Non-trivial A, B and m per layer (B ≠ 0 so that the norm differs from ‖W‖, m away from ‖W + s·BA‖)."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: {
            "A": torch.randn(RANK, i, generator=g) * 0.3,
            "B": torch.randn(o, RANK, generator=g) * 0.3,
            "m": torch.rand(o, generator=g) + 0.5,
        }
        for name, i, o in (("proj", IN, OUT), ("out", OUT, 6))
    }


def peft_model(factors, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj", "out"], use_dora=True, lora_dropout=0.0)
    model = get_peft_model(base_model(seed), cfg)
    with torch.no_grad():
        for name, f in factors.items():
            layer = getattr(model.base_model.model, name)
            layer.lora_A["default"].weight.copy_(f["A"])
            layer.lora_B["default"].weight.copy_(f["B"])
            layer.lora_magnitude_vector["default"].weight.copy_(f["m"])
    return model


def kern_model(factors, seed: int = 0):
    model = base_model(seed)
    net = LORA.make_network(model, TargetSpec(targets=("proj", "out")), {"rank": RANK, "alpha": ALPHA, "dora": True})
    with torch.no_grad():
        for m in net.adapters.values():
            f = factors[m.path]
            m.lora_down.weight.copy_(f["A"])
            m.lora_up.weight.copy_(f["B"])
            m.dora_scale.copy_(f["m"].view(-1, 1))
    return model, net


def test_fresh_dora_starts_at_the_base_model_with_m_the_row_norms():
    model = base_model()
    x = torch.randn(3, IN)
    expected = model(x)
    net = LORA.make_network(model, TargetSpec(targets=("proj", "out")), {"rank": RANK, "dora": True})
    m = net.adapters["lora_unet_proj"]
    torch.testing.assert_close(m.dora_scale.detach().view(-1), model.proj.weight.detach().norm(dim=1))
    torch.testing.assert_close(model(x), expected, **TOL)


@pytest.mark.parametrize("path", ["single", "several"])
def test_forward_and_gradients_equal_peft(path):
    factors = random_factors()
    peft = peft_model(factors)
    model, net = kern_model(factors)
    if path == "several":
        # A second, zero adapter on each layer: the runtime then sums adapter_forward()s instead of add_to().
        from kern_lora.module import LoRAModule

        for m in list(net.adapters.values()):
            z = LoRAModule("z_" + m.name, m.path, m.org, 2)
            from kern.adapters.network.runtime import _attach

            _attach(m.org, z)
    x = torch.randn(5, 3, IN, generator=torch.Generator().manual_seed(3))
    peft.train()
    net.train()
    y_peft = peft(x)
    y_kern = model(x)
    torch.testing.assert_close(y_kern, y_peft, **TOL)
    y_peft.square().sum().backward()
    y_kern.square().sum().backward()
    for name in ("proj", "out"):
        layer = getattr(peft.base_model.model, name)
        m = net.adapters[f"lora_unet_{name}"]
        torch.testing.assert_close(m.lora_down.weight.grad, layer.lora_A["default"].weight.grad, **TOL)
        torch.testing.assert_close(m.lora_up.weight.grad, layer.lora_B["default"].weight.grad, **TOL)
        torch.testing.assert_close(
            m.dora_scale.grad.view(-1), layer.lora_magnitude_vector["default"].weight.grad, **TOL
        )


def test_merged_weight_equals_peft_merge_and_unload():
    factors = random_factors()
    merged = peft_model(factors).merge_and_unload()
    model, net = kern_model(factors)
    # The weight_delta hook (the streaming merge) on the base weights ...
    manager = build_manager()
    tensors = net.adapter_state_dict()
    for name in ("proj", "out"):
        w = getattr(model, name).weight.detach().clone()
        t = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"lora_unet_{name}.")}
        delta = manager.hook.weight_delta(network_type="lora", tensors=t, base_shape=tuple(w.shape), base=w)
        torch.testing.assert_close(w + delta, getattr(merged, name).weight, **TOL)
    # ... and merging the attached network into the model.
    net.merge_into_model()
    for name in ("proj", "out"):
        torch.testing.assert_close(getattr(model, name).weight, getattr(merged, name).weight, **TOL)


def test_multiplier_scales_w_prime_minus_w_unmerged_and_merged():
    factors = random_factors()
    model, net = kern_model(factors)
    w = model.proj.weight.detach().clone()
    x = torch.randn(4, IN)
    with torch.no_grad():
        full = net.adapters["lora_unet_proj"].delta_weight()
        net.multiplier = 0.4
        y = model.proj(x)
        torch.testing.assert_close(y, x @ (w + 0.4 * full).T + model.proj.bias, **TOL)


@pytest.fixture(scope="module")
def peft_file(tmp_path_factory):
    """A file PEFT wrote (get_peft_model_state_dict, diffusers' lora_adapter_metadata), a base checkpoint, and
    PEFT's merged weights."""
    from peft import get_peft_model_state_dict

    tmp = tmp_path_factory.mktemp("dora")
    factors = random_factors()
    peft = peft_model(factors)
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(peft).items()}
    assert any(k.endswith("lora_magnitude_vector") for k in state)
    cfg = {"r": RANK, "lora_alpha": ALPHA, "use_dora": True, "target_modules": ["proj", "out"]}
    save_file(state, tmp / "peft_dora.safetensors", {"lora_adapter_metadata": json.dumps(cfg)})
    base = {k: v.detach().clone() for k, v in base_model().state_dict().items()}
    save_file(base, tmp / "base.safetensors", {})
    merged = {k: v.detach().clone() for k, v in peft.merge_and_unload().state_dict().items()}
    return tmp, merged


def test_peft_file_is_detected_as_dora_and_plain_lora_is_not(peft_file):
    tmp, _ = peft_file
    tensors, metadata = load_file(tmp / "peft_dora.safetensors")
    claim = detect(tensors.keys(), metadata, build_manager())
    assert claim.network_type == "lora" and claim.layout == "peft" and claim.note.startswith("DoRA")
    plain = {k: v for k, v in tensors.items() if "magnitude" not in k}
    claim = detect(plain.keys(), metadata, build_manager())
    assert claim.network_type == "lora" and "DoRA" not in claim.note
    kohya = {
        "lora_unet_a.lora_down.weight",
        "lora_unet_a.lora_up.weight",
        "lora_unet_a.alpha",
        "lora_unet_a.dora_scale",
    }
    claim = detect(kohya, {}, build_manager())
    assert (claim.network_type, claim.layout) == ("lora", "kohya") and claim.note.startswith("DoRA")
    assert set(claim.modules["lora_unet_a"]) == kohya


def test_peft_file_applies_unmerged_as_peft_runs_it(peft_file):
    tmp, merged = peft_file
    model = base_model()
    (net,) = apply_adapters(model, [(tmp / "peft_dora.safetensors", 1.0)])
    assert net.options.get("dora") is True and {type(m).__name__ for m in net.adapters.values()} == {"DoRAModule"}
    reference = Tiny()
    reference.load_state_dict(merged)
    x = torch.randn(4, IN)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), **TOL)


def test_kern_merge_of_a_peft_file_equals_peft_merge_and_unload(peft_file):
    from click.testing import CliRunner
    from kern_cli.commands.merge import command

    tmp, merged = peft_file
    out = tmp / "merged.safetensors"
    args = ["--model", str(tmp / "base.safetensors"), "--weights", str(tmp / "peft_dora.safetensors")]
    result = CliRunner().invoke(command, [*args, "--out", str(out), "--dtype", "float32"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    written, _ = load_file(out)
    for key, value in merged.items():
        torch.testing.assert_close(written[key], value, **TOL)


def test_kern_file_reloads_exactly_and_is_dora_in_kohya_layout(tmp_path):
    factors = random_factors()
    model, net = kern_model(factors)
    path = net.save(tmp_path / "a.safetensors")
    tensors, metadata = load_file(path)
    assert tensors["lora_unet_proj.dora_scale"].shape == (OUT, 1)  # LyCORIS wd_on_out / ComfyUI: [out, 1]
    assert "dora" in metadata.get("ss_network_args", "")
    x = torch.randn(4, IN)
    with torch.no_grad():
        expected = model(x)
        net.remove()
        (reloaded,) = apply_adapters(model, [(path, 1.0)])
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_bad_dora_files_are_refused_naming_the_module(tmp_path):
    g = torch.Generator().manual_seed(0)
    lora = {
        "lora_unet_proj.lora_down.weight": torch.randn(RANK, IN, generator=g),
        "lora_unet_proj.lora_up.weight": torch.randn(OUT, RANK, generator=g),
        "lora_unet_out.lora_down.weight": torch.randn(RANK, OUT, generator=g),
        "lora_unet_out.lora_up.weight": torch.randn(6, RANK, generator=g),
    }
    cases = {
        "half": ({"lora_unet_proj.dora_scale": torch.ones(OUT, 1)}, "1 of 2 modules carry a DoRA magnitude"),
        "columns": (
            {"lora_unet_proj.dora_scale": torch.ones(1, IN), "lora_unet_out.dora_scale": torch.ones(1, OUT)},
            "per-input-column",
        ),
    }
    for name, (extra, message) in cases.items():
        save_file({**lora, **extra}, tmp_path / f"{name}.safetensors", {})
        with pytest.raises(AdapterError, match=message):
            apply_adapters(base_model(), [(tmp_path / f"{name}.safetensors", 1.0)])
    with pytest.raises(AdapterError, match="depends on the base weight"):
        build_manager().hook.weight_delta(
            network_type="lora",
            tensors={
                "lora_down.weight": torch.ones(1, 2),
                "lora_up.weight": torch.ones(3, 1),
                "dora_scale": torch.ones(3, 1),
            },
            base_shape=(3, 2),
            base=None,
        )


# --------------------------------------------------------------------------- training at the CLI


@pytest.fixture(scope="module")
def flux2_tiny(tmp_path_factory):
    from kern_flux2 import tiny

    return tiny.build(tmp_path_factory.mktemp("tiny-flux2"))


def test_kern_train_dora_on_tiny_flux2_learns_and_reloads_exactly(flux2_tiny, tmp_path, monkeypatch, capsys):
    from kern.core.plugins import get_manager
    from kern_cli.main import main

    from tests.helpers import make_dataset

    torch.set_num_threads(2)
    dataset = make_dataset(tmp_path / "data", n=2, size=(32, 32), batch_size=2)
    out = tmp_path / "run"
    manager = get_manager()
    made = []
    real = manager.hook.make_network
    monkeypatch.setattr(manager.hook, "make_network", lambda **kw: made.append(kw["model"]) or real(**kw))
    args = ["train", "--arch", "flux2-klein-4b", "--network", "lora", "--network-opt", "dora=true"]
    args += ["--network-opt", "rank=4", "--dataset", str(dataset), "--out", str(out), "--steps", "4", "--lr", "0.02"]
    for key in ("transformer", "vae", "text_encoder"):
        args += ["--set", f"model.{key}={flux2_tiny[key]}"]
    targets = json.dumps(["img_in", "double_blocks\\..*"])
    for setting in ("model.dtype=float32", "train.mixed_precision=no", "train.device=cpu"):
        args += ["--set", setting]
    args += ["--set", "train.gradient_checkpointing=false", "--set", f"network.targets={targets}"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0, capsys.readouterr().err
    adapter = out / "adapter.safetensors"
    tensors, metadata = load_file(adapter)
    mags = {k: v for k, v in tensors.items() if k.endswith(".dora_scale")}
    assert mags and len(mags) == len([k for k in tensors if k.endswith(".lora_down.weight")])
    assert "dora" in metadata["ss_network_args"]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))

    # The trained magnitudes moved off their start (‖W‖ of the base), and the file reloads exactly.
    trained = made[0]
    layers = dict(trained.named_modules())
    moved = 0
    for key, m in mags.items():
        path = next(p for p in layers if "lora_unet_" + p.replace(".", "_") == key.split(".")[0])
        moved += not torch.allclose(m.view(-1), layers[path].weight.detach().float().norm(dim=1))
    assert moved > 0

    fresh = manager.hook.load_model(
        arch="flux2",
        variant="klein-4b",
        part="transformer",
        path=str(flux2_tiny["transformer"]),
        dtype=torch.float32,
        device=torch.device("cpu"),
        options={},
    )
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(2, 128, 2, 2, generator=g), torch.tensor([0.3, 0.8])
    text = {"ctx": torch.randn(2, 12, 48, generator=g)}

    def velocity(model):
        with torch.no_grad():
            return manager.hook.predict_velocity(
                arch="flux2",
                variant="klein-4b",
                model=model,
                latents=latents,
                timesteps=t,
                text=text,
                references=None,
                options={"guidance": 1.0},
            )

    trained.eval()
    expected = velocity(trained)
    base = velocity(fresh)
    (net,) = apply_adapters(fresh, [(str(adapter), 1.0)], arch="flux2")
    assert {type(m).__name__ for m in net.adapters.values()} == {"DoRAModule"}
    torch.testing.assert_close(velocity(fresh), expected, rtol=1e-5, atol=1e-5)
    assert (expected - base).abs().max() > 1e-4


def test_fp8_base_takes_its_norms_from_the_dequantised_weight():
    from kern.gpu.fp8 import Float8StorageLinear

    factors = random_factors()
    fp8 = base_model()
    fp8.proj = Float8StorageLinear.from_linear(fp8.proj, compute_dtype=torch.float32)
    plain = base_model()
    with torch.no_grad():
        plain.proj.weight.copy_(fp8.proj.dequantized_weight(torch.float32))
    assert not torch.equal(plain.proj.weight, base_model().proj.weight)  # fp8 rounding shows: the test means something
    fresh = LORA.make_network(fp8, TargetSpec(targets=("proj",)), {"rank": RANK, "dora": True})
    torch.testing.assert_close(
        fresh.adapters["lora_unet_proj"].dora_scale.detach().view(-1), plain.proj.weight.norm(dim=1)
    )
    fresh.remove()
    x = torch.randn(4, IN)
    outputs = []
    for model in (fp8, plain):
        net = LORA.make_network(model, TargetSpec(targets=("proj",)), {"rank": RANK, "alpha": ALPHA, "dora": True})
        m = net.adapters["lora_unet_proj"]
        with torch.no_grad():
            m.lora_down.weight.copy_(factors["proj"]["A"])
            m.lora_up.weight.copy_(factors["proj"]["B"])
            m.dora_scale.copy_(factors["proj"]["m"].view(-1, 1))
            outputs.append(model(x))
            delta = m.delta_weight()
        outputs.append(delta)
    torch.testing.assert_close(outputs[0], outputs[2], **TOL)
    torch.testing.assert_close(outputs[1], outputs[3], **TOL)


def test_peft_file_converts_to_kohya_with_dora_scale_and_merges_the_same(peft_file, tmp_path):
    tmp, merged = peft_file
    tensors, metadata = load_file(tmp / "peft_dora.safetensors")
    manager = build_manager()
    claim = detect(tensors.keys(), metadata, manager)
    kohya, _ = manager.hook.convert_weights(
        network_type="lora",
        state_dict=tensors,
        metadata=metadata,
        claim=claim,
        to_layout="kohya",
        module_map=None,
        base=None,
    )
    assert kohya["lora_unet_proj.dora_scale"].shape == (OUT, 1) and "lora_unet_proj.alpha" in kohya
    save_file(kohya, tmp_path / "kohya.safetensors", {})
    model = base_model()
    apply_adapters(model, [(tmp_path / "kohya.safetensors", 1.0)], merge=True)
    for name in ("proj", "out"):
        torch.testing.assert_close(getattr(model, name).weight, merged[f"{name}.weight"], **TOL)


def test_row_split_and_fuse_of_a_dora_module_are_exact():
    from kern_lora.module import LoRAOps

    f = random_factors()["proj"]
    t = {"lora_down.weight": f["A"], "lora_up.weight": f["B"], "alpha": torch.tensor(ALPHA), "dora_scale": f["m"]}
    w = base_model().proj.weight.detach()
    manager = build_manager()

    def merged(tensors, base):
        return base + manager.hook.weight_delta(
            network_type="lora", tensors=tensors, base_shape=tuple(base.shape), base=base
        )

    ops = LoRAOps()
    parts = [((0, 5), ops.split(t, 0, 5)), ((5, OUT), ops.split(t, 5, OUT))]
    for (start, stop), part in parts:
        torch.testing.assert_close(merged(part, w[start:stop]), merged(t, w)[start:stop], **TOL)
    torch.testing.assert_close(merged(ops.fuse(parts, OUT), w), merged(t, w), **TOL)
