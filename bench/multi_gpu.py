"""Several GPUs: data-parallel scaling and the sharded base (``train.shard_base``), with kern's training step.

Run under torchrun (or ``accelerate launch``). Every process runs ``kern.train.driver.train_step`` on its own batch (the
bench/train_step.py protocol: rank-16 LoRA on the default targets, one 1024² image, bf16 base, fp32 adapter,
AdamW, gradient checkpointing) with the job's default fast paths (``kern.gpu.accel.apply``: compiled blocks unless the
base is sharded); accelerate wraps the trainee in DDP as ``kern train`` does. With ``--shard-base``
the transformer is built on the meta device, sharded with ``kern.gpu.distributed.shard_frozen`` (FSDP2 per block)
and only each process's shard is allocated, with random weights. Rank 0 prints one JSON line: the median over
steps of the slowest rank's step time, images per second, and every rank's peak memory.

    torchrun --nproc_per_node 1 bench/multi_gpu.py --config klein4b            # the one-GPU reference
    torchrun --nproc_per_node 2 bench/multi_gpu.py --config klein4b            # DDP: scaling = 2 x t1 / t2
    torchrun --nproc_per_node 2 bench/multi_gpu.py --config dev --shard-base   # the 32B base over two cards
    torchrun --nproc_per_node 2 bench/multi_gpu.py --tiny --shard-base         # CPU (gloo) smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (
    ROOT / "plugins" / "qwen_image",
    ROOT / "plugins" / "lora",
    ROOT / "plugins" / "flux2",
    ROOT / "cli",
    ROOT / "kernel",
    ROOT,
):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch

from bench.train_step import CONFIGS, Timer, _default_dtype, _quiet_logs, kern_manager


def _random_(model: torch.nn.Module) -> None:
    """Random weights for a model materialised with ``to_empty``: matrices N(0, 0.02), biases 0, norm gains 1.
    Sharded parameters are filled shard by shard (their local tensors)."""
    with torch.no_grad():
        for name, q in model.named_parameters():
            local = q.to_local() if hasattr(q, "to_local") else q
            if q.dim() >= 2:
                local.normal_(0.0, 0.02)
            elif name.endswith("bias"):
                local.zero_()
            else:
                local.fill_(1.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="klein4b", choices=sorted(CONFIGS))
    ap.add_argument("--shard-base", action="store_true", help="FSDP2-shard the frozen base across the processes")
    ap.add_argument("--res", type=int, default=None, help="square image side (default 1024; 64 with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 8; 2 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --tiny)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-ckpt", action="store_true")
    ap.add_argument(
        "--tiny", action="store_true", help="toy sizes, fp32, on the CPU (gloo): tests this script, measures nothing"
    )
    args = ap.parse_args(argv)
    _quiet_logs()

    from accelerate import Accelerator
    from kern.core.config import JobConfig, ModelConfig, NetworkConfig, TrainConfig
    from kern.gpu import accel, distributed
    from kern.records import TargetSpec
    from kern.train import driver as train
    from kern.train import optim

    dtype = torch.float32 if args.tiny else torch.bfloat16
    res, steps, warmup = (
        args.res or (64 if args.tiny else 1024),
        args.steps or (2 if args.tiny else 8),
        args.warmup or (1 if args.tiny else 3),
    )
    cfg = CONFIGS[args.config]
    family = cfg.family
    job = JobConfig(
        model=ModelConfig(arch=cfg.arch, dtype=str(dtype).removeprefix("torch.")),
        network=NetworkConfig(type="lora", options={"rank": args.rank, "alpha": float(args.rank)}),
        train=TrainConfig(
            steps=warmup + steps,
            learning_rate=1e-4,
            optimizer="adamw",
            mixed_precision="no" if args.tiny else "bf16",
            gradient_checkpointing=not args.no_ckpt,
            seed=0,
            device="cpu" if args.tiny else None,
            shard_base=args.shard_base,
        ),
    )
    job.source = "bench/multi_gpu.py"
    plan = train.prepare(job, kern_manager(family))
    arch, variant = plan.arch, plan.arch.variant(plan.variant)
    acc = Accelerator(mixed_precision=job.train.mixed_precision, cpu=args.tiny)
    dev = acc.device
    p = family.params(variant.name, args.tiny)
    if args.shard_base:
        with _default_dtype(dtype), torch.device("meta"):
            transformer = family.build_kern(p)
        transformer.requires_grad_(False)
        distributed.shard_frozen(transformer, dev)
        transformer.to_empty(device=dev)
        torch.manual_seed(acc.process_index)
        _random_(transformer)
    else:
        with _default_dtype(dtype), torch.device(dev):
            transformer = family.build_kern(p)
        transformer.requires_grad_(False)
    transformer.eval()
    targets = TargetSpec(targets=arch.default_targets, exclude=tuple(arch.default_excludes))
    torch.manual_seed(0)
    network = plan.hook.make_network(
        network_type="lora", model=transformer, targets=targets, options=plan.network_options
    )
    network.to(dev)
    network.train()
    fast = accel.apply(
        transformer, job.train, dev
    )  # as kern.train.driver.run: checkpointing, attention, compiled blocks
    groups = network.optimizer_param_groups(job.train.learning_rate)
    optimizer = optim.make_optimizer("adamw", groups, job.train.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    trainee = train.Trainee(plan, variant.name, transformer, network)
    if args.shard_base:  # as kern.train.driver.run does it: the base is sharded already, DDP for the adapter
        distributed.keep_out_of_ddp(trainee, transformer)
        trainee = torch.nn.parallel.DistributedDataParallel(
            trainee, device_ids=[dev.index or 0] if dev.type == "cuda" else None
        )
        optimizer, scheduler = acc.prepare(optimizer, scheduler)
    else:
        trainee, optimizer, scheduler = acc.prepare(trainee, optimizer, scheduler)
    trainee.train()
    acc.unwrap_model(trainee).transformer.eval()

    h = w = res // 16
    x0, text = family.kern_inputs(p, 1, h, w, 32 if args.tiny else family.n_txt, dev, dtype)
    generator = torch.Generator().manual_seed(acc.process_index)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timer, times = Timer(dev), []
    for i in range(warmup + steps):
        timer.start()
        loss, _ = train.train_step(acc, trainee, optimizer, scheduler, plan, x0, text, None, generator, dtype)
        dt = timer.stop()
        if i >= warmup:
            times.append(dt)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None
    mine = {"times": times, "peak_gib": peak, "loss_finite": bool(torch.isfinite(loss).item())}
    everyone = [mine]
    if acc.num_processes > 1:
        everyone = [None] * acc.num_processes
        torch.distributed.all_gather_object(everyone, mine)
    if acc.is_main_process:
        slowest = [max(r["times"][i] for r in everyone) for i in range(steps)]
        step_s = statistics.median(slowest)
        print(
            json.dumps(
                {
                    "kind": "multi_gpu",
                    "config": args.config,
                    "processes": acc.num_processes,
                    "shard_base": args.shard_base,
                    "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                    "res": res,
                    "ckpt": not args.no_ckpt,
                    "step_s": round(step_s, 4),
                    "images_per_s": round(acc.num_processes / step_s, 3),
                    "peak_gib": [r["peak_gib"] for r in everyone],
                    "loss_finite": all(r["loss_finite"] for r in everyone),
                    "lora_modules": len(acc.unwrap_model(trainee).network.adapters),
                    "fast_paths": fast,
                }
            ),
            flush=True,
        )
    acc.wait_for_everyone()
    acc.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
