"""Hook specifications: the whole plugin API. Every hook is called with keyword arguments."""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("policy_engine")
hookimpl = pluggy.HookimplMarker("policy_engine")


@hookspec
def register_backends(register: Any) -> None:
    """Register inference backends: call `register(BackendClass)` for each."""


@hookspec
def register_prompt_formats(register: Any) -> None:
    """Register prompt formats: call `register(PromptFormatClass)` for each."""


@hookspec
def register_postprocessors(register: Any) -> None:
    """Register verdict post-processors: call `register(PostProcessorClass)` for each."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add commands to the `policy-engine` CLI: `cli` is its click group."""


@hookspec
def observe_decision(decision: Any) -> None:
    """See every final Decision (after post-processing): for sinks, logs and metrics.

    `decision` is the Decision the engine is about to return, error decisions included.
    """
