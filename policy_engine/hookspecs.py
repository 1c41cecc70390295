"""Hook specifications: the whole plugin API. Every hook is called with keyword arguments, and an
implementation may accept a subset of them. Implementations run last-registered-first: nothing
here depends on that order (post-processors run in the order the policy lists them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

import pluggy

if TYPE_CHECKING:
    import click

    from .backend import Backend
    from .formats.base import PromptFormat
    from .host import PluginHost
    from .postprocess import PostProcessor
    from .verdict import Decision

hookspec = pluggy.HookspecMarker("policy_engine")
hookimpl = pluggy.HookimplMarker("policy_engine")

T_contra = TypeVar("T_contra", contravariant=True)


class Register(Protocol[T_contra]):
    """The callback a `register_<things>` hook receives: call it once per thing to register.
    The host refuses a duplicate name and records which plugin registered what."""

    def __call__(self, thing: T_contra, /) -> None: ...


@hookspec
def register_backends(register: Register[type[Backend]]) -> None:
    """Register inference backends: `register(BackendClass)` for each (a Backend subclass)."""


@hookspec
def register_prompt_formats(register: Register[type[PromptFormat]]) -> None:
    """Register prompt formats: `register(FormatClass)` for each (a PromptFormat subclass)."""


@hookspec
def register_postprocessors(register: Register[type[PostProcessor]]) -> None:
    """Register post-processors: `register(StepClass)` for each (a PostProcessor subclass)."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the `policy-engine` CLI with `cli.add_command(command)`. A name that
    another plugin (or the core) already uses is refused."""


@hookspec
def startup(host: PluginHost) -> None:
    """Called once, after every plugin is loaded and before the host serves anything: check
    your configuration here (environment variables, files) and raise a PolicyEngineError
    with a one-line message when it is wrong. `host` is the plugin host starting up."""


@hookspec
def observe_decision(decision: Decision) -> None:
    """See every final Decision (after post-processing, error Decisions included): for sinks,
    logs and metrics. `decision` is the Decision the engine is about to return; do not change
    it. An exception is logged as a warning and does not keep the Decision from other
    observers or from the caller."""
