"""What a policy text means right now: the policy and its compiled form, or the problems that
stop it; and how the compiled prompt changed. No Textual here."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

from policy_engine import (
    CompiledPolicy,
    PluginHost,
    Policy,
    PolicyEngineError,
    PolicyError,
    Problem,
    at_level,
    get_host,
    load_policy_text,
)


@dataclass(frozen=True)
class Analysis:
    """What a text means: the policy and its compiled form, or the problems that stop it."""

    text: str
    policy: Policy | None = None
    compiled: CompiledPolicy | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.policy is not None and not self.problems


def analyse(text: str, path: Path, host: PluginHost | None = None) -> Analysis:
    """Load and compile `text` as the file at `path`, collecting problems instead of raising."""
    try:
        policy = load_policy_text(text, path, host=host)
        compiled = (host or get_host()).compile(policy)
    except PolicyError as err:
        return Analysis(text, problems=list(err.problems))
    except PolicyEngineError as err:
        return Analysis(text, problems=[Problem(str(path), 0, 0, "", err.message)])
    return Analysis(text, policy, compiled)


def at_audience(analysis: Analysis, level: str | None, host: PluginHost | None = None) -> Analysis:
    """The analysis of the policy at an audience level (`NAME@LEVEL`): the derived policy and
    its compiled form, or the reason there is none; `analysis` itself without a level or when
    the text has problems."""
    if level is None or analysis.policy is None or analysis.problems:
        return analysis
    try:
        policy = at_level(analysis.policy, level)
        compiled = (host or get_host()).compile(policy)
    except PolicyEngineError as err:
        return Analysis(analysis.text, problems=[Problem("", 0, 0, "", err.message)])
    return Analysis(analysis.text, policy, compiled)


def prompt_diff(saved: Analysis, current: Analysis) -> str:
    """A unified diff of the compiled prompt: last saved version against the current text."""
    if current.compiled is None:
        return ""
    before = saved.compiled.prompt if saved.compiled is not None else ""
    after = current.compiled.prompt
    lines = difflib.unified_diff(
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
        fromfile="prompt (saved)",
        tofile="prompt (edited)",
        n=2,
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)
