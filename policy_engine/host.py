"""The plugin host: pluggy, project name `policy_engine`, entry-point group `policy_engine`.

Built-ins (prompt formats, backends, post-processors) come through this distribution's own entry
points, exactly like a third-party plugin. Environment variables:

- `POLICY_ENGINE_PLUGINS`: comma-separated allowlist of third-party entry-point names to load
  (set it empty to load none). Built-ins always load unless blocked.
- `POLICY_ENGINE_DISABLE_PLUGINS`: comma-separated blocklist (built-ins included).
- `POLICY_ENGINE_TRACE_HOOKS=1`: print every hook call and result to stderr.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pluggy

from . import hookspecs
from .components import Backend, PostProcessor, PromptFormat
from .errors import PluginError, UnknownNameError

GROUP = "policy_engine"
OWN_DISTRIBUTION = "policy-engine"
ENV_ALLOW = "POLICY_ENGINE_PLUGINS"
ENV_BLOCK = "POLICY_ENGINE_DISABLE_PLUGINS"
ENV_TRACE = "POLICY_ENGINE_TRACE_HOOKS"

T = TypeVar("T")


@dataclass(frozen=True)
class Registered(Generic[T]):
    """A registered thing and the plugin that registered it."""

    name: str
    obj: T
    plugin: str


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    builtin: bool
    hooks: tuple[str, ...]
    registered: dict[str, list[str]] = field(default_factory=dict)


def _names(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


class PluginHost:
    """Wraps a pluggy PluginManager with one typed method per registry."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self._load_entry_points = load_entry_points
        self._loaded = False
        self._lock = threading.RLock()
        self._dists: dict[str, tuple[str | None, str | None, bool]] = {}
        self._cache: dict[str, dict[str, Registered[Any]]] | None = None
        if os.environ.get(ENV_TRACE):
            self.pm.trace.root.setwriter(lambda text: sys.stderr.write(f"[hooks] {text}"))
            self.pm.enable_tracing()

    # -- loading ---------------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            if self._load_entry_points:
                self._load_from_entry_points()

    def _load_from_entry_points(self) -> None:
        allow = _names(os.environ.get(ENV_ALLOW))
        block = _names(os.environ.get(ENV_BLOCK)) or set()
        for ep in sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: e.name):
            dist = ep.dist
            dist_name = dist.metadata["Name"] if dist is not None else None
            builtin = dist_name == OWN_DISTRIBUTION
            if ep.name in block or (not builtin and allow is not None and ep.name not in allow):
                continue
            if self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                module = ep.load()
                self.pm.register(module, name=ep.name)  # validates hookimpls against the specs
            except Exception as err:  # a broken third-party plugin must not break the tool
                print(
                    f"policy-engine: warning: plugin {ep.name!r} failed to load: {err}",
                    file=sys.stderr,
                )
                continue
            self._dists[ep.name] = (dist_name, dist.version if dist else None, builtin)

    def register(self, plugin: object, name: str) -> None:
        """Register a plugin object (module or instance) by hand, e.g. in tests."""
        self.ensure_loaded()
        with self._lock:
            self.pm.register(plugin, name=name)
            self._cache = None

    def unregister(self, name: str) -> None:
        with self._lock:
            self.pm.unregister(name=name)
            self._cache = None

    # -- registries ------------------------------------------------------------------------
    def _collect(self) -> dict[str, dict[str, Registered[Any]]]:
        self.ensure_loaded()
        with self._lock:
            if self._cache is not None:
                return self._cache
            cache: dict[str, dict[str, Registered[Any]]] = {}
            kinds: list[tuple[str, str, type]] = [
                ("backend", "register_backends", Backend),
                ("prompt format", "register_prompt_formats", PromptFormat),
                ("post-processor", "register_postprocessors", PostProcessor),
            ]
            for kind, hook_name, base in kinds:
                cache[kind] = self._collect_kind(kind, hook_name, base)
            self._cache = cache
            return cache

    def _collect_kind(self, kind: str, hook_name: str, base: type) -> dict[str, Registered[Any]]:
        found: dict[str, Registered[Any]] = {}
        hook = getattr(self.pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            plugin_name = self.pm.get_name(impl.plugin) or repr(impl.plugin)

            def register(obj: Any, _plugin: str = plugin_name) -> None:
                if not (isinstance(obj, type) and issubclass(obj, base)):
                    raise PluginError(
                        f"plugin {_plugin!r} registered {obj!r} as a {kind}; "
                        f"expected a subclass of {base.__name__}"
                    )
                name = getattr(obj, "name", None)
                if not isinstance(name, str) or not name:
                    raise PluginError(f"plugin {_plugin!r} registered a {kind} without a name")
                if name in found:
                    raise PluginError(
                        f"{kind} {name!r} is registered twice: by plugin "
                        f"{found[name].plugin!r} and by plugin {_plugin!r}"
                    )
                found[name] = Registered(name, obj, _plugin)

            others = [p for p in self.pm.get_plugins() if p is not impl.plugin]
            self.pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
        return found

    def backends(self) -> dict[str, Registered[type[Backend]]]:
        return self._collect()["backend"]

    def prompt_formats(self) -> dict[str, Registered[type[PromptFormat]]]:
        return self._collect()["prompt format"]

    def postprocessors(self) -> dict[str, Registered[type[PostProcessor]]]:
        return self._collect()["post-processor"]

    def backend(self, name: str) -> type[Backend]:
        return _lookup("backend", name, self.backends()).obj

    def prompt_format(self, name: str) -> type[PromptFormat]:
        return _lookup("prompt format", name, self.prompt_formats()).obj

    def postprocessor(self, name: str) -> type[PostProcessor]:
        return _lookup("post-processor", name, self.postprocessors()).obj

    # -- other hooks -----------------------------------------------------------------------
    def add_commands(self, cli: Any) -> None:
        self.ensure_loaded()
        self.pm.hook.register_commands(cli=cli)

    def observe_decision(self, decision: Any) -> None:
        """Show the Decision to every observer, each on its own: one failing sink neither loses
        the decision nor keeps it from the others (a warning names the plugin)."""
        self.ensure_loaded()
        # pluggy's call order (last registered first), one call per implementation
        for impl in reversed(self.pm.hook.observe_decision.get_hookimpls()):
            try:
                impl.function(**({"decision": decision} if impl.argnames else {}))
            except Exception as err:  # a failing sink must not lose the decision
                print(
                    f"policy-engine: warning: plugin {impl.plugin_name!r}: observe_decision "
                    f"failed: {type(err).__name__}: {err}",
                    file=sys.stderr,
                )

    def plugins(self) -> list[PluginInfo]:
        """Every registered plugin, its hooks and what it registered."""
        registries = self._collect()
        result = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda item: item[0]):
            if plugin is None:
                continue
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or []))
            registered: dict[str, list[str]] = {}
            for kind, entries in registries.items():
                names = sorted(r.name for r in entries.values() if r.plugin == name)
                if names:
                    registered[kind] = names
            dist, version, builtin = self._dists.get(name, (None, None, False))
            result.append(PluginInfo(name, dist, version, builtin, hooks, registered))
        return result


def _lookup(kind: str, name: str, table: dict[str, Registered[T]]) -> Registered[T]:
    try:
        return table[name]
    except KeyError:
        raise UnknownNameError(kind, name, table) from None


_host: PluginHost | None = None
_host_lock = threading.Lock()


def get_host() -> PluginHost:
    """The process-wide host; plugins load lazily, once, on first use."""
    global _host
    with _host_lock:
        if _host is None:
            _host = PluginHost()
        return _host


def set_host(host: PluginHost | None) -> PluginHost | None:
    """Swap the process-wide host (tests); returns the previous one."""
    global _host
    with _host_lock:
        previous, _host = _host, host
        return previous
