"""kern.gpu.accel: the training fast-path options (parsing, errors naming the key) and their exactness on the CPU.

Selective and full checkpointing must give the gradients of the unchecked model; compiled blocks must trace through
the adapters' patched ``Linear.forward`` and the checkpoint wrapper, give the same loss, and not recompile per step.
The compile check uses dynamo's ``aot_eager`` backend (the tracing and autograd partition kern relies on, without
inductor's C++ build, which takes minutes on the CPU); the device benchmark runs the real inductor path.
"""

from __future__ import annotations

import pytest
import torch
from kern.core.config import TrainConfig, load_job
from kern.core.plugins import build_manager
from kern.errors import ConfigError
from kern.gpu import accel
from kern.records import TargetSpec


def test_defaults_and_values_parse(tmp_path):
    job = load_job(None)
    assert (job.train.gradient_checkpointing, job.train.compile, job.train.attention) == (True, "auto", "auto")
    f = tmp_path / "job.toml"
    f.write_text('[train]\ngradient_checkpointing = "selective"\ncompile = "off"\nattention = "cudnn"\n')
    t = load_job(f).train
    assert (t.gradient_checkpointing, t.compile, t.attention) == ("selective", "off", "cudnn")
    assert [accel.checkpoint_mode(v) for v in (True, False, "full", "selective")] == [
        "full",
        "off",
        "full",
        "selective",
    ]
    assert accel.compile_enabled("auto", torch.device("cpu")) is False
    assert accel.compile_enabled("auto", torch.device("cuda")) is True
    assert accel.compile_enabled("off", torch.device("cuda")) is False


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("compile", '"yes"'),
        ("attention", '"fa3"'),
        ("gradient_checkpointing", '"partial"'),
        ("base_precision", '"fp4"'),
        ("blocks_to_swap", "-1"),
    ],
)
def test_bad_values_name_the_key(tmp_path, key, value):
    f = tmp_path / "job.toml"
    f.write_text(f"[train]\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=rf"job.toml.*{key}.*{value.strip(chr(34))}"):
        load_job(f)


def _tiny_lora_model(seed: int = 0, base_precision: str = "bf16"):
    import kern_flux2.plugin
    import kern_lora.plugin
    from kern_flux2.params import tiny_params
    from kern_flux2.transformer import Flux2Transformer

    torch.manual_seed(seed)
    params = tiny_params(False, depth=2, depth_single=2)
    model = Flux2Transformer(params)
    model.requires_grad_(False)
    model.eval()
    accel.prepare_base(
        model,
        TrainConfig(base_precision=base_precision),
        "cpu",  # before the adapters, as the trainer
        keep=kern_flux2.plugin.KEEP_HIGH_PRECISION,
    )
    manager = build_manager(entry_points=(), extra=[("flux2", kern_flux2.plugin), ("lora", kern_lora.plugin)])
    arch, _ = manager.resolve_arch("flux2-klein-4b")
    network = manager.hook.make_network(
        network_type="lora",
        model=model,
        options={"rank": 4, "alpha": 4.0},
        targets=TargetSpec(targets=arch.default_targets, exclude=tuple(arch.default_excludes)),
    )
    for p in network.parameters():  # non-zero up factors: every adapter contributes and gets gradients
        torch.nn.init.normal_(p, std=0.1)
    network.train()
    b, n_img, n_txt = 1, 16, 8
    img_ids = torch.zeros(b, n_img, 4)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(n_img) // 4, torch.arange(n_img) % 4
    txt_ids = torch.zeros(b, n_txt, 4)
    txt_ids[..., 3] = torch.arange(n_txt)
    inputs = (
        torch.randn(b, n_img, params.in_channels),
        img_ids,
        torch.randn(b, n_txt, params.context_in_dim),
        txt_ids,
        torch.rand(b),
    )
    return model, network, inputs


def _loss_and_grads(model, network, inputs):
    for p in network.parameters():
        p.grad = None
    loss = model(*inputs).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in network.parameters()]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_gives_the_unchecked_gradients(mode):
    model, network, inputs = _tiny_lora_model()
    loss0, grads0 = _loss_and_grads(model, network, inputs)
    done = accel.apply(model, TrainConfig(gradient_checkpointing=mode, compile="off"), "cpu")
    assert done["checkpointing"] == mode and done["blocks"] == 4 and done["compile"] == "off"
    assert model.gradient_checkpointing is False  # the per-block wrappers do it, not the model's own switch
    calls = []
    hook = model.single_blocks[0].linear2.register_forward_pre_hook(lambda *a: calls.append(1))
    loss1, grads1 = _loss_and_grads(model, network, inputs)
    hook.remove()
    assert len(calls) == 2  # the block's layers ran again in backward: it was checkpointed
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert sorted(model.state_dict()) == sorted(_tiny_lora_model()[0].state_dict())  # keys unchanged
    with torch.no_grad():  # sampling: no checkpoint, same output
        assert torch.equal(model(*inputs), _tiny_lora_model()[0](*inputs))


def test_compiled_blocks_trace_adapters_and_do_not_recompile(monkeypatch):
    torch._dynamo.reset()
    model, network, inputs = _tiny_lora_model()
    loss0, grads0 = _loss_and_grads(model, network, inputs)
    real = accel.compile_block
    monkeypatch.setattr(accel, "compile_block", lambda block: real(block, backend="aot_eager"))
    done = accel.apply(model, TrainConfig(gradient_checkpointing="selective", compile="blocks"), "cpu")
    assert done["compile"] == "blocks"
    before = accel.compiled_graphs()
    loss1, grads1 = _loss_and_grads(model, network, inputs)
    first = accel.compiled_graphs()
    assert first > before  # fullgraph: the blocks, their adapters and the checkpoint compiled without a break
    loss2, grads2 = _loss_and_grads(model, network, inputs)
    assert accel.compiled_graphs() == first  # the second step reuses the first step's graphs
    for loss, grads in ((loss1, grads1), (loss2, grads2)):
        assert torch.allclose(loss, loss0, rtol=1e-5)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads0, grads))
    torch._dynamo.reset()


def test_transformer_without_block_lists_keeps_its_own_switch():
    class Plain(torch.nn.Module):
        gradient_checkpointing = False

    m = Plain()
    done = accel.apply(m, TrainConfig(gradient_checkpointing=True), "cpu")
    assert m.gradient_checkpointing is True and done == {"checkpointing": "full", "attention": "auto", "compile": "off"}


@pytest.mark.parametrize("base_precision", ["bf16", "fp8"])
def test_block_swap_and_fp8_base_through_apply(base_precision):
    """``train.blocks_to_swap`` and ``train.base_precision`` wired through accel: the same loss and gradients as the
    same model without swapping, on the CPU (where a swap is a plain copy instead of a side-stream transfer)."""
    model, network, inputs = _tiny_lora_model(base_precision=base_precision)
    ref, ref_network, _ = _tiny_lora_model(base_precision=base_precision)
    if base_precision == "fp8":
        assert type(model.single_blocks[0].linear1).__name__ == "Float8MatmulLinear"
    loss0, grads0 = _loss_and_grads(ref, ref_network, inputs)
    cfg = TrainConfig(gradient_checkpointing=True, compile="off", base_precision=base_precision, blocks_to_swap=2)
    done = accel.apply(model, cfg, "cpu")
    assert done["blocks_swapped"] == 2
    loss1, grads1 = _loss_and_grads(model, network, inputs)
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))


def test_compiled_inner_forward_with_block_swap(monkeypatch):
    """Block swap compiles each block's own forward and keeps the checkpoint eager around it (so the checkpoint,
    not the compiled graph, decides what is kept for backward): same loss and gradients, no recompile on step 2."""
    torch._dynamo.reset()
    model, network, inputs = _tiny_lora_model()
    loss0, grads0 = _loss_and_grads(model, network, inputs)
    real = accel.compile_inner
    monkeypatch.setattr(accel, "compile_inner", lambda block: real(block, backend="aot_eager"))
    done = accel.apply(
        model, TrainConfig(gradient_checkpointing="selective", compile="blocks", blocks_to_swap=1), "cpu"
    )
    assert done["compile"] == "blocks (inner forward)" and done["checkpointing"] == "full"
    loss1, grads1 = _loss_and_grads(model, network, inputs)
    first = accel.compiled_graphs()
    loss2, grads2 = _loss_and_grads(model, network, inputs)
    assert accel.compiled_graphs() == first
    for loss, grads in ((loss1, grads1), (loss2, grads2)):
        assert torch.allclose(loss, loss0, rtol=1e-5)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads0, grads))
    torch._dynamo.reset()


def test_selective_blocks_spends_the_attention_budget_on_the_first_blocks():
    """``selective_blocks = N``: the first N repeated blocks keep their attention outputs, the rest are fully
    recomputed; gradients stay those of the unchecked model."""
    model, network, inputs = _tiny_lora_model()
    loss0, grads0 = _loss_and_grads(model, network, inputs)
    done = accel.apply(model, TrainConfig(gradient_checkpointing="selective", selective_blocks=1, compile="off"), "cpu")
    assert done["selective_blocks"] == 1
    modes = [b._kern_checkpoint for b in accel.blocks(model)]
    assert modes == ["selective"] + ["full"] * (len(modes) - 1)
    loss1, grads1 = _loss_and_grads(model, network, inputs)
    assert torch.equal(loss0, loss1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    with pytest.raises(ValueError):
        TrainConfig(selective_blocks=-1)


@pytest.mark.parametrize(
    ("ckpt", "base", "swap", "arrangement", "checkpointing"),
    [
        ("full", "fp8", 0, "inner", "full"),  # fp8's memory saving: the eager checkpoint decides what is kept
        ("selective", "fp8", 0, "graph", "selective"),  # fp8 spending memory on speed: the compiler decides
        ("selective", "fp8", 2, "inner", "full"),  # block swap: never in the graph (it would hold the swapped copies)
        ("selective", "bf16", 0, "graph", "selective"),
    ],
)
def test_where_the_checkpoint_goes(monkeypatch, ckpt, base, swap, arrangement, checkpointing):
    model, _, _ = _tiny_lora_model(base_precision=base)
    seen = []
    monkeypatch.setattr(accel, "compile_inner", lambda block: seen.append("inner"))
    monkeypatch.setattr(accel, "compile_block", lambda block: seen.append("graph"))
    done = accel.apply(
        model,
        TrainConfig(gradient_checkpointing=ckpt, compile="blocks", base_precision=base, blocks_to_swap=swap),
        "cpu",
    )
    assert set(seen) == {arrangement} and len(seen) == done["blocks"] == 4
    assert done["checkpointing"] == checkpointing


def test_fp8_base_with_the_checkpoint_compiled_into_the_graph(monkeypatch):
    """fp8 + "selective": the Float8MatmulLinear autograd function traced into the compiled checkpoint (fullgraph,
    no break) gives the eager fp8 model's loss and adapter gradients."""
    torch._dynamo.reset()
    model, network, inputs = _tiny_lora_model(base_precision="fp8")
    loss0, grads0 = _loss_and_grads(model, network, inputs)
    real = accel.compile_block
    monkeypatch.setattr(accel, "compile_block", lambda block: real(block, backend="aot_eager"))
    done = accel.apply(
        model, TrainConfig(gradient_checkpointing="selective", compile="blocks", base_precision="fp8"), "cpu"
    )
    assert done["compile"] == "blocks"
    loss1, grads1 = _loss_and_grads(model, network, inputs)
    assert accel.compiled_graphs() > 0
    assert torch.allclose(loss1, loss0, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads0, grads1))
    torch._dynamo.reset()


def test_fp8_base_loads_on_the_cpu_and_backward_follows_compile(monkeypatch):
    """An fp8 base for a GPU is loaded on the CPU (the bf16 model never has to fit the card) and quantised there
    layer by layer; the input-gradient matmul is fp8 only where blocks are compiled (fused there, slower eager)."""
    cuda = torch.device("cuda")
    assert accel.base_device(TrainConfig(base_precision="fp8"), cuda).type == "cpu"
    assert accel.base_device(TrainConfig(base_precision="fp8"), "cpu").type == "cpu"
    assert accel.base_device(TrainConfig(), cuda).type == "cuda"
    assert accel.base_device(TrainConfig(blocks_to_swap=1), cuda).type == "cpu"
    import kern.gpu.fp8

    asked = []
    monkeypatch.setattr(kern.gpu.fp8, "quantize_base", lambda model, **kw: asked.append(kw["backward"]) or 0)
    for compile_, backward in (("blocks", "fp8"), ("off", "bf16"), ("auto", "bf16")):  # auto: off on the CPU
        done = accel.prepare_base(torch.nn.Linear(16, 16), TrainConfig(base_precision="fp8", compile=compile_), "cpu")
        assert done["fp8_backward"] == backward == asked[-1]


@pytest.mark.parametrize("compile_", ["off", "blocks"])
def test_offload_activations_through_apply(monkeypatch, compile_):
    """``train.offload_activations``: the checkpointed blocks' inputs go through ``save_on_cpu`` (counted here), the
    loss and gradients stay those of the plain model, and compiled blocks keep the checkpoint eager (inner forward)
    so the offload hooks see those inputs."""
    torch._dynamo.reset()
    model, network, inputs = _tiny_lora_model()
    loss0, grads0 = _loss_and_grads(model, network, inputs)
    packed = []
    real_save_on_cpu = torch.autograd.graph.save_on_cpu

    class Counting(real_save_on_cpu):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            pack = self.pack_hook
            self.pack_hook = lambda t: packed.append(tuple(t.shape)) or pack(t)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    real = accel.compile_inner
    monkeypatch.setattr(accel, "compile_inner", lambda block: real(block, backend="aot_eager"))
    done = accel.apply(model, TrainConfig(offload_activations=True, compile=compile_), "cpu")
    assert done["activations"] == "offloaded"
    assert done["compile"] == ("blocks (inner forward)" if compile_ == "blocks" else "off")
    loss1, grads1 = _loss_and_grads(model, network, inputs)
    assert len(packed) >= 4  # at least one saved input per checkpointed block
    assert torch.allclose(loss1, loss0, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads0, grads1))
    with pytest.raises(ConfigError, match="offload_activations"):
        accel.apply(_tiny_lora_model()[0], TrainConfig(offload_activations=True, gradient_checkpointing=False), "cpu")
    torch._dynamo.reset()
