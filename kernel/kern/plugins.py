"""Plugin discovery: entry points in the ``kern.plugins`` group, allow/deny lists, and the registry.

Every architecture and network type, built-in or third-party, arrives the same way: a distribution
declares an entry point ``[project.entry-points."kern.plugins"] name = "package.module"`` and the
module holds ``@kern.hookimpl`` functions. A plugin that fails to import, breaks a hook contract or
registers a name that is taken is reported (distribution, version, error) and left out; the others
load as usual.

Environment variables (read when the manager is built):

* ``KERN_PLUGINS=a,b`` — allow-list: load only these plugins (entry-point or distribution names).
* ``KERN_DISABLE_PLUGINS=a,b`` — deny-list: never load these.
* ``KERN_DISABLE_PLUGIN_AUTOLOAD=1`` — load no entry points at all (the kernel's own defaults stay).
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any, Callable, Iterable

import attrs
import pluggy

from kern import hookspecs
from kern.errors import PluginError, UsageError
from kern.log import get_logger
from kern.records import Architecture, NetworkType

if sys.version_info >= (3, 12):
    from importlib.metadata import EntryPoint, entry_points
else:  # the backport has the same selectable API on 3.10 / 3.11
    from importlib_metadata import EntryPoint, entry_points

log = get_logger(__name__)

ENTRY_POINT_GROUP = "kern.plugins"
ENV_ALLOW = "KERN_PLUGINS"
ENV_DENY = "KERN_DISABLE_PLUGINS"
ENV_NO_AUTOLOAD = "KERN_DISABLE_PLUGIN_AUTOLOAD"


@attrs.define
class PluginInfo:
    """What ``kern plugins`` shows for one plugin."""

    name: str
    distribution: str
    version: str
    module: str
    status: str = "loaded"  # loaded | failed | disabled
    error: str = ""
    architectures: list[str] = attrs.field(factory=list)
    networks: list[str] = attrs.field(factory=list)
    hooks: list[str] = attrs.field(factory=list)

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _split_env(name: str) -> set[str]:
    return {p.strip() for p in os.environ.get(name, "").split(",") if p.strip()}


class KernPluginManager:
    """A pluggy manager plus the registry of architectures and network types the plugins declared."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.architectures: dict[str, Architecture] = {}
        self.networks: dict[str, NetworkType] = {}
        self._arch_names: dict[str, tuple[str, str | None]] = {}  # name or alias -> (arch, variant)
        self._network_names: dict[str, str] = {}

    @property
    def hook(self) -> Any:
        return self.pm.hook

    # ------------------------------------------------------------------ loading

    def load_entry_points(self, eps: Iterable[EntryPoint] | None = None) -> None:
        """Import and register every entry point of ``kern.plugins`` that the allow/deny lists let through."""
        if eps is None:
            if os.environ.get(ENV_NO_AUTOLOAD, "") not in ("", "0"):
                return
            eps = entry_points(group=ENTRY_POINT_GROUP)
        allow, deny = _split_env(ENV_ALLOW), _split_env(ENV_DENY)
        for ep in sorted(eps, key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            info = PluginInfo(name=ep.name, distribution=dist, version=version, module=ep.value)
            names = {ep.name, dist}
            if (allow and not names & allow) or names & deny:
                info.status = "disabled"
                self.infos[ep.name] = info
                continue
            if ep.name in self.infos:
                self._fail(info, f"entry point name {ep.name!r} is already used by {self.infos[ep.name].distribution}")
                self.infos[f"{ep.name} ({dist})"] = info
                continue
            self.infos[ep.name] = info
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                self._fail(info, f"import failed: {type(exc).__name__}: {exc}")
                continue
            self.register_module(module, info)

    def register_module(self, module: ModuleType | object, info: PluginInfo) -> None:
        """Register one plugin object (normally a module) and collect what it declares."""
        try:
            self.pm.register(module, name=info.name)
        except Exception as exc:  # e.g. pluggy.PluginValidationError for a hook with a wrong signature
            self._fail(info, f"invalid plugin: {type(exc).__name__}: {exc}")
            return
        self.infos.setdefault(info.name, info)
        info.hooks = sorted(
            h.name for h in self.pm.get_hookcallers(module) or () if not h.name.startswith("register_")
        )
        self._collect(module, info, "register_architectures", self._add_architecture)
        self._collect(module, info, "register_networks", self._add_network)

    def _collect(self, module: object, info: PluginInfo, hook_name: str, add: Callable[[Any, PluginInfo], None]) -> None:
        impl = getattr(module, hook_name, None)
        if impl is None or info.status == "failed":
            return
        declared: list[Any] = []
        try:
            impl(register=declared.append)
        except Exception as exc:
            self._fail(info, f"{hook_name} raised {type(exc).__name__}: {exc}", registered=module)
            return
        for record in declared:
            try:
                add(record, info)
            except PluginError as exc:
                # A clash drops this one declaration and is shown; the plugin's other records stay.
                info.error = "; ".join(filter(None, [info.error, str(exc)]))
                log.warning("plugin registration dropped", plugin=info.name, distribution=info.distribution, error=str(exc))

    def _fail(self, info: PluginInfo, error: str, registered: object | None = None) -> None:
        """Mark ``info`` failed; ``registered`` is its plugin object if it already made it into pluggy."""
        info.status, info.error = "failed", error
        if registered is not None and self.pm.is_registered(registered):
            self.pm.unregister(registered)
        log.warning("plugin failed to load", plugin=info.name, distribution=info.distribution, version=info.version, error=error)

    def _owner(self, table: dict[str, Any], name: str) -> str:
        for info in self.infos.values():
            if name in info.architectures or name in info.networks:
                return f"{info.distribution} {info.version}"
        return "another plugin"

    def _add_architecture(self, arch: Any, info: PluginInfo) -> None:
        if not isinstance(arch, Architecture):
            raise PluginError(f"register_architectures got {type(arch).__name__}, expected kern.Architecture")
        names: dict[str, tuple[str, str | None]] = {arch.name: (arch.name, None)}
        names.update({a: (arch.name, None) for a in arch.aliases})
        for v in arch.variants:
            names.update({a: (arch.name, v.name) for a in v.aliases})
        taken = sorted(n for n in names if n in self._arch_names)
        if taken:
            owners = {self._owner(self.architectures, self._arch_names[n][0]) for n in taken}
            raise PluginError(
                f"{info.distribution} {info.version}: architecture {arch.name!r} clashes on name(s) {taken} "
                f"already registered by {', '.join(sorted(owners))}; it is left out"
            )
        self.architectures[arch.name] = arch
        self._arch_names.update(names)
        info.architectures.append(arch.name)

    def _add_network(self, net: Any, info: PluginInfo) -> None:
        if not isinstance(net, NetworkType):
            raise PluginError(f"register_networks got {type(net).__name__}, expected kern.NetworkType")
        names = [net.name, *net.aliases]
        taken = sorted(n for n in names if n in self._network_names)
        if taken:
            owners = {self._owner(self.networks, self._network_names[n]) for n in taken}
            raise PluginError(
                f"{info.distribution} {info.version}: network type {net.name!r} clashes on name(s) {taken} "
                f"already registered by {', '.join(sorted(owners))}; it is left out"
            )
        self.networks[net.name] = net
        self._network_names.update({n: net.name for n in names})
        info.networks.append(net.name)

    # ------------------------------------------------------------------ lookups

    def resolve_arch(self, name: str) -> tuple[Architecture, str | None]:
        """The architecture and variant for ``name``: a variant alias gives that variant, an
        architecture name or alias gives ``None`` (detect the variant from the checkpoint)."""
        if name not in self._arch_names:
            known = sorted(self._arch_names)
            raise UsageError(f"unknown architecture {name!r}; installed: {known or 'none'} (see `kern plugins`)")
        arch_name, variant = self._arch_names[name]
        return self.architectures[arch_name], variant

    def resolve_network(self, name: str) -> NetworkType:
        if name not in self._network_names:
            known = sorted(self._network_names)
            raise UsageError(f"unknown network type {name!r}; installed: {known or 'none'} (see `kern plugins`)")
        return self.networks[self._network_names[name]]

    def problems(self) -> list[PluginInfo]:
        return [i for i in self.infos.values() if i.status == "failed" or i.error]


def build_manager(entry_points: Iterable[EntryPoint] | None = None, extra: Iterable[tuple[str, object]] = ()) -> KernPluginManager:
    """A fresh manager: the kernel's own defaults, then ``extra`` (name, module) pairs, then entry points."""
    from kern import defaults  # the kernel's last-resort implementations, registered like any plugin

    manager = KernPluginManager()
    manager.register_module(defaults, PluginInfo(name="kern", distribution="kern-tuner", version=_version(), module="kern.defaults"))
    for name, module in extra:
        manager.register_module(module, PluginInfo(name=name, distribution="(in-process)", version="", module=getattr(module, "__name__", name)))
    manager.load_entry_points(entry_points)
    log.debug("plugins loaded", loaded=[n for n, i in manager.infos.items() if i.status == "loaded"],
              problems=[n for n in manager.infos if manager.infos[n].status == "failed"])
    return manager


_MANAGER: KernPluginManager | None = None


def get_manager() -> KernPluginManager:
    """The process-wide manager, built on first use."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = build_manager()
    return _MANAGER


def reset_manager() -> None:
    """Forget the process-wide manager (tests, or after installing a plugin in-process)."""
    global _MANAGER
    _MANAGER = None


def _version() -> str:
    from kern import __version__

    return __version__
