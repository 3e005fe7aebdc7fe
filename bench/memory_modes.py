"""Memory modes of a LoRA training step: bf16 base, fp8 base weights, block swap, both; step time, peak memory, loss.

Same protocol and the same kern path as ``bench/train_step.py`` (whose helpers this imports): rank-16 LoRA on the
architecture's default targets, fp32 adapter, AdamW, gradient checkpointing per block, one 1024² image, 512 text
tokens for FLUX.2 / 128 for Qwen-Image, batch 1, random weights, each step ``kern.train.driver.train_step``. What differs:

* the transformer is built on the meta device and materialised **one block at a time** on the GPU (random init,
  then fp8 quantisation when asked, then to the CPU when the block will be swapped), so the GPU never holds more
  than the run keeps there plus one block: a 64 GB model can be set up under a 24 GiB cap;
* ``--cap`` runs go under ``torch.cuda.set_per_process_memory_fraction`` from before the build to the last step,
  and peak memory is ``torch.cuda.max_memory_allocated`` over the same span (``peak_gib``); ``steady_peak_gib`` is
  the peak of the timed steps alone (after warm-up: without build and first-step compile transients);
* block swap (``kern.gpu.offload.BlockSwap``) needs the blocks uncompiled (its hooks must run in Python), so modes
  with swap run with ``compile = "off"``; the others use ``--compile`` (default ``off``: this measures what the
  memory modes cost or save, the compute speed-ups are train_step.py's business).

Modes (``--modes``): ``bf16``, ``fp8`` (``kern.gpu.fp8.quantize_base``, dequantised bf16 input-gradient),
``fp8g`` (the same with the fp8 input-gradient matmul), ``swap`` / ``fp8swap`` (block swap under the config's
cap, bf16 / fp8 base). The number of resident blocks of a swap mode is planned from the same config's unswapped
run (what it used beside the blocks' weights) unless ``--resident`` gives it; an OOM retries with fewer.

Settings (``--runs``): instead of ``--configs`` x ``--modes``, name each run as ``CONFIG:key=value,...`` with
``base`` (fp8 | bf16, default fp8), ``swap`` (N: ``train.blocks_to_swap``, the first N blocks streamed from pinned
CPU memory, set up by ``kern.gpu.accel.apply`` as ``kern train`` does), ``act`` (``train.offload_activations``),
``cap`` (GiB: ``set_per_process_memory_fraction`` from the build to the last step) and ``compile`` (default ``off``),
e.g. ``dev:swap=56,act,cap=8``. A run that runs out of memory is reported and the next one starts.

Configs: train_step.py's, plus ``qwen_edit``: Qwen-Image-Edit-2511 (``zero_cond_t``; 2509 has the same shapes
without the t = 0 modulation) trained on one control image at 1024², what the edit model sees in training: the
control's 4096 reference tokens after the 4096 target tokens in every block, and 336 text tokens (the protocol's 128
plus the 196 vision tokens of the control at the 384² area the VLM reads it, and the "Picture 1:" label, rounded up).

Loss: every run records the loss of each step; with the same seed bf16 and fp8 runs see the same timesteps and
noise, so their curves are compared step by step (max |Δ| and max |Δ| / loss).

    python3 bench/memory_modes.py --configs klein4b klein9b --modes bf16 fp8 fp8swap --json-out $OUT/mm.jsonl
    python3 bench/memory_modes.py --runs qwen_edit:swap=46,cap=16 dev:swap=56,act,cap=8 --json-out $OUT/mm.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import train_step as ts
from torch import nn

# Issue 8's memory-mode caps (GiB): the step must fit there at no more than 3x the unconstrained kern step time.
CAPS = {"klein4b": 8.0, "klein9b": 12.0, "dev": 24.0, "qwen_image": 12.0, "qwen_edit": 24.0}
GIB = 2**30
EDIT_TEXT_TOKENS = 336  # 128 prompt tokens + 196 vision tokens of one 384² control + "Picture 1:" and markers


def _edit_params(variant: str, tiny: bool):
    from kern_qwen_image.params import QWEN_IMAGE_EDIT_2511, tiny_params

    return tiny_params(zero_cond_t=True) if tiny else QWEN_IMAGE_EDIT_2511


CONFIGS: dict[str, ts.Config] = {
    **ts.CONFIGS,
    "qwen_edit": ts.Config(
        dataclasses.replace(ts.QWEN, name="qwen_edit", n_txt=EDIT_TEXT_TOKENS, params=_edit_params),
        "qwen-image-edit-2511",
        "edit-2511",
    ),
}
CONTROLS = {"qwen_edit": 1}  # control images per item: reference latents at the target's size (1024² area)


@dataclass
class Run:
    config: str
    mode: str
    steps: int
    warmup: int
    res: int
    rank: int
    compile: str
    cap_gib: float | None = None
    resident: int | None = None  # swap modes: blocks kept on the GPU
    tiny: bool = False  # toy sizes on the CPU: tests this script, measures nothing
    blocks_to_swap: int | None = None  # --runs: swapped blocks (overrides resident)
    offload: bool = False  # --runs: train.offload_activations
    label: str | None = None  # --runs: the run's name in the output (mode otherwise)


def _init_(module: nn.Module) -> None:
    """Random weights as the constructors give them: nn.Linear's own init, norm scales 1, other biases 0."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
                continue
            for name, p in m.named_parameters(recurse=False):
                p.fill_(0.0 if name == "bias" else 1.0)


def build(
    cfg: ts.Config, p: Any, dev: torch.device, fp8: bool, n_swapped: int, keep: tuple[str, ...] = ()
) -> tuple[nn.Module, int]:
    """The transformer, block by block: materialise on ``dev``, quantise (fp8, but not the layers ``keep`` matches:
    the architecture's ``keep_high_precision``), move the first ``n_swapped`` blocks to the CPU. Returns (model,
    bytes of one average block as stored)."""
    from kern.gpu.accel import blocks as repeated_blocks
    from kern.gpu.fp8 import quantize_base

    with ts._default_dtype(torch.bfloat16), torch.device("meta"):
        model = cfg.family.build_kern(p)
    blocks = repeated_blocks(model)
    ids = {id(b) for b in blocks}
    stored = 0
    for i, block in enumerate(blocks):
        block.to_empty(device=dev)
        _init_(block)
        block.requires_grad_(False)
        if fp8:
            quantize_base(block, skip=keep)
        stored += sum(t.numel() * t.element_size() for t in (*block.parameters(), *block.buffers()))
        if i < n_swapped:
            block.to("cpu")
    for child in model.children():
        if isinstance(child, nn.ModuleList) and any(id(b) in ids for b in child):
            continue
        child.to_empty(device=dev)
        _init_(child)
    model.requires_grad_(False)
    model.eval()
    return model, stored // max(1, len(blocks))


def run(r: Run, dev: torch.device) -> dict:
    """One training run of ``r.warmup + r.steps`` steps; the same path as train_step.run_kern, plus the memory mode."""
    from accelerate import Accelerator
    from kern.core.config import JobConfig, ModelConfig, NetworkConfig, TrainConfig
    from kern.gpu.accel import blocks as repeated_blocks
    from kern.records import TargetSpec
    from kern.train import driver as train
    from kern.train import optim

    cfg = CONFIGS[r.config]
    family = cfg.family
    ts.free_memory(dev)
    _cap(dev, r.cap_gib)
    fp8 = r.mode.startswith("fp8")
    p = family.params(cfg.variant, r.tiny)
    n_blocks = len(repeated_blocks(_meta(cfg, p)))
    if r.blocks_to_swap is not None:
        resident = n_blocks - min(n_blocks, r.blocks_to_swap)
        compile_ = r.compile
    else:
        resident = min(n_blocks, r.resident) if r.mode in ("swap", "fp8swap") else n_blocks
        compile_ = "off" if resident < n_blocks else r.compile
    swapped = n_blocks - resident
    manager = ts.kern_manager(family)
    job = JobConfig(
        model=ModelConfig(arch=cfg.arch, dtype="bfloat16"),
        network=NetworkConfig(type="lora", options={"rank": r.rank, "alpha": float(r.rank)}),
        train=TrainConfig(
            steps=r.warmup + r.steps,
            learning_rate=1e-4,
            optimizer="adamw",
            max_grad_norm=0.0,
            mixed_precision="bf16",
            gradient_checkpointing=True,
            seed=0,
            device=dev.type,
            compile=compile_,
            # kern.gpu.accel.apply sets up BlockSwap and ActivationOffload from these, as kern train does; the
            # fp8 base is quantised block by block in build() (kern train: prepare_base, layer by layer)
            base_precision="fp8" if fp8 else "bf16",
            blocks_to_swap=swapped,
            offload_activations=r.offload,
        ),
    )
    job.source = "bench/memory_modes.py"
    plan = train.prepare(job, manager)
    variant = plan.arch.variant(plan.variant)
    acc = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=1, cpu=dev.type == "cpu")
    t0 = time.perf_counter()
    torch.manual_seed(1)  # every mode of a config gets the same random weights, so their losses compare
    transformer, block_bytes = build(cfg, p, dev, fp8, swapped, keep=plan.arch.keep_high_precision)
    if r.mode == "fp8g":
        for m in transformer.modules():
            if hasattr(m, "fp8_backward"):
                m.fp8_backward = True
    if not swapped:  # build() put everything on dev; with swap the first blocks wait on the CPU for BlockSwap
        transformer.to(dev)
    arch = plan.arch
    targets = TargetSpec(targets=arch.default_targets, exclude=tuple(arch.default_excludes))
    network = plan.hook.make_network(
        network_type="lora", model=transformer, targets=targets, options=plan.network_options
    )
    network.to(dev)
    _same_adapter_init(network)
    network.train()
    try:
        from kern.gpu import accel

        fast = accel.apply(transformer, job.train, dev)
    except ImportError:  # a checkout before kern.gpu.accel: the model's own checkpointing switch
        transformer.gradient_checkpointing = True
        fast = {"checkpointing": "full", "compile": "off"}
    swapper = transformer.__dict__.get("_kern_block_swap")  # accel.apply's BlockSwap (pins the swapped blocks)
    build_s = time.perf_counter() - t0
    groups = network.optimizer_param_groups(job.train.learning_rate)
    optimizer = optim.make_optimizer("adamw", groups, job.train.learning_rate)
    scheduler = optim.make_scheduler(optimizer, job.train)  # the job's default: constant, no warmup
    trainee = train.Trainee(plan, variant.name, transformer, network)
    trainee, optimizer, scheduler = acc.prepare(trainee, optimizer, scheduler)
    trainee.train()
    acc.unwrap_model(trainee).transformer.eval()
    h = w = r.res // 16
    torch.manual_seed(2)  # inputs too: adapters built on the CPU (swapped blocks) draw from another generator
    x0, text = family.kern_inputs(p, 1, h, w, 32 if r.tiny else family.n_txt, dev, torch.bfloat16)
    # Edit: the control images' latents, as the cache gives them (the driver casts them to the base dtype)
    refs = [torch.randn(1, *x0.shape[1:], device=dev) for _ in range(CONTROLS.get(r.config, 0))] or None
    generator = torch.Generator().manual_seed(0)
    timer, times, losses = ts.Timer(dev), [], []
    warm_peak = 0.0
    for i in range(r.warmup + r.steps):
        timer.start()
        loss, _ = train.train_step(acc, trainee, optimizer, scheduler, plan, x0, text, refs, generator, torch.bfloat16)
        dt = timer.stop()
        losses.append(loss.item())
        if i >= r.warmup:
            times.append(dt)
        if i == r.warmup - 1 and dev.type == "cuda":  # the whole-run peak stays in `peak`; this one is steps only
            warm_peak = torch.cuda.max_memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()
    out = {
        "kind": "result",
        "config": r.config,
        "mode": r.label or r.mode,
        "cap_gib": r.cap_gib,
        "step_s": round(statistics.median(times), 4),
        "step_min_s": round(min(times), 4),
        "step_max_s": round(max(times), 4),
        "step_times": [round(t, 4) for t in times],
        "peak_gib": _peak(dev, warm_peak),
        "steady_peak_gib": ts.peak_gib(dev),
        "steady_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2) if dev.type == "cuda" else None,
        "host_rss_gib": _rss_gib(),
        "blocks_to_swap": swapped,
        "offload_activations": fast.get("activations") == "offloaded",
        "controls": len(refs or ()),
        "text_tokens": text["ctx"].shape[1],
        "build_s": round(build_s, 1),
        "blocks": n_blocks,
        "resident": resident,
        "block_gib": round(block_bytes / GIB, 3),
        "swapped_gib": round(swapper.swapped_bytes() / GIB, 2) if swapper else 0.0,
        "loads": swapper.loads if swapper else 0,
        "compile": fast.get("compile"),
        "checkpointing": fast.get("checkpointing"),
        "steps": r.steps,
        "warmup": r.warmup,
        "losses": [round(v, 6) for v in losses],
        "lora_modules": len(network.adapters),
    }
    if swapper:
        swapper.remove()
    offload = transformer.__dict__.get("_kern_activation_offload")
    if offload:
        offload.remove()
    acc.free_memory()
    del trainee, optimizer, scheduler, network, transformer, swapper, offload, groups, loss, acc, refs
    try:
        from kern.gpu import accel

        accel.reset_attention()
        if out["compile"] not in (None, "off"):
            torch._dynamo.reset()
    except ImportError:
        pass
    ts.free_memory(dev)
    _cap(dev, None)
    return out


def _rss_gib() -> float | None:
    """Host memory of the process (pinned swapped blocks included), GiB; None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    return round(psutil.Process().memory_info().rss / GIB, 1)


def _peak(dev: torch.device, before: float) -> float | None:
    """Peak GiB from the build to the last step: the larger of the peak up to the warm-up's end and after it."""
    now = ts.peak_gib(dev)
    return None if now is None else round(max(before, now), 2)


def _cap(dev: torch.device, cap_gib: float | None) -> None:
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total) if cap_gib else 1.0)


def _same_adapter_init(network: nn.Module) -> None:
    """LoRA A from one CPU generator, B zero: the same adapter whichever device each adapter was built on, so runs
    of different modes compare step by step."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, q in network.named_parameters():
            if "lora_down" in name:
                bound = 1.0 / q.shape[1] ** 0.5  # kaiming_uniform(a=sqrt(5)), as LoRAModule initialises A
                q.copy_(torch.empty(q.shape).uniform_(-bound, bound, generator=g))
            elif "lora_up" in name:
                q.zero_()


def _meta(cfg: ts.Config, p: Any) -> nn.Module:
    with torch.device("meta"):
        return cfg.family.build_kern(p)


def plan_resident(unswapped: dict, cap_gib: float, margin_gib: float = 1.5) -> int:
    """Blocks that fit on the GPU beside what the unswapped run used for everything else (activations, the
    non-block weights, adapter and optimizer), with three swapped blocks on the device at once (the one running,
    the prefetched one, the one backward has not released yet) and a margin for fragmentation."""
    other = unswapped["peak_gib"] - unswapped["blocks"] * unswapped["block_gib"]
    room = cap_gib - margin_gib - other - 3 * unswapped["block_gib"]
    return max(0, min(unswapped["blocks"], int(room // unswapped["block_gib"])))


def linear_microbench(dev: torch.device) -> list[dict]:
    """Float8MatmulLinear against bf16 nn.Linear at the protocol's shapes: forward and forward+input-gradient times, error."""
    from kern.gpu.fp8 import quantize_base

    out = []
    shapes = [
        ("klein4b linear1", 4608, 3072, 27648),
        ("klein4b linear2", 4608, 12288, 3072),
        ("dev linear1", 4608, 6144, 55296),
        ("qwen to_q", 4096, 3072, 3072),
        ("qwen mlp.0", 4096, 3072, 12288),
    ]
    for name, m, k, n in shapes:
        torch.manual_seed(0)
        lin = nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16).requires_grad_(False)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        ref = x.double() @ lin.weight.double().T
        row: dict[str, Any] = {"kind": "linear", "shape": name, "m": m, "k": k, "n": n}
        for label in ("bf16", "fp8", "fp8g"):
            if label != "bf16":
                holder = nn.Sequential(lin)
                if label == "fp8":
                    quantize_base(holder, skip=())
                lin = holder[0]
                lin.fp8_backward = label == "fp8g"
            y = lin(x)
            row[f"{label}_err"] = round(((y.double() - ref).norm() / ref.norm()).item(), 5)
            row[f"{label}_fwd_ms"] = _time(lambda lin=lin, x=x: lin(x))
            row[f"{label}_fwdbwd_ms"] = _time(lambda lin=lin, x=x, gy=gy: torch.autograd.grad(lin(x), x, gy))
            tflop = 2 * m * k * n / 1e12
            row[f"{label}_fwd_tflops"] = round(tflop / row[f"{label}_fwd_ms"] * 1e3, 1)
        out.append(row)
    return out


def _time(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return round(s.elapsed_time(e) / reps, 3)


def copy_bandwidth(dev: torch.device) -> float:
    """Pinned host-to-device copy rate, GB/s (1 GiB)."""
    src = torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(GIB, dtype=torch.uint8, device=dev)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    rate = 5 * GIB / (time.perf_counter() - t) / 1e9
    del src, dst
    return round(rate, 1)


def compare_losses(results: list[dict]) -> list[dict]:
    """Per config, each mode's loss curve against the bf16 run's (same seed: same timesteps and noise)."""
    out = []
    by = {(x["config"], x["mode"]): x for x in results if x.get("kind") == "result"}
    for (config, mode), x in by.items():
        ref = "fp8" if mode == "fp8swap" else "bf16"  # swapping must not change the numbers at all
        base = by.get((config, ref))
        if mode == "bf16" or base is None:
            continue
        n = min(len(x["losses"]), len(base["losses"]))
        d = [abs(a - b) for a, b in zip(x["losses"][:n], base["losses"][:n])]
        rel = [di / abs(b) for di, b in zip(d, base["losses"][:n]) if b]
        out.append(
            {
                "kind": "loss",
                "config": config,
                "mode": mode,
                "against": ref,
                "steps": n,
                "max_abs_diff": round(max(d), 6),
                "max_rel_diff": round(max(rel), 5),
                "mean_rel_diff": round(sum(rel) / len(rel), 5),
            }
        )
    return out


def parse_run(spec: str, a: argparse.Namespace) -> Run:
    """``CONFIG:key=value,...`` (see the module's docstring) as a Run; ValueError naming what is wrong."""
    config, _, settings = spec.partition(":")
    if config not in CONFIGS:
        raise ValueError(f"--runs {spec}: no config {config!r}; configs: {', '.join(sorted(CONFIGS))}")
    r = Run(config, "fp8", a.steps, a.warmup, a.res, a.rank, "off", tiny=a.tiny, blocks_to_swap=0)
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if key == "base" and value in ("fp8", "bf16"):
            r.mode = value
        elif key == "swap" and value.isdigit():
            r.blocks_to_swap = int(value)
        elif key == "act" and value in ("", "true"):
            r.offload = True
        elif key == "cap" and value:
            r.cap_gib = None if a.tiny else float(value)
        elif key == "compile" and value in ("auto", "blocks", "off"):
            r.compile = value
        else:
            raise ValueError(
                f"--runs {spec}: cannot read {item!r}; settings: base=fp8|bf16, swap=N, act, cap=GiB,"
                " compile=auto|blocks|off"
            )
    r.label = settings or r.mode
    return r


def _failed(r: Run, error: str, detail: str) -> dict:
    return {
        "kind": "error",
        "error": error,
        "config": r.config,
        "mode": r.label or r.mode,
        "cap_gib": r.cap_gib,
        "resident": r.resident,
        "blocks_to_swap": r.blocks_to_swap,
        "detail": detail,
    }


def table(results: list[dict], losses: list[dict]) -> str:
    head = (
        f"{'config':<10} {'mode':<20} {'cap GiB':>7} {'resident':>9} {'step s':>8} {'min-max s':>13} {'peak GiB':>9}"
        f" {'steady':>7} {'x bf16':>7} {'anchor/kern':>11}"
    )
    lines = [head, "-" * len(head)]
    base = {x["config"]: x for x in results if x.get("kind") == "result" and x["mode"] == "bf16"}
    for x in results:
        if x.get("kind") == "error":
            lines.append(
                f"{x['config']:<10} {x['mode']:<20} {ts._fmt(x.get('cap_gib'), 'g'):>7} {ts._fmt(x.get('resident'), 'd'):>9} "
                f"{x['error']}: {x.get('detail', '')[:70]}"
            )
        if x.get("kind") != "result":
            continue
        b = base.get(x["config"])
        anchor = ts.ISSUE_ANCHOR.get((x["config"], True))
        lines.append(
            f"{x['config']:<10} {x['mode']:<20} {ts._fmt(x['cap_gib'], 'g'):>7} {x['resident']:>4}/{x['blocks']:<4} "
            f"{x['step_s']:>8.3f} {x['step_min_s']:>6.3f}-{x['step_max_s']:<6.3f} {ts._fmt(x['peak_gib'], '.2f'):>9} "
            f"{ts._fmt(x['steady_peak_gib'], '.2f'):>7} "
            f"{ts._fmt(x['step_s'] / b['step_s'] if b else None, '.2f'):>7} {ts._fmt(anchor[0] / x['step_s'] if anchor else None, '.2f'):>11}"
        )
    for q in losses:
        lines.append(
            f"{q['config']} {q['mode']} vs {q['against']} over {q['steps']} steps: loss max |diff| {q['max_abs_diff']:.5f},"
            f" max rel {q['max_rel_diff']:.4f}, mean rel {q['mean_rel_diff']:.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["klein4b"], choices=sorted(CONFIGS))
    ap.add_argument(
        "--modes", nargs="+", default=["bf16", "fp8", "fp8swap"], choices=["bf16", "fp8", "fp8g", "swap", "fp8swap"]
    )
    ap.add_argument(
        "--steps", type=int, default=17, help="timed steps (default 17: with 3 warm-up, 20-step loss curves)"
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--compile", default="off", choices=["auto", "blocks", "off"], help="kern.gpu.accel compile for unswapped modes"
    )
    ap.add_argument(
        "--cap",
        type=float,
        nargs="*",
        default=None,
        help="GiB caps for the swap modes, one per config (default: issue 8's: klein4b 8, klein9b 12, dev 24, qwen 12)",
    )
    ap.add_argument("--resident", type=int, default=None, help="resident blocks in swap modes (default: planned)")
    ap.add_argument(
        "--runs",
        nargs="+",
        default=None,
        metavar="CONFIG:SETTINGS",
        help="runs by their settings instead of --configs x --modes: CONFIG:key=value,... over base (fp8 | bf16),"
        " swap (N blocks), act, cap (GiB), compile; e.g. dev:swap=56,act,cap=8",
    )
    ap.add_argument(
        "--cap-all", action="store_true", help="also run the unswapped modes under the cap (after the uncapped run)"
    )
    ap.add_argument("--microbench", action="store_true", help="time Float8MatmulLinear against bf16 Linear first")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: tests this script, measures nothing")
    a = ap.parse_args(argv)
    if a.tiny:
        dev, a.res, a.steps, a.warmup = torch.device("cpu"), 128, min(a.steps, 2), min(a.warmup, 1)
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        ap.error("needs a CUDA device (or --tiny)")
    else:
        dev = torch.device("cuda", torch.cuda.current_device())
    ts._quiet_logs()
    sink = open(a.json_out, "w", encoding="utf-8") if a.json_out else None  # noqa: SIM115 - lines as they come
    results: list[dict] = []

    def emit(d: dict) -> None:
        results.append(d)
        line = json.dumps(d)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    from kern.gpu.fp8 import fp8_matmul_supported

    cuda = dev.type == "cuda"
    emit(
        {
            "kind": "header",
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__,
            "commit": ts._git_commit(),
            "fp8_matmul": fp8_matmul_supported(dev),
            "fp8_matmul_why_not": __import__("kern.gpu.fp8").gpu.fp8._WHY_NOT.get(dev.index or 0),
            "h2d_gb_s": copy_bandwidth(dev) if cuda else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    )
    if a.microbench and cuda:
        for row in linear_microbench(dev):
            emit(row)
    if a.runs:
        try:
            specs = [parse_run(spec, a) for spec in a.runs]
        except ValueError as err:
            ap.error(str(err))
        for r in specs:
            try:
                x = run(r, dev)
            except torch.OutOfMemoryError as err:
                x = {**_failed(r, "OOM", str(err)[:200]), "peak_gib": ts.peak_gib(dev)}
            except Exception as err:  # noqa: BLE001 - report and go on with the next run
                if a.tiny:
                    raise
                import traceback

                x = _failed(r, type(err).__name__, traceback.format_exc()[-1500:])
            emit(x)  # outside the except: its traceback held the failed run's tensors
            ts.free_memory(dev)
            _cap(dev, None)
    caps = dict(CAPS)
    if a.cap:
        caps.update(zip(a.configs, a.cap))
    for config in [] if a.runs else a.configs:
        done: dict[str, dict] = {}
        for mode in a.modes:
            swap = mode in ("swap", "fp8swap")
            r = Run(
                config,
                mode,
                a.steps,
                a.warmup,
                a.res,
                a.rank,
                a.compile,
                cap_gib=caps[config] if swap and cuda else None,
                tiny=a.tiny,
            )
            if swap:
                ref = done.get("fp8" if mode == "fp8swap" else "bf16")
                if a.resident is not None:
                    r.resident = a.resident
                elif ref is not None and ref["peak_gib"] is not None:
                    r.resident = plan_resident(ref, caps[config])
                elif a.tiny:
                    r.resident = 1
                else:
                    r.resident = 0
            for attempt in range(3):
                fatal = False
                try:
                    x = run(r, dev)
                    break
                except torch.OutOfMemoryError as err:
                    x = {
                        "kind": "error",
                        "error": "OOM",
                        "config": config,
                        "mode": mode,
                        "cap_gib": r.cap_gib,
                        "resident": r.resident,
                        "detail": str(err)[:200],
                        "peak_gib": ts.peak_gib(dev),
                    }
                except Exception as err:  # noqa: BLE001 - report and go on with the next run
                    import traceback

                    x = {
                        "kind": "error",
                        "error": type(err).__name__,
                        "config": config,
                        "mode": mode,
                        "detail": traceback.format_exc()[-1500:],
                    }
                    fatal = True
                emit(x)  # outside the except: its traceback held the failed run's tensors
                ts.free_memory(dev)
                _cap(dev, None)
                if fatal or not swap or not r.resident:
                    break
                r.resident = r.resident * 2 // 3
            if x.get("kind") == "result":
                done[mode] = x
                emit(x)
            if a.cap_all and not swap and x.get("kind") == "result":
                r.cap_gib = caps[config]
                try:
                    emit({**run(r, dev), "mode": mode + "@cap"})
                except torch.OutOfMemoryError as err:
                    emit(
                        {
                            "kind": "error",
                            "error": "OOM",
                            "config": config,
                            "mode": mode + "@cap",
                            "cap_gib": r.cap_gib,
                            "detail": str(err)[:200],
                        }
                    )
                    ts.free_memory(dev)
                    _cap(dev, None)
    losses = compare_losses(results)
    for q in losses:
        emit(q)
    if sink:
        sink.close()
    print(table(results, losses), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
