"""Per-category thresholds chosen for a target on labelled scores (`calibrate --target`).

The thresholds are meant for the `thresholds` post-processor, so a sample is grouped exactly as
that step would group it: by the verdict's category when it is a policy category, else by the
top category score (ties: the first in policy order), else under `default`. A group with enough
fit samples of both ratings gets its own threshold; `default` is fitted on every fit sample (it
serves categories the fit part did not show). A target is one of

- `recall=X`: the highest threshold whose recall (labelled Unsafe scored at or above it) is at
  least X: the best precision for that recall;
- `precision=Y`: the lowest threshold whose precision is at least Y: the best recall;
- `fpr=Z`: the lowest threshold whose false-positive rate (labelled Safe at or above it) is at
  most Z: a false-positive budget.

Thresholds are chosen on the fit part so that the target holds there with a stated confidence
(a one-sided Wilson bound: a threshold that only just reaches the target on the fit part
misses it on new samples about half of the time), and measured on the held-out part. Pure
Python.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

from pydantic import BaseModel, Field

from ..errors import PolicyEngineError

DEFAULT = "default"
TOLERANCE = 1e-9  # the thresholds step counts a score this close under a threshold as reaching it
DIGITS = 6  # thresholds are written with 6 decimals, rounded to keep the target on the fit part
Metric = Literal["recall", "precision", "fpr"]


@dataclass(frozen=True)
class Target:
    metric: Metric
    value: float

    @classmethod
    def parse(cls, text: str) -> Target:
        name, sep, value = text.partition("=")
        if not sep or name not in ("recall", "precision", "fpr"):
            raise PolicyEngineError(
                f"--target {text!r}: expected recall=X, precision=Y or fpr=Z (X, Y, Z in 0..1)"
            )
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not 0 <= number <= 1:
            raise PolicyEngineError(f"--target {text!r}: {value!r} is not a number in 0..1")
        return cls(name, number)  # type: ignore[arg-type]

    def met(self, figures: GroupFigures) -> bool | None:
        value = getattr(figures, self.metric)
        if value is None:
            return None
        return bool(
            value <= self.value + 1e-12 if self.metric == "fpr" else value >= self.value - 1e-12
        )

    def __str__(self) -> str:
        return f"{self.metric} {'<=' if self.metric == 'fpr' else '>='} {self.value:g}"


@dataclass(frozen=True)
class Scored:
    """One labelled sample: its (calibrated) score, its label and its threshold group."""

    score: float
    unsafe: bool
    group: str


def threshold_group(
    category_id: str | None, category_scores: Mapping[str, float] | None, ids: Sequence[str]
) -> str:
    """The category whose threshold the `thresholds` step applies, or `default`."""
    if category_id in ids:
        return category_id  # type: ignore[return-value]
    ranked = [c for c in ids if category_scores and c in category_scores]
    if ranked and category_scores:
        return max(ranked, key=lambda c: category_scores[c])
    return DEFAULT


class GroupFigures(BaseModel):
    """What a threshold achieves on a set of samples."""

    samples: int
    unsafe: int
    tp: int
    fp: int
    recall: float | None
    precision: float | None
    fpr: float | None = Field(
        description="Labelled Safe at or above the threshold / labelled Safe."
    )


def figures(samples: Sequence[Scored], thresholds: Mapping[str, float]) -> GroupFigures:
    """Unsafe predicted when the score reaches the threshold of the sample's group (or
    `default`), as the `thresholds` step decides."""
    tp = fp = unsafe = 0
    for s in samples:
        threshold = thresholds.get(s.group, thresholds[DEFAULT])
        hit = s.score >= threshold - TOLERANCE
        unsafe += s.unsafe
        tp += hit and s.unsafe
        fp += hit and not s.unsafe
    safe = len(samples) - unsafe
    return GroupFigures(
        samples=len(samples),
        unsafe=unsafe,
        tp=tp,
        fp=fp,
        recall=tp / unsafe if unsafe else None,
        precision=tp / (tp + fp) if tp + fp else None,
        fpr=fp / safe if safe else None,
    )


def _down(value: float) -> float:
    return float(math.floor(value * 10**DIGITS) / 10**DIGITS)


def _up(value: float) -> float:
    return float(math.ceil(value * 10**DIGITS) / 10**DIGITS)


def wilson(successes: int, trials: int, z: float) -> tuple[float, float]:
    """The Wilson score interval of a proportion (z: the one-sided normal quantile)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    scale = 1 + z * z / trials
    return (centre - spread) / scale, (centre + spread) / scale


def z_of(confidence: float) -> float:
    """The one-sided normal quantile of `confidence` (0 at 0.5: the plain proportion)."""
    return NormalDist().inv_cdf(confidence) if confidence > 0.5 else 0.0


def choose(
    samples: Sequence[Scored], target: Target, confidence: float = 0.5
) -> tuple[float, bool]:
    """(threshold, whether the target is reached on these samples). The target must hold for
    the Wilson bound at `confidence` (lower bound for recall and precision, upper for the
    false-positive rate), so that it holds on new samples too; 0.5 asks only the plain
    proportion. An unreachable target gives the threshold closest to it."""
    z = z_of(confidence)
    positives = sorted((s.score for s in samples if s.unsafe), reverse=True)
    negatives = sorted((s.score for s in samples if not s.unsafe), reverse=True)
    floor = 10**-DIGITS  # a threshold of 0 would rate everything Unsafe (refused with flip)
    if target.metric == "recall":
        if not positives:
            return 0.5, False
        n = len(positives)
        for needed in range(1, n + 1):
            if wilson(needed, n, z)[0] >= target.value - 1e-12:
                return max(floor, _down(positives[needed - 1])), True
        return max(floor, _down(positives[-1])), False
    if target.metric == "fpr":
        n = len(negatives)
        allowed = -1
        for count in range(n + 1):
            if wilson(count, n, z)[1] <= target.value + 1e-12:
                allowed = count
        if allowed >= n:
            return floor, True
        reached = allowed >= 0
        above = negatives[max(allowed, 0)]
        return min(1.0, _up(above + 2 * TOLERANCE)), reached
    # precision: the lowest candidate whose precision reaches the target
    best: tuple[float, float] | None = None  # (bound, threshold)
    for candidate in sorted({s.score for s in samples}):
        threshold = max(floor, _down(candidate))
        result = figures(samples, {DEFAULT: threshold})
        if not result.tp + result.fp:
            continue
        bound = wilson(result.tp, result.tp + result.fp, z)[0]
        if bound >= target.value - 1e-12:
            return threshold, True
        if best is None or bound > best[0]:
            best = (bound, threshold)
    return (best[1] if best else 0.5), False


class GroupResult(BaseModel):
    group: str = Field(description="A category id, or `default`.")
    threshold: float
    fitted_on: int = Field(description="Fit samples the threshold was chosen on.")
    reached_on_fit: bool
    fit: GroupFigures
    heldout: GroupFigures
    met_on_heldout: bool | None = Field(description="null: undefined on the held-out part.")


class ThresholdFit(BaseModel):
    target: str
    confidence: float = Field(description="One-sided Wilson confidence the fit part must give.")
    min_samples: int
    thresholds: dict[str, float] = Field(description="`default` first, then by category.")
    groups: list[GroupResult]
    overall_fit: GroupFigures
    overall_heldout: GroupFigures
    met_on_heldout: bool | None


def fit_thresholds(
    fit: Sequence[Scored],
    heldout: Sequence[Scored],
    target: Target,
    order: Sequence[str],
    *,
    min_samples: int = 20,
    confidence: float = 0.5,
) -> ThresholdFit:
    """Thresholds for `target`: one per category group with at least `min_samples` fit
    samples, some Unsafe and some Safe; `default` on the other fit samples when they qualify
    so, else on every fit sample."""

    def qualifies(members: Sequence[Scored]) -> bool:
        return len(members) >= min_samples and 0 < sum(s.unsafe for s in members) < len(members)

    thresholds: dict[str, float] = {DEFAULT: 0.5}
    reached: dict[str, bool] = {}
    sizes: dict[str, int] = {}
    for group in order:
        members = [s for s in fit if s.group == group]
        if group != DEFAULT and qualifies(members):
            thresholds[group], reached[group] = choose(members, target, confidence)
            sizes[group] = len(members)
    rest = [s for s in fit if s.group not in sizes]
    basis = rest if qualifies(rest) else fit
    thresholds[DEFAULT], reached[DEFAULT] = choose(basis, target, confidence)
    sizes[DEFAULT] = len(basis)
    rows = []
    for group, threshold in thresholds.items():

        def of(part: Sequence[Scored], group: str = group) -> list[Scored]:
            if group == DEFAULT:
                return [s for s in part if s.group not in sizes or s.group == DEFAULT]
            return [s for s in part if s.group == group]

        held = figures(of(heldout), thresholds)
        rows.append(
            GroupResult(
                group=group,
                threshold=threshold,
                fitted_on=sizes[group],
                reached_on_fit=reached[group],
                fit=figures(of(fit), thresholds),
                heldout=held,
                met_on_heldout=target.met(held),
            )
        )
    overall = figures(heldout, thresholds)
    return ThresholdFit(
        target=str(target),
        confidence=confidence,
        min_samples=min_samples,
        thresholds=thresholds,
        groups=rows,
        overall_fit=figures(fit, thresholds),
        overall_heldout=overall,
        met_on_heldout=target.met(overall),
    )
