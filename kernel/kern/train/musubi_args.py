"""musubi-tuner training command lines as kern jobs: the pure translation behind ``kern import musubi``.

A command line (or musubi's ``--config_file`` TOML) is split into its launcher, its script and the script's options
(:mod:`kern.train.musubi_options`); :func:`translate` turns the options
into a job (a nested dict of kern's job keys) and sorts every option into one of two explicit lists besides the
translated ones: ``ignored`` (no meaning in kern: data-loader workers, launcher threads, kern's default attention)
and ``refused`` (a setting kern cannot reproduce). Each entry says why. docs/migrating.md is the table.

Which architecture a script trains and which variant a ``--model_version`` names come from the plugins
(``Architecture.musubi_script``, ``Variant.musubi_version``): this module names none. Where musubi's default differs
from kern's (learning rate, steps, alpha, gradient checkpointing, timestep method ...) the job writes musubi's, so
the job trains what the command line trained. Source of the option list and defaults: musubi-tuner
``src/musubi_tuner/training/parser_common.py`` and the ``*_train_network.py`` parsers (commit 30c658c).
"""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import attrs

from kern.train.musubi_options import IGNORED, LYCORIS, LYCORIS_ALGOS, OPTIONS, REFUSED, Command, adapter_args

# musubi's defaults where kern's differ, written when the option is absent (parser_common.py; lora.py: rank 4).
MUSUBI_DEFAULTS = {
    "train.learning_rate": 2e-6,
    "train.steps": 1600,
    "train.gradient_checkpointing": False,
    "timesteps.method": "sigma",
    "network.alpha": 1.0,
    "network.rank": 4,
    "save.keep_last": 0,
}
ARG_NAMES = {"dora": "dora_wd", "use_rslora": "rs_lora"}  # kern network key -> LyCORIS network_args name
# A path the job reads: made absolute by the caller (musubi's were relative to where it ran).
LAUNCHER_KEEPS = (
    "launcher option: keep it on the line that launches kern (accelerate launch ... -m kern_cli.main train)"
)


@attrs.frozen
class Translation:
    job: dict[str, dict[str, Any]]  # section -> key -> value, as the job TOML holds it
    translated: tuple[tuple[str, str], ...]  # (musubi option, kern key)
    ignored: tuple[tuple[str, str], ...]  # (option, why)
    refused: tuple[tuple[str, str], ...]  # (option, why)
    notes: tuple[str, ...] = ()


# --------------------------------------------------------------------------- translation


def translate(
    command: Command,
    architectures: Iterable[Any],
    networks: Iterable[str],
    *,
    arch: Any = None,
    batches_per_epoch: int | None = None,
) -> Translation:
    """``command`` as a job. ``architectures``: the installed :class:`kern.records.Architecture` records (the
    script names one), or ``arch`` to force one; ``networks``: the installed network type names;
    ``batches_per_epoch``: the dataset's batches per epoch, when it could be counted (epoch counts need it)."""
    t = _Builder(command.options)
    arch = arch or _arch_of(command.script, list(architectures), t)
    if arch is not None:
        t.put("(script)", "model.arch", arch.name)
        _variant(arch, t)
    for option, value in command.launcher.items():
        if option != "mixed_precision":
            t.ignored.append((f"launcher --{option}", LAUNCHER_KEEPS))
    _models_and_data(t)
    _network(t, set(networks))
    _optimizer(t)
    _schedule(t, batches_per_epoch)
    _training(t, command.launcher)
    _timesteps(t)
    _saving_and_sampling(t)
    for option in t.left():
        if option in IGNORED:
            t.ignored.append((option, IGNORED[option]))
        elif option in REFUSED:
            t.refused.append((option, REFUSED[option]))
        elif option not in OPTIONS:
            t.refused.append((option, "not a musubi-tuner training option"))
        else:  # a known option no rule took: should not happen; say so rather than drop it
            t.refused.append((option, "kern has no translation for it"))
    for dotted, value in MUSUBI_DEFAULTS.items():
        t.default(dotted, value)
    return Translation(t.job, tuple(t.translated), tuple(t.ignored), tuple(t.refused), tuple(t.notes))


@attrs.define
class _Builder:
    options: dict[str, Any]
    job: dict[str, dict[str, Any]] = attrs.Factory(dict)
    translated: list[tuple[str, str]] = attrs.Factory(list)
    ignored: list[tuple[str, str]] = attrs.Factory(list)
    refused: list[tuple[str, str]] = attrs.Factory(list)
    notes: list[str] = attrs.Factory(list)
    used: set[str] = attrs.Factory(set)
    per_epoch: int | None = None  # optimizer steps per epoch, when the dataset could be counted

    def take(self, option: str) -> Any:
        self.used.add(option)
        return self.options.get(option)

    def put(self, option: str, dotted: str, value: Any) -> None:
        section, key = dotted.split(".", 1)
        self.job.setdefault(section, {})[key] = value
        self.translated.append((option, dotted))

    def has(self, dotted: str) -> bool:
        section, key = dotted.split(".", 1)
        return key in self.job.get(section, {})

    def default(self, dotted: str, value: Any) -> None:
        if not self.has(dotted) and (dotted.split(".")[0] != "network" or "network" in self.job):
            self.put("(musubi default)", dotted, value)

    def refuse(self, option: str, why: str) -> None:
        self.refused.append((option, why))

    def number(self, option: str, kind: type) -> Any:
        value = self.take(option)
        if value is None:
            return None
        try:
            out = kind(ast.literal_eval(value) if isinstance(value, str) else value)
            if isinstance(out, float) and not math.isfinite(out):
                raise ValueError
            return out
        except (ValueError, SyntaxError, TypeError):
            self.refuse(option, f"wants a number, got {value!r}")
            return None

    def simple(self, option: str, dotted: str, kind: type = str) -> None:
        value = self.take(option) if kind is str else self.number(option, kind)
        if value is not None:
            self.put(option, dotted, value)

    def flag(self, option: str, dotted: str, value: Any = True) -> None:
        if self.take(option):
            self.put(option, dotted, value)

    def left(self) -> list[str]:
        return [o for o in self.options if o not in self.used]


def _arch_of(script: str, architectures: list[Any], t: _Builder) -> Any:
    for a in architectures:
        if a.musubi_script and a.musubi_script == script:
            return a
    known = sorted(f"{a.musubi_script}.py" for a in architectures if a.musubi_script)
    if not script:
        t.refuse("(script)", f"the command names no training script; give one of {known} (or kern's --arch)")
    elif script.endswith("_train"):
        t.refuse("(script)", f"{script}.py is a full fine-tune; kern trains adapters (LoRA, LoHa, LoKr): use {known}")
    else:
        t.refuse("(script)", f"{script}.py: kern trains no architecture with it; known: {known}")
    return None


def _variant(arch: Any, t: _Builder) -> None:
    wanted = t.take("model_version")
    if wanted is None:
        t.put("(default --model_version)", "model.variant", arch.variant(None).name)
        return
    for v in arch.variants:
        if (v.musubi_version or v.name) == str(wanted).lower():
            t.put("model_version", "model.variant", v.name)
            return
    known = [v.musubi_version or v.name for v in arch.variants]
    t.refuse("model_version", f"{wanted!r} is not one of {arch.name}'s versions {known}")


def _models_and_data(t: _Builder) -> None:
    for option, dotted in (("dit", "model.transformer"), ("vae", "model.vae"), ("text_encoder", "model.text_encoder")):
        t.simple(option, dotted)
    if t.options.get("dataset_config") is None:
        t.refuse("dataset_config", "musubi needs it and so does kern: give --dataset_config")
    t.simple("dataset_config", "dataset.config")
    t.flag("fp8_text_encoder", "model.fp8_text_encoder")
    t.flag("fp8_vl", "model.fp8_text_encoder")
    weights = t.take("base_weights")
    mults = t.take("base_weights_multiplier") or []
    if weights:
        weights = [weights] if isinstance(weights, str) else list(weights)
        entries = []
        for i, w in enumerate(weights):  # musubi: multiplier i, or 1.0 when the list is shorter
            mult = float(mults[i]) if i < len(mults) else 1.0
            entries.append(f"{w}:{mult:g}")
        t.put("base_weights", "model.base_weights", entries)


def _network(t: _Builder, networks: set[str]) -> None:
    module = t.take("network_module")
    args = t.take("network_args") or []
    args = [args] if isinstance(args, str) else list(args)
    pairs = {}
    for entry in args:
        key, eq, value = str(entry).partition("=")
        if not eq:
            t.refuse("network_args", f"{entry!r} is not key=value")
            continue
        pairs[key.strip()] = value.strip()
    kind = _network_type(module, pairs.pop("algo", None), t)
    if kind is not None and kind not in networks:
        t.refuse("network_module", f"kern has no {kind} network type installed (installed: {sorted(networks)})")
    elif kind is not None:
        t.put("network_module", "network.type", kind)
    if t.take("dim_from_weights"):
        if t.options.get("network_weights") is None:
            t.refuse("dim_from_weights", "needs --network_weights")
        t.used.add("network_dim")  # kern reads the rank (and alpha) from network.init_weights when rank is unset
        t.translated.append(("dim_from_weights", "network.rank (unset: read from network.init_weights)"))
        t.job.setdefault("network", {})["rank"] = None
        t.job["network"]["alpha"] = None
    else:
        t.simple("network_dim", "network.rank", int)
        t.simple("network_alpha", "network.alpha", float)
    t.simple("network_dropout", "network.dropout", float)
    t.simple("network_weights", "network.init_weights")
    keys, ignored, refused = adapter_args(module or "", kind or "", pairs)
    for key, value in keys.items():
        t.put(f"network_args {ARG_NAMES.get(key, key)}", f"network.{key}", value)
    t.ignored += ignored
    t.refused += refused
    if keys.get("dora"):
        t.notes.append("dora_wd: LyCORIS lets the gradient flow through the row norm; kern detaches it (as PEFT)")
    for key, value in pairs.items():
        _network_arg(t, key, value, kind)


def _network_type(module: str | None, algo: str | None, t: _Builder) -> str | None:
    if module is None:
        t.refuse("network_module", "musubi needs it (networks.lora_<arch>, networks.loha); give it")
        return None
    if module == LYCORIS:  # LyCORIS: the algorithm is a network argument; its default is LoRA (LoCon)
        algo = (algo or "lora").lower()
        if algo in LYCORIS_ALGOS:
            return LYCORIS_ALGOS[algo]
        t.refuse("network_args", f"algo={algo}: kern has no {algo} network type (it trains lora, loha, lokr)")
        return None
    if algo is not None:
        t.refuse("network_args", f"algo={algo} belongs to lycoris.kohya, not {module}")
    name = module.rsplit(".", 1)[-1]
    if module.startswith("networks.") and (name == "lora" or name.startswith("lora_")):
        return "lora"
    if module in ("networks.loha", "networks.lokr"):
        return name
    t.refuse("network_module", f"{module}: kern translates networks.lora*, networks.loha, networks.lokr, {LYCORIS}")
    return None


def _network_arg(t: _Builder, key: str, value: str, kind: str | None) -> None:
    option = f"network_args {key}"
    if key == "loraplus_lr_ratio" and kind not in ("lora", None):
        t.refuse(option, f"LoRA+ needs a LoRA's up matrix; a {kind} has none (musubi: not supported with LoHa/LoKr)")
        return
    if key in ("exclude_patterns", "include_patterns"):
        try:
            patterns = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            patterns = None
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            t.refuse(option, f"wants a list of regular expressions, got {value!r}")
            return
        t.put(option, f"network.{key.split('_')[0]}", patterns)  # both fullmatch dotted module paths
    elif key in ("loraplus_lr_ratio", "rank_dropout", "module_dropout"):
        try:
            t.put(option, f"network.{key}", float(value))
        except ValueError:
            t.refuse(option, f"wants a number, got {value!r}")
    elif key == "verbose":
        t.ignored.append((option, "kern logs the adapted modules at -v"))
    elif key in ("conv_dim", "conv_alpha"):
        t.ignored.append((option, "the blocks musubi adapts have no convolutions: it has no effect there either"))
    else:
        t.refuse(option, "kern has no such network option")


def _literal(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value  # musubi's literal_eval would fail; a bare word is meant as a string


def _key_values(t: _Builder, option: str) -> dict[str, Any] | None:
    entries = t.take(option)
    if entries is None:
        return None
    if isinstance(entries, dict):  # a config file may hold a table
        return dict(entries)
    out = {}
    for entry in [entries] if isinstance(entries, str) else entries:
        key, eq, value = str(entry).partition("=")
        if not eq:
            t.refuse(option, f"{entry!r} is not key=value")
            continue
        out[key.strip()] = _literal(value.strip())
    return out


def _optimizer(t: _Builder) -> None:
    name = str(t.take("optimizer_type") or "")
    args = _key_values(t, "optimizer_args") or {}
    lower = name.lower()
    if lower in ("", "adamw", "adamw8bit", "adafactor"):
        kern_name = lower or "adamw"
    elif lower.endswith("8bit") and "." not in name:
        t.refuse("optimizer_type", f"musubi builds only AdamW8bit by name; give bitsandbytes.optim.{name}")
        return
    else:  # musubi: a bare name is a torch.optim class, a dotted one a class path
        kern_name = name if "." in name else f"torch.optim.{name}"
    if kern_name == "adafactor" and args.get("relative_step", True):
        t.refuse(
            "optimizer_type",
            "musubi's Adafactor defaults to relative_step=True (its own LR schedule), which kern does not run; add "
            "--optimizer_args relative_step=False scale_parameter=False warmup_init=False",
        )
    t.put("optimizer_type", "train.optimizer", kern_name)
    if "weight_decay" in args:
        t.put("optimizer_args weight_decay", "train.weight_decay", float(args.pop("weight_decay")))
    if args:
        t.put("optimizer_args", "train.optimizer_args", args)


def _schedule(t: _Builder, batches_per_epoch: int | None) -> None:
    t.simple("learning_rate", "train.learning_rate", float)
    accumulation = t.number("gradient_accumulation_steps", int) or 1
    if accumulation != 1:
        t.put("gradient_accumulation_steps", "train.gradient_accumulation", accumulation)
    per_epoch = math.ceil(batches_per_epoch / accumulation) if batches_per_epoch else None

    def epochs(option: str) -> int | None:
        n = t.number(option, int)
        if n is not None and per_epoch is None:
            t.refuse(option, "kern counts steps: give steps, or a --dataset_config kern can read to count an epoch")
            return None
        return None if n is None else n * per_epoch

    steps = epochs("max_train_epochs")  # musubi: epochs win over --max_train_steps
    if steps is not None:
        t.put("max_train_epochs", "train.steps", steps)
        t.notes.append(f"--max_train_epochs: {steps} steps ({per_epoch} per epoch, counted from the dataset now)")
        t.used.add("max_train_steps")
    else:
        t.simple("max_train_steps", "train.steps", int)
    total = t.job.get("train", {}).get("steps", MUSUBI_DEFAULTS["train.steps"])
    scheduler = t.take("lr_scheduler")
    if scheduler is not None:
        if str(scheduler).startswith("adafactor"):
            t.refuse("lr_scheduler", "Adafactor's own schedule is not one kern runs")
        t.put("lr_scheduler", "train.lr_scheduler", scheduler)
    warmup = t.number("lr_warmup_steps", float)
    if warmup is not None:  # musubi: a float below 1 is a fraction of the steps
        t.put("lr_warmup_steps", "train.warmup_steps", int(warmup * total) if warmup < 1 else int(warmup))
    decay = t.number("lr_decay_steps", float)
    if decay:
        t.refuse("lr_decay_steps", "kern has no decay-steps key; give num_decay_steps in --lr_scheduler_args")
    t.simple("lr_scheduler_num_cycles", "train.lr_scheduler_num_cycles", float)
    t.simple("lr_scheduler_power", "train.lr_scheduler_power", float)
    t.simple("lr_scheduler_min_lr_ratio", "train.lr_scheduler_min_lr_ratio", float)
    args = _key_values(t, "lr_scheduler_args")
    if args:
        t.put("lr_scheduler_args", "train.lr_scheduler_args", args)
    t.per_epoch = per_epoch  # for the save and sample intervals


def _training(t: _Builder, launcher: Mapping[str, Any]) -> None:
    t.simple("max_grad_norm", "train.max_grad_norm", float)
    t.simple("seed", "train.seed", int)
    if t.options.get("seed") is None:
        t.notes.append("no --seed: musubi picks a random seed; kern uses train.seed = 42")
    precision = t.take("mixed_precision") or launcher.get("mixed_precision")
    t.put(
        "mixed_precision" if "mixed_precision" in t.options else "launcher --mixed_precision",
        "train.mixed_precision",
        precision or "no",
    )
    t.flag("gradient_checkpointing", "train.gradient_checkpointing")
    t.flag("gradient_checkpointing_cpu_offload", "train.offload_activations")
    t.flag("fp8_base", "train.base_precision", "fp8")
    t.simple("blocks_to_swap", "train.blocks_to_swap", int)
    if t.job.get("train", {}).get("blocks_to_swap"):
        t.notes.append("--blocks_to_swap: kern counts repeated blocks; check the number against docs/memory.md")
    t.flag("flash_attn", "train.attention", "flash_attn")
    t.flag("compile", "train.compile", "blocks")
    with_ = t.take("log_with")
    if with_ is not None:
        t.put("log_with", "train.log_with", ["tensorboard", "wandb"] if with_ == "all" else [with_])
    t.simple("log_tracker_name", "train.tracker_project")
    guidance = t.number("guidance_scale", float)
    if guidance is not None and guidance != 1.0:
        t.refuse("guidance_scale", "kern trains with the architecture's guidance input; no key sets it")
    elif guidance is not None:
        t.ignored.append(("guidance_scale", "1.0 is musubi's default and what kern feeds"))


def _timesteps(t: _Builder) -> None:
    t.simple("timestep_sampling", "timesteps.method")
    for option in ("discrete_flow_shift", "sigmoid_scale", "logit_mean", "logit_std", "mode_scale"):
        t.simple(option, f"timesteps.{option}", float)
    for option in ("min_timestep", "max_timestep", "num_timestep_buckets"):
        t.simple(option, f"timesteps.{option}", int)
    t.simple("weighting_scheme", "timesteps.weighting_scheme")
    t.flag("preserve_distribution_shape", "timesteps.preserve_distribution_shape")


SAVE_PRECISION = {"float": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _saving_and_sampling(t: _Builder) -> None:
    per_epoch = t.per_epoch
    t.simple("output_dir", "save.out")
    t.simple("output_name", "save.name")
    precision = t.take("save_precision")
    if precision is not None:
        t.put("save_precision", "save.precision", SAVE_PRECISION.get(str(precision), str(precision)))
    for what in ("save", "sample"):
        steps, epochs = t.number(f"{what}_every_n_steps", int), t.number(f"{what}_every_n_epochs", int)
        if epochs is not None and per_epoch is None:
            t.refuse(
                f"{what}_every_n_epochs", f"kern counts steps: give --{what}_every_n_steps, or a dataset it can read"
            )
        elif epochs is not None:  # musubi saves on both schedules; kern has one: the epoch one if given
            t.put(f"{what}_every_n_epochs", f"{what}.every_n_steps", epochs * per_epoch)
        elif steps is not None:
            t.put(f"{what}_every_n_steps", f"{what}.every_n_steps", steps)
    every = t.job.get("save", {}).get("every_n_steps") or 0
    n_epochs, n_steps = t.number("save_last_n_epochs", int), t.number("save_last_n_steps", int)
    if n_epochs is not None:
        t.put("save_last_n_epochs", "save.keep_last", n_epochs)
    elif n_steps is not None:  # musubi keeps the saves of the last N steps
        t.put("save_last_n_steps", "save.keep_last", max(1, n_steps // every) if every else 1)
    prompts = t.take("sample_prompts")
    if prompts is not None:
        t.put("sample_prompts", "sample.prompt_file", prompts)
    elif t.job.get("sample", {}).pop("every_n_steps", None) is not None:
        t.ignored.append(("sample_every_n_*", "without --sample_prompts musubi samples nothing either"))
        t.translated[:] = [(o, k) for o, k in t.translated if k != "sample.every_n_steps"]
        t.job.pop("sample")


def rebase_paths(job: dict[str, dict[str, Any]], cwd: Path) -> None:
    """Make the job's relative paths absolute from ``cwd`` (musubi read them from where it ran; a job file reads
    them from its own folder)."""
    keys = {
        "model": ("transformer", "vae", "text_encoder"),
        "dataset": ("config",),
        "network": ("init_weights",),
        "sample": ("prompt_file",),
        "save": ("out",),
    }
    for section, names in keys.items():
        for name in names:
            value = job.get(section, {}).get(name)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                job[section][name] = str(cwd / value)
    weights = job.get("model", {}).get("base_weights")
    for i, entry in enumerate(weights or []):
        head, _, mult = entry.rpartition(":")
        if not Path(head).expanduser().is_absolute():
            weights[i] = f"{cwd / head}:{mult}"


def report(translation: Translation) -> list[str]:
    """The ignored options, the notes and the refused options, one line each, for stderr."""
    lines = [
        f"ignored --{o}: {why}" if not o.startswith("launcher") else f"ignored {o}: {why}"
        for o, why in translation.ignored
    ]
    lines += [f"note: {n}" for n in translation.notes]
    lines += [
        f"cannot translate --{o}: {why}" if not o.startswith("(") else f"cannot translate {o}: {why}"
        for o, why in translation.refused
    ]
    return lines
