"""The `severity` post-processor: decide an Unsafe verdict's severity on the policy's scale.

The scale is the policy's `severity_levels` (lowest first). The starting level comes from the
policy (the violated category's `severity`, the default) or from the model, when the prompt
format asked it for one (`source: model`). Then `ceiling` entries cap it and `floor` entries
raise it, each only when its `metadata` and `categories` match (an entry without either always
applies). Safe and error Decisions are left alone. The level is set as an override on the
Decision (the Verdict keeps the model's own); the step reads the Decision's current rating and
category, so it follows an earlier `thresholds` flip. Every decision leaves one trace line,
under the step's id, with the level before and after and why, e.g.
`severity high -> critical: floor critical for audience=minors`.

    postprocess:
      - name: severity
        params:
          source: policy
          floor:
            - {level: critical, metadata: {audience: minors}}
            - {level: high, categories: [O7]}
          ceiling:
            - {level: medium, metadata: {surface: [internal, research]}, categories: [O4]}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from policy_engine import (
    Decision,
    Policy,
    PostProcessor,
    Register,
    StepContext,
    hookimpl,
    unknown_categories,
)

Problems = list[tuple[tuple[str | int, ...], str]]


class SeverityBound(BaseModel):
    """A floor or a ceiling: a level, and when it applies."""

    model_config = ConfigDict(extra="forbid")

    level: str = Field(min_length=1, description="A level of the policy's severity_levels.")
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Request metadata that must match: a value, or a list of accepted values.",
    )
    categories: list[str] = Field(
        default_factory=list, description="Category ids that match; empty: any category."
    )

    def matches(self, category_id: str | None, metadata: Mapping[str, Any]) -> bool:
        if self.categories and category_id not in self.categories:
            return False
        return all(metadata.get(key) in _accepted(want) for key, want in self.metadata.items())

    def describe(self) -> str:
        """When this entry applies, in words: 'audience=minors, category O7'."""
        parts = []
        for key, want in self.metadata.items():
            values = _accepted(want)
            if isinstance(want, list):
                parts.append(f"{key} in [{', '.join(str(v) for v in values)}]")
            else:
                parts.append(f"{key}={want}")
        if self.categories:
            label = "category" if len(self.categories) == 1 else "categories"
            parts.append(f"{label} {', '.join(self.categories)}")
        return ", ".join(parts) or "every verdict"


class SeverityParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Literal["policy", "model"] = Field(
        default="policy",
        description=(
            "policy: the category's level in the policy; model: the model's own severity when "
            "the prompt format asked for one, else the policy's."
        ),
    )
    floor: list[SeverityBound] = Field(
        default_factory=list, description="Raise the severity to at least `level` when matching."
    )
    ceiling: list[SeverityBound] = Field(
        default_factory=list, description="Cap the severity at `level` when matching."
    )


def _accepted(want: Any) -> list[Any]:
    return list(want) if isinstance(want, list) else [want]


def _same_conditions(a: SeverityBound, b: SeverityBound) -> bool:
    """Whether two entries apply to exactly the same verdicts (as written)."""
    if set(a.categories) != set(b.categories) or set(a.metadata) != set(b.metadata):
        return False
    for key, want in a.metadata.items():
        mine, theirs = _accepted(want), _accepted(b.metadata[key])
        if not (all(v in theirs for v in mine) and all(v in mine for v in theirs)):
            return False
    return True


class Severity(PostProcessor):
    name = "severity"
    description = "Set an Unsafe verdict's severity: policy or model level, floors and ceilings"
    Params = SeverityParams
    params: SeverityParams

    @classmethod
    def check(cls, params: BaseModel, policy: Policy) -> Problems:
        assert isinstance(params, SeverityParams)
        levels = list(policy.severity_levels)
        problems: Problems = []
        for kind in ("floor", "ceiling"):
            bounds: list[SeverityBound] = getattr(params, kind)
            for index, bound in enumerate(bounds):
                if bound.level not in levels:
                    problems.append(
                        (
                            (kind, index, "level"),
                            f"{bound.level!r} is not a severity level; levels: {', '.join(levels)}",
                        )
                    )
                problems += unknown_categories(
                    policy,
                    (((kind, index, "categories", at), c) for at, c in enumerate(bound.categories)),
                )
                for key, want in bound.metadata.items():
                    if isinstance(want, list) and not want:
                        problems.append(
                            ((kind, index, "metadata", key), "must not be an empty list")
                        )
                    elif isinstance(want, dict) or (
                        isinstance(want, list) and any(isinstance(v, dict | list) for v in want)
                    ):
                        problems.append(
                            ((kind, index, "metadata", key), "must be a value or a list of values")
                        )
        if problems:  # compare floors with ceilings only when each entry is sound
            return problems
        for f_index, floor in enumerate(params.floor):
            for c_index, ceiling in enumerate(params.ceiling):
                if not _same_conditions(floor, ceiling):
                    continue
                if levels.index(floor.level) > levels.index(ceiling.level):
                    problems.append(
                        (
                            ("ceiling", c_index, "level"),
                            f"ceiling {ceiling.level} is below floor.{f_index} ({floor.level}) "
                            "for the same verdicts: the floor wins, this ceiling never applies",
                        )
                    )
        return problems

    def _model_asked(self, context: StepContext) -> bool:
        """Whether the model was asked for a severity (the answer layout has the field)."""
        if context.mode == "score":  # no answer text: the engine fills in the policy's level
            return False
        return "severity" in context.compiled.layout_for(context.mode).keys

    def _policy_level(self, category_id: str | None) -> tuple[str | None, str]:
        if category_id is None:
            return None, "no category, so no policy level"
        try:
            level = self.policy.category(category_id).severity
        except KeyError:
            return None, f"no policy level for category {category_id}"
        return level, f"policy level of {category_id}"

    def _start(self, decision: Decision, context: StepContext) -> tuple[str | None, str]:
        """The level before floors and ceilings, and where it comes from."""
        level, why = self._policy_level(decision.category_id)
        if self.params.source == "policy":
            return level, why
        if not self._model_asked(context):
            return level, f"the model was not asked for a severity; {why}"
        said = decision.verdict.severity
        if decision.category_id == decision.verdict.category_id and said in (
            self.policy.severity_levels
        ):
            return said, "the model's severity"
        return level, f"the model gave no usable severity ({said!r}); {why}"

    def __call__(self, decision: Decision, context: StepContext) -> None:
        if not decision.verdict.ok:
            context.note("error verdict: severity left alone")
            return
        if decision.rating != "Unsafe":
            context.note(f"rating {decision.rating}: severity left alone")
            return
        metadata = context.metadata
        category_id = decision.category_id
        rank = {level: index for index, level in enumerate(self.policy.severity_levels)}
        before = decision.severity
        start, why = self._start(decision, context)
        level = start
        applied: list[str] = []
        ceilings = [b for b in self.params.ceiling if b.matches(category_id, metadata)]
        if ceilings and level is not None:
            cap = min(ceilings, key=lambda b: rank[b.level])
            if rank[level] > rank[cap.level]:
                level = cap.level
                applied.append(f"ceiling {cap.level} for {cap.describe()}")
        floors = [b for b in self.params.floor if b.matches(category_id, metadata)]
        if floors:
            low = max(floors, key=lambda b: rank[b.level])
            if level is None or rank[level] < rank[low.level]:
                level = low.level
                applied.append(f"floor {low.level} for {low.describe()}")
        # Where the starting level came from is worth saying unless a bound moved the verdict's
        # own level (then the bound is the whole story).
        reasons = list(applied)
        if not applied:
            reasons.insert(0, why)
        elif start != before:
            reasons.insert(0, f"{why} is {start or 'none'}")
        if level != before:
            message = f"severity {before or 'none'} -> {level or 'none'}"
            if level is not None:
                context.override("; ".join(reasons), severity=level)
        else:
            message = f"severity {level or 'none'} kept"
        context.note(f"{message}: {'; '.join(reasons)}")


@hookimpl
def register_postprocessors(register: Register[type[PostProcessor]]) -> None:
    register(Severity)
