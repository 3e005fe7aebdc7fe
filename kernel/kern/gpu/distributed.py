"""Several processes, one adapter: data parallel for the adapter, and optionally the frozen base sharded.

Plain data parallel (``accelerate launch --multi_gpu``) gives every process a whole base model; only the
adapter's gradients are averaged. With ``train.shard_base`` each process keeps 1/N of the frozen base
weights (FSDP2 ``fully_shard`` per repeated block, all-gathered just for that block's forward and its
checkpoint recompute), so a model larger than one card trains across several; the adapter stays whole on
every process and DDP still averages its gradients. The adapter is small, so replicating it costs
little, and it keeps saving, resuming and the replica check exactly as without sharding.

The kernel knows no architecture: the repeated blocks are those the transformer names in its ``block_lists``
class attribute (``kern.gpu.accel.blocks``), the same convention compiled blocks and block swap use.
"""

from __future__ import annotations

import torch
from torch import nn

from kern.errors import UsageError
from kern.log import get_logger

log = get_logger(__name__)


def check_launch(accelerator) -> None:
    """kern shards the base itself (``train.shard_base``): accelerate's own FSDP would shard the adapter too."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UsageError(
            f"accelerate is configured for {accelerator.distributed_type.value}; kern trains adapters with data parallel"
            " (launch with --multi_gpu or examples/accelerate/multi_gpu.yaml) and shards the frozen base itself:"
            " set train.shard_base = true"
        )


def shard_base(
    trainee: nn.Module, transformer: nn.Module, device: torch.device, find_unused: bool = False
) -> nn.Module:
    """Shard ``transformer`` (frozen, on the CPU or the device; a child of ``trainee``) across the process group
    and return ``trainee`` wrapped in DDP for the adapter alone. accelerate refuses to wrap a model holding
    sharded (DTensor) parameters, so prepare only the optimizer and scheduler with it."""
    from torch.nn.parallel import DistributedDataParallel

    shard_frozen(transformer, device)
    keep_out_of_ddp(trainee, transformer)
    return DistributedDataParallel(
        trainee, device_ids=[device.index or 0] if device.type == "cuda" else None, find_unused_parameters=find_unused
    )


def shard_frozen(transformer: nn.Module, device: torch.device) -> int:
    """FSDP2 over the process group: one unit per repeated block plus the rest at the top. Parameters on the CPU
    move to ``device`` shard by shard; on the meta device they stay there (``to_empty`` then allocates shards)."""
    from torch.distributed.fsdp import fully_shard

    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise UsageError(
            "train.shard_base needs several processes: launch with `accelerate launch --multi_gpu --num_processes N kern train ...`"
        )
    if any(p.requires_grad for p in transformer.parameters()):
        raise UsageError("train.shard_base shards the frozen base only; the transformer has trainable parameters")
    from kern.gpu.accel import blocks as repeated_blocks

    blocks = repeated_blocks(transformer)
    if not blocks:
        raise UsageError(
            f"train.shard_base: {type(transformer).__name__} names no block_lists (its repeated blocks) to shard by"
        )
    mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)  # gathered for its forward (and checkpoint recompute), freed after
    fully_shard(transformer, mesh=mesh)  # embedders, modulation, final layer
    log.info("base sharded", blocks=len(blocks), processes=torch.distributed.get_world_size())
    return len(blocks)


def keep_out_of_ddp(trainee: nn.Module, transformer: nn.Module) -> None:
    """DDP (which ``accelerate.prepare`` wraps ``trainee`` in) syncs the adapter only, not the sharded base."""
    from torch.nn.parallel import DistributedDataParallel

    prefix = next(name for name, module in trainee.named_children() if module is transformer)
    ignored = [f"{prefix}.{name}" for name, _ in transformer.named_parameters()] + [
        f"{prefix}.{name}" for name, _ in transformer.named_buffers()
    ]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(trainee, ignored)
