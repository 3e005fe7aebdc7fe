"""Issue 18's acceptance at the CLI: `kern train --network lokr` and LoRA with `network.dora = true` on the tiny
model of every FLUX.2 and Qwen-Image variant.

The cheap core runs on every (variant, type): a 2-step `kern train` whose loss is finite, whose adapter left its
zero initialisation (it learns) and whose file is detected as the type trained. The expensive checks run on one
variant per architecture: the saved adapter, applied unmerged to a freshly loaded model, is the trained network
exactly (every adapted layer gives the same output), and `kern generate` with the adapter unmerged and with
`--merge` makes the same image (8-bit PNG: at most 1 level apart) that differs from the base model's.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from kern.adapters.weights import apply_adapters, detect
from kern.core.io import load_file
from kern.core.plugins import build_manager, get_manager
from PIL import Image

from tests.helpers import make_dataset

FLUX2_TARGETS = ["img_in", "txt_in", "final_layer\\.linear", "double_blocks\\..*", "single_blocks\\..*"]
QWEN_TARGETS = ["img_in", "txt_in", r"transformer_blocks\.\d+\.(attn|img_mlp|txt_mlp)\..*"]
STEPS = 2

# --arch and the bundle entries each variant trains with (its transformer, VAE, text encoder; its dataset kind).
VARIANTS = {
    "flux2-klein-4b": ("flux2-klein-4b", "transformer", "vae", "text_encoder", "plain"),
    "flux2-klein-9b": ("flux2-klein-9b", "transformer", "vae", "text_encoder", "plain"),
    "flux2-klein-base-4b": ("flux2-klein-base-4b", "transformer", "vae", "text_encoder", "plain"),
    "flux2-klein-base-9b": ("flux2-klein-base-9b", "transformer", "vae", "text_encoder", "plain"),
    "flux2-dev": ("flux2-dev", "dev_transformer", "vae", "mistral", "refs"),
    "qwen-image": ("qwen-image", "transformer", "vae", "text_encoder", "plain"),
    "qwen-image-edit": ("qwen-image", "edit-2508", "vae", "text_encoder", "refs"),
    "qwen-image-edit-2509": ("qwen-image", "edit-2509", "vae", "text_encoder", "refs"),
    "qwen-image-edit-2511": ("qwen-image", "edit", "vae", "text_encoder", "refs"),
    "qwen-image-layered": ("qwen-image", "layered", "rgba_vae", "text_encoder", "layered"),
}
NETWORKS = {
    "lokr": ["--network", "lokr", "--network-opt", "rank=4", "--network-opt", "factor=4"],
    "dora": ["--network", "lora", "--network-opt", "rank=4", "--network-opt", "dora=true"],
}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny FLUX.2 klein bundle plus a dev transformer (guidance embedding) and a tiny Mistral3 text encoder;
    the tiny Qwen-Image bundle plus the Edit / Edit-2509 / Edit-2511 / Layered transformers and the RGBA VAE."""
    import attrs
    from kern.models.tiny import gains_near_one, write_random_model
    from kern_flux2 import tiny as flux2_tiny
    from kern_flux2.params import tiny_params
    from kern_flux2.transformer import Flux2Transformer
    from kern_qwen_image import tiny as qwen_tiny

    from tests.flux2.test_text_encoder import _mistral_folder

    root = tmp_path_factory.mktemp("network-types")
    flux2 = dict(flux2_tiny.build(root / "flux2"))
    mistral = _mistral_folder(root / "mistral", "left", False)  # hidden 32: dev's context is 3 × 32
    params = attrs.evolve(tiny_params(guidance_embed=True), context_in_dim=96)
    flux2["dev_transformer"] = write_random_model(
        Flux2Transformer(params), root / "flux-2-dev-tiny.safetensors", 0, gains_near_one(flux2_tiny.is_gain)
    )
    flux2["mistral"] = mistral
    qwen = dict(qwen_tiny.build(root / "qwen"))
    folder = root / "qwen-variants"
    qwen["edit"] = qwen_tiny.write_transformer(folder / "qwen-image-edit-tiny.safetensors", variant="edit-2511")
    qwen["edit-2509"] = qwen_tiny.write_transformer(
        folder / "qwen-image-edit-2509-tiny.safetensors", variant="edit-2509"
    )
    qwen["edit-2508"] = qwen_tiny.write_transformer(folder / "qwen-image-edit-2508-tiny.safetensors", variant="edit")
    qwen["layered"] = qwen_tiny.write_transformer(folder / "qwen-image-layered-tiny.safetensors", variant="layered")
    qwen["rgba_vae"] = qwen_tiny.write_vae(folder / "vae-rgba.safetensors", rgba=True)
    return {"flux2": flux2, "qwen": qwen}


def bundle_of(models, variant: str) -> dict:
    return models["flux2" if variant.startswith("flux2") else "qwen"]


@pytest.fixture(scope="module")
def jobs(models, tmp_path_factory):
    """Per variant: (job TOML, dataset TOML). The lokr and dora runs of a variant share the dataset (and its caches)."""
    from tests.qwen_image.test_layered_training import make_layered

    root = tmp_path_factory.mktemp("network-type-jobs")
    out = {}
    for variant, (_, transformer, vae, te, kind) in VARIANTS.items():
        b = bundle_of(models, variant)
        if kind == "layered":
            dataset = make_layered(root / variant, n=2)
        else:
            dataset = make_dataset(root / variant, n=2, size=(32, 32), batch_size=2, refs=int(kind == "refs"))
        targets = FLUX2_TARGETS if variant.startswith("flux2") else QWEN_TARGETS
        job = root / f"{variant}.toml"
        job.write_text(
            f"[model]\ntransformer = {json.dumps(str(b[transformer]))}\nvae = {json.dumps(str(b[vae]))}\n"
            f'text_encoder = {json.dumps(str(b[te]))}\ndtype = "float32"\n\n'
            f"[network]\ntargets = {json.dumps(targets)}\n\n"
            '[train]\nmixed_precision = "no"\ndevice = "cpu"\ngradient_checkpointing = false\n\n'
            "[sample]\nprompts = []\n"
        )
        out[variant] = (job, dataset)
    return out


@pytest.fixture(scope="module")
def base_images() -> dict:
    """Per expensive variant, the base model's image (made once)."""
    return {}


def train(kern_main, jobs, variant, network, out, *extra: str):
    job, dataset = jobs[variant]
    arch = VARIANTS[variant][0]
    code, err = kern_main(
        "train", "--config", str(job), "--arch", arch, *NETWORKS[network], "--dataset", str(dataset),
        "--out", str(out), "--steps", str(STEPS), "--lr", "5e-2", *extra,
    )  # fmt: skip
    assert code in (0, None), err[-3000:]
    return out / "adapter.safetensors"


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_trains_lokr_and_dora_at_the_cli(
    kern_main, models, jobs, base_images, tmp_path, variant, network, monkeypatch
):
    from tests.flux2.test_train_flux2 import Spy

    spy = Spy(monkeypatch, "make_network")
    adapter = train(kern_main, jobs, variant, network, tmp_path / "run")
    curve = losses(tmp_path / "run")
    assert len(curve) == STEPS and all(math.isfinite(v) for v in curve), curve
    tensors, meta = load_file(adapter)
    assert all(torch.isfinite(v).all() for v in tensors.values())
    claim = detect(tensors.keys(), meta, build_manager())
    family = "flux2" if variant.startswith("flux2") else "qwen-image"
    assert meta["kern.arch"] == family
    if network == "lokr":
        assert meta["ss_network_module"] == "lokr" and claim.network_type == "lokr"
        # lokr_w2 (or lokr_w2_b) starts at zero: after two steps it is not, in every module.
        zero_init = {k: v for k, v in tensors.items() if k.endswith((".lokr_w2", ".lokr_w2_b"))}
    else:
        assert claim.network_type == "lora" and claim.note.startswith("DoRA")
        assert any(k.endswith(".dora_scale") for k in tensors)
        zero_init = {k: v for k, v in tensors.items() if k.endswith(".lora_up.weight")}
    still = [k for k, v in zero_init.items() if float(v.abs().max()) == 0]
    assert zero_init and not [k for k in still if not unused_downstream(k, tensors)], still
    if variant in EXPENSIVE:
        (trained_net,) = spy.results["make_network"]
        check_reload(models, variant, adapter, trained_net, spy.calls["make_network"][0]["model"])
        check_generation(kern_main, models, variant, adapter, tmp_path, base_images)


def unused_downstream(key: str, tensors) -> bool:
    """Qwen-Image's last block computes a text stream nobody reads: its text queries, text output projection and
    text MLP get no gradient (with any adapter type)."""
    blocks = [int(m.group(1)) for k in tensors if (m := re.search(r"transformer_blocks_(\d+)_", k))]
    last = f"transformer_blocks_{max(blocks, default=-1)}_"
    return last in key and re.search(r"_(attn_add_q_proj|attn_to_add_out|txt_mlp_net_\w+)\.", key) is not None


# --------------------------------------------------------------------------- reload and generation, one variant each

EXPENSIVE = {"flux2-klein-4b": ("flux2", "klein-4b"), "qwen-image": ("qwen-image", "t2i")}


def load_transformer(models, variant):
    arch, v = EXPENSIVE[variant]
    return get_manager().hook.load_model(
        arch=arch,
        variant=v,
        part="transformer",
        path=str(bundle_of(models, variant)[VARIANTS[variant][1]]),
        dtype=torch.float32,
        device=torch.device("cpu"),
        options={},
    )


def generate(kern_main, models, variant, out, *weights: str) -> np.ndarray:
    b = bundle_of(models, variant)
    arch = VARIANTS[variant][0]
    code, err = kern_main(
        "generate", "--arch", arch, "--transformer", str(b["transformer"]), "--vae", str(b["vae"]),
        "--text-encoder", str(b["text_encoder"]), "-p", "a red square", "-W", "32", "-H", "32", "--steps", "2",
        "--seed", "3", "--dtype", "float32", "--device", "cpu", "--out", str(out), *weights,
    )  # fmt: skip
    assert code in (0, None), err[-3000:]
    (png,) = out.glob("*.png")
    with Image.open(png) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def check_reload(models, variant, adapter, trained_net, trained):
    """The file applied to a fresh model: the same factors, and every adapted layer's output of the trained model."""
    fresh = load_transformer(models, variant)
    (net,) = apply_adapters(fresh, [(str(adapter), 1.0)], arch=EXPENSIVE[variant][0])
    assert set(net.adapters) == set(trained_net.adapters)
    layers = dict(fresh.named_modules())
    trained_layers = dict(trained.named_modules())
    g = torch.Generator().manual_seed(0)
    moved = 0.0
    for m in trained_net.adapters.values():
        for k, v in m.factors().items():
            torch.testing.assert_close(net.adapters[m.name].factors()[k].detach(), v.detach(), rtol=0, atol=0)
        x = torch.randn(3, m.geometry["weight_shape"][1], generator=g)
        with torch.no_grad():
            y = trained_layers[m.path](x)
            torch.testing.assert_close(layers[m.path](x), y, rtol=1e-6, atol=1e-6)
            moved = max(moved, float((y - type(m.org).forward(m.org, x)).abs().max()))
    assert moved > 1e-4  # the trained layers differ from their base layers


def check_generation(kern_main, models, variant, adapter, tmp_path, base_images):
    """`kern generate` unmerged and with --merge: the same image, and not the base model's."""
    if variant not in base_images:
        base_images[variant] = generate(kern_main, models, variant, tmp_path / "base")
    unmerged = generate(kern_main, models, variant, tmp_path / "unmerged", "--weights", str(adapter))
    merged = generate(kern_main, models, variant, tmp_path / "merged", "--weights", str(adapter), "--merge")
    assert np.abs(merged - unmerged).max() <= 1
    assert np.abs(unmerged - base_images[variant]).max() > 2


# --------------------------------------------------------------------------- fp8 base and block swap


@pytest.mark.parametrize("network", list(NETWORKS))
def test_fp8_base_with_block_swap_trains_at_the_cli(kern_main, jobs, tmp_path, network):
    """`train.base_precision = "fp8"` (the storage-fp8 base on the CPU) with `train.blocks_to_swap`: both types
    train, and the run reports the fp8 base and the swapped blocks."""
    out = tmp_path / "run"
    sets = ["--set", "train.base_precision=fp8", "--set", "train.blocks_to_swap=2"]
    adapter = train(kern_main, jobs, "flux2-klein-4b", network, out, *sets)
    assert all(math.isfinite(v) for v in losses(out))
    tensors, _ = load_file(adapter)
    key = (".lokr_w2", ".lokr_w2_b") if network == "lokr" else (".lora_up.weight",)
    assert any(k.endswith(key) and float(v.abs().max()) > 0 for k, v in tensors.items())


def make_network(model, targets, network):
    """A LoKr or DoRA network on ``model`` with every factor random (non-zero updates, m ≠ ‖W‖)."""
    from kern.records import TargetSpec
    from kern_lokr.plugin import LOKR
    from kern_lora.plugin import LORA

    torch.manual_seed(5)
    if network == "lokr":
        net = LOKR.make_network(model, TargetSpec(targets=targets), {"rank": 4, "factor": 4})
    else:
        net = LORA.make_network(model, TargetSpec(targets=targets), {"rank": 4, "dora": True})
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in net.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.device))
    return net.train()


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("arch", ["flux2", "qwen_image"])
def test_block_swap_same_outputs_and_gradients(arch, network, fp8=True):
    """As tests/kernel/test_offload.py for LoRA: with blocks swapped out, LoKr and DoRA give the outputs and
    gradients of the resident model, on an fp8 base (the path that dequantises; DoRA reads the base weight in its forward: it must see the
    block's loaded copy, dequantised), and no swapped block runs on its stored weights."""
    from kern.gpu.accel import blocks as repeated_blocks
    from kern.gpu.offload import BlockSwap

    from tests.kernel.test_offload import _flux2, _qwen, _same, _step, _Watch

    model, x, targets = {"flux2": _flux2, "qwen_image": _qwen}[arch](fp8)
    model.gradient_checkpointing = True
    net = make_network(model, targets, network)
    if fp8:
        assert any(type(m.org).__name__ == "Float8MatmulLinear" for m in net.adapters.values())
    ref_out, ref_grads = _step(model, net, x)
    assert sum(g is not None for g in ref_grads) > len(ref_grads) // 2
    swap = BlockSwap(repeated_blocks(model), resident=1, device="cpu")
    watch = _Watch(swap)
    for _ in range(2):
        out, grads = _step(model, net, x)
        assert torch.equal(out, ref_out)
        assert all(_same(a, b) for a, b in zip(grads, ref_grads))
    assert not watch.bad, f"blocks {watch.bad} ran on swapped-out weights"
    swap.drop_all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: block swap between GPU and pinned CPU memory")
@pytest.mark.parametrize("network", list(NETWORKS))
def test_cuda_block_swap_matches(network):
    """On a GPU: the swapped blocks' weights live in pinned CPU memory until the block runs; LoKr and DoRA (which
    reads the base weight) give the resident model's outputs and gradients, fp8 base included."""
    from kern.gpu.accel import blocks as repeated_blocks
    from kern.gpu.offload import BlockSwap

    from tests.kernel.test_offload import _flux2, _same, _step

    for fp8 in (False, True):
        model, x, targets = _flux2(fp8)
        model.gradient_checkpointing = True
        model.cuda()
        x = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
        net = make_network(model, targets, network).cuda()
        ref_out, ref_grads = _step(model, net, x)
        swap = BlockSwap(repeated_blocks(model), resident=1, device="cuda")
        model.cuda()
        for _ in range(2):
            out, grads = _step(model, net, x)
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
            assert all(_same(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(grads, ref_grads))
        # Saving and merging read the base weight too (DoRA), wherever the block's weights are now.
        deltas = {name: m.delta_weight() for name, m in net.adapters.items()}
        assert all(torch.isfinite(d).all() for d in deltas.values())
        swap.drop_all()


@pytest.mark.parametrize("layer", ["storage", "matmul"])
@pytest.mark.parametrize("network", list(NETWORKS))
def test_fp8_layers_of_both_classes(layer, network):
    """On each fp8 layer class of kern.gpu.fp8 the adapter's output and ΔW are those on the dequantised weight in
    float32 (DoRA's magnitude starts at, and its norm is taken on, the dequantised rows); merging into the fp8
    layer re-quantises W + ΔW."""
    from kern.gpu.fp8 import Float8StorageLinear, quantize_base

    torch.manual_seed(0)
    model = nn_model()
    if layer == "storage":
        model.proj = Float8StorageLinear.from_linear(model.proj, compute_dtype=torch.float32)
    else:
        quantize_base(model, skip=())
    assert type(model.proj).__name__ == {"storage": "Float8StorageLinear", "matmul": "Float8MatmulLinear"}[layer]
    plain = nn_model()
    with torch.no_grad():
        plain.proj.weight.copy_(model.proj.dequantized_weight(torch.float32))
    nets = [make_network(m, ("proj",), network) for m in (model, plain)]
    x = torch.randn(5, 64)
    with torch.no_grad():
        fp8_out, plain_out = model(x), plain(x)
        torch.testing.assert_close(fp8_out, plain_out, rtol=1e-5, atol=1e-5)
        (a,), (b,) = (list(n.adapters.values()) for n in nets)
        torch.testing.assert_close(a.delta_weight(), b.delta_weight(), rtol=1e-5, atol=1e-6)
        nets[0].merge_into_model()
        merged = model.proj.dequantized_weight(torch.float32)
        want = plain.proj.weight + b.delta_weight()
        # e4m3 re-quantisation: at most 2**-4 relative per element, of the row's largest magnitude.
        assert ((merged - want).abs() <= want.abs().amax(dim=1, keepdim=True) * 2**-4).all()


class OneLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(64, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def nn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return OneLayer().requires_grad_(False)


@pytest.mark.parametrize("network", list(NETWORKS))
def test_adapter_forward_traces_in_one_graph(network):
    """torch.compile (kern compiles the blocks on CUDA) traces the adapted layer without a graph break: a DoRA norm
    read off the alpha tensor (float(tensor)) broke it on the GPU; the eager backend shows the same on the CPU."""
    import torch._dynamo

    model = nn_model()
    net = make_network(model, ("proj",), network)
    x = torch.randn(3, 5, model.proj.in_features)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    net.remove()
