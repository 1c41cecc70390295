"""Running the test cases a policy carries (`tests:`): `policy-engine test POLICY`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine
from ..policy import GivenVerdict, Policy, PolicyTest
from ..verdict import Decision, Verdict, VerdictError


@dataclass
class CaseResult:
    """One case: passed, or the differences between what was expected and what came."""

    index: int
    case: PolicyTest
    decision: Decision
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def title(self) -> str:
        if self.case.name:
            return self.case.name
        return _image_title(self.case)

    def to_dict(self) -> dict[str, Any]:
        decision = self.decision
        return {
            "case": self.index + 1,
            "name": self.case.name,
            "image": _image_title(self.case),
            "passed": self.passed,
            "failures": self.failures,
            "rating": decision.rating,
            "category": decision.category_id,
            "actions": [a.name for a in decision.actions],
        }


def check_case(case: PolicyTest, decision: Decision) -> list[str]:
    """What differs between a case's expectations and a Decision (empty: it passes)."""
    verdict = decision.verdict
    if verdict.error is not None:
        return [f"{verdict.error.kind} error: {verdict.error.message}"]
    failures = []
    if case.rating is not None and decision.rating != case.rating:
        failures.append(f"rating {decision.rating}, expected {case.rating}")
    if case.category is not None and decision.category_id != case.category:
        failures.append(f"category {decision.category_id}, expected {case.category}")
    if case.actions is not None:
        got = sorted(a.name for a in decision.actions)
        if got != sorted(case.actions):
            failures.append(f"actions {got or 'none'}, expected {sorted(case.actions) or 'none'}")
    return failures


def run_policy_tests(engine: Engine) -> list[CaseResult]:
    """Every case of the engine's policy, in order: images judged by the backend (batched like
    any assessment), given verdicts post-processed as they are."""
    cases = engine.policy.tests
    judged = iter(engine.assess_many([(c.image, c.metadata) for c in cases if c.image is not None]))
    results = []
    for index, case in enumerate(cases):
        if case.given is not None:
            problem = given_problem(engine.policy, case)
            verdict = given_verdict(engine, case.given) if problem is None else None
            if verdict is None:
                decision = engine.decide(_refused(engine, str(problem)), case.metadata)
                results.append(CaseResult(index, case, decision, [str(problem)]))
                continue
            decision = engine.decide(verdict, case.metadata)
        else:
            decision = next(judged)
        failures = check_case(case, decision)
        known = {c.id for c in engine.policy.categories} | {engine.policy.none_category.id}
        if case.category is not None and case.category not in known:
            failures.insert(0, f"expects category {case.category!r}, which the policy lacks")
        results.append(CaseResult(index, case, decision, failures))
    return results


def given_problem(policy: Policy, case: PolicyTest) -> str | None:
    """Why a case's given verdict does not fit the policy (a category it lacks, …), or None."""
    given = case.given
    assert given is not None
    known = [c.id for c in policy.categories]
    if given.category is not None and given.category not in [*known, policy.none_category.id]:
        return f"given category {given.category!r} is not in the policy; categories: " + (
            ", ".join(known)
        )
    if given.rating == "Unsafe" and given.category in (None, policy.none_category.id):
        return "a given Unsafe verdict names one of the policy's categories"
    if given.severity is not None and given.severity not in policy.severity_levels:
        levels = ", ".join(policy.severity_levels)
        return f"given severity {given.severity!r} is not a level; levels: {levels}"
    return None


def _refused(engine: Engine, message: str) -> Verdict:
    policy = engine.policy
    return Verdict(
        error=VerdictError(kind="config", message=message),
        policy_id=policy.id,
        policy_version=policy.version,
        policy_hash=engine.compiled.hash,
        source="given verdict",
    )


def given_verdict(engine: Engine, given: GivenVerdict) -> Verdict:
    """The Verdict a test case assumes, as a model's answer would give it."""
    policy = engine.policy
    category_id = given.category or policy.none_category.id
    if category_id == policy.none_category.id:
        name, level = policy.none_category.name, None
    else:
        category = policy.category(category_id)
        name, level = category.name, category.severity if given.rating == "Unsafe" else None
    return Verdict(
        rating=given.rating,
        category_id=category_id,
        category_name=name,
        severity=given.severity or level,
        p_unsafe=given.p_unsafe,
        category_scores=given.category_scores,
        policy_id=policy.id,
        policy_version=policy.version,
        policy_hash=engine.compiled.hash,
        model="given (policy test)",
        source="given verdict",
    )


def _image_title(case: PolicyTest) -> str:
    if case.image is None:
        given = case.given
        assert given is not None
        return f"given {given.rating}" + (f" {given.category}" if given.category else "")
    return case.image if not case.image.startswith("data:") else "a data: URL"
