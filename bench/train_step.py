"""LoRA training-step benchmark: kern against diffusers + peft, same shapes, same protocol, one process, one GPU.

Protocol (issue 8): rank-16 LoRA on every Linear of the transformer blocks, bf16 base weights, fp32 adapter,
AdamW, gradient checkpointing per block, one 1024² image (4096 image tokens) and 512 text tokens (FLUX.2),
batch 1, random weights, median (and min) of 8 timed steps after 3 warm-up steps, peak
``torch.cuda.max_memory_allocated`` over build + steps.

kern side: the transformer is built directly on the GPU in bf16, the LoRA comes from the plugin manager's
``make_network`` hook with the architecture's default targets, ``kern.gpu.accel.apply`` applies the job's fast paths
(compiled blocks, attention backend, checkpointing; ``--kern`` varies them), and each step runs the way
``kern.train.driver.run`` does it: ``kern.train.driver.prepare`` resolves the job, ``Trainee`` calls the ``predict_velocity``
hook, ``make_optimizer`` builds kern's AdamW, accelerate wraps model and optimizer, timesteps come from the
``sample_timesteps`` hook, noise is mixed into the latents and the loss is the (weighted) MSE to the velocity
``noise - x0`` (``kern.train.driver.train_step`` itself).

Anchor side (when diffusers and peft import): diffusers' transformer of the same configuration with a peft
LoRA on the same layers (diffusers splits q / k / v, so it holds more, thinner LoRA modules), autocast bf16,
MSE to a random target, backward, fused AdamW; bench/ANCHOR.md states it, with its targets and issue 8's numbers.

FLOPs: the reference forward count (bench/ANCHOR.md: 2 FLOPs per MAC, image-stream weights on image tokens,
text-stream weights on text tokens, attention 4·L²·D per block, norms / RoPE / elementwise ignored).
model TFLOP/s = 3 × forward FLOPs / step time (forward + activation-gradient backward ≈ 2×; the checkpoint
recompute is not counted as useful work), MFU = model TFLOP/s / a measured bf16 8192³ matmul rate.

Output: one JSON line per (config, implementation), ratio lines (anchor step time / kern step time, kern peak /
anchor peak), a header line, and a table; with --json-out the JSON lines also go to a file.

    python3 bench/train_step.py --configs klein4b klein9b dev            # on the device machine
    python3 bench/train_step.py --tiny --only both --json-out /tmp/t.jsonl  # CPU smoke test of this harness

Adding an architecture (as Qwen-Image, 128 text tokens, is added): write a ``Family`` for it (kern params, kern
model, kern inputs, forward FLOPs, the diffusers anchor) and add its configs to ``CONFIGS``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The checkout's own code, whether or not it is pip-installed: kernel, CLI (logging set-up), the plugins used here.
for _p in (
    ROOT / "plugins" / "lora",
    ROOT / "plugins" / "lokr",
    ROOT / "plugins" / "flux2",
    ROOT / "plugins" / "qwen_image",
    ROOT / "cli",
    ROOT / "kernel",
):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch

FLOPS_CONVENTION = (
    "model TFLOP/s = 3 x forward FLOPs / median step time; forward FLOPs per bench/ANCHOR.md "
    "(2 FLOPs/MAC, attention 4 L^2 D per block, norms/RoPE/elementwise ignored); "
    "MFU = model TFLOP/s / measured dense matmul rate"
)

# Issue 8's anchor measurements (diffusers + peft, H100 80GB, res 1024, rank 16, batch 1): (step s, peak GiB).
ISSUE_ANCHOR = {
    ("klein4b", True): (0.408, 9.4),
    ("klein9b", True): (0.736, 20.1),
    ("dev", True): (2.219, 66.5),
    ("klein4b", False): (0.277, 23.4),
    ("qwen_image", True): (1.83, 42.0),
}


# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Family:
    """What the harness needs from one architecture. Every callable takes the kern params object first."""

    name: str
    plugins: tuple[tuple[str, str], ...]  # (plugin name, module) registered in the kern manager with the LoRA plugin
    n_txt: int  # text tokens of the protocol
    params: Callable[[str, bool], Any]  # (variant, tiny) -> kern params
    build_kern: Callable[[Any], torch.nn.Module]  # params -> kern transformer (called under device / dtype context)
    kern_inputs: Callable[
        ..., tuple[torch.Tensor, dict[str, torch.Tensor]]
    ]  # (p, batch, h, w, n_txt, dev, dtype) -> x0, text
    forward_flops: Callable[[Any, int, int], tuple[float, float]]  # (p, n_img, n_txt) -> (linear, attention) FLOPs
    anchor: Callable[..., tuple[torch.nn.Module, Callable[[], torch.Tensor], torch.Tensor]]
    # (p, rank, ckpt, batch, h, w, n_txt, dev, dtype) -> (peft-wrapped diffusers model, forward(), random target)


def _flux2_params(variant: str, tiny: bool):
    from kern_flux2.params import PARAMS_BY_VARIANT, tiny_params

    p = PARAMS_BY_VARIANT[variant]
    if tiny:  # same code path, toy sizes: the real token interface (128 channels, 4-axis RoPE), guidance as the variant
        return tiny_params(guidance_embed=p.guidance_embed, depth=2, depth_single=2)
    return p


def _flux2_build(p):
    from kern_flux2.transformer import Flux2Transformer

    return Flux2Transformer(p)


def _flux2_inputs(p, batch, h, w, n_txt, dev, dtype):
    x0 = torch.randn(batch, p.in_channels, h, w, device=dev)  # latents as the cache gives them: fp32
    text = {"ctx": torch.randn(batch, n_txt, p.context_in_dim, device=dev, dtype=dtype)}
    return x0, text


def _flux2_flops(p, n_img, n_txt):
    d, m, n = p.hidden_size, p.mlp_hidden, n_img + n_txt
    blocks = p.depth + p.depth_single
    # Per token and block: qkv 3D² + proj D² + gated MLP in 2MD + out MD (= 13 D² at M = 3D). Double blocks run
    # each stream's weights on its own tokens, so together they see n tokens, as a single block does.
    macs = blocks * (4 * d * d + 3 * m * d) * n
    macs += (
        p.in_channels * d * n_img + p.context_in_dim * d * n_txt + d * p.in_channels * n_img
    )  # img_in, txt_in, final
    return 2.0 * macs, 4.0 * blocks * n * n * d


# The anchor's LoRA targets (bench/ANCHOR.md): every Linear of the double and single blocks, modulations excluded.
FLUX2_ANCHOR_TARGETS = (
    r".*(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|linear_in|linear_out"
    r"|to_qkv_mlp_proj)$|.*single_transformer_blocks\.\d+\.attn\.to_out$"
)


# --network: kern's network type and options, and the peft config of the anchor's adapter of the same kind.
NETWORKS = ("lora", "dora", "lokr")


def kern_network(network: str, rank: int) -> tuple[str, dict[str, Any]]:
    options: dict[str, Any] = {"rank": rank, "alpha": float(rank)}
    if network == "dora":
        return "lora", {**options, "dora": True}
    return network, options


def peft_config(network: str, rank: int, targets: str) -> Any:
    """peft's LoRA (``use_dora`` for DoRA) or LoKr (W2 low rank, factor -1: the layout kern's lokr defaults to)."""
    from peft import LoKrConfig, LoraConfig

    if network == "lokr":
        return LoKrConfig(r=rank, alpha=rank, target_modules=targets, init_weights=True)
    return LoraConfig(
        r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian", use_dora=network == "dora"
    )


def _flux2_anchor(p, rank, ckpt, batch, h, w, n_txt, dev, dtype, network="lora"):
    from diffusers import Flux2Transformer2DModel

    with _default_dtype(dtype), torch.device(dev):
        model = Flux2Transformer2DModel(**p.diffusers_config())
    model.requires_grad_(False)
    model.add_adapter(peft_config(network, rank, FLUX2_ANCHOR_TARGETS))
    for q in model.parameters():
        if q.requires_grad:
            q.data = q.data.float()
    if ckpt:
        model.enable_gradient_checkpointing()
    n_img = h * w
    x = torch.randn(batch, n_img, p.in_channels, device=dev, dtype=dtype)
    ctx = torch.randn(batch, n_txt, p.context_in_dim, device=dev, dtype=dtype)
    img_ids = torch.zeros(batch, n_img, 4, device=dev)
    img_ids[..., 1] = torch.arange(h, device=dev).repeat_interleave(w)
    img_ids[..., 2] = torch.arange(w, device=dev).repeat(h)
    txt_ids = torch.zeros(batch, n_txt, 4, device=dev)
    txt_ids[..., 3] = torch.arange(n_txt, device=dev)
    t = torch.rand(batch, device=dev, dtype=dtype)
    g = torch.full((batch,), 4.0, device=dev, dtype=dtype) if p.guidance_embed else None

    def forward():
        return model(
            hidden_states=x,
            encoder_hidden_states=ctx,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=g,
            return_dict=False,
        )[0]

    return model, forward, torch.randn_like(x)


FLUX2 = Family(
    name="flux2",
    plugins=(("flux2", "kern_flux2.plugin"),),
    n_txt=512,
    params=_flux2_params,
    build_kern=_flux2_build,
    kern_inputs=_flux2_inputs,
    forward_flops=_flux2_flops,
    anchor=_flux2_anchor,
)


def _qwen_params(variant: str, tiny: bool):
    from kern_qwen_image.params import QWEN_IMAGE, tiny_params

    return tiny_params() if tiny else QWEN_IMAGE


def _qwen_build(p):
    from kern_qwen_image.transformer import QwenImageTransformer

    return QwenImageTransformer(p)


def _qwen_inputs(p, batch, h, w, n_txt, dev, dtype):
    x0 = torch.randn(batch, p.out_channels, 2 * h, 2 * w, device=dev)  # (B, 16, H/8, W/8): packed 2x2 into h*w tokens
    text = {
        "ctx": torch.randn(batch, n_txt, p.joint_attention_dim, device=dev, dtype=dtype),
        "mask": torch.ones(batch, n_txt, device=dev, dtype=torch.bool),
    }
    return x0, text


def _qwen_flops(p, n_img, n_txt):
    d, n = p.hidden_size, n_img + n_txt
    # Per block and token: q, k, v, out 4 D² + GELU MLP 2·D·4D = 12 D², each stream's weights on its own tokens.
    macs = p.num_layers * (4 * d * d + 2 * p.mlp_hidden * d) * n
    macs += p.in_channels * d * n_img + p.joint_attention_dim * d * n_txt + d * p.out_dim * n_img
    return 2.0 * macs, 4.0 * p.num_layers * n * n * d


# The anchor's LoRA targets (bench/ANCHOR.md): attention projections and both MLP Linears of every block.
QWEN_ANCHOR_TARGETS = (
    r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|(img|txt)_mlp\.net\.(0\.proj|2))$"
)


def _qwen_anchor(p, rank, ckpt, batch, h, w, n_txt, dev, dtype, network="lora"):
    from diffusers import QwenImageTransformer2DModel

    with _default_dtype(dtype), torch.device(dev):
        model = QwenImageTransformer2DModel(
            patch_size=p.patch_size,
            in_channels=p.in_channels,
            out_channels=p.out_channels,
            num_layers=p.num_layers,
            attention_head_dim=p.head_dim,
            num_attention_heads=p.num_heads,
            joint_attention_dim=p.joint_attention_dim,
            axes_dims_rope=tuple(p.axes_dim),
        )
    model.requires_grad_(False)
    model.add_adapter(peft_config(network, rank, QWEN_ANCHOR_TARGETS))
    for q in model.parameters():
        if q.requires_grad:
            q.data = q.data.float()
    if ckpt:
        model.enable_gradient_checkpointing()
    x = torch.randn(batch, h * w, p.in_channels, device=dev, dtype=dtype)
    ctx = torch.randn(batch, n_txt, p.joint_attention_dim, device=dev, dtype=dtype)
    mask = torch.ones(batch, n_txt, device=dev, dtype=dtype)
    t = torch.rand(batch, device=dev, dtype=dtype)

    def forward():
        return model(
            hidden_states=x,
            encoder_hidden_states=ctx,
            encoder_hidden_states_mask=mask,
            timestep=t,
            img_shapes=[[(1, h, w)]] * batch,
            return_dict=False,
        )[0]

    return model, forward, torch.randn_like(x)


QWEN = Family(
    name="qwen_image",
    plugins=(("qwen_image", "kern_qwen_image.plugin"),),
    n_txt=128,
    params=_qwen_params,
    build_kern=_qwen_build,
    kern_inputs=_qwen_inputs,
    forward_flops=_qwen_flops,
    anchor=_qwen_anchor,
)


@dataclass(frozen=True)
class Config:
    family: Family
    arch: str  # what kern's job names in model.arch: a variant alias of the family's architecture
    variant: str


CONFIGS: dict[str, Config] = {
    "klein4b": Config(FLUX2, "flux2-klein-4b", "klein-4b"),
    "klein9b": Config(FLUX2, "flux2-klein-9b", "klein-9b"),
    "dev": Config(FLUX2, "flux2-dev", "dev"),
    "qwen_image": Config(QWEN, "qwen-image", "t2i"),
}


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class Timer:
    """CUDA events on a GPU (device time of the whole step, host gaps included), perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.s, self.e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.s.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.e.record()
            torch.cuda.synchronize()
            return self.s.elapsed_time(self.e) / 1000
        return time.perf_counter() - self.t0


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()  # adapters and accelerate patch forwards with closures: cycles, so collect before emptying the cache
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


class Peaks:
    """Peak memory of the whole run (``peak_gib``: build, warm-up and compilation included, what a card must hold)
    and of the timed steps alone (``steady_peak_gib``: the steady training peak, which the build can hide: an fp8
    base is built in bf16 here before it is quantised)."""

    def __init__(self, device: torch.device):
        self.device, self.before = device, None

    def mark(self) -> None:
        """Call at the first timed step."""
        self.before = peak_gib(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def fields(self) -> dict[str, float | None]:
        steps = peak_gib(self.device)
        whole = None if steps is None else max(steps, self.before or 0.0)
        return {"peak_gib": whole, "steady_peak_gib": steps}


def matmul_rate(device: torch.device) -> tuple[float, str]:
    """Dense matmul FLOP/s: bf16 8192³ on a GPU (the MFU ceiling), fp32 512³ on the CPU (tiny runs only)."""
    n, dtype, reps = (8192, torch.bfloat16, 20) if device.type == "cuda" else (512, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = reps * 2 * n**3 / (time.perf_counter() - t)
    del a, b
    return rate, f"{str(dtype).removeprefix('torch.')} {n}^3"


def kern_manager(family: Family):
    """kern's plugin manager with the family's plugin, LoRA and LoKr registered from the checkout, not from entry points.

    Entry points need installed distributions; registering the modules explicitly works the same whether or not
    the repo was pip-installed (and cannot pick up a stale installed copy)."""
    import importlib

    from kern.core.plugins import build_manager

    extra = [
        (name, importlib.import_module(module))
        for name, module in (*family.plugins, ("lora", "kern_lora.plugin"), ("lokr", "kern_lokr.plugin"))
    ]
    return build_manager(entry_points=(), extra=extra)


def _quiet_logs() -> None:
    """kern logs through structlog; keep stdout for the JSON lines and the table."""
    try:
        from kern_cli.log import configure

        configure(verbosity=0)  # to stderr
    except ImportError:
        import logging

        import structlog

        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        )


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- the two implementations


@dataclass
class Setup:
    config: str
    res: int
    rank: int
    ckpt: bool
    batch: int
    steps: int
    warmup: int
    tiny: bool
    device: torch.device
    dtype: torch.dtype
    max_grad_norm: float
    network: str = "lora"  # lora | dora | lokr: the adapter both sides train (NETWORKS)
    fast: dict[str, Any] = None  # TrainConfig overrides of this kern run: compile, attention, gradient_checkpointing
    profile: Path | None = None  # append a torch.profiler table of one extra step here

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.res // 16, self.res // 16  # FLUX.2 and Qwen-Image: 8x VAE, 2x2 patches -> one token per 16² pixels

    def n_txt(self, family: Family) -> int:
        return 32 if self.tiny else family.n_txt


def _result(impl: str, s: Setup, family: Family, p: Any, times: list[float], loss: torch.Tensor, **extra: Any) -> dict:
    h, w = s.latent_hw
    n_txt = s.n_txt(family)
    lin, attn = family.forward_flops(p, h * w, n_txt)
    fwd = s.batch * (lin + attn)
    med = statistics.median(times)
    digits = 6 if s.tiny else 2
    return dict(
        kind="result",
        impl=impl,
        config=s.config,
        res=s.res,
        n_img=h * w,
        n_txt=n_txt,
        batch=s.batch,
        rank=s.rank,
        network=s.network,
        ckpt=s.ckpt,
        dtype=str(s.dtype).removeprefix("torch."),
        steps=len(times),
        warmup=s.warmup,
        step_s=round(med, 4 if not s.tiny else 6),
        step_min_s=round(min(times), 4 if not s.tiny else 6),
        fwd_tflop=round(fwd / 1e12, digits),
        model_tflops_per_s=round(3 * fwd / med / 1e12, digits),
        loss_finite=bool(torch.isfinite(loss).item()),
        **extra,
    )


def kern_label(fast: dict[str, Any]) -> str:
    """``kern`` for the job defaults, ``kern[key=value,...]`` for a run with fast-path overrides."""
    short = {
        "gradient_checkpointing": "ckpt",
        "base_precision": "base",
        "blocks_to_swap": "swap",
        "selective_blocks": "sel",
        "offload_activations": "act",
    }
    return "kern" + (f"[{','.join(f'{short.get(k, k)}={v}' for k, v in fast.items())}]" if fast else "")


def parse_fast(text: str) -> dict[str, Any]:
    """``--kern`` value: ``default`` or ``key=value,...`` over compile, attention, ckpt (gradient_checkpointing)."""
    out: dict[str, Any] = {}
    if text == "default":
        return out
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = {
            "ckpt": "gradient_checkpointing",
            "base": "base_precision",
            "swap": "blocks_to_swap",
            "sel": "selective_blocks",
            "act": "offload_activations",
        }.get(key, key)
        if (
            key
            not in (
                "compile",
                "attention",
                "gradient_checkpointing",
                "base_precision",
                "blocks_to_swap",
                "selective_blocks",
                "offload_activations",
            )
            or not value
        ):
            raise SystemExit(f"--kern {text!r}: use key=value over compile, attention, ckpt, base, swap, sel, act")
        out[key] = (
            int(value)
            if key in ("blocks_to_swap", "selective_blocks")
            else {"true": True, "false": False}.get(value, value)
        )
    return out


def profile_step(step: Callable[[], Any], device: torch.device, title: str, path: Path) -> None:
    """One more step under torch.profiler; the 30 costliest kernels by device time go to ``path`` (appended)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"\n===== {title}\n")
        f.write(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90))


def _kern_step(train_step, acc, trainee, optimizer, scheduler, plan, x0, text, generator, base_dtype) -> torch.Tensor:
    return train_step(acc, trainee, optimizer, scheduler, plan, x0, text, None, generator, base_dtype)[0]


def _anchor_step(forward, target, opt, bf16: bool, device_type: str) -> torch.Tensor:
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        out = forward()
    loss = torch.nn.functional.mse_loss(out.float(), target.float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def run_kern(s: Setup, cfg: Config) -> dict:
    """One config with kern's own pieces, in the order kern.train.driver.run uses them (data loading and logging left out)."""
    from accelerate import Accelerator
    from kern.core.config import JobConfig, ModelConfig, NetworkConfig, TrainConfig
    from kern.gpu import accel
    from kern.records import TargetSpec
    from kern.train import driver as train
    from kern.train import optim

    family, dev = cfg.family, s.device
    free_memory(dev)
    manager = kern_manager(family)
    job = JobConfig(
        model=ModelConfig(arch=cfg.arch, dtype=str(s.dtype).removeprefix("torch.")),
        network=NetworkConfig(**dict(zip(("type", "options"), kern_network(s.network, s.rank)))),
        train=TrainConfig(
            steps=s.warmup + s.steps,
            learning_rate=1e-4,
            optimizer="adamw",
            max_grad_norm=s.max_grad_norm,
            mixed_precision="bf16" if s.dtype == torch.bfloat16 else "no",
            seed=0,
            device=dev.type,
            **{"gradient_checkpointing": s.ckpt, **(s.fast or {})},
        ),
    )
    job.source = "bench/train_step.py"
    plan = train.prepare(job, manager)
    hook, arch = plan.hook, plan.arch
    variant = plan.arch.variant(plan.variant)
    base_dtype = train.DTYPES[job.model.dtype]
    acc = Accelerator(mixed_precision=job.train.mixed_precision, gradient_accumulation_steps=1, cpu=dev.type == "cpu")

    p = family.params(variant.name, s.tiny)
    # Random weights, built where they run (no CPU copy), or on the CPU when blocks are swapped, as kern.train.driver.run loads.
    # The trainer also loads an fp8 base on the CPU (to quantise it layer by layer); random init on the CPU is too
    # slow for 20-32B here, so only a swapped base starts there and an fp8 one is built in bf16 on the GPU (see Peaks).
    with _default_dtype(base_dtype), torch.device("cpu" if job.train.blocks_to_swap > 0 else dev):
        transformer = family.build_kern(p)
    transformer.requires_grad_(False)
    transformer.eval()
    base = accel.prepare_base(
        transformer, job.train, dev, keep=arch.keep_high_precision
    )  # fp8 base, before the adapters
    targets = TargetSpec(
        targets=tuple(job.network.targets) or arch.default_targets,
        exclude=tuple(arch.default_excludes) + tuple(job.network.exclude),
        include=tuple(job.network.include),
    )
    torch.manual_seed(job.train.seed)
    network = hook.make_network(
        network_type=plan.network.name, model=transformer, targets=targets, options=plan.network_options
    )
    network.to(dev)
    network.train()
    fast = accel.apply(
        transformer, job.train, dev
    )  # as kern.train.driver.run: checkpointing, attention, compiled blocks
    groups = network.optimizer_param_groups(job.train.learning_rate)
    params = [q for g in groups for q in g["params"]]
    assert params and all(q.dtype == torch.float32 and q.device.type == dev.type for q in params), (
        "adapter not fp32 on device"
    )
    optimizer = optim.make_optimizer(job.train.optimizer, groups, job.train.learning_rate)
    scheduler = optim.make_scheduler(optimizer, job.train)
    trainee = train.Trainee(plan, variant.name, transformer, network)
    trainee, optimizer, scheduler = acc.prepare(trainee, optimizer, scheduler)
    trainee.train()
    acc.unwrap_model(trainee).transformer.eval()

    h, w = s.latent_hw
    x0, text = family.kern_inputs(p, s.batch, h, w, s.n_txt(family), dev, base_dtype)
    generator = torch.Generator().manual_seed(job.train.seed)
    before = [q.detach().clone() for q in params] if s.tiny else None
    # kern's own training step, the one kern.train.driver.run's loop calls
    step = functools.partial(
        _kern_step, train.train_step, acc, trainee, optimizer, scheduler, plan, x0, text, generator, base_dtype
    )

    timer, times, first, peaks = Timer(dev), [], None, Peaks(dev)
    graphs = accel.compiled_graphs()
    for i in range(s.warmup + s.steps):
        if i == s.warmup:
            graphs_warm = accel.compiled_graphs()
            peaks.mark()
        timer.start()
        loss = step()
        dt = timer.stop()
        first = dt if first is None else first
        if i >= s.warmup:
            times.append(dt)
    recompiles = accel.compiled_graphs() - graphs_warm
    if s.profile is not None:
        profile_step(step, dev, f"{s.config} {kern_label(s.fast)}", s.profile)
    extra: dict[str, Any] = {
        "fast": {**fast, **base},
        "first_step_s": round(first, 2),
        "compiled_graphs": graphs_warm - graphs,
        "recompiles_timed": recompiles,
        "lora_modules": len(network.adapters),
        "lora_params": sum(q.numel() for q in params),
        "optimizer": f"kern make_optimizer({job.train.optimizer!r}) {type(optimizer.optimizer).__name__}"
        + ("(fused=True)" if optimizer.optimizer.defaults.get("fused") else ""),
        "max_grad_norm": job.train.max_grad_norm,
        "timestep_method": plan.timestep_method,
        **peaks.fields(),
    }
    if s.tiny:
        extra["lora_updated"] = sum(not torch.equal(a, q) for a, q in zip(before, params)) / len(params)
    out = _result(kern_label(s.fast), s, family, p, times, loss, **extra)
    acc.free_memory()  # accelerate keeps references to what it prepared
    del trainee, optimizer, scheduler, network, transformer, params, groups, loss, before, acc, step
    accel.reset_attention()
    if fast["compile"] != "off":
        torch._dynamo.reset()  # compiled code and its guards refer to this run's modules
    free_memory(dev)
    return out


def run_anchor(s: Setup, cfg: Config) -> dict:
    """diffusers' transformer + peft LoRA, the anchor of bench/ANCHOR.md."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    family, dev = cfg.family, s.device
    free_memory(dev)
    p = family.params(cfg.variant, s.tiny)
    h, w = s.latent_hw
    model, forward, target = family.anchor(
        p, s.rank, s.ckpt, s.batch, h, w, s.n_txt(family), dev, s.dtype, network=s.network
    )
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    before = [q.detach().clone() for q in params] if s.tiny else None
    step = functools.partial(_anchor_step, forward, target, opt, s.dtype == torch.bfloat16, dev.type)

    timer, times, peaks = Timer(dev), [], Peaks(dev)
    for i in range(s.warmup + s.steps):
        if i == s.warmup:
            peaks.mark()
        timer.start()
        loss = step()
        dt = timer.stop()
        if i >= s.warmup:
            times.append(dt)
    if s.profile is not None:
        profile_step(step, dev, f"{s.config} diffusers+peft", s.profile)
    extra: dict[str, Any] = {
        "lora_modules": sum(isinstance(m, BaseTunerLayer) for m in model.modules()),
        "lora_params": sum(q.numel() for q in params),
        "optimizer": "torch AdamW(fused=True)",
        "max_grad_norm": 0.0,
        "diffusers": _version("diffusers"),
        "peft": _version("peft"),
        **peaks.fields(),
    }
    if s.tiny:
        extra["lora_updated"] = sum(not torch.equal(a, q) for a, q in zip(before, params)) / len(params)
    result = _result("diffusers+peft", s, family, p, times, loss, **extra)
    del model, forward, target, params, opt, loss, before, step
    free_memory(dev)
    return result


# --------------------------------------------------------------------------- output


def spread_lines(results: list[dict]) -> list[dict]:
    """Per config and implementation run more than once (``--repeat``): the median step of each run, and their
    spread (max − min over the median of them): the noise a single run's number carries."""
    runs: dict[tuple[str, str], list[float]] = {}
    for r in results:
        if r.get("kind") == "result":
            runs.setdefault((r["config"], r["impl"]), []).append(r["step_s"])
    out = []
    for (config, impl), steps in runs.items():
        if len(steps) > 1:
            mid = statistics.median(steps)
            out.append(
                {
                    "kind": "spread",
                    "config": config,
                    "impl": impl,
                    "runs": len(steps),
                    "step_s": steps,
                    "min_s": min(steps),
                    "median_s": mid,
                    "max_s": max(steps),
                    "spread": round((max(steps) - min(steps)) / mid, 4),
                }
            )
    return out


def ratio_lines(results: list[dict], tiny: bool) -> list[dict]:
    """kern against the anchor per config (the last run of each when ``--repeat`` ran them several times)."""
    out = []
    by = {(r["config"], r["impl"]): r for r in results if r.get("kind") == "result"}
    for (config, impl), k in by.items():
        if not impl.startswith("kern"):
            continue
        a = by.get((config, "diffusers+peft"))
        if a is not None:
            out.append(
                {
                    "kind": "ratio",
                    "config": config,
                    "impl": impl,
                    "against": "diffusers+peft, this process",
                    "speedup": round(a["step_s"] / k["step_s"], 3),
                    "speedup_min": round(a["step_min_s"] / k["step_min_s"], 3),
                    "memory_ratio": round(k["peak_gib"] / a["peak_gib"], 3)
                    if k["peak_gib"] and a["peak_gib"]
                    else None,
                }
            )
        ref = ISSUE_ANCHOR.get((config, k["ckpt"]))
        if (
            ref
            and not tiny
            and k.get("network", "lora") == "lora"  # issue 8's anchor trained a LoRA
            and k["res"] == 1024
            and k["rank"] == 16
            and k["batch"] == 1
            and k["peak_gib"] is not None
        ):
            out.append(
                {
                    "kind": "ratio",
                    "config": config,
                    "impl": impl,
                    "against": "issue 8 anchor (diffusers+peft, H100 80GB)",
                    "speedup": round(ref[0] / k["step_s"], 3),
                    "memory_ratio": round(k["peak_gib"] / ref[1], 3),
                    "anchor_step_s": ref[0],
                    "anchor_peak_gib": ref[1],
                }
            )
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(results: list[dict], ratios: list[dict]) -> str:
    head = f"{'config':<10} {'impl':<44} {'ckpt':<5} {'step s':>9} {'min s':>9} {'peak GiB':>9} {'steady GiB':>10} {'fwd TFLOP':>10} {'TFLOP/s':>9} {'MFU':>6}"
    lines = [head, "-" * len(head)]
    for r in results:
        if r.get("kind") != "result":
            if r.get("kind") == "error":
                lines.append(f"{r['config']:<10} {r['impl']:<44} {r['error']}: {r.get('detail', '')[:80]}")
            continue
        lines.append(
            f"{r['config']:<10} {r['impl']:<44} {r['ckpt']!s:<5} {r['step_s']:>9.4f} {r['step_min_s']:>9.4f} "
            f"{_fmt(r['peak_gib'], '.2f'):>9} {_fmt(r.get('steady_peak_gib'), '.2f'):>10} {r['fwd_tflop']:>10g} {r['model_tflops_per_s']:>9g} {_fmt(r.get('mfu'), '.1%'):>6}"
        )
    for q in ratios:
        mem = "" if q["memory_ratio"] is None else f", kern peak / anchor peak {q['memory_ratio']:.2f}"
        lines.append(f"{q['config']} {q['impl']}: anchor time / kern time {q['speedup']:.2f}{mem}  [{q['against']}]")
    lines.append(f"({FLOPS_CONVENTION})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["klein4b", "klein9b", "dev"], choices=sorted(CONFIGS))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--network",
        choices=NETWORKS,
        default="lora",
        help="adapter of both sides: lora, dora (kern network.dora / peft use_dora) or lokr (kern lokr / peft LoKr)",
    )
    ap.add_argument("--res", type=int, default=None, help="square image side in pixels (default 1024; 128 with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 8; 2 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --tiny)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-ckpt", action="store_true", help="no gradient checkpointing")
    ap.add_argument("--only", choices=["kern", "anchor", "both"], default="both")
    ap.add_argument(
        "--max-grad-norm",
        type=float,
        default=0.0,
        help="kern's gradient clipping (kern's job default is 1.0; the protocol and the anchor clip nothing)",
    )
    ap.add_argument("--json-out", type=Path, default=None, help="also write the JSON lines here")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the list of configs this many times in this process; a 'spread' line per config and implementation",
    )
    ap.add_argument(
        "--kern",
        nargs="+",
        default=["default"],
        metavar="SETTING",
        help="kern runs per config: 'default' (the job defaults) or key=value,... over compile (auto|blocks|off),"
        " attention (auto|flash|cudnn|efficient|math), ckpt (true|false|full|selective),"
        " base (bf16|fp8: train.base_precision), swap (N: train.blocks_to_swap), sel (N: train.selective_blocks)",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="after timing, profile one more step of each run; top kernels appended to this file",
    )
    ap.add_argument(
        "--memory-cap-gib",
        type=float,
        default=None,
        help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction)",
    )
    ap.add_argument(
        "--tiny", action="store_true", help="toy sizes, fp32, on the CPU: tests this harness, measures nothing"
    )
    a = ap.parse_args(argv)
    res = a.res or (128 if a.tiny else 1024)
    steps = a.steps or (2 if a.tiny else 8)
    warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 3)
    if res % 16:
        ap.error(f"--res {res} is not a multiple of 16")

    _quiet_logs()
    if a.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)  # toy matrices: threads only add overhead (and contention on a busy machine)
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run on the GPU machine, or pass --tiny for the CPU smoke test")
        device, dtype = torch.device("cuda"), torch.bfloat16

    lines: list[dict] = []
    sink = open(a.json_out, "w", encoding="utf-8") if a.json_out else None

    def emit(d: dict) -> None:
        lines.append(d)
        text = json.dumps(d)
        print(text, flush=True)
        if sink:
            sink.write(text + "\n")
            sink.flush()

    header: dict[str, Any] = {
        "kind": "header",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "peft": _version("peft"),
        "commit": _git_commit(),
        "tiny": a.tiny,
        "flops_convention": FLOPS_CONVENTION,
    }
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        header["gpu_total_gib"] = round(total / 2**30, 2)
        if a.memory_cap_gib:
            torch.cuda.set_per_process_memory_fraction(min(1.0, a.memory_cap_gib * 2**30 / total))
            header["memory_cap_gib"] = a.memory_cap_gib
    elif a.memory_cap_gib:
        header["memory_cap_gib"] = None  # no GPU: nothing to cap
    rate, rate_what = matmul_rate(device)
    header["matmul_tflops"] = round(rate / 1e12, 1 if device.type == "cuda" else 4)
    header["matmul"] = rate_what
    emit(header)

    impls = {"kern": ["kern"], "anchor": ["anchor"], "both": ["kern", "anchor"]}[a.only]
    anchor_missing = None
    if "anchor" in impls:
        try:
            import diffusers  # noqa: F401
            import peft  # noqa: F401
        except ImportError as exc:
            anchor_missing = f"{type(exc).__name__}: {exc}"

    kern_runs = [parse_fast(k) for k in a.kern]
    results: list[dict] = []
    # --repeat: the whole list of configs again, in the same order (a second run of the command, in one process)
    for repeat, name in ((r, n) for r in range(a.repeat) for n in a.configs):
        cfg = CONFIGS[name]
        runs = [(impl, fast) for impl in impls for fast in (kern_runs if impl == "kern" else [None])]
        for impl, fast in runs:
            s = Setup(
                config=name,
                res=res,
                rank=a.rank,
                ckpt=not a.no_ckpt,
                batch=a.batch,
                steps=steps,
                warmup=warmup,
                tiny=a.tiny,
                device=device,
                dtype=dtype,
                max_grad_norm=a.max_grad_norm,
                network=a.network,
                fast=fast,
                profile=a.profile,
            )
            label = kern_label(fast) if impl == "kern" else "diffusers+peft"
            if impl == "anchor" and anchor_missing:
                r = {
                    "kind": "error",
                    "impl": label,
                    "config": name,
                    "error": "skipped",
                    "detail": f"diffusers / peft: {anchor_missing}",
                }
            else:
                try:
                    r = (run_kern if impl == "kern" else run_anchor)(s, cfg)
                    r["mfu"] = round(r["model_tflops_per_s"] * 1e12 / rate, 4)
                except torch.OutOfMemoryError as err:
                    r = {
                        "kind": "error",
                        "impl": label,
                        "config": name,
                        "error": "OOM",
                        "detail": str(err)[:300],
                        "peak_gib": peak_gib(device),
                    }
                except Exception as err:  # one failing configuration must not cost the rest of a device run
                    if a.tiny:
                        raise
                    import traceback

                    r = {
                        "kind": "error",
                        "impl": label,
                        "config": name,
                        "error": type(err).__name__,
                        "detail": "".join(traceback.format_exception(err))[-1500:],
                    }
                if r.get("kind") == "error":
                    import kern.gpu.accel

                    kern.gpu.accel.reset_attention()
                    torch._dynamo.reset()
                    free_memory(device)  # outside the except: its traceback held the failed run's tensors
            r["repeat"] = repeat
            results.append(r)
            emit(r)
    ratios, spreads = ratio_lines(results, a.tiny), spread_lines(results)
    for q in ratios + spreads:
        emit(q)
    if sink:
        sink.close()
    print(table(results, ratios), flush=True)
    for q in spreads:
        print(
            f"{q['config']} {q['impl']}: {q['runs']} runs, step {q['min_s']:.4f} / {q['median_s']:.4f} / "
            f"{q['max_s']:.4f} s (min / median / max), spread {q['spread']:.1%}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
