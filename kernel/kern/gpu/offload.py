"""Memory mode: stream the frozen base blocks from pinned CPU memory (block swap) and offload activation checkpoints.

**Block swap.** :class:`BlockSwap` keeps the weights of all but ``resident`` of a transformer's repeated blocks in
pinned CPU memory, one flat buffer per block, and copies a block's weights to the GPU just before the block runs.
The copy of the *next* block is issued on a side CUDA stream while the current one computes, and the compute
stream waits on an event only when it needs that block; a block's GPU copy is dropped again when the block after
it starts (``Tensor.record_stream`` keeps the allocator from reusing it while queued kernels still read it).

Which blocks: the *last* ``resident`` blocks (in execution order) stay on the GPU. Forward ends and backward starts
with them, so the turnaround needs no copy, and the first swapped block of backward is fetched while the resident
ones run.

How it knows what comes next: a forward pre-hook on every block for the forward pass, and, armed by a forward
hook, a hook on the gradient of the block's output for the backward pass. Under ``torch.utils.checkpoint(...,
use_reentrant=False)`` (kern's gradient checkpointing) backward re-runs each block's forward, in reverse order,
just before that block's backward: the output-gradient hook fires when backward reaches the block, before any of
its nodes has asked for a saved tensor, so the weights are bound before the recompute, whether the checkpoint
wraps the block's call (``checkpoint(block, ...)``: the pre-hook fires again in the recompute, a no-op) or sits
inside its ``forward`` (``checkpoint(type(block).forward, block, ...)``, kern.gpu.accel's wrapper: no module hook fires
in the recompute). Backward then prefetches in reverse. Not chosen: ``saved_tensors_hooks`` (checkpointing owns
those inside a block; a second set disables it) and module full-backward hooks (they wrap the block's inputs and
outputs in extra autograd nodes). There is no "done" hook: the checkpoint's recompute stops early once it has what
backward needs, so a block's forward need not finish; entering the next block drops every loaded block but the
current and the prefetched one (and, once forward is past the last swapped block, that block, which backward needs
first). At most two swapped blocks are on the device at a time, plus what autograd still holds of the last one.

The hooks are Python with CUDA stream side effects: a block compiled with ``nn.Module.compile()`` would trace them
(and break a ``fullgraph`` compile). Compile the block's inner ``forward`` instead, so the hooks stay outside.

Without gradient checkpointing the answers stay right but memory is not saved: autograd then keeps each block's
GPU weights for backward, and the backward hooks fetch each block once more for nothing. Use it with checkpointing. Swapping exchanges the module's tensor objects (it never mutates a tensor autograd may
have saved), so weights saved in a graph stay valid after the block is swapped out.

Adapters: their parameters belong to the adapter modules (kern.adapters.network.AdapterModule), which are not submodules of
the blocks, so they are never swapped and stay on the GPU; only the blocks' own (frozen) tensors move.
``model.to(device)`` (accelerate's ``prepare`` calls it) skips swapped blocks: their weights would not fit, which
is why they are swapped. Single process only: DDP broadcasts every module tensor at start.

**Activation offload.** :class:`ActivationOffload` runs a model's forward under
``torch.autograd.graph.save_on_cpu(pin_memory=True)``: what autograd saves outside checkpointed blocks — with
checkpointing that is chiefly each block's input — goes to pinned CPU memory and comes back for backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kern.errors import UsageError

__all__ = ["ActivationOffload", "BlockSwap"]

_ALIGN = 64  # bytes: every tensor in a block's flat buffer starts on this boundary (any dtype can view it)


class _Slot:
    """One swapped block: its tensors packed into one pinned CPU buffer, and the GPU copy while loaded."""

    def __init__(self, block: nn.Module, pin: bool) -> None:
        entries, seen, offset = [], {}, 0
        for module in block.modules():
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(module, kind).items():
                    if t is None:
                        continue
                    if kind == "_parameters" and t.requires_grad:
                        raise UsageError(
                            f"block swap: {type(module).__name__}.{name} is trainable; only frozen base "
                            "weights can be swapped (adapters live outside the blocks)"
                        )
                    if id(t) not in seen:  # a tensor shared by two modules is stored once
                        seen[id(t)] = (offset, t)
                        offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
                    entries.append((module, kind, name, seen[id(t)][0], t))
        self.cpu = torch.empty(max(offset, 1), dtype=torch.uint8, pin_memory=pin)
        self.entries = []  # (module, kind, name, offset, nbytes, dtype, shape)
        self.stored = []  # the CPU tensor each entry holds while the block is swapped out
        views: dict[int, torch.Tensor] = {}
        for module, kind, name, off, t in entries:
            nbytes = t.numel() * t.element_size()
            if off not in views:
                view = self._view(self.cpu, off, nbytes, t.dtype, t.shape)
                view.copy_(t.detach())
                views[off] = nn.Parameter(view, requires_grad=False) if kind == "_parameters" else view
            self.entries.append((module, kind, name, off, nbytes, t.dtype, t.shape))
            self.stored.append(views[off])
        self.gpu: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        self.bound = False
        self.swap_out()

    @staticmethod
    def _view(flat: torch.Tensor, off: int, nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor:
        return flat[off : off + nbytes].view(dtype).view(shape)

    def swap_out(self) -> None:
        for (module, kind, name, *_), t in zip(self.entries, self.stored):
            getattr(module, kind)[name] = t
        self.gpu, self.ready, self.bound = None, None, False

    def swap_in(self) -> None:
        made: dict[int, torch.Tensor] = {}
        for module, kind, name, off, nbytes, dtype, shape in self.entries:
            if off not in made:
                view = self._view(self.gpu, off, nbytes, dtype, shape)
                made[off] = nn.Parameter(view, requires_grad=False) if kind == "_parameters" else view
            getattr(module, kind)[name] = made[off]
        self.bound = True


class BlockSwap:
    """Keep the frozen weights of all but the last ``resident`` of ``blocks`` in pinned CPU memory and stream each
    to ``device`` just before it runs, prefetching the next one on a side stream (module docstring: how and why).

    ``blocks`` in execution order (``kern.gpu.accel.blocks``); their weights may be anywhere (CPU or ``device``):
    swapped blocks are packed into pinned memory (their GPU copies are freed), resident ones moved to ``device``.
    On a CPU ``device`` (tests) loading is a plain copy and there is no stream, so the logic runs unchanged.
    ``events``: set it to a list to record ``("load", i)`` / ``("drop", i)`` as they happen.
    """

    def __init__(self, blocks: Sequence[nn.Module], resident: int, device: torch.device | str) -> None:
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        n = len(self.blocks)
        self.resident = max(0, min(int(resident), n))
        self.slots: dict[int, _Slot] = {}
        for i, block in enumerate(self.blocks):
            if i < n - self.resident:
                self.slots[i] = _Slot(block, pin=self.cuda)
                block.__dict__["_apply"] = _skip_apply(block)  # model.to(...) leaves it where BlockSwap keeps it
            else:
                block.to(self.device)
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.events: list[tuple[str, int]] | None = None
        self.loads = 0
        self._hooks = [
            h
            for i, b in enumerate(self.blocks)
            for h in (b.register_forward_pre_hook(self._pre_hook(i)), b.register_forward_hook(self._post_hook(i)))
        ]

    @property
    def swapped(self) -> list[int]:
        return sorted(self.slots)

    def swapped_bytes(self) -> int:
        return sum(s.cpu.numel() for s in self.slots.values())

    # ------------------------------------------------------------------ the hook

    def _pre_hook(self, i: int):
        def hook(module, args):
            self._enter(i, backward=torch._C._current_graph_task_id() != -1)  # -1: not inside a backward pass

        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            # Forward with grad: arm a hook on the outputs' gradients. It fires when backward reaches this block,
            # before any of the block's own nodes run, hence before the checkpoint recomputes the block.
            if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
                return
            for t in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(self._grad_hook(i))  # entering twice is a no-op

        return hook

    def _grad_hook(self, i: int):
        def hook(grad):
            self._enter(i, backward=True)

        return hook

    def _enter(self, i: int, backward: bool) -> None:
        """Block ``i`` is about to run (forward, or its recompute in backward): make sure it is on the device, start
        fetching the next swapped block in this direction, and drop every other loaded block."""
        nxt = self._next(i, -1 if backward else 1)
        keep = {i, nxt}
        if not backward and nxt is None:  # past the last swapped block: keep it, backward starts with it
            keep.add(self._next(i, -1))
        for j, slot in self.slots.items():
            if j not in keep and slot.gpu is not None:
                self._drop(j)
        if i in self.slots:
            self._fetch(i)
            self._bind(i)
        if nxt is not None:
            self._fetch(nxt)

    def _next(self, i: int, step: int) -> int | None:
        j = i + step
        while 0 <= j < len(self.blocks):
            if j in self.slots:
                return j
            j += step
        return None

    # ------------------------------------------------------------------ moving weights

    def _fetch(self, i: int) -> None:
        """Start copying block ``i``'s weights to the device (no-op if already there or on the way)."""
        slot = self.slots[i]
        if slot.gpu is not None:
            return
        self.loads += 1
        if self.events is not None:
            self.events.append(("load", i))
        if not self.cuda:
            slot.gpu = slot.cpu.clone()
            return
        with torch.cuda.stream(self.stream):
            slot.gpu = torch.empty_like(slot.cpu, device=self.device)
            slot.gpu.copy_(slot.cpu, non_blocking=True)
            slot.ready = torch.cuda.Event()
            slot.ready.record(self.stream)

    def _bind(self, i: int) -> None:
        """Make block ``i`` use its device copy; the compute stream waits for the copy, not the host."""
        slot = self.slots[i]
        if slot.bound:
            return
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(slot.ready)
            slot.gpu.record_stream(compute)  # allocated on the side stream, read on this one
        slot.swap_in()

    def _drop(self, i: int) -> None:
        if self.events is not None:
            self.events.append(("drop", i))
        self.slots[i].swap_out()

    # ------------------------------------------------------------------ lifetime

    def drop_all(self) -> None:
        """Release every block's device copy (e.g. before something else needs the memory)."""
        for j, slot in self.slots.items():
            if slot.gpu is not None:
                self._drop(j)

    def remove(self) -> None:
        """Remove the hooks; swapped blocks keep their weights in (pinned) CPU memory and follow ``.to()`` again."""
        self.drop_all()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for i in self.slots:
            self.blocks[i].__dict__.pop("_apply", None)


def _skip_apply(block: nn.Module):
    def _apply(fn, recurse=True):
        return block

    return _apply


class ActivationOffload:
    """Run ``model``'s forward under ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` (entered in a forward
    pre-hook, left in an always-called forward hook), so the tensors autograd saves outside checkpointed blocks
    wait for backward in pinned CPU memory. Costs a device-to-host copy per saved tensor (``save_on_cpu`` copies
    synchronously) and the copy back in backward. ``remove()`` takes the hooks off."""

    def __init__(self, model: nn.Module) -> None:
        self._stack: list = []
        self._hooks = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit, always_call=True),
        ]

    def _enter(self, module, args):
        if torch.is_grad_enabled():
            ctx = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
            ctx.__enter__()
            self._stack.append(ctx)
        else:
            self._stack.append(None)

    def _exit(self, module, args, output):
        ctx = self._stack.pop() if self._stack else None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
