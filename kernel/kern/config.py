"""Job configuration: attrs classes filled from TOML, with command-line overrides.

A job file has one table per section (``[model]``, ``[network]``, ``[dataset]``, ``[train]``,
``[timesteps]``, ``[sample]``, ``[save]``). Unknown keys and values of the wrong type raise
``ConfigError`` naming the file and the dotted key. Sections whose keys depend on a plugin
(``[network]`` options belong to the network type, ``[timesteps]`` options to the sampler) keep
those keys in ``options`` and are checked once the plugin is known, with the same kind of message.
"""

from __future__ import annotations

import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import attrs

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
    arch: str | None = None  # architecture name or alias, e.g. "flux2-klein-4b"
    variant: str | None = None  # forces a variant instead of detecting it from the checkpoint
    transformer: str | None = None  # checkpoint file or diffusers folder
    vae: str | None = None
    text_encoder: str | None = None
    dtype: str = attrs.field(default="bfloat16", validator=_choice(*DTYPES))
    fp8_text_encoder: bool = False


@attrs.define(kw_only=True)
class NetworkConfig:
    type: str = "lora"
    targets: list[str] = attrs.Factory(list)  # regexes replacing the architecture's default targets
    include: list[str] = attrs.Factory(list)  # regexes (fullmatch on dotted module paths) that override exclude
    exclude: list[str] = attrs.Factory(list)
    options: dict[str, Any] = attrs.Factory(dict)  # rank, alpha, dropout ...: checked against the network type

    EXTRA = "options"


@attrs.define(kw_only=True)
class DatasetConfig:
    config: str | None = None  # a musubi-tuner style dataset TOML


@attrs.define(kw_only=True)
class TrainConfig:
    steps: int = 1000
    learning_rate: float = 1e-4
    optimizer: str = "adamw"
    lr_scheduler: str = attrs.field(default="constant", validator=_choice("constant", "linear", "cosine"))
    warmup_steps: int = 0
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = attrs.field(default="bf16", validator=_choice("no", "bf16", "fp16"))
    # true (= "full") | false | "selective" (also keep attention outputs); see kern.accel and docs/training.md
    gradient_checkpointing: bool | str = attrs.field(default=True, validator=_checkpointing)
    # with "selective": only the first N repeated blocks keep their attention outputs, the rest are full (a memory budget)
    selective_blocks: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(0)))
    compile: str = attrs.field(default="auto", validator=_one_of("auto", "blocks", "off"))  # auto: compiled blocks on CUDA
    attention: str = attrs.field(default="auto", validator=_one_of("auto", "flash", "cudnn", "efficient", "math", "flash_attn"))  # SDPA backend, or the flash-attn package
    base_precision: str = attrs.field(default="bf16", validator=_one_of("bf16", "fp8"))  # fp8: frozen Linears in float8
    blocks_to_swap: int = attrs.field(default=0, validator=attrs.validators.ge(0))  # repeated blocks whose frozen weights stay in CPU memory and stream in (block swap)
    offload_activations: bool = False  # checkpointed blocks' inputs wait for backward in pinned CPU memory (kern.offload)
    shard_base: bool = False  # several processes: FSDP2-shard the frozen base across them (kern.distributed)
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
    source: str = "<defaults>"  # where the values came from, for error messages

    def to_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self, filter=lambda a, _: a.name != "source")
        for section in ("network", "timesteps"):
            out[section].update(out[section].pop("options"))
        return _drop_none(out)


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "none")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: Mapping[str, Any], where: str, prefix: str) -> Any:
    attrs.resolve_types(cls)
    fields = {f.name: f for f in attrs.fields(cls) if f.name != "source"}
    extra = getattr(cls, "EXTRA", None)
    kwargs: dict[str, Any] = {}
    if extra:
        kwargs[extra] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields or key == extra:
            if extra:
                kwargs[extra][key] = value  # checked later against the plugin's schema
                continue
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{where}: unknown key {dotted!r}; known keys here: {known}")
        f = fields[key]
        if attrs.has(f.type):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {dotted!r} must be a table ([{dotted}])")
            kwargs[key] = _build(f.type, value, where, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, f.type, f"{where}: {dotted}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: bad value in [{prefix.rstrip('.') or 'top level'}]: {exc}") from None


def parse_value(text: str) -> Any:
    """A command-line value as TOML would read it (``3``, ``1e-4``, ``true``, ``[1, 2]``), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``section.key`` (or deeper) in nested ``data``."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


# Keys holding paths: relative values in a job file are taken relative to that file's folder,
# so a job file works from any working directory; command-line values stay relative to the cwd.
PATH_KEYS = ("model.transformer", "model.vae", "model.text_encoder", "dataset.config", "save.out")


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            data[section][key] = str((base / value).resolve())


def load_job(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> JobConfig:
    """Read a job TOML (or start from defaults) and apply ``overrides`` (dotted key → value)."""
    data: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        p = Path(path)
        where = str(p)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from None
        _resolve_paths(data, p.parent)
    for dotted, value in (overrides or {}).items():
        apply_override(data, dotted, value)
    where_all = where if not overrides else f"{where} (with command-line overrides {sorted(overrides)})"
    job = _build(JobConfig, data, where_all, "")
    job.source = where
    return job


def dump_toml(data: Mapping[str, Any]) -> str:
    """A small TOML writer for the resolved config kern stores in each run folder (tables of scalars and lists)."""
    lines: list[str] = []

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for k, v in scalars.items():
        lines.append(f"{k} = {fmt(v)}")
    for section, table in data.items():
        if not isinstance(table, dict):
            continue
        lines.append(f"\n[{section}]")
        for k, v in table.items():
            if isinstance(v, dict):
                lines.append(f"{k} = {{ " + ", ".join(f"{a} = {fmt(b)}" for a, b in v.items()) + " }")
            elif v is not None:
                lines.append(f"{k} = {fmt(v)}")
    return "\n".join(lines).lstrip() + "\n"
