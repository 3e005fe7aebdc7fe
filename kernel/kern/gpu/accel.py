"""GPU fast paths of the training step, in one place: attention backend, per-block checkpointing, compiled blocks.

``apply(transformer, train, device)`` is the one entry: ``kern.train.driver.run`` and ``bench/train_step.py`` both call
it after the network is attached, so the benchmark measures the trainer's real path. It never names an
architecture. What it needs from the transformer is one class attribute:

    block_lists = ("double_blocks", "single_blocks")   # names of the nn.ModuleLists of repeated blocks

Each block of those lists gets its ``forward`` wrapped in activation checkpointing (``full``: keep only the
block's inputs; ``selective``: also keep the attention outputs, the costliest op to recompute per byte kept),
and, with ``compile = "blocks"``, is compiled on its own (``torch.compile`` of the block, ``dynamic=False``):
the blocks of one class share their compiled code, the checkpoint is traced into the compiled graph, and the
adapters' patched ``Linear.forward`` are traced with it. A transformer without ``block_lists`` keeps its own
``gradient_checkpointing`` switch (when it has one) and is not compiled.

Memory options (the other half of issue 8, ``kern.gpu.fp8`` and ``kern.gpu.offload``): ``prepare_base`` quantises
the frozen Linears to fp8 before the network is built (``train.base_precision = "fp8"``), and ``apply`` sets up
``BlockSwap`` for ``train.blocks_to_swap`` blocks. With block swap, and with fp8 under full checkpointing, a
compiled block compiles only its own forward and the checkpoint stays eager around it (``compile_inner``), so
the checkpoint, not the compiled graph, decides what backward keeps. fp8 with ``"selective"`` checkpointing
compiles the checkpoint into the graph instead: the compiler then keeps some fp8 matmul results rather than
recomputing them, the fastest fp8 step (bench/RESULTS.md).

Exactness: compile is off on the CPU by default (``auto``), so the fp32 conformance and resume tests run the
eager code; the checkpoint wrappers recompute exactly what was run, so gradients equal the unchecked ones.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kern.log import get_logger

log = get_logger(__name__)


def checkpoint_mode(value: bool | str) -> str:
    """``train.gradient_checkpointing`` as one of "off", "full", "selective"."""
    if value is True or value == "full":
        return "full"
    if value is False:
        return "off"
    return value


def compile_enabled(value: str, device: torch.device, sharded: bool = False) -> bool:
    """``auto``: compile on CUDA only (the CPU runs the eager code the exactness tests check), and not for an
    FSDP2-sharded base (``train.shard_base``: compiled blocks under sharding are not measured yet)."""
    return value == "blocks" or (value == "auto" and device.type == "cuda" and not sharded)


# --------------------------------------------------------------------------- attention

# The SDPA backends each ``train.attention`` value allows, in order of preference. "flash_attn" (a flash-attention
# package, kern.gpu.attention) keeps auto's order for the calls the package cannot take.
_BACKENDS = {
    "auto": ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "flash_attn": ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "flash": ("FLASH_ATTENTION",),
    "cudnn": ("CUDNN_ATTENTION",),
    "efficient": ("EFFICIENT_ATTENTION",),
    "math": ("MATH",),
}
_saved_attention: tuple[Any, ...] | None = None  # torch's settings before set_attention, for reset_attention


def set_attention(name: str) -> str:
    """Choose the attention backend process-wide (``train.attention``) and return what was chosen. SDPA values pick
    ``F.scaled_dot_product_attention``'s backends (``auto`` prefers cuDNN, then flash, then the others);
    ``flash_attn`` routes ``kern.gpu.attention.attention`` through the installed flash-attention package (a
    ``ConfigError`` naming the key when there is none). Process-wide rather than a context manager around each
    call, so compiled blocks see it when they are traced and eager blocks pay nothing per call."""
    global _saved_attention
    from torch.nn.attention import SDPBackend, _sdpa_kernel

    from kern.gpu import attention

    chosen = name
    if name == "flash_attn":
        found = attention.flash_attn_package()
        if found is None:
            from kern.errors import ConfigError

            raise ConfigError(
                "train.attention = 'flash_attn' needs a flash-attention package: pip install flash-attn"
                " (FlashAttention-2) or FlashAttention-3's flash_attn_interface; or set it to 'auto'"
            )
        chosen = found[0]
        attention.use_flash_attn(found[1])
    else:
        attention.use_flash_attn(None)

    if _saved_attention is None:
        b = torch.backends.cuda
        _saved_attention = (
            b.flash_sdp_enabled(),
            b.mem_efficient_sdp_enabled(),
            b.math_sdp_enabled(),
            b.cudnn_sdp_enabled(),
            torch._C._get_sdp_priority_order(),
        )
    _sdpa_kernel([getattr(SDPBackend, n) for n in _BACKENDS[name]], set_priority=True)
    return chosen


def reset_attention() -> None:
    """Back to torch's own SDPA settings (the benchmark does this before it runs the anchor)."""
    global _saved_attention
    from kern.gpu import attention

    attention.use_flash_attn(None)
    if _saved_attention is None:
        return
    flash, efficient, math_, cudnn, priority = _saved_attention
    b = torch.backends.cuda
    b.enable_flash_sdp(flash)
    b.enable_mem_efficient_sdp(efficient)
    b.enable_math_sdp(math_)
    b.enable_cudnn_sdp(cudnn)
    torch._C._set_sdp_priority_order(priority)
    _saved_attention = None


# --------------------------------------------------------------------------- checkpointing


_ATTENTION_OPS = tuple(
    op
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    if (op := getattr(torch.ops.aten, name, None)) is not None
)


def _save_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Selective-checkpoint policy: keep attention outputs (O(L²) work for O(L) memory), recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op in _ATTENTION_OPS or getattr(op, "overloadpacket", None) in _ATTENTION_OPS or "flash_attn" in str(op):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context() -> Any:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_save_attention)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A block's forward under activation checkpointing (bound to the block by ``wrap_checkpoint``).

    One module-level function for every block, so compiled blocks of one class share their code. Keyed on
    grad mode, not ``self.training``: kern trains adapters with the frozen base in eval mode, and sampling
    runs under no_grad. ``_kern_inner``: the block's own forward compiled on its own, when the checkpoint has
    to stay outside the compiled graph (``compile_inner``)."""
    if self._kern_inner is not None:
        fn = self._kern_inner
    else:
        fn, args = type(self).forward, (self, *args)
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    if self._kern_checkpoint == "selective":
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_selective_context, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def wrap_checkpoint(block: nn.Module, mode: str) -> None:
    """Checkpoint ``block`` ("full" or "selective") by replacing its ``forward`` with an instance-level bound method;
    the module tree and state-dict keys stay as they were."""
    block._kern_checkpoint = mode
    block._kern_inner = None
    block.forward = types.MethodType(_checkpointed_forward, block)


def blocks(transformer: nn.Module) -> list[nn.Module]:
    """The repeated blocks the transformer names in its ``block_lists`` class attribute (empty if it has none)."""
    out = []
    for name in getattr(transformer, "block_lists", ()):
        out.extend(getattr(transformer, name))
    return out


# --------------------------------------------------------------------------- compile


def _configure_dynamo() -> None:
    """Room for the compiled variants one run needs (block classes × grad / no-grad × bucket shapes), and a log
    line for each recompile so a per-step recompile shows up."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, key):
            setattr(cfg, key, max(getattr(cfg, key), 64))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 512)


def compile_inner(block: nn.Module, backend: str = "inductor") -> None:
    """Compile only the block's own forward and leave the (eager) checkpoint around it, for block swap and fp8 base
    weights: a checkpoint compiled into the graph keeps the graph's inputs, the block's weights among them, for
    backward, which held every swapped block's GPU copy (measured: no memory saved), and with fp8 weights the
    compiled-checkpoint step peaked 4.5 GiB above the eager one (bench/RESULTS.md)."""
    inner = torch.compile(types.MethodType(type(block).forward, block), backend=backend, dynamic=False, fullgraph=True)
    block._kern_inner = inner


def compile_block(block: nn.Module, backend: str = "inductor") -> None:
    """``torch.compile`` one block's ``forward`` in place (static shapes, one graph), the checkpoint wrapper included.

    The forward rather than the module's whole call (``nn.Module.compile``), so module hooks stay outside the
    graph (block swap drives its weight copies from hooks); parameters and state-dict keys are unchanged."""
    block.forward = torch.compile(block.forward, backend=backend, dynamic=False, fullgraph=True)


# --------------------------------------------------------------------------- the entry


def prepare_base(
    transformer: nn.Module, train: Any, device: torch.device | str, keep: Sequence[str] = ()
) -> dict[str, Any]:
    """Before the network is built (adapters wrap the layers' forward as they find them): fp8 base weights for
    ``train.base_precision = "fp8"`` (``kern.gpu.fp8.quantize_base``; quantised layer by layer on the GPU when
    there is one), except the Linears whose paths match ``keep`` (the architecture's ``keep_high_precision``). A base that ``base_device`` put on the CPU only so it could be quantised there goes to
    ``device`` afterwards (fp8 bytes only: the bf16 model never has to fit the GPU).

    The input-gradient matmul is fp8 too when the blocks are compiled: the gradient's quantisation fuses into
    the compiled backward and the step is 6 % faster (4B model, bench/RESULTS.md); eager it costs more than it
    saves, so eager blocks dequantise the weight for a bf16 matmul instead. Loss over 20 steps: the same as the
    bf16-backward fp8 run to 3e-5."""
    device = torch.device(device)
    if train.base_precision != "fp8":
        return {}
    from kern.gpu.fp8 import quantize_base

    sharded = bool(getattr(train, "shard_base", False))
    backward = "fp8" if compile_enabled(train.compile, device, sharded=sharded) else "bf16"
    n = quantize_base(transformer, skip=keep, backward=backward, device=device if device.type == "cuda" else None)
    if device.type == "cuda" and train.blocks_to_swap == 0 and not sharded:
        transformer.to(device)
    return {"fp8_layers": n, "fp8_backward": backward}


def base_device(train: Any, device: torch.device | str) -> torch.device:
    """Where the transformer should be loaded: the CPU when blocks are to be swapped (the whole model need not fit
    the GPU; ``apply`` moves what stays resident) or when an fp8 base is to be quantised on a GPU
    (``prepare_base`` moves it over once it is fp8), else ``device``."""
    device = torch.device(device)
    if train.blocks_to_swap > 0 or (train.base_precision == "fp8" and device.type == "cuda"):
        return torch.device("cpu")
    return device


def apply(transformer: nn.Module, train: Any, device: torch.device | str) -> dict[str, Any]:
    """Apply ``train.attention``, ``train.gradient_checkpointing``, ``train.blocks_to_swap`` and ``train.compile`` to
    ``transformer`` (call it after the network is attached, before the first step; ``prepare_base`` comes before
    the network). Returns what was done, for the log and the benchmark."""
    device = torch.device(device)
    mode = checkpoint_mode(train.gradient_checkpointing)
    done: dict[str, Any] = {"checkpointing": mode, "attention": train.attention, "compile": "off"}
    if device.type == "cuda":
        done["attention"] = set_attention(train.attention)
    repeated = blocks(transformer)
    if not repeated and train.blocks_to_swap:
        from kern.errors import ConfigError

        raise ConfigError(
            f"train.blocks_to_swap = {train.blocks_to_swap}: {type(transformer).__name__} names no block_lists"
            " to swap; set it to 0"
        )
    if not repeated:
        if hasattr(transformer, "gradient_checkpointing"):
            transformer.gradient_checkpointing = mode != "off"
        if mode == "selective" or train.compile == "blocks":
            log.warning(
                "the transformer names no block_lists: selective checkpointing and compiled blocks are not"
                " available for it; using its own checkpointing switch",
                transformer=type(transformer).__name__,
            )
        done["checkpointing"] = "full" if mode != "off" else "off"
        return done
    if (
        train.blocks_to_swap
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        from kern.errors import ConfigError

        raise ConfigError(
            "train.blocks_to_swap works in one process only (every process would stream its own copy);"
            " set it to 0 or use train.shard_base"
        )
    if train.blocks_to_swap and mode == "off":
        log.warning(
            "train.blocks_to_swap without gradient checkpointing saves no memory: autograd keeps every block's"
            " weights for backward"
        )
    if hasattr(transformer, "gradient_checkpointing"):
        transformer.gradient_checkpointing = False  # the per-block wrappers below do it instead
    compiled = compile_enabled(train.compile, device, sharded=bool(getattr(train, "shard_base", False)))
    # Block swap always needs the checkpoint outside the graph (see compile_inner); fp8 needs it for its memory
    # saving, unless "selective" asks to spend memory on speed: then the compiled checkpoint keeps what it likes.
    offload = bool(getattr(train, "offload_activations", False))
    if offload and mode == "off":
        from kern.errors import ConfigError

        raise ConfigError(
            "train.offload_activations needs gradient checkpointing (without it every activation would"
            " cross PCIe): set train.gradient_checkpointing = true, or offload_activations = false"
        )
    # The saved-tensor hooks of activation offload must see the checkpoint's inputs: the checkpoint stays eager.
    inner = (
        compiled
        and mode != "off"
        and (train.blocks_to_swap > 0 or offload or (train.base_precision == "fp8" and mode == "full"))
    )
    if inner and mode == "selective":
        log.warning(
            "selective checkpointing cannot see inside a block compiled on its own (block swap, activation"
            " offload): using full checkpointing"
        )
        mode = done["checkpointing"] = "full"
    if mode != "off":
        budget = len(repeated) if train.selective_blocks is None else train.selective_blocks
        for i, block in enumerate(repeated):
            wrap_checkpoint(block, "selective" if mode == "selective" and i < budget else "full")
        if mode == "selective" and budget < len(repeated):
            done["selective_blocks"] = min(budget, len(repeated))
    if train.blocks_to_swap > 0:
        from kern.gpu.offload import BlockSwap

        swap = BlockSwap(repeated, resident=len(repeated) - train.blocks_to_swap, device=device)
        transformer.__dict__["_kern_block_swap"] = swap  # a handle (not a submodule); its hooks keep it alive anyway
        transformer.to(device)  # the rest of the model; swapped blocks stay in pinned CPU memory
        done["blocks_swapped"] = len(swap.swapped)
    if offload:
        from kern.gpu.offload import ActivationOffload

        transformer.__dict__["_kern_activation_offload"] = ActivationOffload(transformer)
        done["activations"] = "offloaded"
    if compiled:
        _configure_dynamo()
        for block in repeated:
            (compile_inner if inner else compile_block)(block)
        done["compile"] = "blocks (inner forward)" if inner else "blocks"
    done["blocks"] = len(repeated)
    return done  # the trainer logs it with the rest of the run's set-up (kern.train.presets.summary)


def apply_inference(transformer: nn.Module, compile: str, attention: str, device: torch.device | str) -> dict[str, Any]:
    """Generation's fast paths: the SDPA backend (``attention``, on CUDA) and, with ``compile = "blocks"``, every
    repeated block compiled on its own (no checkpointing: nothing needs gradients). Opt-in rather than ``auto``:
    the first image pays 20–50 s of compilation, which only a long batch or many steps earn back."""
    device = torch.device(device)
    done: dict[str, Any] = {"attention": attention, "compile": "off"}
    if device.type == "cuda":
        done["attention"] = set_attention(attention)
    if compile == "blocks":
        repeated = blocks(transformer)
        if not repeated:
            log.warning(
                "the transformer names no block_lists: nothing to compile", transformer=type(transformer).__name__
            )
            return done
        _configure_dynamo()
        for block in repeated:
            compile_block(block)
        done.update(compile="blocks", blocks=len(repeated))
    return done


def compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process: read before and after a step to see that steps after
    the first do not recompile."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))
