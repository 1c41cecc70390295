"""Running the test cases a policy carries (`tests:`): `policy-engine test POLICY`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine
from ..policy import PolicyTest
from ..verdict import Decision


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
        return self.case.image if not self.case.image.startswith("data:") else "a data: URL"

    def to_dict(self) -> dict[str, Any]:
        decision = self.decision
        return {
            "case": self.index + 1,
            "name": self.case.name,
            "image": self.case.image if not self.case.image.startswith("data:") else "data:…",
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
    """Every case of the engine's policy, in order (batched like any assessment)."""
    cases = engine.policy.tests
    items = [(case.image, case.metadata) for case in cases]
    return [
        CaseResult(index, case, decision, check_case(case, decision))
        for index, (case, decision) in enumerate(zip(cases, engine.assess_many(items), strict=True))
    ]
