"""Escalation: turn verdicts into moderation actions, declaratively.

Two post-processors:

`rules` -- the rules language. Conditions on the Decision (final rating, category, severity;
the model's P(Unsafe) and category scores; actions earlier steps added), the mode and the
request metadata, combined with all/any/not; actions allow, block, blur, human_review, escalate
(with queue and priority), flag, or a custom name the policy declares under `actions:` (an
undeclared name is a load-time error, so a typo like `blok` is caught). Semantics: rules run
in the order listed; with `match: first` (the default) the first rule that holds acts and later
rules are not evaluated, with `match: all` every rule that holds acts, in order; `default`
acts when none held. Every evaluated rule leaves a trace line naming the facts that decided it.

    postprocess:
      - name: rules
        id: moderation
        params:
          rules:
            - id: self-harm
              when: {category: O7}
              then: {action: escalate, queue: safeguarding, priority: urgent}
            - id: minors-strict
              when: {rating: Unsafe, metadata: {audience: minors}}
              then: block
            - id: borderline
              when: {p_unsafe: {min: 0.3, max: 0.7}}
              then: {action: human_review, queue: borderline}
          default: allow

`escalate` -- one rule per step, the short form the shipped policies started with:

    postprocess:
      - name: escalate
        params: {categories: [O7], action: escalate, queue: crisis, priority: urgent}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from policy_engine import (
    Decision,
    Policy,
    PostProcessor,
    Register,
    StepContext,
    hookimpl,
    unknown_categories,
)


class EscalateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ratings: list[str] = Field(default_factory=lambda: ["Unsafe"], min_length=1)
    categories: list[str] = Field(
        default_factory=list, description="Category ids that match; empty: any category."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Request metadata that must be equal, e.g. audience."
    )
    applies_to: Literal["verdicts", "errors", "all"] = Field(
        default="verdicts",
        description="Match valid verdicts, error verdicts (failed assessments), or both.",
    )
    action: str = Field(default="human_review", min_length=1)
    queue: str | None = None
    priority: str | None = None


class Escalate(PostProcessor):
    name = "escalate"
    description = "Add an action (human_review, block, escalate, …) when a verdict matches"
    Params = EscalateParams
    params: EscalateParams

    @classmethod
    def check(cls, params: BaseModel, policy: Policy) -> list[tuple[tuple[str | int, ...], str]]:
        assert isinstance(params, EscalateParams)
        problems = unknown_categories(
            policy, ((("categories", i), c) for i, c in enumerate(params.categories))
        )
        for index, rating in enumerate(params.ratings):
            if rating not in ("Safe", "Unsafe"):
                problems.append((("ratings", index), f"{rating!r} is not Safe or Unsafe"))
        if params.action not in policy.known_actions():
            problems.append((("action",), policy.unknown_action(params.action)))
        return problems

    def matches(self, decision: Decision, metadata: Mapping[str, Any]) -> tuple[bool, str]:
        verdict = decision.verdict
        p = self.params
        if not verdict.ok:
            if p.applies_to == "verdicts":
                return False, "verdict is an error"
            return True, f"error verdict ({verdict.error.kind if verdict.error else '?'})"
        if p.applies_to == "errors":
            return False, "verdict is not an error"
        if decision.rating not in p.ratings:
            return False, f"rating {decision.rating} not in {p.ratings}"
        if p.categories and decision.category_id not in p.categories:
            return False, f"category {decision.category_id} not in {p.categories}"
        for key, expected in p.metadata.items():
            if metadata.get(key) != expected:
                return False, f"metadata {key}={metadata.get(key)!r}, rule wants {expected!r}"
        return True, f"rating {decision.rating}, category {decision.category_id}"

    def __call__(self, decision: Decision, context: StepContext) -> None:
        matched, why = self.matches(decision, context.metadata)
        if not matched:
            context.note(f"no match ({why})")
            return
        extra = {
            k: v
            for k, v in (("queue", self.params.queue), ("priority", self.params.priority))
            if v is not None
        }
        context.add_action(self.params.action, **extra)
        context.note(f"matched ({why}) -> {self.params.action}")


# -- the rules language ------------------------------------------------------------------------


Where = tuple[str | int, ...]
Problems = list[tuple[Where, str]]


class Range(BaseModel):
    """An inclusive range of a probability: `{min: 0.3, max: 0.7}`."""

    model_config = ConfigDict(extra="forbid")

    min: float = Field(default=0.0, ge=0.0, le=1.0)
    max: float = Field(default=1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min > self.max:
            raise ValueError(f"impossible range: min {self.min} > max {self.max}")
        return self

    def holds(self, value: float) -> bool:
        return self.min <= value <= self.max

    def __str__(self) -> str:
        return f"[{self.min:g}, {self.max:g}]"


class SeverityRange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    at_least: str | None = None
    at_most: str | None = None


class Condition(BaseModel):
    """When a rule applies. Every key given must hold (and); `all`, `any`, `not` combine.

    Keys about the verdict (rating, category, severity, p_unsafe, score) never match a failed
    assessment; `error: true` matches only those, `error: false` only valid verdicts.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    rating: list[Literal["Safe", "Unsafe"]] | None = None
    category: list[str] | None = None
    severity: SeverityRange | None = None
    p_unsafe: Range | None = None
    score: dict[str, Range] | None = Field(
        default=None, description="Category id -> range of its category score."
    )
    mode: list[Literal["full", "verdict", "score"]] | None = None
    metadata: dict[str, Any] | None = Field(
        default=None, description="Request metadata: key -> value, or a list of accepted values."
    )
    error: bool | None = None
    action: list[str] | None = Field(
        default=None,
        description="Holds when an earlier step added one of these actions (e.g. a `flag` "
        "from thresholds).",
    )
    all: list[Condition] | None = None
    any: list[Condition] | None = None
    not_: Condition | None = Field(default=None, alias="not")

    @field_validator("rating", "category", "mode", "action", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        """`rating: Unsafe` means `rating: [Unsafe]`."""
        return [value] if isinstance(value, str) else value

    def check(self, policy: Policy, where: Where) -> Problems:
        problems = unknown_categories(
            policy,
            [((*where, "category", i), c) for i, c in enumerate(self.category or [])]
            + [((*where, "score", c), c) for c in self.score or {}],
        )
        for i, name in enumerate(self.action or []):
            if name not in policy.known_actions():
                problems.append(((*where, "action", i), policy.unknown_action(name)))
        if self.severity is not None:
            levels = policy.severity_levels
            for key in ("at_least", "at_most"):
                level = getattr(self.severity, key)
                if level is not None and level not in levels:
                    problems.append(
                        (
                            (*where, "severity", key),
                            f"{level!r} is not a severity level; levels: {', '.join(levels)}",
                        )
                    )
            low, high = self.severity.at_least, self.severity.at_most
            if low in levels and high in levels and levels.index(low) > levels.index(high):
                problems.append(((*where, "severity"), f"impossible range: {low} is above {high}"))
        for key in ("all", "any"):
            for index, child in enumerate(getattr(self, key) or []):
                problems.extend(child.check(policy, (*where, key, index)))
        if self.not_ is not None:
            problems.extend(self.not_.check(policy, (*where, "not")))
        return problems

    def evaluate(
        self, decision: Decision, context: StepContext, policy: Policy
    ) -> tuple[bool, str]:
        """(holds, why): `why` names the facts that decided it, for the trace. Rating,
        category and severity are the Decision's current values (after earlier steps'
        overrides); scores are the model's."""
        verdict = decision.verdict
        reasons: list[str] = []
        about_verdict = any(
            v is not None
            for v in (self.rating, self.category, self.severity, self.p_unsafe, self.score)
        )
        if self.error is not None:
            if self.error != (not verdict.ok):
                return False, "verdict is an error" if not verdict.ok else "verdict is not an error"
            reasons.append(
                f"error verdict ({verdict.error.kind})" if verdict.error else "valid verdict"
            )
        if about_verdict and not verdict.ok:
            return False, "verdict is an error"
        if self.rating is not None:
            ratings = _as_list(self.rating)
            if decision.rating not in ratings:
                return False, f"rating {decision.rating} not {_either(ratings)}"
            reasons.append(f"rating {decision.rating}")
        if self.category is not None:
            categories = _as_list(self.category)
            if decision.category_id not in categories:
                return False, f"category {decision.category_id} not {_either(categories)}"
            reasons.append(f"category {decision.category_id}")
        if self.severity is not None:
            ok, why = _severity_holds(self.severity, decision.severity, policy)
            if not ok:
                return False, why
            reasons.append(why)
        if self.p_unsafe is not None:
            if verdict.p_unsafe is None:
                return False, "no p_unsafe"
            if not self.p_unsafe.holds(verdict.p_unsafe):
                return False, f"p_unsafe {verdict.p_unsafe:.3f} not in {self.p_unsafe}"
            reasons.append(f"p_unsafe {verdict.p_unsafe:.3f} in {self.p_unsafe}")
        for category, bounds in (self.score or {}).items():
            scores = verdict.category_scores or {}
            if category not in scores:
                return False, f"no score for {category}"
            if not bounds.holds(scores[category]):
                return False, f"score {category} {scores[category]:.3f} not in {bounds}"
            reasons.append(f"score {category} {scores[category]:.3f} in {bounds}")
        if self.action is not None:
            wanted = _as_list(self.action)
            added = [a.name for a in decision.actions if a.name in wanted]
            if not added:
                return False, f"no earlier action {_either(wanted)}"
            by = next(a.by for a in decision.actions if a.name == added[0])
            reasons.append(f"action {added[0]} (by {by})")
        if self.mode is not None:
            modes = _as_list(self.mode)
            if context.mode not in modes:
                return False, f"mode {context.mode} not {_either(modes)}"
            reasons.append(f"mode {context.mode}")
        metadata = context.metadata
        for key, wanted in (self.metadata or {}).items():
            accepted = wanted if isinstance(wanted, list) else [wanted]
            if key not in metadata:
                return False, f"metadata {key} missing"
            if metadata[key] not in accepted:
                return False, f"metadata {key}={metadata[key]!r} not {_either(accepted)}"
            reasons.append(f"{key}={metadata[key]!r}")
        for child in self.all or []:
            ok, why = child.evaluate(decision, context, policy)
            if not ok:
                return False, why
            reasons.append(why)
        if self.any is not None:
            misses = []
            for child in self.any:
                ok, why = child.evaluate(decision, context, policy)
                if ok:
                    reasons.append(why)
                    break
                misses.append(why)
            else:
                return False, "none of: " + "; ".join(misses)
        if self.not_ is not None:
            ok, why = self.not_.evaluate(decision, context, policy)
            if ok:
                return False, f"not ({why})"
            reasons.append(f"not ({why})")
        return True, "; ".join(reasons) or "always"


class ActionSpec(BaseModel):
    """What a matching rule does: a known action or a custom one, with its parameters."""

    model_config = ConfigDict(extra="forbid")

    action: str

    @field_validator("action")
    @classmethod
    def _one_word(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", value):
            raise ValueError(f"{value!r} is not an action name (one word: letters, digits, _ . -)")
        return value

    queue: str | None = None
    priority: str | None = None
    reason: str | None = None
    params: dict[str, Any] = Field(default_factory=dict, description="Extra parameters.")

    def apply(self, context: StepContext, rule: str) -> str:
        extra = {
            k: v
            for k, v in (
                ("queue", self.queue),
                ("priority", self.priority),
                ("reason", self.reason),
            )
            if v is not None
        }
        context.add_action(self.action, by_rule=rule, **extra, **self.params)
        shown = " ".join(f"{k}={v}" for k, v in {**extra, **self.params}.items())
        return f"{self.action} {shown}".rstrip()


def _action(value: Any) -> Any:
    return {"action": value} if isinstance(value, str) else value


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    when: Condition = Field(default_factory=Condition)
    then: list[ActionSpec] = Field(min_length=1)

    @field_validator("then", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        return [_action(item) for item in items]


class RulesParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    match: Literal["first", "all"] = Field(
        default="first",
        description="first: the first matching rule acts, later ones are not evaluated; "
        "all: every matching rule acts, in order.",
    )
    rules: list[Rule] = Field(min_length=1)
    default: list[ActionSpec] | None = Field(
        default=None, description="Actions when no rule matched."
    )

    @field_validator("default", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if value is None:
            return None
        items = value if isinstance(value, list) else [value]
        return [_action(item) for item in items]


class Rules(PostProcessor):
    """Declarative moderation rules: conditions on the verdict and the request, and actions.

    Evaluation semantics: rules are evaluated in the order listed. With `match: first` (the
    default) the first rule whose condition holds applies its actions and no later rule is
    evaluated; with `match: all` every rule whose condition holds applies, in order. When no rule
    matched, `default` actions apply. Every evaluated rule leaves one trace line saying whether
    it matched and which facts decided it.
    """

    name = "rules"
    description = (
        "Declarative rules: conditions (rating, category, severity, scores, metadata) -> actions"
    )
    Params = RulesParams
    params: RulesParams

    @classmethod
    def check(cls, params: BaseModel, policy: Policy) -> list[tuple[tuple[str | int, ...], str]]:
        assert isinstance(params, RulesParams)
        problems: Problems = []
        seen: dict[str, int] = {}
        known = policy.known_actions()
        for index, rule in enumerate(params.rules):
            problems.extend(rule.when.check(policy, ("rules", index, "when")))
            for at, spec in enumerate(rule.then):
                if spec.action not in known:
                    where = ("rules", index, "then", at, "action")
                    problems.append((where, policy.unknown_action(spec.action)))
            if rule.id is not None:
                if rule.id in seen:
                    problems.append(
                        (
                            ("rules", index, "id"),
                            f"duplicate rule id {rule.id!r} (also rule {seen[rule.id]})",
                        )
                    )
                seen[rule.id] = index
        for at, spec in enumerate(params.default or []):
            if spec.action not in known:
                problems.append((("default", at, "action"), policy.unknown_action(spec.action)))
        return problems

    def __call__(self, decision: Decision, context: StepContext) -> None:
        matched_any = False
        for index, rule in enumerate(self.params.rules):
            label = f"rule {rule.id!r}" if rule.id else f"rule {index}"
            ok, why = rule.when.evaluate(decision, context, self.policy)
            if not ok:
                context.note(f"{label}: no match ({why})")
                continue
            matched_any = True
            done = [spec.apply(context, str(rule.id or index)) for spec in rule.then]
            context.note(f"{label}: matched ({why}) -> {', '.join(done)}")
            if self.params.match == "first":
                rest = len(self.params.rules) - index - 1
                if rest:
                    context.note(f"first match wins: {rest} later rule(s) not evaluated")
                return
        if not matched_any and self.params.default:
            done = [spec.apply(context, "default") for spec in self.params.default]
            context.note(f"no rule matched -> default {', '.join(done)}")
        elif not matched_any:
            context.note("no rule matched; no default")


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _either(values: list[Any]) -> str:
    return str(values[0]) if len(values) == 1 else "in [" + ", ".join(map(str, values)) + "]"


def _severity_holds(
    bounds: SeverityRange, severity: str | None, policy: Policy
) -> tuple[bool, str]:
    levels = policy.severity_levels
    if severity is None or severity not in levels:
        return False, f"severity {severity} not on the scale"
    rank = levels.index(severity)
    if bounds.at_least is not None and rank < levels.index(bounds.at_least):
        return False, f"severity {severity} below {bounds.at_least}"
    if bounds.at_most is not None and rank > levels.index(bounds.at_most):
        return False, f"severity {severity} above {bounds.at_most}"
    return True, f"severity {severity}"


@hookimpl
def register_postprocessors(register: Register[type[PostProcessor]]) -> None:
    register(Escalate)
    register(Rules)
