"""The `thresholds` post-processor: per-category thresholds on calibrated scores.

A backend that scores (mode `score`, and `p_unsafe` in the other modes of the transformers
backend) gives `p_unsafe`, the probability of "Unsafe", and in score mode `category_scores`, the
probability of each category *if* the image is unsafe. One global cut (the engine's
`score_threshold`, 0.5) treats every category alike; this step applies one threshold per
category instead:

- `p_unsafe`: a threshold on P(Unsafe) per category id, plus `default`. The category is the
  verdict's own when it is a policy category, else the most likely one in `category_scores`, else
  none (the default threshold applies).
- `category_scores`: a threshold on P(Unsafe and category c) = `p_unsafe * category_scores[c]`,
  to catch a rare, grave category (self-harm) even when another category ranks first.

With `action: flag` (the default) each threshold reached adds a `flag` action (category, score,
threshold, basis) and the rating is never changed; later `rules` can act on it (`when: {action:
flag}`). With `action: flip` the Decision is re-rated by an override (the Verdict keeps what the
model said): Unsafe (with the category that reached its threshold) when one is reached, Safe
when an Unsafe rating's P(Unsafe) is under its category's threshold. Verdicts without a score are
left alone. Every decision leaves one trace line, under the step's id, with the comparisons made
(and, for flip, the rating before).

    postprocess:
      - name: thresholds
        params:
          p_unsafe: {default: 0.5, O4: 0.8, O7: 0.3}
          category_scores: {O7: 0.15}
          action: flip
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from policy_engine import (
    Decision,
    Policy,
    PostProcessor,
    Register,
    StepContext,
    hookimpl,
)

Problems = list[tuple[tuple[str | int, ...], str]]
Threshold = Annotated[float, Field(ge=0.0, le=1.0, strict=True)]
DEFAULT = "default"
DEFAULT_THRESHOLD = 0.5
EPSILON = 1e-9  # a score this close under a threshold reaches it (float rounding of products)


class ThresholdsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    p_unsafe: dict[str, Threshold] = Field(
        default_factory=lambda: {DEFAULT: DEFAULT_THRESHOLD},
        description="Threshold on P(Unsafe) per category id, and `default` (0.5 if not given).",
    )
    category_scores: dict[str, Threshold] = Field(
        default_factory=dict,
        description="Threshold on p_unsafe * category_scores[c] per category id.",
    )
    action: Literal["flag", "flip"] = Field(
        default="flag",
        description="flag: add a `flag` action, keep the rating; flip: re-rate the verdict.",
    )

    @property
    def default(self) -> float:
        return self.p_unsafe.get(DEFAULT, DEFAULT_THRESHOLD)


def _num(value: float) -> str:
    return f"{value:.4g}"


@dataclass(frozen=True)
class Hit:
    """A threshold that was reached."""

    category: str | None
    score: float
    threshold: float
    basis: str  # "p_unsafe" or "category_scores"


class Thresholds(PostProcessor):
    name = "thresholds"
    description = "Per-category thresholds on p_unsafe and category scores: flag or re-rate"
    Params = ThresholdsParams
    params: ThresholdsParams

    @classmethod
    def check(cls, params: BaseModel, policy: Policy) -> Problems:
        assert isinstance(params, ThresholdsParams)
        ids = [c.id for c in policy.categories]
        none_id = policy.none_category.id
        problems: Problems = []
        if DEFAULT in ids and DEFAULT in params.p_unsafe:
            problems.append(
                (
                    ("p_unsafe", DEFAULT),
                    f"{DEFAULT!r} is both the default threshold and a category id of this policy",
                )
            )
        for field in ("p_unsafe", "category_scores"):
            thresholds: dict[str, float] = getattr(params, field)
            allowed = [*ids, DEFAULT] if field == "p_unsafe" else ids
            for key, value in thresholds.items():
                if key == none_id:
                    hint = "use default" if field == "p_unsafe" else "it is not a violation"
                    problems.append(
                        (
                            (field, key),
                            f"{key!r} is the none-applying category and never thresholded; {hint}",
                        )
                    )
                elif key not in allowed:
                    problems.append(
                        (
                            (field, key),
                            f"unknown category {key!r}; categories: {', '.join(sorted(allowed))}",
                        )
                    )
                elif value == 0 and params.action == "flip":
                    if field == "category_scores":
                        which = "every verdict with category scores"
                    elif key == DEFAULT:
                        which = "every scored verdict without a category threshold"
                    else:
                        which = f"every scored {key} verdict"
                    problems.append(
                        (
                            (field, key),
                            f"threshold 0 with action flip rates {which} Unsafe; "
                            "use a threshold above 0",
                        )
                    )
        return problems

    # -- evaluation ------------------------------------------------------------------------
    def _category(self, decision: Decision) -> tuple[str | None, str]:
        """The category whose p_unsafe threshold applies, and how it was found."""
        ids = [c.id for c in self.policy.categories]
        if decision.category_id in ids:
            return decision.category_id, "verdict"
        scores = decision.verdict.category_scores or {}
        ranked = [c for c in ids if c in scores]
        if ranked:
            top = max(ranked, key=lambda c: scores[c])  # ties: the first in policy order
            return top, "top category score"
        return None, "no category"

    def _evaluate(self, decision: Decision, p: float) -> tuple[list[Hit], list[str]]:
        """The thresholds reached (the p_unsafe rule's first) and every comparison in words."""
        verdict = decision.verdict
        hits: list[Hit] = []
        words: list[str] = []
        category, found = self._category(decision)
        if category is not None and category in self.params.p_unsafe:
            threshold = self.params.p_unsafe[category]
            which = f"{category} threshold"
        else:
            threshold = self.params.default
            which = f"default, {category} by {found}" if category else "default, no category"
        reached = p >= threshold - EPSILON
        words.append(f"p_unsafe {_num(p)} {'>=' if reached else '<'} {_num(threshold)} ({which})")
        if reached:
            hits.append(Hit(category, p, threshold, "p_unsafe"))
        if self.params.category_scores:
            scores = verdict.category_scores
            if scores is None:
                words.append("no category scores")
            else:
                found_hits: list[Hit] = []
                for c, threshold in self.params.category_scores.items():
                    if c not in scores:
                        words.append(f"{c}: no category score")
                        continue
                    score = p * scores[c]
                    reached = score >= threshold - EPSILON
                    words.append(
                        f"{c}: {_num(p)} x {_num(scores[c])} = {_num(score)} "
                        f"{'>=' if reached else '<'} {_num(threshold)}"
                    )
                    if reached:
                        found_hits.append(Hit(c, score, threshold, "category_scores"))
                hits += sorted(found_hits, key=lambda h: -h.score)
        return hits, words

    def __call__(self, decision: Decision, context: StepContext) -> None:
        verdict = decision.verdict
        if not verdict.ok:
            context.note("error verdict: left alone")
            return
        if verdict.p_unsafe is None:
            context.note("no score: left alone")
            return
        hits, words = self._evaluate(decision, verdict.p_unsafe)
        detail = "; ".join(words)
        if self.params.action == "flag":
            for hit in hits:
                context.add_action(
                    "flag",
                    category=hit.category,
                    score=hit.score,
                    threshold=hit.threshold,
                    basis=hit.basis,
                )
            if hits:
                flagged = ", ".join(dict.fromkeys(h.category or "no category" for h in hits))
                context.note(f"flag {flagged}: {detail}")
            else:
                context.note(f"no flag: {detail}")
            return
        self._flip(decision, context, hits, detail)

    def _flip(self, decision: Decision, context: StepContext, hits: list[Hit], detail: str) -> None:
        before = f"{decision.rating} ({decision.category_id})"
        if hits:
            category = hits[0].category
            if decision.rating == "Unsafe" and category in (None, decision.category_id):
                context.note(f"rating {before} kept: {detail}")
                return
            reason = f"P(Unsafe) reached a threshold: {detail}"
            if category is None:
                context.override(reason, rating="Unsafe", clear_category=True)
            else:
                context.override(reason, rating="Unsafe", category_id=category)
        elif decision.rating == "Unsafe":
            context.override(
                f"P(Unsafe) under the threshold: {detail}",
                rating="Safe",
                category_id=self.policy.none_category.id,
            )
        else:
            context.note(f"rating {before} kept: {detail}")
            return
        context.note(f"rating {before} -> {decision.rating} ({decision.category_id}): {detail}")


@hookimpl
def register_postprocessors(register: Register[type[PostProcessor]]) -> None:
    register(Thresholds)
