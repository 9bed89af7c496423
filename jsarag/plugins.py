"""The plugin manager: built-in and third-party plugins load the same way, from the entry-point group ``jsarag``.

- ``JSARAG_LOAD_PLUGINS=a,b`` loads only the named entry points (``JSARAG_LOAD_PLUGINS=`` loads none).
- ``JSARAG_TRACE_PLUGINS=1`` prints every hook call with the plugins that implement it to stderr.
An unknown component name is an error that lists the registered names; an exception inside a plugin names it.
"""
from __future__ import annotations

import functools
import os
import sys
import traceback
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from jsarag import hookspecs
from jsarag.components import Component
from jsarag.errors import JsaragError, PluginError

GROUP = "jsarag"
KINDS = {  # component kind -> its registration hook
    "retriever": "register_retrievers",
    "index": "register_indexes",
    "generator": "register_generators",
    "estimator": "register_estimators",
    "observer": "register_observers",
}


@dataclass(frozen=True)
class Registered:
    """A component class offered under a name, and who offered it."""

    kind: str
    name: str
    cls: type[Component]
    plugin: str
    package: str


class Plugins:
    """The loaded plugins, their registered components, and attributed hook calls."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.packages: dict[str, str] = {}  # plugin name -> distribution it came from
        self._registry: dict[str, dict[str, Registered]] | None = None
        if load_entry_points:
            self._load_entry_points()
        self.tracing = os.environ.get("JSARAG_TRACE_PLUGINS") == "1"
        if self.tracing:
            self.pm.add_hookcall_monitoring(_trace_before, lambda *a: None)

    def _load_entry_points(self) -> None:
        wanted = os.environ.get("JSARAG_LOAD_PLUGINS")
        allowed = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
        for ep in entry_points(group=GROUP):
            if allowed is not None and ep.name not in allowed or self.pm.has_plugin(ep.name):
                continue
            package = ep.dist.name if ep.dist else "?"
            try:
                module = ep.load()
            except Exception as exc:
                raise PluginError(f"plugin '{ep.name}' (package {package}, {ep.value}) failed to load: {exc}") from exc
            self.add(module, ep.name, package)

    def add(self, plugin: ModuleType | object, name: str, package: str = "?") -> None:
        """Register a plugin module (or object) under ``name``."""
        self.pm.register(plugin, name=name)
        self.packages[name] = package
        if not isinstance(plugin, Component):
            self._registry = None  # a new plugin module may register new components

    def registry(self) -> dict[str, dict[str, Registered]]:
        """Return every registered component, by kind then name."""
        if self._registry is None:
            self._registry = self._collect()
        return self._registry

    def _collect(self) -> dict[str, dict[str, Registered]]:
        found: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
        for kind, hook_name in KINDS.items():
            impls = getattr(self.pm.hook, hook_name).get_hookimpls()
            if self.tracing:  # registration hooks are called one plugin at a time, to know who registered what
                _trace_before(hook_name, impls, {})
            for impl in impls:
                package = self.packages.get(impl.plugin_name, "?")

                def register(name: str, cls: type[Component], *, _p=impl.plugin_name, _pkg=package, _k=kind) -> None:
                    if name in found[_k]:
                        other = found[_k][name].plugin
                        raise PluginError(f"{_k} '{name}' is registered twice: by plugin '{other}' and by '{_p}'")
                    found[_k][name] = Registered(_k, name, cls, _p, _pkg)

                self._call_impl(impl, hook_name, register=register)
        return found

    def component(self, kind: str, name: str) -> Registered:
        """Return the component ``name`` of ``kind``; an unknown name lists the registered ones."""
        known = self.registry()[kind]
        if name not in known:
            names = ", ".join(sorted(known)) or "none"
            raise PluginError(f"unknown {kind} '{name}'; registered {kind}s: {names}")
        return known[name]

    def join(self, instance: Component, kind: str, name: str) -> None:
        """Let a built component take part in the run's hook calls."""
        self.add(instance, f"{kind}:{name}", self.component(kind, name).package)

    def call(self, hook_name: str, **kwargs: Any) -> Any:
        """Call a hook; an exception from a plugin is re-raised naming that plugin."""
        hook = getattr(self.pm.hook, hook_name)
        try:
            return hook(**kwargs)
        except Exception as exc:
            error = _attributed(exc, hook_name, hook.get_hookimpls())
            if error is exc:
                raise
            raise error from exc

    def _call_impl(self, impl: pluggy.HookImpl, hook_name: str, **kwargs: Any) -> Any:
        try:
            return impl.function(**kwargs)
        except JsaragError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin '{impl.plugin_name}' raised in {hook_name}: {type(exc).__name__}: {exc}") from exc


def _culprit(exc: BaseException, impls: list[pluggy.HookImpl]) -> str | None:
    """Return the plugin whose hook function appears innermost in the traceback."""
    codes = {impl.function.__code__: impl.plugin_name for impl in impls if hasattr(impl.function, "__code__")}
    culprit = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        culprit = codes.get(frame.f_code, culprit)
    return culprit


def _attributed(exc: Exception, hook_name: str, impls: list[pluggy.HookImpl]) -> Exception:
    """Name the plugin in the error: project errors keep their type (with a note), others become PluginError."""
    plugin = _culprit(exc, impls) or "?"
    if isinstance(exc, JsaragError):
        exc.add_note(f"(raised by plugin '{plugin}' in hook {hook_name})")
        return exc
    return PluginError(f"plugin '{plugin}' raised in hook {hook_name}: {type(exc).__name__}: {exc}")


def _trace_before(hook_name: str, impls: list[pluggy.HookImpl], kwargs: dict[str, Any]) -> None:
    names = ", ".join(impl.plugin_name for impl in reversed(impls)) or "no plugin"
    print(f"[jsarag trace] {hook_name} -> {names}", file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=1)
def get_plugins() -> Plugins:
    """Return the process-wide plugin manager, loading entry points on first use."""
    return Plugins()
