"""`night-review`: route valid Unsafe decisions to a review queue, with a minimum severity.

policy YAML:  - {name: night-review, params: {queue: night-shift, min_severity: high}}
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from policy_engine import Check, Decision, Policy, PostProcessor, StepContext

ACTION = "night_review"


class NightReviewParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queue: str = Field(min_length=1, description="The review queue the action names.")
    min_severity: str | None = Field(
        default=None,
        description=(
            "One of the policy's severity levels: a decision below it is raised to it "
            "(with an override) before the action is added. None: severity is left alone."
        ),
    )

    @field_validator("queue")
    @classmethod
    def _not_blank(cls, queue: str) -> str:
        if queue and not queue.strip():
            raise ValueError("must not be blank")
        return queue


class NightReview(PostProcessor):
    """Add a `night_review` action (with `queue`) to every valid Unsafe decision."""

    name = "night-review"
    description = "Add a `night_review` action to Unsafe decisions, raising severity to a minimum"
    Params = NightReviewParams
    params: NightReviewParams

    @classmethod
    def check(cls, params: BaseModel, policy: Policy) -> list[Check]:
        problems: list[Check] = []
        if not isinstance(params, NightReviewParams):
            return problems
        levels = policy.severity_levels
        if params.min_severity is not None and params.min_severity not in levels:
            problems.append(
                (
                    ("min_severity",),
                    f"unknown severity {params.min_severity!r}; "
                    f"the policy's levels are: {', '.join(levels)}",
                )
            )
        return problems

    def __call__(self, decision: Decision, context: StepContext) -> None:
        if not decision.verdict.ok:
            context.note("no night review (the verdict is an error)")
            return
        # decision.rating / decision.severity are the final values, after earlier overrides.
        if decision.rating != "Unsafe":
            context.note(f"no night review (rating {decision.rating})")
            return
        queue = self.params.queue
        minimum = self.params.min_severity
        if minimum is not None:
            levels = context.policy.severity_levels
            current = decision.severity
            # An Unsafe decision without a known severity is not known to reach the minimum.
            below = current not in levels or levels.index(current) < levels.index(minimum)
            if below:
                context.override(
                    f"night review needs at least severity {minimum!r} (was {current!r})",
                    severity=minimum,
                )
                context.note(f"raised severity {current!r} -> {minimum!r}")
        context.add_action(ACTION, queue=queue)
        context.note(f"queued for night review in {queue!r} (severity {decision.severity!r})")
