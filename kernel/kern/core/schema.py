"""attrs classes filled from TOML tables: types checked, unknown keys named, plugin-owned keys kept aside.

The mechanics behind :mod:`kern.core.config`; they know no section of a job.
"""

from __future__ import annotations

import tomllib
import types
import typing
from typing import Any, Mapping

import attrs

from kern.errors import ConfigError


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
    fields = {f.name: f for f in attrs.fields(cls) if f.name not in ("source", "given")}
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
