"""Verdicts and Decisions, and the parser that turns raw model text into a Verdict.

The parser never defaults to Safe: text that does not validate against the compiled schema
becomes an error verdict (rating None, `error` set) that keeps the raw text.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from .compiler import CompiledPolicy
from .types import Mode

if TYPE_CHECKING:
    from .backend import Generation
    from .policy import Category, NoneCategory, Policy

Rating = Literal["Safe", "Unsafe"]


class VerdictError(BaseModel):
    """Why there is no usable verdict for an item."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["image", "backend", "output", "config"]
    message: str
    retryable: bool = False


class JudgeVerdict(BaseModel):
    """One judge's answer inside a composite backend's verdict (cascade, ensemble): what that
    judge said, read strictly like any verdict, or why it failed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="The judge's name in the composite's options.")
    backend: str
    model: str | None = None
    mode: Mode
    policy_id: str | None = None
    decoding: dict[str, Any] | None = None
    rating: Rating | None = None
    category_id: str | None = None
    p_unsafe: float | None = Field(default=None, ge=0.0, le=1.0)
    error: str | None = None
    decided: bool = Field(default=False, description="This judge's answer decided the item.")


class VerdictPart(BaseModel):
    """One part of an item judged as several (a video's frame, a post's image): what the
    model said about it, kept on the item's one aggregated Verdict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0, description="Position among the item's parts (0-based).")
    timestamp: float | None = Field(default=None, description="Seconds into a video; None else.")
    source: str | None = None
    rating: Rating | None = None
    category_id: str | None = None
    p_unsafe: float | None = Field(default=None, ge=0.0, le=1.0)
    error: str | None = Field(default=None, description="Why this part has no rating.")


class Verdict(BaseModel):
    """What the model said about one image, validated against the policy's schema. Frozen:
    post-processors record their changes as overrides on the Decision."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    category_severities: dict[str, str] | None = Field(
        default=None,
        description="Every violated category id with the model's severity for it, when the "
        "policy asks for `violations` (generic format).",
    )
    raw: str | None = Field(default=None, description="The model's raw answer text.")
    error: VerdictError | None = None
    policy_id: str
    policy_version: str
    policy_hash: str
    model: str | None = None
    decoding: dict[str, Any] | None = Field(
        default=None, description="How the answer was decoded (greedy or sampling settings)."
    )
    source: str | None = Field(default=None, description="Which image this is about.")
    timings: dict[str, float] = Field(default_factory=dict)
    judges: list[JudgeVerdict] | None = Field(
        default=None, description="Each judge's answer, from a composite backend."
    )
    decided_by: str | None = Field(
        default=None, description="Which judge (or rule) decided, and why: composite backends."
    )
    p_unsafe_raw: float | None = Field(
        default=None, ge=0.0, le=1.0, description="P(Unsafe) as the model gave it, if calibrated."
    )
    calibration: dict[str, str] | None = Field(
        default=None, description="The calibration applied to p_unsafe: its name and hash."
    )
    category_scores_raw: dict[str, float] | None = Field(
        default=None, description="category_scores as the model gave them, if calibrated."
    )
    parts: list[VerdictPart] | None = Field(
        default=None, description="A video's frames or a post's images, each as judged."
    )
    deciding_part: int | None = Field(
        default=None, description="The index of the part the aggregation rule decided by."
    )
    aggregation: str | None = Field(
        default=None, description="The rule that made one verdict of the parts, e.g. 'any-unsafe'."
    )

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


class Override(BaseModel):
    """A step's change to the Decision's final rating, category or severity, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: str
    reason: str
    changes: dict[str, Any] = Field(
        description="New final values: rating, category_id, category_name, severity."
    )


FINAL_FIELDS = ("rating", "category_id", "category_name", "severity")


class ShadowResult(BaseModel):
    """What a step or a policy running in shadow would have decided: recorded, never enforced
    (docs/shadow.md).

    `kind` "step": a policy step marked `shadow: true`, run on a copy of the Decision (and the
    live steps after it on that copy); `source` is the step's id. `kind` "policy": a whole
    shadow policy judged on the same item; `source` is its id, `policy_*` its provenance and
    `reused_answer` says whether the live backend answer was read again under the shadow
    policy (same prompt and answer schema) instead of a second backend call. The final values,
    actions and overrides are the would-be Decision's; `trace` holds the lines the shadow run
    wrote.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["step", "policy"]
    source: str
    rating: Rating | None = None
    category_id: str | None = None
    category_name: str | None = None
    severity: str | None = None
    p_unsafe: float | None = None
    actions: list[Action] = Field(default_factory=list)
    overrides: list[Override] = Field(default_factory=list)
    trace: list[TraceEntry] = Field(default_factory=list)
    error: VerdictError | None = None
    policy_id: str | None = None
    policy_version: str | None = None
    policy_hash: str | None = None
    reused_answer: bool | None = None

    @classmethod
    def of(
        cls,
        decision: Decision,
        kind: Literal["step", "policy"],
        source: str,
        *,
        trace_from: int = 0,
        **extra: Any,
    ) -> ShadowResult:
        """The would-be `decision` as a shadow result (its trace from line `trace_from` on)."""
        return cls(
            kind=kind,
            source=source,
            rating=decision.rating,
            category_id=decision.category_id,
            category_name=decision.category_name,
            severity=decision.severity,
            p_unsafe=decision.verdict.p_unsafe,
            actions=list(decision.actions),
            overrides=list(decision.overrides),
            trace=list(decision.trace[trace_from:]),
            error=decision.verdict.error,
            **extra,
        )

    def agrees_with(self, decision: Decision) -> bool:
        """Same final rating and the same set of action names as the live `decision`."""
        return self.rating == decision.rating and {a.name for a in self.actions} == {
            a.name for a in decision.actions
        }


class Decision(BaseModel):
    """A verdict plus what post-processing made of it.

    `verdict` is what the model said; `rating`, `category_id`, `category_name` and `severity`
    are the final values after the steps' `overrides` (the verdict's own when none): actions,
    outputs and reports use these. Steps change a Decision through their `StepContext`.
    """

    model_config = ConfigDict(extra="forbid")

    verdict: Verdict
    overrides: list[Override] = Field(default_factory=list)
    actions: list[Action] = Field(default_factory=list)
    trace: list[TraceEntry] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    shadow: list[ShadowResult] | None = Field(
        default=None,
        description="What steps or policies in shadow would have decided; never enforced.",
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_final_values(cls, data: Any) -> Any:
        """A dumped Decision carries its final values; they are derived, not input."""
        if isinstance(data, dict) and any(k in data for k in FINAL_FIELDS):
            data = {k: v for k, v in data.items() if k not in FINAL_FIELDS}
        return data

    def _final(self, key: str) -> Any:
        value = getattr(self.verdict, key)
        for override in self.overrides:
            value = override.changes.get(key, value)
        return value

    @computed_field  # type: ignore[prop-decorator]
    @property
    def rating(self) -> Rating | None:
        """The final rating (None for an item that could not be assessed)."""
        value: Rating | None = self._final("rating")
        return value

    @computed_field  # type: ignore[prop-decorator]
    @property
    def category_id(self) -> str | None:
        value: str | None = self._final("category_id")
        return value

    @computed_field  # type: ignore[prop-decorator]
    @property
    def category_name(self) -> str | None:
        value: str | None = self._final("category_name")
        return value

    @computed_field  # type: ignore[prop-decorator]
    @property
    def severity(self) -> str | None:
        value: str | None = self._final("severity")
        return value

    @property
    def ok(self) -> bool:
        return self.verdict.ok and not any(t.error for t in self.trace)

    @property
    def unsafe(self) -> bool:
        return self.rating == "Unsafe"

    def add_action(self, name: str, by: str, **params: Any) -> Action:
        action = Action(name=name, by=by, params=params)
        self.actions.append(action)
        return action

    def add_override(self, step: str, reason: str, changes: dict[str, Any]) -> Override:
        unknown = set(changes) - set(FINAL_FIELDS)
        if unknown:
            raise ValueError(f"cannot override {', '.join(sorted(unknown))}")
        override = Override(step=step, reason=reason, changes=changes)
        self.overrides.append(override)
        return override

    def note(self, step: str, message: str, *, error: bool = False) -> None:
        self.trace.append(TraceEntry(step=step, message=message, error=error))

    def add_shadow(self, result: ShadowResult) -> None:
        """Record what a step or policy in shadow would have decided (never enforced)."""
        self.shadow = [*(self.shadow or []), result]


_FENCE = re.compile(r"\A```[A-Za-z0-9_-]*[ \t]*\n(?P<body>.*?)\n?```\Z", re.DOTALL)


def read_answer(text: str, *, lenient: bool = False) -> tuple[dict[str, Any], str]:
    """The one JSON object a reply holds, and the text around it (empty when strict).

    Strict (the default, for replies constrained to a schema): after whitespace, the reply is
    exactly one JSON object, optionally inside one ``` code fence. An array, several objects or
    any other text is a ValueError that says which. Lenient (opt-in, for unconstrained
    servers): prose around exactly one object is allowed; the caller must still check that the
    prose does not contradict the object (`contradiction`). Never takes an object out of an
    array or picks one of several."""
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    body = fenced.group("body").strip() if fenced else stripped
    if not body:
        raise ValueError("empty reply: no JSON object")
    decoder = json.JSONDecoder()
    try:
        value, end = decoder.raw_decode(body)
    except json.JSONDecodeError:
        value, end = None, -1
    if end != -1:
        if not isinstance(value, dict):
            raise ValueError(f"the reply is a JSON {_json_kind(value)}, not one object")
        if not body[end:].strip():
            return value, ""
    found = _objects(body)
    if not found:
        raise ValueError("no JSON object in the reply")
    if len(found) > 1:
        raise ValueError(f"the reply holds {len(found)} JSON objects, not one")
    ((start, stop, obj),) = found
    before, after = body[:start], body[stop:]
    if before.rstrip().endswith("[") or after.lstrip().startswith(","):
        raise ValueError("the JSON object is inside an array, not alone")
    if not lenient:
        where = "before" if before.strip() else "after"
        raise ValueError(f"text {where} the JSON object (a schema-constrained reply is one object)")
    return obj, (before + " " + after).strip()


def contradiction(rating: str, prose: str) -> str | None:
    """Why prose around a lenient reply contradicts its rating (it names the other one)."""
    other = {"Safe": r"\bunsafe\b|\bnot safe\b", "Unsafe": r"\bsafe\b"}[rating]
    found = re.search(other, prose, re.IGNORECASE)
    if found is None:
        return None
    return f"the text around the JSON object says {found.group(0)!r} but the object says {rating!r}"


def _objects(text: str) -> list[tuple[int, int, dict[str, Any]]]:
    """Every top-level JSON object in text: (start, end, value)."""
    decoder = json.JSONDecoder()
    found = []
    start = text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            found.append((start, end, value))
        start = text.find("{", end)
    return found


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


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
    mode: Mode = "full",
    lenient: bool = False,
    model: str | None = None,
    decoding: dict[str, Any] | None = None,
    source: str | None = None,
    timings: dict[str, float] | None = None,
) -> Verdict:
    """Read raw model text as a verdict for `mode`; an error verdict (kind "output", the raw
    text kept) when it is not exactly one object that satisfies the mode's schema, or when it
    is inconsistent (an Unsafe rating must name one of the policy's categories)."""
    extra: dict[str, Any] = {"model": model, "decoding": decoding, "source": source}
    extra["timings"] = dict(timings or {})
    try:
        answer, prose = read_answer(text, lenient=lenient)
    except ValueError as err:
        return error_verdict(compiled, "output", str(err), raw=text, **extra)
    problem = compiled.problem(answer, mode)
    if problem is None and prose:
        problem = contradiction(answer["rating"], prose)
    if problem is not None:
        return error_verdict(compiled, "output", f"invalid verdict: {problem}", raw=text, **extra)
    label = answer["category"]
    category_id = compiled.labels[label]
    name = label.split(": ", 1)[1] if ": " in label else label
    severity = answer.get("severity")
    by_id = _violations_by_id(compiled, answer.get("violations"))
    if severity is None and by_id is not None and answer["rating"] == "Unsafe":
        severity = by_id[category_id]  # the model's severity of its main category
    if severity is None and answer["rating"] == "Unsafe":
        # The policy's level for the violated category, when the model was not asked for one.
        severity = compiled.policy.category(category_id).severity
    return Verdict(
        rating=answer["rating"],
        category_id=category_id,
        category_name=name,
        rationale=answer.get("rationale"),
        severity=severity,
        categories=[compiled.labels[c] for c in answer["categories"]]
        if "categories" in answer
        else (None if by_id is None else list(by_id)),
        category_severities=by_id,
        raw=text,
        policy_id=compiled.policy.id,
        policy_version=compiled.policy.version,
        policy_hash=compiled.hash,
        **extra,
    )


def _violations_by_id(
    compiled: CompiledPolicy, violations: dict[str, str] | None
) -> dict[str, str] | None:
    """An answer's `violations` (label -> severity) by category id, in policy order."""
    if violations is None:
        return None
    by_id = {compiled.labels[label]: level for label, level in violations.items()}
    return {c.id: by_id[c.id] for c in compiled.policy.categories if c.id in by_id}


def build_verdict(
    compiled: CompiledPolicy,
    mode: Mode,
    generation: Generation,
    *,
    source: str | None = None,
    timings: dict[str, float] | None = None,
    score_threshold: float = 0.5,
    lenient: bool = False,
) -> Verdict:
    """The one way a backend's Generation becomes a Verdict, for every mode: a failure is an
    error verdict; score mode rates by `score_threshold` and picks the likeliest category;
    full and verdict modes parse the text (strictly unless `lenient`). A composite backend's
    per-judge answers and its reason (`judges`, `decided_by`) are kept, errors included."""
    verdict = _build_verdict(
        compiled,
        mode,
        generation,
        source=source,
        timings=timings,
        score_threshold=score_threshold,
        lenient=lenient,
    )
    if generation.judges is None and generation.decided_by is None:
        return verdict
    return verdict.model_copy(
        update={"judges": generation.judges, "decided_by": generation.decided_by}
    )


def _build_verdict(
    compiled: CompiledPolicy,
    mode: Mode,
    generation: Generation,
    *,
    source: str | None = None,
    timings: dict[str, float] | None = None,
    score_threshold: float = 0.5,
    lenient: bool = False,
) -> Verdict:
    extra: dict[str, Any] = {
        "model": generation.model,
        "decoding": generation.decoding,
        "source": source,
        "timings": dict(timings or {}),
    }
    if generation.error is not None:
        return error_verdict(
            compiled,
            "backend",
            generation.error,
            raw=generation.text or None,
            retryable=generation.retryable,
            **extra,
        )
    scores = {"p_unsafe": generation.p_unsafe, "category_scores": generation.category_scores}
    if mode != "score":
        verdict = parse_verdict(generation.text, compiled, mode=mode, lenient=lenient, **extra)
        if verdict.ok:
            return verdict.model_copy(update=scores)
        if generation.hint and verdict.error is not None:
            error = verdict.error.model_copy(
                update={"message": f"{verdict.error.message}; {generation.hint}"}
            )
            return verdict.model_copy(update={"error": error})
        return verdict
    if generation.p_unsafe is None:
        return error_verdict(compiled, "backend", "the backend gave no score", **extra)
    rating: Rating = "Unsafe" if generation.p_unsafe >= score_threshold else "Safe"
    policy = compiled.policy
    category = _score_category(policy, rating, generation.category_scores)
    return Verdict(
        rating=rating,
        category_id=category.id if category else None,
        category_name=category.name if category else None,
        severity=getattr(category, "severity", None),
        policy_id=policy.id,
        policy_version=policy.version,
        policy_hash=compiled.hash,
        **scores,
        **extra,
    )


def _score_category(
    policy: Policy, rating: str, scores: dict[str, float] | None
) -> Category | NoneCategory | None:
    """A score-mode verdict's category: for Unsafe, the most likely violated category; for
    Safe, the none-applying one; None when the backend gave no category scores."""
    if not scores:
        return None
    if rating == "Safe":
        return policy.none_category
    known = {c.id: c for c in policy.categories}
    ranked = sorted((v, k) for k, v in scores.items() if k in known)
    return known[ranked[-1][1]] if ranked else None
