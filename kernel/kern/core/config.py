"""Job configuration: attrs classes filled from TOML, with command-line overrides.

A job file has one table per section (``[model]``, ``[network]``, ``[dataset]``, ``[train]``,
``[timesteps]``, ``[sample]``, ``[save]``). Unknown keys and values of the wrong type raise
``ConfigError`` naming the file and the dotted key. Sections whose keys depend on a plugin
(``[network]`` options belong to the network type, ``[timesteps]`` options to the sampler) keep
those keys in ``options`` and are checked once the plugin is known, with the same kind of message.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any, Callable, Mapping

import attrs

from kern.core.schema import _build, apply_override, parse_value  # noqa: F401 - parse_value: re-exported
from kern.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


def _choice(*values: str) -> Any:
    return attrs.validators.optional(attrs.validators.in_(values))


def _one_of(*values: str) -> Any:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value not in values:
            raise ValueError(f"{attribute.name} must be one of {', '.join(map(repr, values))} (got {value!r})")

    return check


def _checkpointing(instance: Any, attribute: Any, value: Any) -> None:
    if not (isinstance(value, bool) or value in ("full", "selective")):
        raise ValueError(f"{attribute.name} must be true, false, 'full' or 'selective' (got {value!r})")


@attrs.define(kw_only=True)
class ModelConfig:
    arch: str | None = None  # architecture name, alias or variant alias (`kern plugins` lists them)
    variant: str | None = None  # forces a variant instead of detecting it from the checkpoint
    # One diffusers folder or repo id (org/name[@rev]) or ComfyUI models/ folder for all three parts (kern.models.sources)
    path: str | None = None
    transformer: str | None = (
        None  # checkpoint file, diffusers folder or repo id (org/name[@rev][/path]); wins over path
    )
    vae: str | None = None
    text_encoder: str | None = None
    dtype: str = attrs.field(default="bfloat16", validator=_choice(*DTYPES))
    fp8_text_encoder: bool = False
    # "FILE[:MULT]": adapters merged into the base before training (musubi's --base_weights); MULT defaults to 1
    base_weights: list[str] = attrs.Factory(list)


@attrs.define(kw_only=True)
class NetworkConfig:
    type: str = "lora"
    targets: list[str] = attrs.Factory(list)  # regexes replacing the architecture's default targets
    include: list[str] = attrs.Factory(list)  # regexes (fullmatch on dotted module paths) that override exclude
    exclude: list[str] = attrs.Factory(list)
    # an adapter file (any layout kern reads) the network starts from; its rank is used when rank is not given
    init_weights: str | None = None
    options: dict[str, Any] = attrs.Factory(dict)  # rank, alpha, dropout ...: checked against the network type

    EXTRA = "options"


@attrs.define(kw_only=True)
class DatasetConfig:
    config: str | None = None  # a musubi-tuner style dataset TOML


@attrs.define(kw_only=True)
class TrainConfig:
    steps: int = 1000
    learning_rate: float = 1e-4
    optimizer: str = "adamw"  # a built-in name or a dotted class path (kern.train.optim)
    optimizer_args: dict[str, Any] = attrs.Factory(dict)  # keyword arguments of the optimizer
    weight_decay: float = 0.01
    lr_scheduler: str = "constant"  # any transformers.get_scheduler name (kern.train.optim)
    lr_scheduler_num_cycles: float | None = None  # cosine restarts (cosine_with_restarts) or cycles; musubi's name
    lr_scheduler_min_lr_ratio: float | None = None  # the LR the decay ends at, as a fraction of learning_rate
    lr_scheduler_power: float | None = None  # polynomial decay's power
    lr_scheduler_args: dict[str, Any] = attrs.Factory(dict)  # more keyword arguments of the schedule
    warmup_steps: int = 0
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = attrs.field(default="bf16", validator=_choice("no", "bf16", "fp16"))
    # true (= "full") | false | "selective" (also keep attention outputs); see kern.gpu.accel and docs/training.md
    gradient_checkpointing: bool | str = attrs.field(default=True, validator=_checkpointing)
    # with "selective": only the first N repeated blocks keep their attention outputs, the rest are full (a memory budget)
    selective_blocks: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(0))
    )
    compile: str = attrs.field(
        default="auto", validator=_one_of("auto", "blocks", "off")
    )  # auto: compiled blocks on CUDA
    attention: str = attrs.field(
        default="auto", validator=_one_of("auto", "flash", "cudnn", "efficient", "math", "flash_attn")
    )  # SDPA backend, or the flash-attn package
    base_precision: str = attrs.field(default="bf16", validator=_one_of("bf16", "fp8"))  # fp8: frozen Linears in float8
    blocks_to_swap: int = attrs.field(
        default=0, validator=attrs.validators.ge(0)
    )  # repeated blocks whose frozen weights stay in CPU memory and stream in (block swap)
    offload_activations: bool = (
        False  # checkpointed blocks' inputs wait for backward in pinned CPU memory (kern.gpu.offload)
    )
    shard_base: bool = False  # several processes: FSDP2-shard the frozen base across them (kern.gpu.distributed)
    ema_decay: float | None = None  # an EMA of the adapter weights, saved beside the plain one (kern.train.ema)
    validate_every_n_steps: int = 0  # validation loss on the held-out dataset (kern.train.validation); 0: never
    log_with: list[str] = attrs.Factory(lambda: ["tensorboard"])  # accelerate trackers (kern.train.metrics)
    tracker_project: str | None = None  # the trackers' project name; default: save.name
    seed: int = 42
    device: str | None = None  # default: what accelerate picks


@attrs.define(kw_only=True)
class TimestepConfig:
    method: str | None = None  # default: the architecture's
    options: dict[str, Any] = attrs.Factory(dict)

    EXTRA = "options"


@attrs.define(kw_only=True)
class SampleConfig:
    prompts: list[str] = attrs.Factory(list)
    prompt_file: str | None = None  # a prompt file in kern generate's syntax (docs/generate.md), added to prompts
    wildcards: str | None = None  # the folder __name__ wildcards are read from
    every_n_steps: int = 0  # 0: only at the end
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    guidance: float | None = None
    seed: int = 0


@attrs.define(kw_only=True)
class SaveConfig:
    out: str = "runs/kern"
    name: str = "adapter"
    every_n_steps: int = 0
    keep_last: int = 3
    precision: str = attrs.field(default="float32", validator=_choice(*DTYPES))


@attrs.define(kw_only=True)
class JobConfig:
    """A training job: what ``kern train --config job.toml`` reads."""

    model: ModelConfig = attrs.Factory(ModelConfig)
    network: NetworkConfig = attrs.Factory(NetworkConfig)
    dataset: DatasetConfig = attrs.Factory(DatasetConfig)
    train: TrainConfig = attrs.Factory(TrainConfig)
    timesteps: TimestepConfig = attrs.Factory(TimestepConfig)
    sample: SampleConfig = attrs.Factory(SampleConfig)
    save: SaveConfig = attrs.Factory(SaveConfig)
    preset: str | None = None  # the preset (examples/presets) the job starts from; the job's keys override it
    source: str = "<defaults>"  # where the values came from, for error messages
    given: frozenset[str] = frozenset()  # the dotted keys the job file or the command line set (the rest are defaults)

    def to_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self, filter=lambda a, _: a.name not in ("source", "given"))
        for section in ("network", "timesteps"):
            out[section].update(out[section].pop("options"))
        return _drop_none(out)


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


# --------------------------------------------------------------------------- loading


# Keys holding paths: relative values in a job file are taken relative to that file's folder,
# so a job file works from any working directory; command-line values stay relative to the cwd.
PATH_KEYS = (
    "model.path",
    "model.transformer",
    "model.vae",
    "model.text_encoder",
    "network.init_weights",
    "dataset.config",
    "sample.prompt_file",
    "sample.wildcards",
    "save.out",
)
# Of those, the ones that may also be a Hugging Face repo id: a relative value is made absolute only where it exists.
MODEL_KEYS = ("model.path", "model.transformer", "model.vae", "model.text_encoder")


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            local = (base / value).resolve()
            # "org/name" next to the job file is a folder; otherwise a model key keeps it as written (a repo id,
            # or a path relative to the working directory, which kern.models.hub tries first).
            if dotted not in MODEL_KEYS or local.exists() or not _could_be_elsewhere(value):
                data[section][key] = str(local)


def split_weight(entry: str) -> tuple[str, float]:
    """``"FILE[:MULT]"`` (``model.base_weights``) as (file, multiplier); a suffix that is no number is part of the
    file name (``C:\\x.safetensors`` stays whole)."""
    head, sep, tail = entry.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return entry, 1.0


def _resolve_weight_paths(data: dict[str, Any], base: Path) -> None:
    model = data.get("model")
    entries = model.get("base_weights") if isinstance(model, dict) else None
    if not isinstance(entries, list):
        return
    for i, entry in enumerate(entries):
        if isinstance(entry, str) and entry:
            file, mult = split_weight(entry)
            if not Path(file).expanduser().is_absolute() and (base / file).exists():
                entries[i] = f"{(base / file).resolve()}:{mult:g}" if file != entry else str((base / file).resolve())


def _could_be_elsewhere(value: str) -> bool:
    """A relative model value that is no file next to the job file: kept as written when it is one relative to the
    working directory or reads as a repo id (``kern.models.hub`` tries both, in that order)."""
    from kern.core.repo_ids import parse

    return Path(value).expanduser().exists() or parse(value) is not None


def load_job(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    read_preset: Callable[[str], dict[str, Any]] | None = None,
) -> JobConfig:
    """Read a job TOML (or start from defaults), apply ``overrides`` (dotted key → value) and check every value
    that needs no plugin to judge (:func:`check_job`). A ``preset`` (the job's top-level key or an override) is read
    with ``read_preset`` (``kern.train.presets.read_preset``); its keys go under the job file's and the overrides'."""
    data: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        p = Path(path)
        where = str(p)
        data = _read_toml(p)
        _resolve_paths(data, p.parent)
        _resolve_weight_paths(data, p.parent)
    for dotted, value in (overrides or {}).items():
        apply_override(data, dotted, value)
    if data.get("preset") is not None:
        if not isinstance(data["preset"], str):
            raise ConfigError(f"{where}: preset must be a preset's name (kern train --preset), got {data['preset']!r}")
        if read_preset is None:  # kern.core reads no presets itself: they are kern.train's (a higher layer)
            raise ConfigError(f"{where}: preset = {data['preset']!r}: presets are read by `kern train` only")
        data = _under(read_preset(data["preset"]), data)
    where_all = where if not overrides else f"{where} (with command-line overrides {sorted(overrides)})"
    job = _build(JobConfig, data, where_all, "")
    job.source = where
    job.given = frozenset(_dotted_keys(data))
    check_job(job)
    return job


def _under(preset: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` over ``preset``, section by section (a job's ``[train]`` keys replace only those keys of the preset)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in preset.items()}
    for key, value in data.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_toml(p: Path) -> dict[str, Any]:
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a folder, not a job TOML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start}); save the job file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read it ({exc.strerror or exc})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None


def _dotted_keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        keys.extend(_dotted_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and not prefix else [f"{prefix}{k}"])
    return keys


# --------------------------------------------------------------------------- checks

MAX_COUNT = 2**31 - 1  # steps, accumulation, intervals: anything larger is a typo
MAX_SEED = 2**63 - 1  # torch and Python take any seed up to here; kern adds small offsets (process, image index)
MAX_SIDE = 16384  # pixels per side of a sample image
MAX_SAMPLE_STEPS = 10000
DEVICES = ("cpu", "cuda")


def check_job(job: JobConfig) -> None:
    """Every value of ``job`` that can be judged without a plugin: finite numbers in range, names that stay inside
    the run folder, a device this machine has, settings that would be silently ignored. ``ConfigError`` names the
    key and the file; nothing has been loaded or written yet."""
    where = job.source
    t, s, v = job.train, job.sample, job.save

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{where}: {key} {why}")

    def count(key: str, value: int | None, low: int, high: int = MAX_COUNT) -> None:
        if value is not None and not low <= value <= high:
            fail(key, f"must be between {low} and {high}, got {value}")

    def finite(key: str, value: float | None, low: float | None = None, positive: bool = False) -> None:
        if value is None:
            return
        if not math.isfinite(value):
            fail(key, f"must be a finite number, got {value}")
        if positive and value <= 0:
            fail(key, f"must be greater than 0, got {value}")
        if low is not None and value < low:
            fail(key, f"must be at least {low}, got {value}")

    count("train.steps", t.steps, 1)
    finite("train.learning_rate", t.learning_rate, positive=True)
    count("train.warmup_steps", t.warmup_steps, 0)
    count("train.gradient_accumulation", t.gradient_accumulation, 1)
    finite("train.max_grad_norm", t.max_grad_norm, low=0.0)
    count("train.seed", t.seed, 0, MAX_SEED)
    count("train.blocks_to_swap", t.blocks_to_swap, 0, 100000)
    count("train.selective_blocks", t.selective_blocks, 0, 100000)
    if t.selective_blocks is not None and t.gradient_checkpointing != "selective":
        fail(
            "train.selective_blocks",
            'only applies with train.gradient_checkpointing = "selective"; set that or remove it',
        )
    if t.device is not None and t.device not in DEVICES:
        hint = "; to pick a GPU, set CUDA_VISIBLE_DEVICES instead" if re.fullmatch(r"cuda:\d+", t.device) else ""
        fail(
            "train.device",
            f"must be one of {list(DEVICES)} (or unset: the GPU when there is one), got {t.device!r}{hint}",
        )
    if t.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail(
                "train.device",
                "is 'cuda' but this machine has no usable CUDA device; set it to 'cpu' or leave it unset",
            )

    finite("train.weight_decay", t.weight_decay, low=0.0)
    finite("train.lr_scheduler_num_cycles", t.lr_scheduler_num_cycles, positive=True)
    finite("train.lr_scheduler_power", t.lr_scheduler_power, positive=True)
    finite("train.lr_scheduler_min_lr_ratio", t.lr_scheduler_min_lr_ratio, low=0.0)
    if t.lr_scheduler_min_lr_ratio is not None and t.lr_scheduler_min_lr_ratio > 1:
        fail("train.lr_scheduler_min_lr_ratio", f"must be between 0 and 1, got {t.lr_scheduler_min_lr_ratio}")
    if t.ema_decay is not None and not (math.isfinite(t.ema_decay) and 0 < t.ema_decay < 1):
        fail(
            "train.ema_decay",
            f"must be between 0 and 1 (exclusive; e.g. 0.999), or unset for no EMA, got {t.ema_decay}",
        )
    count("train.validate_every_n_steps", t.validate_every_n_steps, 0)

    count("sample.every_n_steps", s.every_n_steps, 0)
    count("sample.steps", s.steps, 1, MAX_SAMPLE_STEPS)
    count("sample.width", s.width, 1, MAX_SIDE)
    count("sample.height", s.height, 1, MAX_SIDE)
    finite("sample.guidance", s.guidance)
    count("sample.seed", s.seed, 0, MAX_SEED)
    if (
        not s.prompts and not s.prompt_file
    ):  # a sample setting other than its default, with nothing to sample, would be silently ignored
        default = SampleConfig()
        unused = sorted(
            k
            for k in job.given
            if k.startswith("sample.")
            and k not in ("sample.prompts", "sample.prompt_file")
            and getattr(s, k.split(".")[1], None) != getattr(default, k.split(".")[1], None)
        )
        if unused:
            fail(unused[0], "has no effect without sample.prompts; add sample prompts or remove it")

    count("save.every_n_steps", v.every_n_steps, 0)
    count("save.keep_last", v.keep_last, 0)
    check_name(v.name, f"{where}: save.name")
    if not v.out.strip():
        fail("save.out", "is empty; name the run folder")
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = getattr(getattr(job, section), key)
        if isinstance(value, str) and "\0" in value:
            fail(dotted, "contains a NUL character")
    for key in ("targets", "include", "exclude"):
        for i, pattern in enumerate(getattr(job.network, key)):
            try:
                re.compile(pattern)
            except re.error as exc:
                fail(f"network.{key}[{i}]", f"is not a regular expression ({exc}): {pattern!r}")


_NAME = re.compile(r"[^/\\\x00-\x1f]+")


def check_name(name: str, where: str) -> str:
    """``name`` as a file stem inside an output folder: no path separators, no ``..``, no hidden or empty name,
    no control characters. Raises ``ConfigError`` naming ``where``."""
    if (
        not isinstance(name, str)
        or not _NAME.fullmatch(name)
        or name in (".", "..")
        or name.startswith(".")
        or name != name.strip()
        or len(name.encode("utf-8")) > 200
    ):
        raise ConfigError(
            f"{where} must be a plain file name (no '/', '\\', '..', leading dot, control characters or "
            f"surrounding spaces, at most 200 bytes), got {name!r}"
        )
    return name


def dump_toml(data: Mapping[str, Any]) -> str:
    """The resolved config kern stores in each run folder, as TOML that reads back to the same job."""
    import tomli_w

    return tomli_w.dumps(_drop_none(dict(data)))
