"""Generation benchmark: kern's denoising loop against the diffusers pipelines' own loops, same shapes, one process.

Protocol (issue 8): one 1024² image, random bf16 weights, text embeddings given (no text encoder, no VAE: the
loop only), FLUX.2 klein 4B distilled at 4 steps, FLUX.2 dev at 28 steps with embedded guidance 4.0, Qwen-Image
at 50 steps with true CFG 4.0 (128 prompt tokens, 8 negative tokens). Median (and min) of ``--runs`` timed
images after one warm-up image, peak ``torch.cuda.max_memory_allocated`` over build + runs.

kern side: the transformer built on the GPU in bf16 and ``kern.generate.denoise.euler_denoise``, the loop ``kern generate``
runs (schedule from the ``generation_schedule`` hook, velocity from ``predict_velocity``, true CFG through
``combine_guidance``). Anchor side (when diffusers imports): the diffusers transformer of the same configuration
inside ``Flux2KleinPipeline`` / ``Flux2Pipeline`` / ``QwenImagePipeline`` called with ``prompt_embeds`` and
``output_type="latent"`` (no VAE, no text encoder), so exactly its denoising loop runs.

    python3 bench/generate.py --configs klein4b dev qwen          # on the device machine
    python3 bench/generate.py --tiny --json-out /tmp/g.jsonl        # CPU smoke test of this harness
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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

from bench.train_step import Timer, _default_dtype, _git_commit, _quiet_logs, _version, free_memory, peak_gib


@dataclass(frozen=True)
class GenConfig:
    arch: str
    variant: str
    steps: int
    guidance: float
    n_txt: int
    n_neg: int = 0  # negative-prompt tokens: true CFG when > 0


CONFIGS = {
    "klein4b": GenConfig("flux2", "klein-4b", steps=4, guidance=1.0, n_txt=512),
    "dev": GenConfig("flux2", "dev", steps=28, guidance=4.0, n_txt=512),
    "qwen": GenConfig("qwen-image", "t2i", steps=50, guidance=4.0, n_txt=128, n_neg=8),
}


def _manager():
    import importlib

    from kern.core.plugins import build_manager

    return build_manager(
        entry_points=(),
        extra=[
            (n, importlib.import_module(m))
            for n, m in (("flux2", "kern_flux2.plugin"), ("qwen_image", "kern_qwen_image.plugin"))
        ],
    )


def _params(cfg: GenConfig, tiny: bool):
    if cfg.arch == "flux2":
        from kern_flux2.params import PARAMS_BY_VARIANT, tiny_params

        p = PARAMS_BY_VARIANT[cfg.variant]
        return tiny_params(guidance_embed=p.guidance_embed, depth=2, depth_single=2) if tiny else p
    from kern_qwen_image.params import QWEN_IMAGE, tiny_params

    return tiny_params() if tiny else QWEN_IMAGE


def _text(cfg: GenConfig, p: Any, n: int, dev, dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    if cfg.arch == "flux2":
        return {"ctx": torch.randn(1, n, p.context_in_dim, generator=g).to(dev, dtype)}
    return {
        "ctx": torch.randn(1, n, p.joint_attention_dim, generator=g).to(dev, dtype),
        "mask": torch.ones(1, n, dtype=torch.long, device=dev),
    }


def run_kern(cfg: GenConfig, p: Any, res: int, runs: int, dev, dtype, compile: str = "off") -> dict:
    from kern.generate.denoise import euler_denoise, seeded_noise
    from kern.gpu import accel

    manager = _manager()
    arch, _ = manager.resolve_arch(cfg.arch)
    variant = arch.variant(cfg.variant)
    with _default_dtype(dtype), torch.device(dev):
        if cfg.arch == "flux2":
            from kern_flux2.transformer import Flux2Transformer

            model = Flux2Transformer(p)
        else:
            from kern_qwen_image.transformer import QwenImageTransformer

            model = QwenImageTransformer(p)
            model.variant = cfg.variant
    model.eval().requires_grad_(False)
    fast = accel.apply_inference(model, compile, "auto", dev)  # as kern generate does (--compile: "blocks")
    text = _text(cfg, p, cfg.n_txt, dev, dtype)
    negative = _text(cfg, p, cfg.n_neg, dev, dtype) if cfg.n_neg else None
    noise = seeded_noise([0], (arch.latent_channels, res // arch.latent_downscale, res // arch.latent_downscale))

    def image() -> torch.Tensor:
        return euler_denoise(
            manager.hook,
            arch.name,
            variant,
            model,
            text,
            noise,
            cfg.steps,
            cfg.guidance,
            negative_text=negative,
            device=dev,
            dtype=dtype,
        )

    out = _time(image, runs, dev)
    accel.reset_attention()  # the anchor runs with torch's own SDPA choice
    return {**out, "fast_paths": fast}


def _diffusers_pipeline(cfg: GenConfig, p: Any, dev, dtype):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        shift=3.0,
    )
    with _default_dtype(dtype), torch.device(dev):
        if cfg.arch == "flux2":
            from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel

            model = Flux2Transformer2DModel(**p.diffusers_config())
        else:
            from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

            model = QwenImageTransformer2DModel(
                patch_size=2,
                in_channels=p.in_channels,
                out_channels=p.out_channels,
                num_layers=p.num_layers,
                attention_head_dim=p.head_dim,
                num_attention_heads=p.num_heads,
                joint_attention_dim=p.joint_attention_dim,
                axes_dims_rope=p.axes_dim,
            )
    model.eval().requires_grad_(False)
    if cfg.arch == "qwen-image":
        return QwenImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=model)
    # The FLUX.2 pipelines undo the latents' BatchNorm even for output_type="latent": a narrow VAE of the real
    # geometry (8x, 32 x 2x2 latent channels) supplies those statistics and nothing else runs in it.
    from diffusers import AutoencoderKLFlux2

    with _default_dtype(dtype), torch.device(dev):
        vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    if p.guidance_embed:
        return Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=model)
    return Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=model, is_distilled=True
    )


def run_anchor(cfg: GenConfig, p: Any, res: int, runs: int, dev, dtype) -> dict:
    pipe = _diffusers_pipeline(cfg, p, dev, dtype)
    pipe.set_progress_bar_config(disable=True)
    text = _text(cfg, p, cfg.n_txt, dev, dtype)
    kwargs: dict[str, Any] = dict(
        prompt_embeds=text["ctx"], height=res, width=res, num_inference_steps=cfg.steps, output_type="latent"
    )
    if cfg.arch == "qwen-image":
        neg = _text(cfg, p, cfg.n_neg, dev, dtype)
        kwargs.update(
            prompt_embeds_mask=text["mask"],
            negative_prompt_embeds=neg["ctx"],
            negative_prompt_embeds_mask=neg["mask"],
            true_cfg_scale=cfg.guidance,
        )
    else:
        kwargs.update(guidance_scale=cfg.guidance)

    def image() -> torch.Tensor:
        return pipe(generator=torch.Generator(dev).manual_seed(0), **kwargs).images

    return _time(image, runs, dev)


def _time(image: Callable[[], torch.Tensor], runs: int, dev) -> dict:
    with torch.no_grad():
        out = image()  # warm-up: allocator, kernels, compiled graphs
        timer, times = Timer(dev), []
        for _ in range(runs):
            timer.start()
            out = image()
            times.append(timer.stop())
    return {
        "s_per_image": round(statistics.median(times), 4),
        "min_s": round(min(times), 4),
        "peak_gib": peak_gib(dev),
        "finite": bool(torch.isfinite(out.float()).all()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["klein4b", "dev", "qwen"], choices=sorted(CONFIGS))
    ap.add_argument("--res", type=int, default=None, help="square image side (default 1024; 64 with --tiny)")
    ap.add_argument("--runs", type=int, default=None, help="timed images (default 3; 1 with --tiny)")
    ap.add_argument("--only", choices=["kern", "anchor", "both"], default="both")
    ap.add_argument(
        "--kern-compile",
        nargs="+",
        default=["off"],
        choices=["off", "blocks"],
        help="kern runs per config: eager (off) and/or compiled blocks (kern generate --compile)",
    )
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument(
        "--tiny", action="store_true", help="toy sizes, fp32, on the CPU: tests this harness, measures nothing"
    )
    args = ap.parse_args(argv)
    _quiet_logs()
    dev = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    res, runs = args.res or (64 if args.tiny else 1024), args.runs or (1 if args.tiny else 3)
    lines = [
        {
            "kind": "header",
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "diffusers": _version("diffusers"),
            "commit": _git_commit(),
            "res": res,
            "runs": runs,
        }
    ]
    for name in args.configs:
        cfg = CONFIGS[name]
        p = _params(cfg, args.tiny)
        found = {}
        runs_of = (
            [
                (
                    f"kern[compile={c}]" if len(args.kern_compile) > 1 else "kern",
                    lambda *a, c=c: run_kern(*a, compile=c),
                )
                for c in args.kern_compile
            ]
            if args.only != "anchor"
            else []
        )
        if args.only != "kern":
            runs_of.append(("anchor", run_anchor))
        for impl, fn in runs_of:
            free_memory(dev)
            found[impl] = {
                "kind": "result",
                "impl": impl,
                "config": name,
                "steps": cfg.steps,
                "cfg": bool(cfg.n_neg),
                **fn(cfg, p, res, runs, dev, dtype),
            }
            lines.append(found[impl])
            free_memory(dev)
        for impl in (k for k in found if k != "anchor" and "anchor" in found):
            lines.append(
                {
                    "kind": "ratio",
                    "config": name,
                    "impl": impl,
                    "speedup": round(found["anchor"]["s_per_image"] / found[impl]["s_per_image"], 3),
                    "memory": round(found[impl]["peak_gib"] / found["anchor"]["peak_gib"], 3)
                    if found[impl]["peak_gib"]
                    else None,
                }
            )
    for line in lines:
        print(json.dumps(line), flush=True)
    if args.json_out:
        args.json_out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
