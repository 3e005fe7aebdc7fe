"""Hook routing: a hook call for one architecture or network type reaches only the plugin that registered it.

``manager.hook`` is a ``HookRouter``. A hook whose spec takes ``arch`` is called on the plugin that registered
that architecture (the name, an alias or a variant alias) and on the kernel's own plugin ``kern``
(``kern.core.defaults``, tried last); a hook whose spec takes ``network_type`` likewise on the plugin that
registered that network type. So a plugin writes each hook once, for its own names, with no
``if arch != ...: return None`` guard, and cannot answer for a name it did not register. Every other hook
(``register_*``, ``detect_weights``) reaches every plugin, as in plain pluggy. A call for a name nobody
registered reaches only the plugins that registered no name of that kind (and ``kern``), so it never lands in a
guard-less plugin that would take it for its own.

A routed call is an ordinary pluggy call on a subset of the plugins (``PluginManager.subset_hook_caller``):
``firstresult``, ``trylast`` and kern's hook-call monitoring behave as for a plain call. A plugin written with
the old guards keeps working: its guard now always passes.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

KERNEL_PLUGIN = "kern"  # the kernel's own hook implementations, registered like a plugin under this name
# The hook argument that names what a call is for, and the kind of registered name it is.
ROUTED_ARGUMENTS = {"arch": "architecture", "network_type": "network"}


def routing_argument(caller: pluggy.HookCaller) -> str | None:
    """``"arch"`` or ``"network_type"`` when the hook's spec takes one, else ``None`` (called on every plugin)."""
    if caller.spec is None:
        return None
    return next((a for a in ROUTED_ARGUMENTS if a in caller.spec.argnames), None)


class RoutedHook:
    """One hook of ``manager.hook``: called like pluggy's ``HookCaller`` (keyword arguments only), it picks the
    plugins from the call's ``arch`` / ``network_type``. Other attributes (``get_hookimpls``, ``spec`` ...) are the
    raw caller's, which covers every plugin."""

    def __init__(self, router: HookRouter, caller: pluggy.HookCaller, argument: str) -> None:
        self._router, self._caller, self._argument = router, caller, argument
        self.name = caller.name

    def __call__(self, **kwargs: Any) -> Any:
        return self._router.caller_for(self.name, self._argument, kwargs.get(self._argument))(**kwargs)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):  # this object's own fields, dunders: never the raw caller's private state
            raise AttributeError(attr)
        return getattr(self._caller, attr)

    def __repr__(self) -> str:
        return f"<RoutedHook {self.name!r} by {self._argument}>"


class HookRouter:
    """``manager.hook``: ``manager.hook.load_model(arch=..., ...)`` as with pluggy's relay, routed (module docstring).

    ``owner(kind, name)`` gives the pluggy name of the plugin that registered ``name`` (``kind`` is
    ``"architecture"`` or ``"network"``) or ``None``; ``owners(kind)`` the pluggy names of every plugin that
    registered a name of that kind. Call ``forget()`` whenever plugins are registered or unregistered."""

    def __init__(
        self, pm: pluggy.PluginManager, owner: Callable[[str, str], str | None], owners: Callable[[str], set[str]]
    ) -> None:
        self._pm, self._owner, self._owners = pm, owner, owners
        self._callers: dict[tuple[str, str, str | None], pluggy.HookCaller] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        caller = getattr(self._pm.hook, name)  # AttributeError for a hook that does not exist, as pluggy's relay
        argument = routing_argument(caller)
        if argument is None:
            return caller
        routed = RoutedHook(self, caller, argument)
        setattr(self, name, routed)  # one object per hook: tests may monkeypatch it like a pluggy caller
        return routed

    def forget(self) -> None:
        """Drop the cached subset callers: the set of registered plugins changed."""
        self._callers.clear()

    def caller_for(self, hook: str, argument: str, name: Any) -> pluggy.HookCaller:
        """The pluggy caller of ``hook`` restricted to the plugins that answer for ``name`` (cached)."""
        kind = ROUTED_ARGUMENTS[argument]
        owner = self._owner(kind, name) if isinstance(name, str) else None
        key = (hook, kind, owner)
        caller = self._callers.get(key)
        if caller is None:
            if owner is not None:
                keep = {owner, KERNEL_PLUGIN}
                removed = [p for p in self._pm.get_plugins() if self._pm.get_name(p) not in keep]
            else:
                owners = self._owners(kind) - {KERNEL_PLUGIN}
                removed = [p for p in self._pm.get_plugins() if self._pm.get_name(p) in owners]
            caller = self._callers[key] = self._pm.subset_hook_caller(hook, removed)
        return caller
