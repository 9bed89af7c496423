"""The plugin manager: built-in and third-party plugins load the same way, from the entry-point group ``jsarag``.

Plugins answer only the registration hooks of ``jsarag.api`` (pluggy); the registered classes are checked against
their kind's contract when a run chooses them (``check_class``), before anything is built.

- ``JSARAG_LOAD_PLUGINS=a,b`` loads only the named entry points (``JSARAG_LOAD_PLUGINS=`` loads none).
- ``JSARAG_TRACE_PLUGINS=1`` prints every registration call and every hook-point call of a run to stderr.
A misspelt registration hook is an error naming the plugin (pluggy's ``check_pending``); an unknown component name
lists the registered names.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import os
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType

import pluggy

from jsarag import api
from jsarag.errors import JsaragError, PluginError

GROUP = "jsarag"
KINDS = {  # component kind -> its registration hook
    "retriever": "register_retrievers",
    "index": "register_indexes",
    "generator": "register_generators",
    "estimator": "register_estimators",
    "observer": "register_observers",
}
# the methods a step calls on each kind: a component that defines another kind's is answering the wrong hook point
STEP_METHODS = {
    "retriever": {"encode", "search", "score"},
    "index": {"search"},
    "generator": {"score", "generate"},
    "estimator": {"extra_rows", "sample", "update"},
    "observer": {"on_hook"},
}
FRAMEWORK_HOOKS = {"retrieve": "the framework builds the candidate set: a retriever implements encode, search and "
                               "score instead"}
LIFECYCLE = {name for name in vars(api.Component) if name.startswith("on_")} | {"on_hook"}


def tracing() -> bool:
    """Whether ``JSARAG_TRACE_PLUGINS=1`` asks for every hook call to be printed."""
    return os.environ.get("JSARAG_TRACE_PLUGINS") == "1"


def trace(text: str) -> None:
    """Print one trace line to stderr."""
    print(f"[jsarag trace] {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Registered:
    """A component class offered under a name, and who offered it."""

    kind: str
    name: str
    cls: type[api.Component]
    plugin: str
    package: str

    def describe(self) -> str:
        """``kind 'name' (plugin p, package q)`` for messages."""
        return f"{self.kind} '{self.name}' (plugin {self.plugin}, package {self.package})"


class Plugins:
    """The loaded plugins and the component classes they registered."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(api)
        self.packages: dict[str, str] = {}  # plugin name -> distribution it came from
        self._registry: dict[str, dict[str, Registered]] | None = None
        if load_entry_points:
            self._load_entry_points()

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
        """Register a plugin module (or object) under ``name``; a hook it implements that no spec knows is an error."""
        self.pm.register(plugin, name=name)
        self.packages[name] = package
        self._registry = None
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            hooks = ", ".join(KINDS.values())
            raise PluginError(f"plugin '{name}' (package {package}): {exc}; the hooks are {hooks}") from None

    def registry(self) -> dict[str, dict[str, Registered]]:
        """Return every registered component, by kind then name."""
        if self._registry is None:
            self._registry = self._collect()
        return self._registry

    def _collect(self) -> dict[str, dict[str, Registered]]:
        found: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
        for kind, hook_name in KINDS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                plugin, package = impl.plugin_name, self.packages.get(impl.plugin_name, "?")
                if tracing():
                    trace(f"{hook_name} -> {plugin}")
                register = functools.partial(self._register, found[kind], kind, plugin, package)
                try:
                    impl.function(register=register)
                except JsaragError:
                    raise
                except Exception as exc:
                    raise PluginError(f"plugin '{plugin}' raised in {hook_name}: {type(exc).__name__}: {exc}") from exc
        return found

    @staticmethod
    def _register(found: dict[str, Registered], kind: str, plugin: str, package: str, name: str, cls: type) -> None:
        base = api.BASES[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"plugin '{plugin}' registered {kind} '{name}' as {cls!r}, which is not a subclass of "
                              f"jsarag.api.{base.__name__}")
        options_base = api.IndexOptions if kind == "index" else api.Options
        if not (isinstance(cls.Options, type) and issubclass(cls.Options, options_base)):
            raise PluginError(f"{kind} '{name}' (plugin {plugin}): its Options must subclass "
                              f"jsarag.api.{options_base.__name__}")
        if name in found:
            raise PluginError(f"{kind} '{name}' is registered twice: by plugin '{found[name].plugin}' and by '{plugin}'")
        found[name] = Registered(kind, name, cls, plugin, package)

    def component(self, kind: str, name: str) -> Registered:
        """Return the component ``name`` of ``kind``; an unknown name lists the registered ones."""
        known = self.registry()[kind]
        if name not in known:
            names = ", ".join(sorted(known)) or "none"
            raise PluginError(f"unknown {kind} '{name}'; registered {kind}s: {names}")
        return known[name]


def check_class(registered: Registered) -> None:
    """Refuse a component class that breaks its kind's contract: a required method missing (with the method it
    probably meant), a method of another kind's hook point, an unknown ``on_*`` event, or a ``@hookimpl`` method."""
    cls, kind, problems = registered.cls, registered.kind, []
    own = {name for klass in cls.__mro__ if klass not in inspect.getmro(api.BASES[kind]) for name in vars(klass)
           if not name.startswith("_")}
    for missing in sorted(getattr(cls, "__abstractmethods__", ())):
        close = difflib.get_close_matches(missing, sorted(own), n=1, cutoff=0.75)
        problems.append(f"it does not implement {missing}" + (f" (is '{close[0]}' a misspelling?)" if close else ""))
    others = set().union(*(m for k, m in STEP_METHODS.items() if k != kind)) - STEP_METHODS[kind]
    if kind in ("index", "observer"):
        others |= {"score", "encode"} - STEP_METHODS[kind]
    for name in sorted(own & (others | set(FRAMEWORK_HOOKS))):
        owner = FRAMEWORK_HOOKS.get(name) or "a hook point of " + ", ".join(
            f"{k}s" for k, methods in STEP_METHODS.items() if name in methods)
        problems.append(f"it defines {name}, which is {owner}; only that kind answers it")
    for name in sorted(n for n in own if n.startswith("on_") and n not in LIFECYCLE):
        close = difflib.get_close_matches(name, sorted(LIFECYCLE), n=1)
        problems.append(f"it defines {name}, which is no event" + (f" (did you mean {close[0]}?)" if close else ""))
    for name in sorted(n for n in own if hasattr(getattr(cls, n, None), "jsarag_impl")):
        problems.append(f"its method {name} carries @hookimpl, which marks registration hooks only (methods are "
                        "called directly)")
    if problems:
        raise PluginError(f"{registered.describe()} cannot join a run: " + "; ".join(problems))


@functools.lru_cache(maxsize=1)
def get_plugins() -> Plugins:
    """Return the process-wide plugin manager, loading entry points on first use."""
    return Plugins()
