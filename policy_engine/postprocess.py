"""The post-processor contract: one step of a policy's chain, from Verdict to Decision.

The engine runs the steps a policy lists, in its order. Each step is a `PostProcessor`
constructed once per engine with its validated params; for every Decision it is called with a
`StepContext`: the request's metadata and mode, the compiled policy, the step's id, and the
only ways to change the Decision: `add_action` (stamped with the step), `override` (a final
value that differs from what the model said, with the reason) and `note` (a trace line). The
Verdict itself is never changed: it is what the model said.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from .types import Check, Mode, NoParams

if TYPE_CHECKING:
    from .compiler import CompiledPolicy
    from .policy import Policy
    from .verdict import Action, Decision, Rating


@dataclass(frozen=True)
class StepContext:
    """What one step sees of the request, and how it changes the Decision."""

    step: str  # the step's id: its `id` in the policy, else "INDEX:NAME"
    mode: Mode
    compiled: CompiledPolicy
    metadata: Mapping[str, Any]
    decision: Decision

    @property
    def policy(self) -> Policy:
        return self.compiled.policy

    def add_action(self, name: str, /, *, by_rule: str | None = None, **params: Any) -> Action:
        """Add an action to the Decision, stamped with this step (`by`: the step's id, or
        "STEP:RULE" when `by_rule` names the part of the step that decided)."""
        by = self.step if by_rule is None else f"{self.step}:{by_rule}"
        return self.decision.add_action(name, by=by, **params)

    def override(
        self,
        reason: str,
        *,
        rating: Rating | None = None,
        category_id: str | None = None,
        severity: str | None = None,
        clear_category: bool = False,
    ) -> None:
        """Set the Decision's final rating, category or severity (the Verdict keeps what the
        model said). A category is given by id; its name follows from the policy.
        `clear_category` sets category and severity to none (a flip to Unsafe without a
        known category)."""
        changes: dict[str, Any] = {}
        if rating is not None:
            changes["rating"] = rating
        if clear_category:
            changes |= {"category_id": None, "category_name": None, "severity": None}
        elif category_id is not None:
            policy = self.policy
            if category_id == policy.none_category.id:
                name, level = policy.none_category.name, None
            else:
                category = policy.category(category_id)
                name, level = category.name, category.severity
            changes |= {"category_id": category_id, "category_name": name, "severity": level}
        if severity is not None:
            changes["severity"] = severity
        if changes:
            self.decision.add_override(self.step, reason, changes)

    def note(self, message: str, *, error: bool = False) -> None:
        """A line in the Decision's trace, under this step."""
        self.decision.note(self.step, message, error=error)


class PostProcessor(ABC):
    """One step of a policy's chain. Register the class; the engine builds it once per
    engine with validated `params` (an instance of `Params`: declare `params: MyParams` in
    the subclass for typed access)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel, policy: Policy) -> None:
        self.params = params
        self.policy = policy

    @classmethod
    def check(cls, params: BaseModel, policy: Policy) -> list[Check]:
        """Problems of these params against the policy (unknown categories, …), located
        relative to the params. `policy-engine check` lists them with the file's lines."""
        return []

    @abstractmethod
    def __call__(self, decision: Decision, context: StepContext) -> None:
        """Act on one Decision through `context` (add_action, override, note). Raising
        records the failure in the Decision and applies the policy's failure rule; the
        verdict is never lost."""


def unknown_categories(
    policy: Policy, found: Iterable[tuple[tuple[str | int, ...], str]]
) -> list[Check]:
    """A Check for each (location, category id) that is not one of the policy's ids (the
    none-applying one included), worded alike for every post-processor."""
    known = [c.id for c in policy.categories] + [policy.none_category.id]
    listing = ", ".join(sorted(known))
    return [
        (where, f"unknown category {category!r}; categories: {listing}")
        for where, category in found
        if category not in known
    ]
