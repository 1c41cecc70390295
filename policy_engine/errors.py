"""The engine's errors: few, each with a message a person can act on.

The CLI turns every `PolicyEngineError` into one line on stderr and a non-zero exit; anything
else reaching the user is a bug.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError


class PolicyEngineError(Exception):
    """Base error. `str(err)` is the user-facing message; `exit_code` is the CLI's status."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Problem:
    """One problem in a policy file, located as precisely as the YAML allows."""

    file: str
    line: int  # 1-based; 0 when unknown
    column: int  # 1-based; 0 when unknown
    path: str  # dotted field path, e.g. "categories.3.severity"; "" for the whole file
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class PolicyError(PolicyEngineError):
    """A policy file that cannot be loaded: one or more located problems."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class UnknownNameError(PolicyEngineError):
    """A backend, prompt format, post-processor or policy name that nothing registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        self.kind, self.name, self.known = kind, name, sorted(known)
        listing = f"installed: {', '.join(self.known)}" if self.known else "none installed"
        super().__init__(f"unknown {kind} {name!r}; {listing}")


class PluginError(PolicyEngineError):
    """A plugin that misbehaves at registration (duplicate name, wrong type)."""


class BackendUnavailableError(PolicyEngineError):
    """A backend whose dependencies are missing; the message names the install command."""


class BackendError(PolicyEngineError):
    """A fault while a backend runs. `retryable` says whether trying again may help."""

    exit_code = 1

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class OutputParseError(PolicyEngineError):
    """Model output that is not a valid verdict; keeps the raw text."""

    exit_code = 1

    def __init__(self, message: str, raw: str) -> None:
        super().__init__(message)
        self.raw = raw


class ImageError(PolicyEngineError):
    """An image that cannot be used: missing, not an image, corrupt, too large."""

    exit_code = 1


_PLAIN = {
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}


def plain_message(item: Any) -> str:
    """One pydantic error item in plain words ("must be an integer"), for users' messages."""
    kind = item["type"]
    if kind in _PLAIN:
        return _PLAIN[kind]
    ctx = item.get("ctx") or {}
    if kind == "too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    message: str = item["msg"]
    if kind == "value_error":  # a validator's own words
        return message.removeprefix("Value error, ")
    return message.replace("Input should be", "must be").replace("String should", "must")


def one_line(err: ValidationError, *, valid: Iterable[str] = ()) -> str:
    """A pydantic error as one readable line: 'option x: message; option y: message'.
    An unknown option lists the `valid` ones, when given."""
    known = sorted(valid)
    parts = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "options"
        if item["type"] == "extra_forbidden":
            message = "unknown option"
            if known:
                message += f" (options: {', '.join(known)})"
        else:
            message = plain_message(item)
        parts.append(f"option {where}: {message}")
    return "; ".join(parts)
