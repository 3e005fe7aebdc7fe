"""kern.gpu.offload: block swap and activation offload give the same outputs and gradients as the plain model.

On the CPU the 'device' copy of a swapped block is a fresh CPU tensor, so the hook logic (what is loaded when, in
which order, forward and checkpoint recompute, early-stopped recomputes, what is dropped) runs exactly as on a GPU,
only without streams. A block running on its stored (swapped-out) tensors instead of a loaded copy is caught by
comparing data pointers inside the block.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from kern.adapters.network import build_network
from kern.errors import UsageError
from kern.gpu.accel import blocks as repeated_blocks
from kern.gpu.fp8 import quantize_base
from kern.gpu.offload import ActivationOffload, BlockSwap
from kern.records import TargetSpec
from torch.utils.checkpoint import checkpoint


def _flux2(fp8: bool = False):
    from kern_flux2 import geometry
    from kern_flux2.params import tiny_params
    from kern_flux2.plugin import DEFAULT_TARGETS, KEEP_HIGH_PRECISION
    from kern_flux2.transformer import Flux2Transformer

    torch.manual_seed(0)
    p = tiny_params(guidance_embed=True, depth=2, depth_single=3)
    model = Flux2Transformer(p).requires_grad_(False).eval()
    if fp8:
        quantize_base(model, skip=KEEP_HIGH_PRECISION)
    g = torch.Generator().manual_seed(1)
    x = {
        "img": geometry.pack(torch.randn(2, p.in_channels, 4, 6, generator=g)),
        "img_ids": geometry.image_ids(4, 6),
        "txt": torch.randn(2, 8, p.context_in_dim, generator=g),
        "txt_ids": geometry.text_ids(8),
        "timesteps": torch.rand(2, generator=g),
        "guidance": torch.full((2,), 4.0),
    }
    return model, x, DEFAULT_TARGETS


def _qwen(fp8: bool = False):
    from kern_qwen_image.params import tiny_params
    from kern_qwen_image.plugin import DEFAULT_TARGETS, KEEP_HIGH_PRECISION
    from kern_qwen_image.transformer import QwenImageTransformer

    torch.manual_seed(0)
    p = tiny_params(num_layers=4)
    model = QwenImageTransformer(p).requires_grad_(False).eval()
    if fp8:
        quantize_base(model, skip=KEEP_HIGH_PRECISION)
    g = torch.Generator().manual_seed(1)
    shapes = [(1, 4, 6)]
    x = {
        "img": torch.randn(2, sum(math.prod(s) for s in shapes), p.in_channels, generator=g),
        "txt": torch.randn(2, 7, p.joint_attention_dim, generator=g),
        "txt_mask": None,
        "timesteps": torch.rand(2, generator=g),
        "img_shapes": shapes,
    }
    return model, x, DEFAULT_TARGETS


def _lora(model, targets):
    from kern_lora.module import LoRAModule

    torch.manual_seed(5)
    net = build_network("lora", model, TargetSpec(targets=targets), {"rank": 4}, LoRAModule)
    with torch.no_grad():
        for a in net.adapters.values():
            a.lora_up.weight.normal_(0, 0.1)  # non-zero B, so the adapters change the output
    return net.train()


def _step(model, net, x):
    for q in net.parameters():
        q.grad = None
    out = model(**x)
    out.square().mean().backward()
    # Qwen-Image's last block's text-only adapters get no gradient (the output is read from the image stream).
    return out.detach().clone(), [None if q.grad is None else q.grad.clone() for q in net.parameters()]


def _same(a, b, **tol):
    if a is None or b is None:
        return a is None and b is None
    return torch.allclose(a, b, **tol) if tol else torch.equal(a, b)


def _inner_checkpoint(self, *args):
    return checkpoint(type(self).forward, self, *args, use_reentrant=False)


class _Watch:
    """A forward pre-hook registered after BlockSwap's: checks that a swapped block runs on loaded tensors."""

    def __init__(self, swap: BlockSwap) -> None:
        self.swap, self.runs, self.bad = swap, [], []
        self.stored = {i: {t.data_ptr() for t in s.stored} for i, s in swap.slots.items()}
        for i, b in enumerate(swap.blocks):
            b.register_forward_pre_hook(self._hook(i))

    def _hook(self, i):
        def hook(module, args):
            self.runs.append(i)
            if i in self.stored:
                ptrs = {t.data_ptr() for t in module.parameters()} | {t.data_ptr() for t in module.buffers()}
                if ptrs & self.stored[i]:
                    self.bad.append(i)

        return hook


@pytest.mark.parametrize("build", [_flux2, _qwen], ids=["flux2", "qwen_image"])
@pytest.mark.parametrize("ckpt", ["call", "inner", "off"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_block_swap_same_outputs_and_gradients(build, ckpt, fp8):
    """``call``: the model checkpoints ``block(...)`` (its own gradient_checkpointing switch); ``inner``: the block's
    forward checkpoints the class forward, as kern.gpu.accel wraps blocks (no module hook fires in the recompute)."""
    model, x, targets = build(fp8)
    model.gradient_checkpointing = ckpt == "call"
    if ckpt == "inner":
        for block in repeated_blocks(model):
            block.forward = types.MethodType(_inner_checkpoint, block)
    net = _lora(model, targets)
    ref_out, ref_grads = _step(model, net, x)

    blocks = repeated_blocks(model)
    n = len(blocks)
    swap = BlockSwap(blocks, resident=1, device="cpu")
    assert swap.swapped == list(range(n - 1))
    watch = _Watch(swap)
    swap.events = []
    for step in range(2):  # the second step starts from the state the first one left
        out, grads = _step(model, net, x)
        assert torch.equal(out, ref_out)
        assert all(_same(a, b) for a, b in zip(grads, ref_grads))
        loads = [i for e, i in swap.events if e == "load"]
        swap.events.clear()
        if ckpt == "call":
            # forward runs blocks 0..n-1, the recompute in backward n-1..0; forward loads the swapped ones in order
            # (block 0 is still there from the last backward in the second step), backward loads n-3..0: block n-2,
            # the last swapped one, stays loaded through the turnaround.
            assert watch.runs[-2 * n :] == list(range(n)) + list(range(n - 1, -1, -1))
            assert loads == list(range(step, n - 1)) + list(range(n - 3, -1, -1))
        elif ckpt == "inner":  # the recompute calls the class forward: the block's own hooks see the forward only
            assert watch.runs[-n:] == list(range(n))
            assert loads == list(range(step, n - 1)) + list(range(n - 3, -1, -1))
        else:
            # No recompute: backward uses the weights autograd saved (so nothing was saved in memory either); the
            # backward hooks still fetch each block once more, which is why memory mode requires checkpointing.
            assert watch.runs[-n:] == list(range(n))
            assert loads[: n - 1 - step] == list(range(step, n - 1))
    assert not watch.bad, f"blocks {watch.bad} ran on swapped-out weights"
    # At rest at most the block the last pass ended on is loaded; all others hold their stored CPU tensors.
    assert sum(s.gpu is not None for s in swap.slots.values()) <= 1
    swap.drop_all()
    for i, slot in swap.slots.items():
        assert all(t1 is t2 for t1, t2 in zip(_tensors(blocks[i]), slot.stored))


def _tensors(block):
    return [
        t
        for m in block.modules()
        for kind in ("_parameters", "_buffers")
        for t in getattr(m, kind).values()
        if t is not None
    ]


def test_no_grad_forward_and_state_dict():
    model, x, targets = _flux2()
    net = _lora(model, targets)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(**x)
    swap = BlockSwap(repeated_blocks(model), resident=2, device="cpu")
    assert swap.swapped == [0, 1, 2] and swap.swapped_bytes() > 0
    with torch.no_grad():
        assert torch.equal(model(**x), ref)
    sd = model.state_dict()  # swapped blocks show their stored weights under the usual keys
    assert sd.keys() == keys.keys() and all(torch.equal(sd[k], v) for k, v in keys.items())
    # model.to(...) (accelerate's prepare calls it) leaves swapped blocks alone
    stored = swap.slots[0].stored
    model.to(torch.float64)
    assert all(a is b for a, b in zip(_tensors(model.double_blocks[0]), stored))
    assert model.img_in.weight.dtype == torch.float64
    swap.remove()
    model.to(torch.float32)
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float32
    assert len(net.adapters) > 0


def test_trainable_block_weights_are_refused():
    model, _, _ = _flux2()
    model.single_blocks[0].linear1.weight.requires_grad_(True)
    with pytest.raises(UsageError, match="trainable"):
        BlockSwap(repeated_blocks(model), resident=0, device="cpu")


def test_repeated_blocks_order():
    model, _, _ = _flux2()
    assert repeated_blocks(model) == [*model.double_blocks, *model.single_blocks]
    qwen, _, _ = _qwen()
    assert repeated_blocks(qwen) == list(qwen.transformer_blocks)


def test_activation_offload_same_gradients(monkeypatch):
    model, x, targets = _qwen()
    model.gradient_checkpointing = True
    net = _lora(model, targets)
    ref_out, ref_grads = _step(model, net, x)
    packed = []

    class Counting(torch.autograd.graph.save_on_cpu):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook

            def counting_pack(t):
                packed.append(tuple(t.shape))
                return pack(t)

            self.pack_hook = counting_pack

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    off = ActivationOffload(model)
    out, grads = _step(model, net, x)
    assert torch.equal(out, ref_out) and all(_same(a, b) for a, b in zip(grads, ref_grads))
    # Every checkpointed block's inputs went through the offload hooks (img and txt of each of the 4 blocks).
    assert sum(s == tuple(x["img"].shape[:2]) + (64,) for s in packed) >= 4
    n = len(packed)
    with torch.no_grad():
        model(**x)
    assert len(packed) == n  # nothing saved without grad
    off.remove()
    _step(model, net, x)
    assert len(packed) == n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_block_swap_matches():
    model, x, targets = _flux2()
    model.gradient_checkpointing = True
    model.cuda()
    x = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    net = _lora(model, targets).cuda()
    ref_out, ref_grads = _step(model, net, x)
    swap = BlockSwap(repeated_blocks(model), resident=1, device="cuda")
    assert all(s.cpu.is_pinned() for s in swap.slots.values())
    model.cuda()
    for _ in range(2):
        out, grads = _step(model, net, x)
        assert torch.equal(out, ref_out)
        assert all(_same(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, ref_grads))
