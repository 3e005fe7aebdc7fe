"""What a plugin is checked for when it loads: its hook implementations and the records it registers.

Each check raises ``PluginError`` with a message naming the field or hook; the manager (``kern.core.plugins``)
then leaves the whole plugin out. Nothing here runs plugin code except where said.
"""

from __future__ import annotations

import difflib
import inspect
import re
from typing import Any

import pluggy

from kern.errors import PluginError
from kern.records import Architecture, NetworkType, Option, Variant

# Hook options that would let a plugin run before, or around, the other plugins' answers for their names.
REFUSED_HOOK_OPTIONS = ("tryfirst", "wrapper", "hookwrapper")
# Architecture, variant and network names and aliases: used on the command line, in env lists and cache file names.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


# --------------------------------------------------------------------------- hooks


def spec_names(pm: pluggy.PluginManager) -> list[str]:
    """Every hook kern specifies."""
    return sorted(
        n for n, caller in vars(pm.hook).items() if isinstance(caller, pluggy.HookCaller) and caller.has_spec()
    )


def check_hooks(pm: pluggy.PluginManager, module: object) -> None:
    """Hook implementations that match no hook (a typo does nothing, silently) or that could pre-empt other plugins."""
    problems = []
    for caller in pm.get_hookcallers(module) or ():
        impls = [i for i in caller.get_hookimpls() if i.plugin is module]
        if not caller.has_spec() and not all(i.optionalhook for i in impls):
            close = difflib.get_close_matches(caller.name, spec_names(pm), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else "; the hooks are listed in kern/hookspecs.py"
            problems.append(f"@kern.hookimpl {caller.name!r} matches no kern hook{hint}")
        for impl in impls:
            refused = [o for o in REFUSED_HOOK_OPTIONS if getattr(impl, o, False)]
            if refused:
                problems.append(
                    f"hook {caller.name!r} uses {'/'.join(refused)}, which kern refuses: it would run before "
                    "or around other plugins' answers for their own names"
                )
    if problems:
        raise PluginError("; ".join(problems))


def undecorated_hooks(pm: pluggy.PluginManager, module: object) -> list[str]:
    """Functions of the plugin module named like a hook but not marked ``@kern.hookimpl``: kern never calls them."""
    hooked = {h.name for h in pm.get_hookcallers(module) or ()}
    missing = []
    for name in spec_names(pm):
        if name in hooked or name.startswith("register_"):
            continue
        candidate = inspect.getattr_static(module, name, None)  # runs no plugin code
        if callable(candidate) and getattr(candidate, "__module__", None) == getattr(module, "__name__", None):
            missing.append(name)
    return missing


# --------------------------------------------------------------------------- records


def check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise PluginError(
            f"{what} {name!r} is not a valid name: use letters, digits and . _ + - (at most 100 characters)"
        )
    return name


def check_names(names: Any, what: str) -> tuple[str, ...]:
    if not isinstance(names, (tuple, list)):
        raise PluginError(f"{what} must be a tuple of names, got {type(names).__name__} {names!r}")
    return tuple(check_name(n, what) for n in names)


def _check_positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PluginError(f"{what} must be a positive integer, got {value!r}")


def check_options(options: Any, what: str) -> None:
    if not isinstance(options, (tuple, list)) or not all(isinstance(o, Option) for o in options):
        raise PluginError(f"{what}: options must be a tuple of kern.Option, got {options!r}")
    names = [o.name for o in options]
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise PluginError(f"{what}: option names must be unique, non-empty strings, got {names!r}")


def check_patterns(patterns: Any, what: str) -> None:
    if not isinstance(patterns, (tuple, list)) or not all(isinstance(p, str) for p in patterns):
        raise PluginError(f"{what} must be a tuple of regular expressions, got {patterns!r}")
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise PluginError(f"{what}: {p!r} is not a valid regular expression ({exc})") from None


def _check_variant(v: Any, where: str) -> None:
    if not isinstance(v, Variant):
        raise PluginError(f"{where}: variants must be kern.Variant records, got {type(v).__name__}")
    check_name(v.name, f"{where}: variant name")
    if v.cache_id:
        check_name(v.cache_id, f"{where}: variant {v.name!r} cache_id")
    for field in ("steps", "width", "height"):
        _check_positive_int(getattr(v, field), f"{where}: variant {v.name!r} {field}")
    if (
        isinstance(v.guidance, bool)
        or not isinstance(v.guidance, (int, float))
        or v.guidance != v.guidance
        or abs(v.guidance) == float("inf")
    ):
        raise PluginError(f"{where}: variant {v.name!r} guidance must be a finite number, got {v.guidance!r}")


def check_architecture(arch: Architecture) -> dict[str, tuple[str, str | None]]:
    """Check the fields the kernel relies on; return the names it answers to: name -> (arch, variant or None)."""
    name = check_name(arch.name, "architecture name")
    where = f"architecture {name!r}"
    if not isinstance(arch.variants, (tuple, list)) or not arch.variants:
        raise PluginError(f"{where}: variants must be a non-empty tuple of kern.Variant")
    for v in arch.variants:
        _check_variant(v, where)
    variant_names = [v.name for v in arch.variants]
    if len(set(variant_names)) != len(variant_names):
        raise PluginError(f"{where}: variant names must be unique, got {variant_names}")
    if arch.default_variant is not None and arch.default_variant not in variant_names:
        raise PluginError(
            f"{where}: default_variant {arch.default_variant!r} is not one of its variants {variant_names}"
        )
    for field in ("resolution_step", "latent_channels", "latent_downscale"):
        _check_positive_int(getattr(arch, field), f"{where}: {field}")
    check_patterns(arch.default_targets, f"{where}: default_targets")
    check_patterns(arch.default_excludes, f"{where}: default_excludes")
    check_patterns(arch.keep_high_precision, f"{where}: keep_high_precision")
    if not isinstance(arch.timestep_method, str):
        raise PluginError(f"{where}: timestep_method must be a string, got {arch.timestep_method!r}")
    check_options(arch.options, where)
    names: dict[str, tuple[str, str | None]] = {}
    entries = [(n, (name, None)) for n in (name, *check_names(arch.aliases, f"{where}: aliases"))]
    entries += [
        (a, (name, v.name))
        for v in arch.variants
        for a in check_names(v.aliases, f"{where}: variant {v.name!r} aliases")
    ]
    for alias, target in entries:
        if names.setdefault(alias, target) != target:
            raise PluginError(f"{where}: the name {alias!r} is declared twice (for {names[alias]} and {target})")
    return names


def check_network(net: NetworkType) -> tuple[str, ...]:
    """Check a network type's names and options; return the names it answers to (its name first, then aliases)."""
    check_options(net.options, f"network type {net.name!r}")
    return (check_name(net.name, "network type name"), *check_names(net.aliases, f"network type {net.name!r} aliases"))
