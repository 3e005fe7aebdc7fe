"""The training driver: a job config in; an adapter, checkpoints, samples and logs out.

It asks hooks for everything architecture- or network-specific and never names either. Phases,
in the order that keeps peak memory at the largest single model rather than their sum:

1. text: load the text encoder, fill the text cache (and encode sample prompts), free it;
2. latents: load the VAE, fill the latent cache (the VAE stays on the CPU for sample images);
3. train: load the transformer, wrap it with the network, run the loop.

A run folder holds ``config.toml`` (the resolved job), ``metrics.jsonl``, ``tensorboard/``,
``samples/``, ``checkpoints/step-NNNNNN/`` and the final ``<name>.safetensors`` plus ``loss.png``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import attrs
import torch
from torch import nn

from kern.core.config import PATH_KEYS, JobConfig, dump_toml
from kern.errors import ConfigError, Interrupted, KernError, UsageError
from kern.log import get_logger
from kern.core.plugins import KernPluginManager, get_manager
from kern.records import Architecture, NetworkType, TargetSpec, Variant, resolve_options

log = get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@attrs.define
class Plan:
    """A job with every name resolved and every plugin option checked: what the loop runs."""

    job: JobConfig
    arch: Architecture
    variant: str | None  # None: detected from the checkpoint before anything loads
    network: NetworkType
    network_options: dict[str, Any]
    timestep_method: str
    timestep_options: Any
    out: Path
    manager: KernPluginManager

    @property
    def hook(self) -> Any:
        return self.manager.hook


def prepare(job: JobConfig, manager: KernPluginManager | None = None) -> Plan:
    """Resolve architecture, variant, network type and their options; errors name the key and file."""
    from kern.maths import timesteps

    manager = manager or get_manager()
    if not job.model.arch:
        raise ConfigError(f"{job.source}: model.arch is not set; pass --arch or set [model] arch (see `kern plugins`)")
    arch, variant = manager.resolve_arch(job.model.arch)
    if job.model.variant:
        try:
            variant = arch.variant(job.model.variant).name
        except KeyError as exc:
            raise ConfigError(f"{job.source}: model.variant: {exc.args[0]}") from None
    network = manager.resolve_network(job.network.type)
    try:
        options = resolve_options(network.options, job.network.options, f"{job.source}: [network] ({network.name})")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    known = {f.name for f in attrs.fields(timesteps.TimestepOptions)}
    unknown = sorted(set(job.timesteps.options) - known)
    if unknown:
        raise ConfigError(f"{job.source}: unknown key(s) {['timesteps.' + k for k in unknown]}; known: {sorted(known)}")
    method = job.timesteps.method or arch.timestep_method
    try:
        ts_options = timesteps.TimestepOptions.from_mapping(job.timesteps.options)
    except (UsageError, TypeError, ValueError) as exc:
        raise ConfigError(f"{job.source}: [timesteps]: {exc}") from None
    if job.train.steps < 1:
        raise ConfigError(f"{job.source}: train.steps must be at least 1, got {job.train.steps}")
    _check_timesteps(manager, arch, method, ts_options, job.source)
    check_optimizer(job.train.optimizer, job.source)
    return Plan(job=job, arch=arch, variant=variant, network=network, network_options=options, timestep_method=method,
                timestep_options=ts_options, out=Path(job.save.out), manager=manager)


def _check_timesteps(manager: KernPluginManager, arch: Architecture, method: str, options: Any, source: str) -> None:
    """Draw once with the job's method and options (a pure function, no model): a typo fails now, not after caching."""
    key = "timesteps.method" if method != arch.timestep_method else f"{arch.name}'s timestep method"
    try:
        t = manager.hook.sample_timesteps(arch=arch.name, method=method, batch_size=2, latent_shape=(arch.latent_channels, 64, 64),
                                          generator=torch.Generator().manual_seed(0), options=options)
    except (UsageError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {key} = {method!r}: {exc}") from None
    if t is None:
        raise ConfigError(f"{source}: {key} = {method!r}: no installed plugin samples timesteps this way")


def check_files(plan: Plan, needed: tuple[str, ...] = ("transformer", "vae", "text_encoder")) -> None:
    """Before any work: every model file among ``needed`` that the architecture requires is set, and every one that
    is set exists. Errors name the key and the job file."""
    job = plan.job
    for part in ("transformer", "vae", "text_encoder"):
        path = getattr(job.model, part)
        if not path:
            if part in needed and part in plan.arch.required_files:
                raise ConfigError(f"{job.source}: model.{part} is not set; {plan.arch.name} needs its {part.replace('_', ' ')} "
                                  f"(set [model] {part}, or --set model.{part}=PATH)")
            continue
        if not Path(path).expanduser().exists():
            raise ConfigError(f"{job.source}: model.{part} = {path!r}: no such file or folder")


def check_trainable(plan: Plan, variant: Variant) -> None:
    if variant.untrainable:
        raise ConfigError(f"{plan.job.source}: {plan.arch.name} {variant.name} cannot be trained: {variant.untrainable}")


# --------------------------------------------------------------------------- pieces


def _release_memory() -> None:
    """Return freed model memory to the system/driver (call after dropping the last reference)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _variant(plan: Plan) -> Variant:
    if plan.variant is None and plan.job.model.transformer:
        detected = plan.hook.detect_variant(arch=plan.arch.name, path=plan.job.model.transformer)
        if detected:
            plan.variant = detected
            log.info("variant detected", arch=plan.arch.name, variant=detected, file=plan.job.model.transformer)
    return plan.arch.variant(plan.variant)


OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")


def check_optimizer(name: str, source: str = "") -> None:
    """``train.optimizer`` names a known optimizer whose package is installed (checked before any work)."""
    key = name.lower().replace("-", "").replace("_", "")
    where = f"{source}: " if source else ""
    if key not in OPTIMIZERS:
        raise ConfigError(f"{where}unknown train.optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    import importlib.util

    needs = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}.get(key)
    if needs and importlib.util.find_spec(needs) is None:
        raise ConfigError(f"{where}train.optimizer = {name!r} needs {needs}: pip install {needs}")


def make_optimizer(name: str, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """AdamW, AdamW 8-bit (bitsandbytes), Adafactor (transformers) or Prodigy (prodigyopt).

    AdamW is torch's fused kernel when every parameter is on a GPU (one launch for all adapter tensors instead
    of several per tensor), the default implementation otherwise (the CPU, whose runs the tests pin bit-exactly)."""
    name = name.lower().replace("-", "").replace("_", "")
    if name == "adamw":
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.is_cuda and p.dtype == torch.float32 for p in params)
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, **({"fused": True} if fused else {}))
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UsageError("train.optimizer = 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=0.01)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise UsageError("train.optimizer = 'prodigy' needs prodigyopt: pip install prodigyopt") from None
        return Prodigy(groups, lr=lr, weight_decay=0.01)
    raise UsageError(f"unknown train.optimizer {name!r}; known: adamw, adamw8bit, adafactor, prodigy")


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the base LR at optimizer step ``s``: linear warmup, then constant/linear/cosine decay."""

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return f


class Trainee(nn.Module):
    """Transformer plus network as one module, so DDP syncs the network's gradients."""

    def __init__(self, plan: Plan, variant: str, transformer: nn.Module, network: nn.Module) -> None:
        super().__init__()
        self.transformer, self.network = transformer, network
        self._call = plan.hook.predict_velocity
        self._arch, self._variant = plan.arch.name, variant

    def forward(self, latents, timesteps, text, references, options):
        return self._call(arch=self._arch, variant=self._variant, model=self.transformer, latents=latents,
                          timesteps=timesteps, text=text, references=references, options=options)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(generator: torch.Generator, state: dict[str, Any]) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT = re.compile(r"step-(\d{6,})")


def checkpoint_dirs(out: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first (intact or not: :func:`newest_intact_checkpoint` judges)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(CHECKPOINT.fullmatch(p.name).group(1)))


def save_checkpoint(out: Path, step: int, network: nn.Module, state: dict[str, Any], keep_last: int, save_adapter) -> Path:
    """Write ``checkpoints/step-NNNNNN/`` (the adapter, and the full state as safetensors + JSON, no pickle) into a
    temporary folder and rename it into place, then prune to the newest ``keep_last`` (0 keeps all)."""
    from kern.train.state import save_state

    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_adapter(tmp / "adapter.safetensors")
        save_state(tmp, {**state, "network": network.state_dict()}, also=("adapter.safetensors",))
        if final.exists():  # the same step again (a resumed run): move the old one aside, never leave none
            old = root / f".step-{step:06d}.old.tmp"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(out)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def newest_intact_checkpoint(out: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint whose files all match their recorded digests, and its state. A damaged one is named in
    a warning and skipped; ``UsageError`` when there is none to resume from."""
    from kern.train.state import DamagedState, load_state

    found = checkpoint_dirs(out)
    if not found:
        raise UsageError(f"--resume: no checkpoint in {out / 'checkpoints'}; start without --resume")
    problems = []
    for path in reversed(found):
        if (path / "state.pt").exists() and not (path / "state.json").exists():
            problems.append(f"{path.name}: written by an older kern as a pickle (state.pt), which kern no longer loads "
                            "because a pickle can run code")
            continue
        try:
            return path, load_state(path)
        except DamagedState as exc:
            problems.append(f"{path.name}: {exc}")
            log.warning("damaged checkpoint skipped; trying an older one", checkpoint=str(path), problem=str(exc))
    raise UsageError(f"--resume: no intact checkpoint in {out / 'checkpoints'} ({'; '.join(problems)}); "
                     "start a new run with --overwrite, or another --out")


def _metadata(plan: Plan, variant: str, step: int, started: float) -> dict[str, str]:
    from kern.adapters.network import modelspec_metadata

    job = plan.job
    v = plan.arch.variant(variant)
    spec = modelspec_metadata(
        architecture=v.modelspec or f"{plan.arch.name}-{variant}",
        implementation=plan.arch.implementation,
        title=job.save.name,
        resolution=(job.sample.width or v.width, job.sample.height or v.height),
    )
    return spec | {
        "kern.arch": plan.arch.name,
        "kern.variant": variant,
        "ss_base_model_version": f"{plan.arch.name}_{variant}".replace("-", "_"),
        "ss_network_module": plan.network.name,
        "ss_network_dim": str(plan.network_options.get("rank", "")),
        "ss_network_alpha": str(plan.network_options.get("alpha", "")),
        "ss_network_args": json.dumps({k: v for k, v in plan.network_options.items() if k not in ("rank", "alpha")}, default=str),
        "ss_learning_rate": str(job.train.learning_rate),
        "ss_lr_scheduler": job.train.lr_scheduler,
        "ss_lr_warmup_steps": str(job.train.warmup_steps),
        "ss_max_train_steps": str(job.train.steps),
        "ss_steps": str(step),
        "ss_seed": str(job.train.seed),
        "ss_optimizer": job.train.optimizer,
        "ss_mixed_precision": job.train.mixed_precision,
        "ss_gradient_checkpointing": str(job.train.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(job.train.gradient_accumulation),
        "ss_max_grad_norm": str(job.train.max_grad_norm),
        "ss_timestep_sampling": plan.timestep_method,
        "ss_training_started_at": str(started),
        "ss_output_name": job.save.name,
    }


# --------------------------------------------------------------------------- caching phases


def _abs(path: str | None) -> str:
    """A model path as the cache fingerprint sees it: the same file named two ways is one setting."""
    return str(Path(path).resolve()) if path else ""


def _cache_id(plan: Plan, variant: Variant) -> str:
    return variant.cache_id or f"{plan.arch.name}-{variant.name}"


def load_items(plan: Plan) -> tuple[list[Any], list[Any]]:
    from kern.data import datasets as data

    job = plan.job
    if not job.dataset.config:
        raise UsageError(f"{job.source}: dataset.config is not set; pass --dataset dataset.toml")
    specs = data.load_dataset_config(job.dataset.config)
    items = data.scan_items(specs, plan.arch.resolution_step)
    from kern.core.io import remove_orphans

    for folder in sorted({s.cache_directory for s in specs}):  # shared folders: only temp files over an hour old
        remove_orphans(folder)
    log.info("dataset", items=len(items), datasets=len(specs))
    return specs, items


def text_phase(plan: Plan, variant: Variant, items: list[Any], device: Any, with_encoder: Callable[[Any], None] | None = None,
               write: bool = True, caption_dropout: bool = False) -> int:
    """Fill the text cache (when ``write``) and call ``with_encoder(encoder)`` (the sample prompts' encoding),
    loading the text encoder only when something is to be encoded, and freeing it afterwards.

    Returns the number of items encoded. For a variant whose text encoder reads the control images
    (``Variant.text_images``), each item is encoded with its controls, and with ``caption_dropout`` its
    empty caption too (with the same controls).
    """
    from kern.data import cache
    from kern.data.datasets import open_picture

    job, hook = plan.job, plan.hook
    settings = {"text_encoder": _abs(job.model.text_encoder), "dtype": job.model.dtype, "fp8": job.model.fp8_text_encoder}
    if variant.text_images:
        _check_text_images(variant, items)
    loaded: list[Any] = []

    def encoder() -> Any:
        if not loaded:
            loaded.append(hook.load_model(arch=plan.arch.name, variant=variant.name, part="text_encoder", path=job.model.text_encoder,
                                          dtype=DTYPES[job.model.dtype], device=device, options={"fp8": job.model.fp8_text_encoder}))
        return loaded[0]

    def encode(prompts: list[str], images: list[list[Any]] | None = None) -> dict[str, torch.Tensor]:
        options = {"images": images} if images is not None else {}
        with torch.no_grad():
            result = hook.encode_text(arch=plan.arch.name, variant=variant.name, encoder=encoder(), prompts=prompts, options=options)
        return {k: v.detach().to("cpu") for k, v in result.items()}

    encoded = 0
    if write:
        controls = (lambda item: [open_picture(p) for p in item.control_paths]) if variant.text_images else None
        encoded = cache.ensure_text_cache(items, _cache_id(plan, variant), encode, settings=settings, images=controls,
                                          empty_per_item=caption_dropout)
        log.info("text cache ready", encoded=encoded, reused=len(items) - encoded)
    if with_encoder is not None:
        with_encoder(encoder())
    loaded.clear()  # the last reference: the encoder's memory goes back before the next phase loads
    _release_memory()
    return encoded


def _check_text_images(variant: Variant, items: list[Any]) -> None:
    """Edit variants encode every caption with its control images: a target without any cannot be trained."""
    missing = [i for i in items if not i.control_paths]
    if missing:
        raise UsageError(f"{variant.name} trains on target images with control images, but {len(missing)} item(s) have none, e.g. "
                         f"{missing[0].image_path}; set control_directory (or control_path in the JSONL) in the dataset config")


def latent_phase(plan: Plan, variant: Variant, items: list[Any], device: Any, write: bool = True):
    """Load the VAE and fill the latent cache; return (number encoded, the VAE moved to the CPU)."""
    from kern.data import cache

    job, hook = plan.job, plan.hook
    vae = hook.load_model(arch=plan.arch.name, variant=variant.name, part="vae", path=job.model.vae, dtype=torch.float32,
                          device=device, options={})
    encoded = 0
    if write:
        def encode(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return hook.encode_latents(arch=plan.arch.name, variant=variant.name, vae=vae, images=images.to(device)).cpu()

        encoded = cache.ensure_latent_cache(items, _cache_id(plan, variant), encode, dtype=torch.float32,
                                            settings={"vae": _abs(job.model.vae)})
        log.info("latent cache ready", encoded=encoded, reused=len(items) - encoded)
    if isinstance(vae, nn.Module):
        vae = vae.to("cpu")
    return encoded, vae


def cache_only(job: JobConfig, text: bool = True, latents: bool = True) -> dict[str, tuple[int, int]]:
    """``kern cache``: fill the caches a training run would, without training."""
    plan = prepare(job)
    check_files(plan, (("text_encoder",) if text else ()) + (("vae",) if latents else ()))
    variant = _variant(plan)
    check_trainable(plan, variant)
    specs, items = load_items(plan)
    device = torch.device(job.train.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = {}
    if text:
        out["text"] = (text_phase(plan, variant, items, device, caption_dropout=any(s.caption_dropout_rate > 0 for s in specs)), len(items))
    if latents:
        out["latents"] = (latent_phase(plan, variant, items, device)[0], len(items))
    return out


# --------------------------------------------------------------------------- one step


class NonFiniteLoss(KernError):
    def __init__(self, value: float) -> None:
        super().__init__(f"loss became {value}")
        self.value = value


def train_step(acc: Any, trainee: nn.Module, optimizer: Any, scheduler: Any, plan: Plan, x0: torch.Tensor,
               text: dict[str, torch.Tensor], references: list[torch.Tensor] | None, generator: torch.Generator,
               base_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One flow-matching micro-step on clean latents ``x0``: sample t, noise, predict, weighted MSE to the
    velocity, backward, and (on accumulation boundaries) clip, optimizer and scheduler step.

    Returns (loss, t). t and all randomness come from the CPU ``generator`` (``draw_noise``), so runs are
    reproducible and resumable from its state alone. The loss is checked after backward and before the
    optimizer step (``NonFiniteLoss``): a NaN never reaches the weights, and the host does not wait for the
    forward before it queues the backward. The training loop and ``bench/train_step.py`` both run exactly this.
    """
    from kern.maths import timesteps

    device = x0.device
    t = plan.hook.sample_timesteps(arch=plan.arch.name, method=plan.timestep_method, batch_size=x0.shape[0],
                                   latent_shape=tuple(x0.shape[1:]), generator=generator, options=plan.timestep_options)
    noise = draw_noise(x0, generator)
    t = t.to(device)
    tb = t.view(-1, *([1] * (x0.dim() - 1)))
    noisy = (1 - tb) * x0 + tb * noise
    max_grad_norm = plan.job.train.max_grad_norm
    with acc.accumulate(trainee):
        with acc.autocast():
            pred = trainee(noisy.to(base_dtype), t, text, references, {"guidance": 1.0})
        weight = timesteps.loss_weighting(plan.timestep_options.weighting_scheme, t).view_as(tb)
        loss = (weight * (pred.float() - (noise - x0)) ** 2).mean()
        acc.backward(loss)
        bad = ~torch.isfinite(loss.detach())
        if acc.num_processes > 1:  # one process's NaN is every process's after the gradient all-reduce
            bad = acc.reduce(bad.float(), reduction="sum") > 0
        if bad:
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(loss.item())
        if acc.sync_gradients and max_grad_norm > 0:
            acc.clip_grad_norm_(acc.unwrap_model(trainee).network.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, t


_device_generators: dict[torch.device, torch.Generator] = {}


def draw_noise(x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x0``, as fp32 on ``x0``'s device.

    On the CPU it is drawn from ``generator`` itself. On a GPU a device generator is re-seeded each step from
    one draw of ``generator`` and the noise is drawn there: no host-side sampling and copy per step, and the
    CPU generator's state still fixes everything (checkpoints store only it, so resume stays exact)."""
    if x0.device.type == "cpu":
        return torch.randn(x0.shape, generator=generator)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    g = _device_generators.get(x0.device)
    if g is None:
        g = _device_generators[x0.device] = torch.Generator(x0.device)
    g.manual_seed(seed)
    return torch.randn(x0.shape, generator=g, device=x0.device)


# --------------------------------------------------------------------------- samples


class Sampler:
    """The ``[sample]`` images of a run, made by ``kern.generate.driver.Generator`` with the models the run holds.

    Sample prompts are prompt lines (``--w --h --d --s --g --n --ci``, wildcards not expanded): parsed and
    checked when the run starts, encoded while the text encoder is loaded for the cache, and denoised
    with the training transformer (adapters active) whenever samples are due.
    """

    def __init__(self, plan: Plan, variant: Variant, device: Any, dtype: torch.dtype) -> None:
        from kern.generate.driver import Generator, Setup
        from kern.data.prompts import parse_line

        job = plan.job
        s = job.sample
        names = {v: k for k, v in DTYPES.items()}
        setup = Setup(arch=plan.arch.name, variant=variant.name, vae=job.model.vae, text_encoder=job.model.text_encoder,
                      dtype=names[dtype], device=str(device), width=s.width, height=s.height, steps=s.steps, guidance=s.guidance,
                      seed=s.seed, fp8_text_encoder=job.model.fp8_text_encoder)
        self.generator = Generator(setup, plan.manager)
        requests = [parse_line(p, f"{job.source}: sample.prompts[{i}]") for i, p in enumerate(job.sample.prompts)]
        self.images = self.generator.plan([r for r in requests if r is not None])
        self.texts: dict[Any, Any] = {}
        self.references: dict[Any, Any] | None = None

    def encode(self, encoder: Any) -> None:
        self.generator.text_encoder = encoder
        self.texts = self.generator.encode(self.images)
        self.generator.text_encoder = None

    def run(self, transformer: nn.Module, vae: Any, folder: Path, step: int, save: bool = True) -> list[Path]:
        """Denoise every sample with ``transformer`` and, when ``save``, decode and write them."""
        gen = self.generator
        gen.setup.out = folder
        gen.transformer, gen.vae = transformer, vae.to(gen.device) if isinstance(vae, nn.Module) else vae
        try:
            if self.references is None:
                self.references = gen.encode_references(self.images)
            gen.denoise(self.images, self.texts, references=self.references)
            if not save:
                return []
            return gen.decode_and_save(self.images, name=lambda im, layer: f"step-{step:06d}_{im.index:02d}" + (f"_layer{layer}" if layer is not None else ""))
        finally:
            if isinstance(vae, nn.Module):
                vae.to("cpu")
            gen.transformer = gen.vae = None


# --------------------------------------------------------------------------- the run


def run(job: JobConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train as ``job`` says; return the path of the final adapter.

    Everything is checked before any work (:func:`prepare`, :func:`check_inputs`, the dataset, the sample prompts,
    the run folder); then the folder is locked for this process (:class:`kern.train.runs.RunLock`). An earlier run in the
    folder is continued with ``resume`` or replaced with ``overwrite``, never silently. SIGINT / SIGTERM during the
    loop finish the step, write a checkpoint and raise ``kern.errors.Interrupted``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from kern.gpu import distributed
    from kern.train import runs
    from kern.core.io import ensure_writable_dir

    if resume and overwrite:
        raise UsageError("--resume continues the run in the folder and --overwrite replaces it: give one of them")
    plan = prepare(job)
    if not job.dataset.config:
        raise UsageError(f"{job.source}: dataset.config is not set; pass --dataset dataset.toml")
    check_files(plan)
    variant = _variant(plan)
    check_trainable(plan, variant)
    specs, items = load_items(plan)  # every image probed and every caption read
    # The sample prompts parsed and sized (no model yet; the device is set once it is known).
    sampler = Sampler(plan, variant, torch.device("cpu"), DTYPES[job.model.dtype]) if job.sample.prompts else None
    ensure_writable_dir(plan.out, "save.out (--out)")

    ddp = DistributedDataParallelKwargs(find_unused_parameters=bool(plan.network_options.get("module_dropout")))
    acc = Accelerator(
        mixed_precision=job.train.mixed_precision,
        gradient_accumulation_steps=job.train.gradient_accumulation,
        cpu=job.train.device == "cpu" or not torch.cuda.is_available(),  # CPU-only: gloo DDP under torchrun
        kwargs_handlers=[ddp],
    )
    distributed.check_launch(acc)
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(runs.StopSignals())
        if acc.is_main_process:
            stack.enter_context(runs.RunLock(plan.out))
        resume_from = _open_run_folder(plan, acc, resume, overwrite)
        # A sharded base needs every process in each forward, so then every process runs the samples' loop.
        if sampler is not None and (acc.is_main_process or job.train.shard_base):
            sampler.generator.device = acc.device
        else:
            sampler = None
        return _train(plan, variant, acc, ddp, stop, resume_from, specs, items, sampler)


def _open_run_folder(plan: Plan, acc: Any, resume: bool, overwrite: bool) -> tuple[Path, dict[str, Any]] | None:
    """Under the lock: refuse to replace an earlier run unasked, pick the checkpoint to resume from, clear debris."""
    from kern.train import runs

    out, name = plan.out, plan.job.save.name
    earlier = runs.earlier_outputs(out, name)
    resume_from = newest_intact_checkpoint(out) if resume else None
    if earlier and not (resume or overwrite):
        raise UsageError(f"{out} holds an earlier run ({', '.join(earlier)}): continue it with --resume, replace it with "
                         "--overwrite, or choose another --out")
    acc.wait_for_everyone()  # every process has judged the folder before the main one changes it
    if acc.is_main_process:
        if overwrite and earlier:
            runs.clear_outputs(out, name)
        runs.remove_orphans(out)
    return resume_from


def _train(plan: Plan, variant: Variant, acc: Any, ddp: Any, stop: Any, resume_from: tuple[Path, dict[str, Any]] | None,
           specs: list[Any], items: list[Any], sampler: Sampler | None) -> Path:
    from kern.data import cache
    from kern.data import datasets as data
    from kern.gpu import distributed

    job, hook, arch, out = plan.job, plan.hook, plan.arch, plan.out
    cache_id = _cache_id(plan, variant)
    base_dtype = DTYPES[job.model.dtype]
    device = acc.device
    sharded = job.train.shard_base

    if acc.is_main_process:
        resolved = job.to_dict()
        resolved["model"]["variant"] = variant.name
        for dotted in PATH_KEYS:  # absolute, so the stored config reruns from anywhere
            section, key = dotted.split(".")
            if resolved.get(section, {}).get(key):
                resolved[section][key] = str(Path(resolved[section][key]).resolve())
        from kern.core.io import write_text

        write_text(out / "config.toml", dump_toml(resolved))

    text_phase(plan, variant, items, device, sampler.encode if sampler else None, write=acc.is_main_process,
               caption_dropout=any(s.caption_dropout_rate > 0 for s in specs))
    _, vae = latent_phase(plan, variant, items, device, write=acc.is_main_process)
    acc.wait_for_everyone()

    # Phase 3: the transformer and the network.
    # Sharded: load on the CPU, each process then moves only its shard to the device; block swap: likewise, the
    # swapped blocks stay there.
    from kern.gpu import accel

    transformer = hook.load_model(arch=arch.name, variant=variant.name, part="transformer", path=job.model.transformer,
                                  dtype=base_dtype, device="cpu" if sharded else accel.base_device(job.train, device), options={})
    if transformer is None:
        raise KernError(f"no installed plugin loads the {arch.name} transformer (see `kern plugins`)")
    transformer.requires_grad_(False)
    transformer.eval()  # the frozen base never uses dropout; the network's own modules go to train mode below
    accel.prepare_base(transformer, job.train, device)  # fp8 base weights: before the adapters wrap the layers
    targets = TargetSpec(targets=tuple(job.network.targets) or arch.default_targets, exclude=tuple(arch.default_excludes) + tuple(job.network.exclude),
                         include=tuple(job.network.include))
    torch.manual_seed(job.train.seed)  # network init is part of what a seed fixes
    network = hook.make_network(network_type=plan.network.name, model=transformer, targets=targets, options=plan.network_options)
    if network is None:
        raise KernError(f"no plugin built a {plan.network.name!r} network (see `kern plugins`)")
    network.to(device)
    network.train()
    accel.apply(transformer, job.train, device)  # checkpointing, attention backend, compiled blocks: after the network
    groups = network.optimizer_param_groups(job.train.learning_rate)
    optimizer = make_optimizer(job.train.optimizer, groups, job.train.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(job.train.lr_scheduler, job.train.warmup_steps, job.train.steps))
    trainee = Trainee(plan, variant.name, transformer, network)
    if sharded:
        trainee = distributed.shard_base(trainee, transformer, device, find_unused=ddp.find_unused_parameters)
        optimizer, scheduler = acc.prepare(optimizer, scheduler)
    else:
        trainee, optimizer, scheduler = acc.prepare(trainee, optimizer, scheduler)

    generator = torch.Generator().manual_seed(job.train.seed + acc.process_index)
    step, epoch, batch_pos, history = 0, 0, 0, []
    started = time.time()

    def save_adapter(path: Path, at_step: int) -> None:
        acc.unwrap_model(trainee).network.save(path, dtype=DTYPES[job.save.precision], metadata=_metadata(plan, variant.name, at_step, started))

    if resume_from is not None:
        checkpoint, state = resume_from
        _restore(checkpoint, state, acc.unwrap_model(trainee).network, optimizer, scheduler)
        step, epoch, batch_pos, history = state["step"], state["epoch"], state["batch_pos"], list(state["history"])
        _set_rng_state(generator, state["rng"][acc.process_index])
        log.info("resumed", checkpoint=str(checkpoint), step=step, epoch=epoch, batch=batch_pos)

    def write_checkpoint(at_step: int) -> Path | None:
        states = [None] * acc.num_processes
        if acc.num_processes > 1:
            torch.distributed.all_gather_object(states, _rng_state(generator))
        else:
            states = [_rng_state(generator)]
        path = None
        if acc.is_main_process:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": at_step,
                     "epoch": epoch, "batch_pos": batch_pos, "history": history, "rng": states}
            path = save_checkpoint(out, at_step, acc.unwrap_model(trainee).network, state, job.save.keep_last,
                                   lambda p: save_adapter(p, at_step))
            log.info("checkpoint saved", path=str(path), step=at_step)
        acc.wait_for_everyone()
        return path

    with contextlib.ExitStack() as files:
        writer = _tensorboard(out / "tensorboard") if acc.is_main_process else None
        if writer is not None:
            files.callback(writer.close)
        # A fresh run starts its metrics anew; a resumed one appends after the checkpoint's step.
        if resume_from is not None and acc.is_main_process:
            _truncate_metrics(out / "metrics.jsonl", step)
        metrics = files.enter_context(open(out / "metrics.jsonl", "a" if resume_from else "w", encoding="utf-8")) \
            if acc.is_main_process else None
        progress = _progress(job.train.steps, step, acc.is_main_process)
        files.callback(progress.close)
        rate_start, rate_step = time.time(), step

        def make_samples(at_step: int) -> None:
            if sampler is not None:
                with acc.autocast():
                    sampler.run(acc.unwrap_model(trainee).transformer, vae, out / "samples", at_step, save=acc.is_main_process)

        trainee.train()
        acc.unwrap_model(trainee).transformer.eval()
        stop.deferred = True  # from here a signal ends the step, then the run, with a checkpoint
        while step < job.train.steps:
            order = data.batch_order(items, specs, job.train.seed, epoch)
            mine = order[acc.process_index :: acc.num_processes]
            if not mine:
                raise KernError(f"{job.dataset.config}: too few batches for {acc.num_processes} processes")
            while batch_pos < len(mine) and step < job.train.steps:
                batch = cache.load_batch([items[i] for i in mine[batch_pos]], cache_id, generator=generator,
                                         caption_dropout_rate=specs[items[mine[batch_pos][0]].dataset_index].caption_dropout_rate)
                batch_pos += 1
                x0 = batch["latents"].to(device, torch.float32)
                text = {k: v.to(device) for k, v in batch["text"].items()}
                refs = [r.to(device, base_dtype) for r in batch["references"]] if batch["references"] else None
                try:
                    loss, t = train_step(acc, trainee, optimizer, scheduler, plan, x0, text, refs, generator, base_dtype)
                except NonFiniteLoss as exc:
                    kept = checkpoint_dirs(out)
                    raise KernError(
                        f"loss became {exc.value} at step {step + 1} (batch {batch['keys']}); stopping. "
                        f"Last good checkpoint: {kept[-1] if kept else 'none yet'}. Lower train.learning_rate or check the data."
                    ) from None
                if not acc.sync_gradients:
                    continue
                step += 1
                loss_value = acc.gather(loss.detach()).mean().item()
                history.append(loss_value)
                lr = scheduler.get_last_lr()[0]
                if acc.is_main_process:
                    metrics.write(json.dumps({"step": step, "loss": loss_value, "lr": lr, "t": t.cpu().tolist()}) + "\n")
                    metrics.flush()
                    if writer is not None:
                        writer.add_scalar("loss", loss_value, step)
                        writer.add_scalar("lr", lr, step)
                        writer.add_histogram("timesteps", t.float().cpu(), step)
                    rate = (step - rate_step) / max(1e-9, time.time() - rate_start)
                    progress.update(1, loss=loss_value, rate=rate)
                saved = False
                if job.save.every_n_steps and step % job.save.every_n_steps == 0 and step < job.train.steps:
                    write_checkpoint(step)
                    saved = True
                if _stop_requested(stop, acc):
                    path = write_checkpoint(step) if not saved else checkpoint_dirs(out)[-1]
                    name = signal_name(stop.signum or 15)
                    raise Interrupted(stop.signum or 15, f"stopped by {name} after step {step} of {job.train.steps}; checkpoint "
                                                         f"{path}; continue with: kern train --config {out / 'config.toml'} --resume")
                if job.sample.every_n_steps and step % job.sample.every_n_steps == 0 and step < job.train.steps:
                    make_samples(step)
            if batch_pos >= len(mine):
                epoch, batch_pos = epoch + 1, 0
        stop.deferred = False

        progress.close()
        if acc.num_processes > 1:
            _check_replicas_agree(acc.unwrap_model(trainee).network)
        final = out / f"{job.save.name}.safetensors"
        if acc.is_main_process:
            save_adapter(final, step)
        make_samples(step)  # after the save: a failing sample loses no training
        if acc.is_main_process:
            from kern.train.plot import loss_plot

            loss_plot(history, out / "loss.png")
            log.info("training done", adapter=str(final), steps=step, final_loss=history[-1] if history else None,
                     seconds=round(time.time() - started, 1))
    acc.wait_for_everyone()
    acc.end_training()
    return final


def _restore(checkpoint: Path, state: dict[str, Any], network: nn.Module, optimizer: Any, scheduler: Any) -> None:
    """Load a checkpoint's state into the run; a checkpoint of another network or optimizer is a clear error."""
    try:
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for key in ("step", "epoch", "batch_pos", "history", "rng"):
            state[key]
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--resume: {checkpoint} does not fit this job ({first[:300]}); resume with the [network] and "
                         "[train] optimizer settings the run was started with (its config.toml)") from None


def _stop_requested(stop: Any, acc: Any) -> bool:
    """Whether any process got SIGINT / SIGTERM: all of them must write the checkpoint together."""
    flag = stop.requested
    if acc.num_processes > 1:
        t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
        flag = bool(acc.reduce(t, reduction="sum").item() > 0)
        if flag and stop.signum is None:
            stop.signum = 15
    return flag


def signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint a resumed run restarts from), and a line torn
    by a killed process (it is the last one; any unreadable line is dropped with a warning)."""
    from kern.core.io import write_text

    if not path.is_file():
        return
    keep, torn = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            at = int(record.get("step", 0))
        except (ValueError, TypeError, AttributeError):
            torn += line.strip() != ""
            continue
        if at <= step:
            keep.append(line)
    if torn:
        log.warning("unreadable metrics lines dropped (a write torn by a killed process)", file=str(path), lines=torn)
    write_text(path, "".join(line + "\n" for line in keep))


def _check_replicas_agree(network: nn.Module) -> None:
    """DDP keeps every process's adapter identical; a mismatch means a broken set-up, so fail loudly."""
    digest = sum(float(p.detach().double().sum()) * (i + 1) for i, p in enumerate(network.parameters()))
    digests: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise KernError(f"data-parallel processes ended with different adapter weights: {digests}")
    log.info("replicas agree", processes=len(digests), digest=digest)


def _tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: metrics.jsonl always has the same scalars
        log.info("tensorboard not installed; scalars go to metrics.jsonl only (pip install tensorboard)")
        return None
    return SummaryWriter(str(path))


class _progress:
    """A tqdm bar with step, loss, it/s and ETA, or nothing on non-main processes."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, n: int, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
