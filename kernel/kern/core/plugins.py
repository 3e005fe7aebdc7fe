"""Plugin discovery: entry points in the ``kern.plugins`` group, allow/deny lists, and the registry.

Every architecture and network type, built-in or third-party, arrives the same way: a distribution
declares an entry point ``[project.entry-points."kern.plugins"] name = "package.module"`` and the
module holds ``@kern.hookimpl`` functions.

A plugin cannot break kern: whatever it raises while importing or registering (any exception,
``SystemExit`` and ``GeneratorExit`` included; only ``KeyboardInterrupt`` and kern's own stop signal
pass), a hook implementation that matches no hook (a typo such as ``laod_model``), a hook with a
wrong argument name, bad records or a name another plugin already owns: the plugin is left out as a
whole (status ``failed``) with its distribution, version and the reason; the others load as usual.

Who wins a name: the distributions shipped with kern (``BUILTIN_DISTRIBUTIONS``) load first, then
the others sorted by entry-point name; the first to declare a name keeps it. A hook call for a name reaches
only the plugin that owns it, so a third-party plugin cannot answer for a built-in's names; hooks that reach
every plugin (``detect_weights``) ask the built-in plugins first.
To replace a built-in on purpose, disable it: ``KERN_DISABLE_PLUGINS=<its entry-point name>``. See docs/plugins.md.

Dispatch: ``manager.hook.<name>(...)`` routes a call that names an architecture or network type to the plugin
that registered it (``kern.core.routing``); pluggy's own relay stays at ``manager.pm.hook``. The checks a plugin
passes when it loads are in ``kern.core.plugin_checks``.

Environment variables (read when the manager is built):

* ``KERN_PLUGINS=a,b`` — allow-list: load only these plugins (entry-point or distribution names).
* ``KERN_DISABLE_PLUGINS=a,b`` — deny-list: never load these.
* ``KERN_DISABLE_PLUGIN_AUTOLOAD=1`` — load no entry points at all (the kernel's own defaults stay).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator

import attrs
import pluggy

from kern import errors, hookspecs
from kern.core import plugin_checks as checks
from kern.core.routing import KERNEL_PLUGIN, HookRouter
from kern.errors import PluginError, UsageError
from kern.log import get_logger
from kern.records import Architecture, NetworkType

if sys.version_info >= (3, 12):
    from importlib.metadata import EntryPoint, distributions
else:  # the backport has the same API on 3.10 / 3.11
    from importlib_metadata import EntryPoint, distributions

log = get_logger(__name__)

ENTRY_POINT_GROUP = "kern.plugins"
ENV_ALLOW = "KERN_PLUGINS"
ENV_DENY = "KERN_DISABLE_PLUGINS"
ENV_NO_AUTOLOAD = "KERN_DISABLE_PLUGIN_AUTOLOAD"

# The distributions shipped with kern: they load first, so they keep their names against any other plugin.
BUILTIN_DISTRIBUTIONS = ("kern-tuner", "kern-lora", "kern-loha", "kern-lokr", "kern-flux2", "kern-qwen-image")
MAX_ERROR_CHARS = 500
# What still stops kern while a plugin's code runs: Ctrl-C, and kern's own stop signal where this kern has one.
STOP = tuple(c for c in (KeyboardInterrupt, getattr(errors, "Interrupted", None)) if c is not None)


@attrs.define
class PluginInfo:
    """What ``kern plugins`` shows for one plugin."""

    name: str
    distribution: str
    version: str
    module: str
    status: str = "loaded"  # loaded | failed | disabled
    error: str = ""  # why it failed, or warnings about a loaded plugin
    architectures: list[str] = attrs.field(factory=list)
    networks: list[str] = attrs.field(factory=list)
    hooks: list[str] = attrs.field(factory=list)

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @property
    def label(self) -> str:
        return f"{self.distribution} {self.version}".strip()


def _split_env(name: str) -> set[str]:
    return {p.strip() for p in os.environ.get(name, "").split(",") if p.strip()}


def _describe(exc: BaseException) -> str:
    """``Type: message``, bounded, and safe even when the exception's ``__str__`` itself fails."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 — a plugin's exception may be broken too
        text = "(message unavailable)"
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + " …"


@contextlib.contextmanager
def _plugin_code() -> Iterator[None]:
    """Run a plugin's code: its prints go to stderr (stdout carries `kern plugins --json`)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _dist_of(ep: EntryPoint) -> tuple[str, str]:
    """(distribution, version) of an entry point; ``?`` where the metadata is missing or unreadable."""
    try:
        dist = ep.dist
        return (dist.name or "?", dist.version or "?") if dist is not None else ("?", "?")
    except Exception:  # noqa: BLE001 — broken metadata must not stop discovery
        return ("?", "?")


def _load_order(ep: EntryPoint) -> tuple:
    dist = _dist_of(ep)[0]
    return (dist not in BUILTIN_DISTRIBUTIONS, ep.name, dist)


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
        self._owners: dict[tuple[str, str], PluginInfo] = {}  # ("architecture" | "network", name or alias) -> owner
        self._modules: dict[str, object] = {}  # plugin name -> plugin object, for loaded plugins
        self.pm.add_hookcall_monitoring(lambda *_: None, self._no_exit_from_hooks)
        self._router = HookRouter(self.pm, self._owner_of, self._owners_of)

    @property
    def hook(self) -> Any:
        """The hooks to call: ``manager.hook.load_model(arch=..., ...)`` reaches the plugin that registered that
        architecture (``kern.core.routing``); ``manager.pm.hook`` is pluggy's unrouted relay."""
        return self._router

    def _owner_of(self, kind: str, name: str) -> str | None:
        info = self._owners.get((kind, name))
        return info.name if info is not None else None

    def _owners_of(self, kind: str) -> set[str]:
        return {info.name for (k, _), info in self._owners.items() if k == kind}

    # ------------------------------------------------------------------ loading

    def load_entry_points(self, eps: Iterable[EntryPoint] | None = None) -> None:
        """Import and register every entry point of ``kern.plugins`` that the allow/deny lists let through:
        the built-in distributions first, then the others by entry-point name."""
        if eps is None:
            if os.environ.get(ENV_NO_AUTOLOAD, "") not in ("", "0"):
                return
            eps = self._discover()
        allow, deny = _split_env(ENV_ALLOW), _split_env(ENV_DENY)
        builtin: list[PluginInfo] = []
        for ep in sorted(eps, key=_load_order):
            dist, version = _dist_of(ep)
            info = PluginInfo(name=ep.name, distribution=dist, version=version, module=ep.value)
            names = {ep.name, dist}
            if (allow and not names & allow) or names & deny:
                info.status = "disabled"
                self._track(info)
                continue
            taken = self.infos.get(ep.name)
            if taken is not None and taken.status != "disabled":
                self._track(info)
                self._fail(
                    info,
                    f"entry point name {ep.name!r} is already used by {taken.label}; rename the entry point"
                    + (
                        f", or disable the other by its distribution name: KERN_DISABLE_PLUGINS={taken.distribution}"
                        if taken.distribution not in ("?", "(in-process)")
                        else ""
                    ),
                )
                continue
            if taken is not None:  # a disabled plugin of that name makes room: keep it listed under another key
                self.infos[self._free_key(f"{ep.name} ({taken.distribution})")] = self.infos.pop(ep.name)
            self._track(info)
            try:
                with _plugin_code():
                    module = ep.load()
            except STOP:
                raise
            except BaseException as exc:  # noqa: BLE001 — SystemExit too: a broken plugin must not take kern down
                self._fail(info, f"import failed: {_describe(exc)}")
                continue
            self.register_module(module, info)
            if info.status == "loaded" and dist in BUILTIN_DISTRIBUTIONS:
                builtin.append(info)
        self._answer_first(builtin)

    def _discover(self) -> list[EntryPoint]:
        """Entry points of every installed distribution, read one distribution at a time, so one with unreadable
        metadata is reported and the others still load. The first distribution of a name on ``sys.path`` wins."""
        found: list[EntryPoint] = []
        seen: set[str] = set()
        for dist in distributions():
            try:
                name = dist.name
                key = re.sub(r"[-_.]+", "-", name).lower() if name else f"?{id(dist)}"
                if key in seen:
                    continue
                seen.add(key)
                found.extend(ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP)
            except Exception as exc:  # noqa: BLE001 — e.g. a non-UTF-8 entry_points.txt, a dist-info without METADATA
                where = str(getattr(dist, "_path", "") or "?")
                info = PluginInfo(
                    name=f"? ({Path(where).name})", distribution=_safe_name(dist), version="?", module="?"
                )
                self._track(info)
                self._fail(
                    info, f"unreadable distribution metadata in {where}: {_describe(exc)}; reinstall or remove it"
                )
        return found

    def register_module(self, module: ModuleType | object, info: PluginInfo) -> None:
        """Register one plugin object (normally a module) and collect what it declares; on any problem the whole
        plugin is left out (``info.status == "failed"``, the reason in ``info.error``)."""
        try:
            self._register(module, info)
        finally:
            self._router.forget()  # who answers for which name may have changed

    def _register(self, module: ModuleType | object, info: PluginInfo) -> None:
        self._track(info)
        try:
            with _plugin_code():
                self.pm.register(module, name=info.name)
        except STOP:
            raise
        except BaseException as exc:  # e.g. pluggy.PluginValidationError for a hook argument the spec does not have
            self._fail(info, f"invalid plugin: {_describe(exc)}")
            return
        try:
            checks.check_hooks(self.pm, module)
            archs = self._declared(module, "register_architectures", Architecture)
            networks = self._declared(module, "register_networks", NetworkType)
            arch_names = self._architecture_names(archs, info)
            network_names = self._network_names_of(networks, info)
            if not archs and not networks and not self.pm.get_hookcallers(module):
                raise PluginError(
                    f"it implements no kern hook (no @kern.hookimpl functions in {info.module!r}); "
                    "check that the entry point names the module holding the hooks"
                )
        except PluginError as exc:
            self._fail(info, str(exc), registered=module)
            return
        for arch in archs:
            self.architectures[arch.name] = arch
            info.architectures.append(arch.name)
        for net in networks:
            self.networks[net.name] = net
            info.networks.append(net.name)
        self._arch_names.update(arch_names)
        self._network_names.update(network_names)
        self._owners.update({("architecture", n): info for n in arch_names})
        self._owners.update({("network", n): info for n in network_names})
        info.hooks = sorted(h.name for h in self.pm.get_hookcallers(module) or () if not h.name.startswith("register_"))
        self._modules[info.name] = module
        self._warn_undecorated(module, info)

    def _track(self, info: PluginInfo) -> None:
        if not any(i is info for i in self.infos.values()):
            self.infos[self._free_key(info.name)] = info

    def _free_key(self, key: str) -> str:
        base, n = key, 1
        while key in self.infos:
            n += 1
            key = f"{base} #{n}"
        return key

    def _fail(self, info: PluginInfo, error: str, registered: object | None = None) -> None:
        """Mark ``info`` failed; ``registered`` is its plugin object if it already made it into pluggy."""
        info.status, info.error = "failed", error
        info.architectures, info.networks, info.hooks = [], [], []
        if registered is not None and self.pm.is_registered(registered):
            self.pm.unregister(registered)
        log.warning(
            "plugin failed to load", plugin=info.name, distribution=info.distribution, version=info.version, error=error
        )

    def _answer_first(self, builtin: list[PluginInfo]) -> None:
        """Re-register the built-in plugins so pluggy (last registered, first called) asks them before the others in
        the hooks that reach every plugin (routed hooks reach only a name's owner anyway)."""
        for info in builtin:
            module = self._modules[info.name]
            self.pm.unregister(module)
            self.pm.register(module, name=info.name)
        self._router.forget()

    def _no_exit_from_hooks(self, outcome: Any, hook_name: str, methods: list, kwargs: Any) -> None:
        """A hook that raises ``SystemExit``, ``GeneratorExit`` or another non-``Exception`` would end kern silently
        (``sys.exit(0)`` in ``load_model`` would even look like success): make it a ``PluginError`` naming the plugin."""
        exc = outcome.exception
        if exc is None or isinstance(exc, (Exception, *STOP)):
            return
        culprit = _culprit(exc, methods)
        info = next((i for i in self.infos.values() if i.name == culprit and i.status == "loaded"), None)
        who = f"plugin {culprit!r}" + (f" ({info.label})" if info.version else "") if info else "a plugin"
        disable = f"KERN_DISABLE_PLUGINS={culprit}" if info else "KERN_DISABLE_PLUGINS"
        outcome.force_exception(
            PluginError(
                f"{who} raised {_describe(exc)} in hook {hook_name}; a plugin must raise an error, not exit. "
                f"Report it to the plugin's authors, or disable the plugin ({disable})"
            )
        )

    # ------------------------------------------------------------------ checks

    def _warn_undecorated(self, module: object, info: PluginInfo) -> None:
        """A function named like a hook but not marked ``@kern.hookimpl`` is never called: say so (it may be a helper)."""
        missing = checks.undecorated_hooks(self.pm, module)
        if missing:
            note = f"function(s) {missing} are named like kern hooks but not marked @kern.hookimpl, so kern never calls them"
            info.error = "; ".join(filter(None, [info.error, note]))
            log.warning(
                "plugin hook not marked @kern.hookimpl",
                plugin=info.name,
                distribution=info.distribution,
                functions=missing,
            )

    def _declared(self, module: object, hook_name: str, kind: type) -> list[Any]:
        """What the plugin's ``register_architectures`` / ``register_networks`` declares (each checked)."""
        try:
            impl = getattr(module, hook_name, None)  # may run a module-level __getattr__
        except STOP:
            raise
        except BaseException as exc:  # noqa: BLE001
            raise PluginError(f"{hook_name}: {_describe(exc)}") from None
        if impl is None:
            return []
        if not callable(impl):
            raise PluginError(f"{hook_name} is not a function (it is {impl!r}); write `def {hook_name}(register):`")
        declared: list[Any] = []

        def register(record: Any) -> None:
            declared.append(record)

        try:
            with _plugin_code():
                impl(register=register)
        except STOP:
            raise
        except BaseException as exc:  # noqa: BLE001 — SystemExit, GeneratorExit ... are the plugin's failure, not kern's
            raise PluginError(f"{hook_name} raised {_describe(exc)}") from None
        for record in declared:
            if not isinstance(record, kind):
                raise PluginError(f"{hook_name} registered a {type(record).__name__}, expected kern.{kind.__name__}")
        return declared

    def _architecture_names(self, archs: list[Architecture], info: PluginInfo) -> dict[str, tuple[str, str | None]]:
        """Every name and alias the architectures declare (checked), clashing with nothing registered before."""
        names: dict[str, tuple[str, str | None]] = {}
        for arch in archs:
            for name, target in checks.check_architecture(arch).items():
                if names.setdefault(name, target) != target:
                    raise PluginError(f"the name {name!r} is declared twice (by {names[name]} and {target})")
        self._check_free("architecture", names, info)
        return names

    def _network_names_of(self, networks: list[NetworkType], info: PluginInfo) -> dict[str, str]:
        names: dict[str, str] = {}
        for net in networks:
            for name in checks.check_network(net):
                if names.setdefault(name, net.name) != net.name:
                    raise PluginError(
                        f"the network name {name!r} is declared twice (by {names[name]!r} and {net.name!r})"
                    )
        self._check_free("network", names, info)
        return names

    def _check_free(self, kind: str, names: Iterable[str], info: PluginInfo) -> None:
        """A name another plugin owns makes this whole plugin fail: left registered, its hooks could answer for
        that name (pluggy asks the last-registered plugin first)."""
        taken: dict[str, tuple[PluginInfo, list[str]]] = {}
        for name in names:
            owner = self._owners.get((kind, name))
            if owner is not None:
                taken.setdefault(owner.name, (owner, []))[1].append(name)
        if not taken:
            return
        clashes = "; ".join(
            f"{sorted(n)} already registered by {owner.label} (plugin {owner.name!r})"
            for owner, n in (taken[k] for k in sorted(taken))
        )
        raise PluginError(
            f"{kind} name(s) of {info.label} clash: {clashes}; the whole plugin is left out so it cannot answer for "
            f"those names. To use it instead, disable the other plugin: KERN_DISABLE_PLUGINS={','.join(sorted(taken))}"
        )

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


# --------------------------------------------------------------------------- helpers


def _culprit(exc: BaseException, impls: list) -> str | None:
    """The plugin whose code raised ``exc``: the innermost traceback frame in one of the hook implementations'
    top-level packages."""
    packages = {(getattr(i.function, "__module__", "") or "").split(".")[0]: i.plugin_name for i in impls}
    found, tb = None, exc.__traceback__
    while tb is not None:
        name = (tb.tb_frame.f_globals.get("__name__") or "").split(".")[0]
        found = packages.get(name, found)
        tb = tb.tb_next
    return found


def _safe_name(dist: Any) -> str:
    try:
        return str(dist.name or "?")
    except Exception:  # noqa: BLE001
        return "?"


def build_manager(
    entry_points: Iterable[EntryPoint] | None = None, extra: Iterable[tuple[str, object]] = ()
) -> KernPluginManager:
    """A fresh manager: the kernel's own defaults, then ``extra`` (name, module) pairs, then entry points."""
    from kern.core import defaults  # the kernel's last-resort implementations, registered like any plugin

    manager = KernPluginManager()
    manager.register_module(
        defaults,
        PluginInfo(name=KERNEL_PLUGIN, distribution="kern-tuner", version=_version(), module="kern.core.defaults"),
    )
    for name, module in extra:
        manager.register_module(
            module,
            PluginInfo(name=name, distribution="(in-process)", version="", module=getattr(module, "__name__", name)),
        )
    manager.load_entry_points(entry_points)
    log.debug(
        "plugins loaded",
        loaded=[i.name for i in manager.infos.values() if i.status == "loaded"],
        problems=[i.name for i in manager.infos.values() if i.status == "failed"],
    )
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
