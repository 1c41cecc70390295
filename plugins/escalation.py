"""The `escalate` post-processor: when a verdict matches, add an action (review, block, …).

One step is one rule; a policy lists several steps for several rules, and they run in the order
the policy lists them. Every match (and every non-match) leaves a line in the Decision's trace.

    postprocess:
      - name: escalate
        params: {categories: [O7], action: escalate, queue: crisis, priority: urgent}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from policy_engine import Decision, Policy, PostProcessor, hookimpl


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
        known = {c.id for c in policy.categories} | {policy.none_category.id}
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for index, category in enumerate(params.categories):
            if category not in known:
                problems.append(
                    (
                        ("categories", index),
                        f"unknown category {category!r}; categories: {', '.join(sorted(known))}",
                    )
                )
        for index, rating in enumerate(params.ratings):
            if rating not in ("Safe", "Unsafe"):
                problems.append((("ratings", index), f"{rating!r} is not Safe or Unsafe"))
        return problems

    def matches(self, decision: Decision, metadata: dict[str, Any]) -> tuple[bool, str]:
        verdict = decision.verdict
        p = self.params
        if not verdict.ok:
            if p.applies_to == "verdicts":
                return False, "verdict is an error"
            return True, f"error verdict ({verdict.error.kind if verdict.error else '?'})"
        if p.applies_to == "errors":
            return False, "verdict is not an error"
        if verdict.rating not in p.ratings:
            return False, f"rating {verdict.rating} not in {p.ratings}"
        if p.categories and verdict.category_id not in p.categories:
            return False, f"category {verdict.category_id} not in {p.categories}"
        for key, expected in p.metadata.items():
            if metadata.get(key) != expected:
                return False, f"metadata {key}={metadata.get(key)!r}, rule wants {expected!r}"
        return True, f"rating {verdict.rating}, category {verdict.category_id}"

    def __call__(self, decision: Decision, context: dict[str, Any]) -> None:
        step = f"escalate:{self.params.action}"
        matched, why = self.matches(decision, context.get("metadata", {}))
        if not matched:
            decision.note(step, f"no match ({why})")
            return
        extra = {
            k: v
            for k, v in (("queue", self.params.queue), ("priority", self.params.priority))
            if v is not None
        }
        decision.add_action(self.params.action, by=step, **extra)
        decision.note(step, f"matched ({why}) -> {self.params.action}")


@hookimpl
def register_postprocessors(register):  # type: ignore[no-untyped-def]
    register(Escalate)
