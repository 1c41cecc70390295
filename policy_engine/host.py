"""The plugin host: pluggy, project name `policy_engine`, entry-point group `policy_engine`.

Built-ins (prompt formats, backends, post-processors) come through this distribution's own entry
points, exactly like a third-party plugin. Environment variables:

- `POLICY_ENGINE_PLUGINS`: comma-separated allowlist of third-party entry-point names to load
  (set it empty to load none). Built-ins always load unless blocked.
- `POLICY_ENGINE_DISABLE_PLUGINS`: comma-separated blocklist (built-ins included).
- `POLICY_ENGINE_TRACE_HOOKS=1`: print every hook call and result to stderr.

After loading, the host reports hook implementations that match no hook spec (a misspelled
`register_backend` would otherwise register nothing, silently): a warning per plugin and hook,
and `policy-engine plugins` marks them. Then it calls every plugin's `startup` hook.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import pluggy

from . import hookspecs
from .backend import Backend
from .compiler import CompiledPolicy, compile_policy, policy_hash
from .errors import PluginError, PolicyEngineError, UnknownNameError
from .formats.base import PromptFormat
from .postprocess import PostProcessor

if TYPE_CHECKING:
    import click

    from .policy import Policy

log = logging.getLogger(__name__)
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
    unknown_hooks: tuple[str, ...] = ()  # implementations that match no hook spec
    commands: tuple[str, ...] = ()  # CLI commands it added (once the CLI asked for them)


def _names(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


class PluginHost:
    """Wraps a pluggy PluginManager with one typed method per registry and per hook."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self._load_entry_points = load_entry_points
        self._loaded = False
        self._lock = threading.RLock()
        self._dists: dict[str, tuple[str | None, str | None, bool]] = {}
        self._cache: dict[str, dict[str, Registered[Any]]] | None = None
        self._observers: list[tuple[str, Any]] | None = None
        self._compiled: OrderedDict[tuple[str, type[PromptFormat]], CompiledPolicy] = OrderedDict()
        self._commands: dict[str, str] = {}
        self._startup_error: PolicyEngineError | None = None
        if os.environ.get(ENV_TRACE):
            self.pm.trace.root.setwriter(lambda text: sys.stderr.write(f"[hooks] {text}"))
            self.pm.enable_tracing()

    # -- loading ---------------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        """Load entry-point plugins (once), report unknown hooks, run `startup` hooks."""
        with self._lock:
            if self._loaded:
                if self._startup_error is not None:
                    raise self._startup_error
                return
            self._loaded = True
            if self._load_entry_points:
                self._load_from_entry_points()
            for plugin, hook in self.unknown_hooks():
                log.warning(
                    "plugin %r implements %r, which is no hook of policy-engine%s: it is "
                    "never called",
                    plugin,
                    hook,
                    _did_you_mean(hook, self.hook_names()),
                )
            try:
                self.pm.hook.startup(host=self)
            except PolicyEngineError as err:  # a configuration problem: every use reports it
                self._startup_error = err
                raise

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
                log.warning("plugin %r failed to load: %s", ep.name, err)
                continue
            self._dists[ep.name] = (dist_name, dist.version if dist else None, builtin)

    def register(self, plugin: object, name: str) -> None:
        """Register a plugin object (module or instance) by hand, e.g. in tests. An
        implementation of an unknown hook is a PluginError here (a typo in code at hand)."""
        self.ensure_loaded()
        with self._lock:
            self.pm.register(plugin, name=name)
            self._invalidate()
            unknown = [hook for owner, hook in self.unknown_hooks() if owner == name]
            if unknown:
                self.pm.unregister(name=name)
                self._invalidate()
                hook = unknown[0]
                raise PluginError(
                    f"plugin {name!r} implements {hook!r}, which is no hook of policy-engine"
                    f"{_did_you_mean(hook, self.hook_names())}"
                )

    def unregister(self, name: str) -> None:
        with self._lock:
            self.pm.unregister(name=name)
            self._invalidate()

    def _invalidate(self) -> None:
        self._cache = None
        self._observers = None
        self._compiled.clear()

    def hook_names(self) -> list[str]:
        """Every hook a plugin may implement."""
        return sorted(n for n, caller in vars(self.pm.hook).items() if _has_spec(caller))

    def unknown_hooks(self) -> list[tuple[str, str]]:
        """(plugin, hook) for each implementation that matches no hook spec."""
        found = []
        for name, caller in sorted(vars(self.pm.hook).items()):
            if _has_spec(caller) or not hasattr(caller, "get_hookimpls"):
                continue
            for impl in caller.get_hookimpls():
                if not impl.optionalhook:
                    found.append((impl.plugin_name, name))
        return found

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
        for plugin_name, call in self._per_plugin(hook_name):

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

            call(register=register)
        return found

    def _per_plugin(self, hook_name: str) -> list[tuple[str, Any]]:
        """(plugin name, a caller of that plugin's implementation alone), in pluggy's order:
        each call still goes through pluggy (hook tracing shows it)."""
        callers = []
        plugins = self.pm.get_plugins()
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            others = [p for p in plugins if p is not impl.plugin]
            name = self.pm.get_name(impl.plugin) or repr(impl.plugin)
            callers.append((name, self.pm.subset_hook_caller(hook_name, remove_plugins=others)))
        return callers

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

    def compile(self, policy: Policy) -> CompiledPolicy:
        """Compile `policy` with the prompt format this host registers under its name. Cached
        per host by the policy's content and the format class."""
        fmt = self.prompt_format(policy.prompt_format)
        key = (policy_hash(policy), fmt)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        compiled = compile_policy(policy, fmt())
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > _COMPILE_CACHE:
                self._compiled.popitem(last=False)
        return compiled

    # -- other hooks -----------------------------------------------------------------------
    def add_commands(self, cli: click.Group) -> None:
        """Let each plugin add its commands; a name already taken (by the core or another
        plugin) is a PluginError naming both."""
        import click

        self.ensure_loaded()
        taken = cli.list_commands(click.Context(cli))  # lazy built-ins included
        owners = {
            name: f"plugin {self._commands[name]!r}"
            if name in self._commands
            else "policy-engine (core)"
            for name in taken
        }
        for plugin, call in self._per_plugin("register_commands"):
            before = dict(cli.commands)
            call(cli=cli)
            for name, command in cli.commands.items():
                if before.get(name) is command or self._commands.get(name) == plugin:
                    continue  # unchanged, or this plugin adding its own command again
                if name in owners:
                    cli.commands.clear()  # the clash leaves the CLI as it was
                    cli.commands.update(before)
                    raise PluginError(
                        f"command {name!r} is added twice: by {owners[name]} and by plugin "
                        f"{plugin!r}"
                    )
                owners[name] = f"plugin {plugin!r}"
                self._commands[name] = plugin

    def observe_decision(self, decision: Any) -> None:
        """Show the Decision to every observer, each through pluggy on its own: one failing
        observer neither loses the Decision nor keeps it from the others (a warning names the
        plugin)."""
        self.ensure_loaded()
        observers = self._observers
        if observers is None:
            with self._lock:
                observers = self._observers = self._per_plugin("observe_decision")
        for plugin, call in observers:
            try:
                call(decision=decision)
            except Exception as err:  # a failing sink must not lose the decision
                log.warning(
                    "plugin %r: observe_decision failed: %s: %s", plugin, type(err).__name__, err
                )

    def plugins(self) -> list[PluginInfo]:
        """Every registered plugin, its hooks and what it registered."""
        registries = self._collect()
        unknown: dict[str, list[str]] = {}
        for owner, hook in self.unknown_hooks():
            unknown.setdefault(owner, []).append(hook)
        specs = set(self.hook_names())
        result = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda item: item[0]):
            if plugin is None:
                continue
            hooks = tuple(
                sorted(h.name for h in self.pm.get_hookcallers(plugin) or [] if h.name in specs)
            )
            registered: dict[str, list[str]] = {}
            for kind, entries in registries.items():
                names = sorted(r.name for r in entries.values() if r.plugin == name)
                if names:
                    registered[kind] = names
            commands = tuple(sorted(c for c, owner in self._commands.items() if owner == name))
            dist, version, builtin = self._dists.get(name, (None, None, False))
            result.append(
                PluginInfo(
                    name,
                    dist,
                    version,
                    builtin,
                    hooks,
                    registered,
                    tuple(unknown.get(name, ())),
                    commands,
                )
            )
        return result


_COMPILE_CACHE = 128


def _has_spec(caller: Any) -> bool:
    has_spec = getattr(caller, "has_spec", None)
    return bool(has_spec and has_spec())


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
