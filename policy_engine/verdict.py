"""Verdicts and Decisions, and the parser that turns raw model text into a Verdict.

The parser never defaults to Safe: text that does not validate against the compiled schema
becomes an error verdict (rating None, `error` set) that keeps the raw text.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field

from .compiler import CompiledPolicy

Rating = Literal["Safe", "Unsafe"]


class VerdictError(BaseModel):
    """Why there is no usable verdict for an item."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["image", "backend", "output", "config"]
    message: str
    retryable: bool = False


class Verdict(BaseModel):
    """What the model said about one image, validated against the policy's schema."""

    model_config = ConfigDict(extra="forbid")

    rating: Rating | None = Field(
        default=None, description="None when the item errored: never a silent Safe."
    )
    category_id: str | None = None
    category_name: str | None = None
    rationale: str | None = None
    p_unsafe: float | None = Field(default=None, ge=0.0, le=1.0)
    category_scores: dict[str, float] | None = None
    severity: str | None = None
    categories: list[str] | None = Field(default=None, description="Several categories, if asked.")
    raw: str | None = Field(default=None, description="The model's raw answer text.")
    error: VerdictError | None = None
    policy_id: str
    policy_version: str
    policy_hash: str
    model: str | None = None
    source: str | None = Field(default=None, description="Which image this is about.")
    timings: dict[str, float] = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def unsafe(self) -> bool:
        return self.rating == "Unsafe"


class Action(BaseModel):
    """Something a post-processor decided should happen: block, blur, review, …"""

    model_config = ConfigDict(extra="forbid")

    name: str
    by: str = Field(description="The post-processor step that added it.")
    params: dict[str, Any] = Field(default_factory=dict)


class TraceEntry(BaseModel):
    """One readable line of what a post-processor did and why."""

    model_config = ConfigDict(extra="forbid")

    step: str
    message: str
    error: bool = False


class Decision(BaseModel):
    """A verdict plus what post-processing made of it. Post-processors add to it in place."""

    model_config = ConfigDict(extra="forbid")

    verdict: Verdict
    actions: list[Action] = Field(default_factory=list)
    trace: list[TraceEntry] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verdict.ok and not any(t.error for t in self.trace)

    def add_action(self, name: str, by: str, **params: Any) -> Action:
        action = Action(name=name, by=by, params=params)
        self.actions.append(action)
        return action

    def note(self, step: str, message: str, *, error: bool = False) -> None:
        self.trace.append(TraceEntry(step=step, message=message, error=error))


def extract_json_object(text: str) -> Any:
    """The first JSON object in `text`: whole, fenced in ``` or inside chatty prose."""
    decoder = json.JSONDecoder()
    stripped = text.strip()
    try:
        whole = json.loads(stripped)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict):
        return whole
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    raise ValueError("no JSON object in the reply")


def error_verdict(
    compiled: CompiledPolicy,
    kind: Literal["image", "backend", "output", "config"],
    message: str,
    *,
    raw: str | None = None,
    retryable: bool = False,
    **extra: Any,
) -> Verdict:
    policy = compiled.policy
    return Verdict(
        rating=None,
        error=VerdictError(kind=kind, message=message, retryable=retryable),
        raw=raw,
        policy_id=policy.id,
        policy_version=policy.version,
        policy_hash=compiled.hash,
        **extra,
    )


def parse_verdict(
    text: str,
    compiled: CompiledPolicy,
    *,
    schema: dict[str, Any] | None = None,
    **extra: Any,
) -> Verdict:
    """Validate raw model text against the compiled schema; an error verdict if it fails."""
    schema = schema or compiled.schema
    try:
        answer = extract_json_object(text)
    except ValueError as err:
        return error_verdict(compiled, "output", str(err), raw=text, **extra)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(answer), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.absolute_path) or "answer"
        return error_verdict(
            compiled, "output", f"invalid verdict: {where}: {first.message}", raw=text, **extra
        )
    label = answer["category"]
    category_id = compiled.labels[label]
    name = label.split(": ", 1)[1] if ": " in label else label
    severity = answer.get("severity")
    if severity is None and answer["rating"] == "Unsafe":
        # The policy's level for the violated category, when the model was not asked for one.
        policy = compiled.policy
        if category_id != policy.none_category.id:
            severity = policy.category(category_id).severity
    return Verdict(
        rating=answer["rating"],
        category_id=category_id,
        category_name=name,
        rationale=answer.get("rationale"),
        severity=severity,
        categories=[compiled.labels[c] for c in answer["categories"]]
        if "categories" in answer
        else None,
        raw=text,
        policy_id=compiled.policy.id,
        policy_version=compiled.policy.version,
        policy_hash=compiled.hash,
        **extra,
    )
