"""`policy-engine eval`: measure a model and policy against a labelled set of images.

    policy-engine eval labels.jsonl --policy llavaguard --backend sglang --url http://gpu:30000
    policy-engine eval labels.jsonl --predictions results.db --compare results-v2.db

Predictions come from running the labelled images through an Engine (optionally saved as an
audit results file with `--out`) or from an existing results file, joined by id. The metrics are
LlavaGuard's, with Unsafe as the positive class; `--exceptions` adds LlavaGuard's policy
exception rate. Everything here is plain counting: no numpy, no sklearn.

This module imports only the standard library, click, pydantic and policy_engine's light
modules; the Engine (and with it Pillow) is imported when a backend actually runs.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import click
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..compiler import compile_policy
from ..components import Backend, Mode
from ..errors import PolicyEngineError, PolicyError
from ..host import PluginHost, get_host
from ..loader import check_policy, load_policy, shipped_policies
from ..policy import CategoryException, ExceptionStatus, Policy
from ..verdict import Decision
from .store import ResultRow, ResultStore

if TYPE_CHECKING:
    from ..engine import Engine

Rating = Literal["Safe", "Unsafe"]
RATINGS: tuple[Rating, ...] = get_args(Rating)

EXCEPTION_REASON = "eval: policy exception rate"
NO_CATEGORY = "-"  # a prediction without a category (score mode without category scores)
IDS_SHOWN = 10  # ids listed for missing and invalid predictions
CHANGED_SHOWN = 20  # ids listed for fixed and broken samples in a comparison
SWEEP_THRESHOLDS: tuple[float, ...] = tuple(i / 20 for i in range(1, 20))  # 0.05 .. 0.95
COMPARED_METRICS = (
    "recall",
    "specificity",
    "precision",
    "f1",
    "balanced_accuracy",
    "accuracy",
    "category_accuracy",
    "invalid_share",
    "roc_auc",
)


class EvalError(PolicyEngineError):
    """A user error: bad labels, options that do not go together, a missing file (exit 2)."""


class EvalFailure(PolicyEngineError):
    """The evaluation ran but measured nothing (exit 1)."""

    exit_code = 1


# -- the labelled set -----------------------------------------------------------------------


class LabelledSample(BaseModel):
    """One labelled image. `category` is a category id of the policy or its none id ("NA")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    image: str = Field(description="As written: a path relative to the labels file, or data:.")
    rating: Rating
    category: str = "NA"
    exception: bool = Field(
        default=False,
        description="Safe only because the policy declares `category` non-violating.",
    )
    metadata: dict[str, Any] = Field(default_factory=dict)
    line: int = 0

    def image_source(self, base: Path) -> str:
        """The image to load: a data: URL as it is, a path resolved against `base` (an
        absolute or `~` path as it is), like an audit's JSONL manifest."""
        if self.image[:5].lower() == "data:":
            return self.image
        return str(base / Path(self.image).expanduser())


class _LabelLine(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    image: str = Field(min_length=1)
    rating: Rating
    category: str | None = None
    id: str | int | None = None
    exception: bool = False
    metadata: dict[str, Any] = Field(default_factory=dict)


def _validation_message(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "line"
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(_LabelLine.model_fields)
            parts.append(f"unknown key {where!r}; allowed: {allowed}")
        elif item["type"] == "missing":
            parts.append(f"{where}: required")
        else:
            parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def category_id(value: str, policy: Policy) -> str:
    """A label's category (an id, a full label, "NA") as the policy's category id."""
    none = policy.none_category
    ids = {c.id for c in policy.categories}
    if value in ids:
        return value
    if value in ("NA", none.id, none.label):
        return none.id
    for category in policy.categories:
        if value == category.label:
            return category.id
    known = ", ".join([*(c.id for c in policy.categories), none.id])
    raise ValueError(f"unknown category {value!r} in policy {policy.id!r}; categories: {known}")


def parse_labels(lines: Iterable[str], policy: Policy, *, name: str) -> list[LabelledSample]:
    """Parse JSONL label lines against a policy; errors name `name`:LINE."""
    samples: list[LabelledSample] = []
    first_line: dict[str, int] = {}
    none_id = policy.none_category.id
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue

        def fail(message: str, number: int = number) -> EvalError:
            return EvalError(f"{name}:{number}: {message}")

        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise fail(f"invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise fail(f"expected a JSON object, got {type(record).__name__}")
        try:
            row = _LabelLine.model_validate(record)
        except ValidationError as err:
            raise fail(_validation_message(err)) from None
        try:
            category = category_id(row.category, policy) if row.category else none_id
        except ValueError as err:
            raise fail(f"category: {err}") from None
        if row.rating == "Unsafe" and category == none_id:
            raise fail(f"category: an Unsafe sample needs a category of the policy, not {none_id}")
        if row.exception:
            if row.rating != "Safe" or category == none_id:
                raise fail(
                    "exception: an exception sample is rated Safe and names the category "
                    "its policy declares non-violating"
                )
            declared = policy.exception_for(category)
            if declared is None or declared.status != ExceptionStatus.NON_VIOLATING:
                raise fail(
                    f"exception: policy {policy.id!r} does not declare {category} "
                    "non-violating (evaluate with the policy the labels were made for)"
                )
        sample_id = row.image if row.id is None else str(row.id)
        if sample_id in first_line:
            raise fail(f"duplicate id {sample_id!r} (first on line {first_line[sample_id]})")
        first_line[sample_id] = number
        samples.append(
            LabelledSample(
                id=sample_id,
                image=row.image,
                rating=row.rating,
                category=category,
                exception=row.exception,
                metadata=row.metadata,
                line=number,
            )
        )
    return samples


def read_labels(path: str | Path, policy: Policy) -> list[LabelledSample]:
    """Read a labels file (JSONL). Raises EvalError naming FILE or FILE:LINE."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such labels file")
    try:
        with path.open(encoding="utf-8") as handle:
            samples = parse_labels(handle, policy, name=str(path))
    except UnicodeDecodeError:
        raise EvalError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise EvalError(f"{path}: {err.strerror or err}") from None
    if not samples:
        raise EvalError(f"{path}: no labelled samples")
    return samples


# -- predictions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """What the model (and the policy's post-processors) said about one sample."""

    rating: str | None
    category_id: str | None = None
    p_unsafe: float | None = None
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.error is None and self.rating in RATINGS

    @classmethod
    def from_row(cls, row: ResultRow) -> Prediction:
        error = None if row.ok else (row.error or "error")
        return cls(row.rating, row.category_id, row.p_unsafe, error)

    @classmethod
    def from_decision(cls, decision: Decision) -> Prediction:
        verdict = decision.verdict
        error = verdict.error.message if verdict.error is not None else None
        return cls(verdict.rating, verdict.category_id, verdict.p_unsafe, error)


def read_predictions(
    path: str | Path, wanted: set[str] | None = None
) -> tuple[dict[str, Prediction], dict[str, str]]:
    """The predictions of a results file (only the `wanted` ids, if given) and its meta."""
    with ResultStore(path) as store:
        meta = store.meta
        predictions = {
            row.id: Prediction.from_row(row)
            for row in store.rows()
            if wanted is None or row.id in wanted
        }
    return predictions, meta


# -- metrics --------------------------------------------------------------------------------


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator; None (undefined) when the denominator is 0."""
    return numerator / denominator if denominator else None


class Counts(BaseModel):
    """A 2x2 rating confusion, Unsafe being the positive class, and its ratios."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    recall: float | None = None
    specificity: float | None = None
    precision: float | None = None
    f1: float | None = None
    balanced_accuracy: float | None = None
    accuracy: float | None = None

    @classmethod
    def of(cls, tp: int, fp: int, tn: int, fn: int) -> Counts:
        recall = ratio(tp, tp + fn)
        specificity = ratio(tn, tn + fp)
        balanced = None if recall is None or specificity is None else (recall + specificity) / 2
        return cls(
            tp=tp,
            fp=fp,
            tn=tn,
            fn=fn,
            recall=recall,
            specificity=specificity,
            precision=ratio(tp, tp + fp),
            f1=ratio(2 * tp, 2 * tp + fp + fn),
            balanced_accuracy=balanced,
            accuracy=ratio(tp + tn, tp + fp + tn + fn),
        )

    @classmethod
    def count(cls, pairs: Iterable[tuple[bool, bool]]) -> Counts:
        """From (labelled Unsafe, predicted Unsafe) pairs."""
        tally: Counter[tuple[bool, bool]] = Counter(pairs)
        return cls.of(
            tp=tally[True, True],
            fp=tally[False, True],
            tn=tally[False, False],
            fn=tally[True, False],
        )


class Metrics(Counts):
    samples: int = Field(default=0, description="Samples with a valid prediction.")
    category_accuracy: float | None = Field(
        default=None,
        description=(
            "Of the labelled-Unsafe samples predicted Unsafe, the share whose predicted category "
            "is the labelled one; null when no prediction names a category."
        ),
    )
    category_samples: int = Field(default=0, description="category_accuracy's denominator.")


class Coverage(BaseModel):
    labelled: int
    predicted: int = Field(description="Labelled samples with a prediction (valid or not).")
    missing: int = Field(description="Labelled samples without a prediction: excluded.")
    missing_ids: list[str]
    valid: int
    invalid: int = Field(description="Error predictions: excluded from the metrics.")
    invalid_share: float | None = Field(description="invalid / predicted.")
    invalid_ids: list[str]


class CategoryRow(BaseModel):
    category: str
    support: int = Field(description="Samples labelled with this category, valid prediction.")
    unsafe: int = Field(description="Of those, labelled Unsafe.")
    recall: float | None = Field(description="Share of the labelled-Unsafe predicted Unsafe.")
    category_accuracy: float | None = Field(
        description="Of the labelled-Unsafe predicted Unsafe, share with this category predicted."
    )
    accuracy: float | None = Field(description="Share with the labelled rating.")


class SweepPoint(Counts):
    threshold: float


class Scores(BaseModel):
    scored: int = Field(description="Valid predictions carrying p_unsafe.")
    positives: int
    negatives: int
    roc_auc: float | None
    sweep: list[SweepPoint] = Field(description="Predicted Unsafe when p_unsafe >= threshold.")


class ExceptionCategory(BaseModel):
    category: str
    samples: int
    valid: int
    invalid: int
    safe: int
    rate: float | None


class ExceptionRate(BaseModel):
    """Of samples that should be Safe only because of a policy exception, the share rated Safe
    (invalid predictions excluded, counted separately)."""

    samples: int
    valid: int
    invalid: int
    safe: int
    rate: float | None
    per_category: list[ExceptionCategory]


class Confusion(BaseModel):
    rating: dict[str, dict[str, int]] = Field(description="labelled -> predicted -> count")
    category: dict[str, dict[str, int]] = Field(description="labelled id -> predicted id -> count")


class Evaluation(BaseModel):
    coverage: Coverage
    metrics: Metrics
    confusion: Confusion
    per_category: list[CategoryRow]
    scores: Scores | None
    labelled_exceptions: ExceptionRate | None

    def values(self) -> dict[str, float | None]:
        """The headline numbers compared by `--compare`."""
        values: dict[str, float | None] = {
            key: getattr(self.metrics, key) for key in COMPARED_METRICS[:7]
        }
        values["invalid_share"] = self.coverage.invalid_share
        values["roc_auc"] = self.scores.roc_auc if self.scores else None
        return values


def _ordered(keys: Iterable[str], order: Sequence[str]) -> list[str]:
    """Keys in `order` first (in that order), then the others sorted, NO_CATEGORY last."""
    present = set(keys)
    known = [k for k in order if k in present]
    rest = sorted(present - set(known) - {NO_CATEGORY})
    return known + rest + ([NO_CATEGORY] if NO_CATEGORY in present else [])


def roc_auc(scores: Sequence[float], positives: Sequence[bool]) -> float | None:
    """ROC-AUC from ranks (Mann-Whitney U), ties given their average rank; None without
    both classes."""
    n_pos = sum(positives)
    n_neg = len(positives) - n_pos
    if not n_pos or not n_neg:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        average = (start + end) / 2 + 1  # ranks are 1-based
        for position in range(start, end + 1):
            ranks[order[position]] = average
        start = end + 1
    rank_sum = sum(rank for rank, positive in zip(ranks, positives, strict=True) if positive)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def threshold_sweep(
    scores: Sequence[float],
    positives: Sequence[bool],
    thresholds: Sequence[float] = SWEEP_THRESHOLDS,
) -> list[SweepPoint]:
    """The rating metrics if Unsafe were predicted exactly when p_unsafe >= threshold."""
    points = []
    for threshold in thresholds:
        counts = Counts.count(
            (positive, score >= threshold)
            for score, positive in zip(scores, positives, strict=True)
        )
        points.append(SweepPoint(threshold=threshold, **counts.model_dump()))
    return points


def exception_rate(
    samples: Sequence[LabelledSample],
    predictions: Mapping[str, Prediction],
    order: Sequence[str] = (),
) -> ExceptionRate:
    """Share of `samples` (all expected Safe because of an exception) predicted Safe, overall
    and per category; samples without a prediction are left out."""
    tallies: dict[str, Counter[str]] = defaultdict(Counter)
    for sample in samples:
        prediction = predictions.get(sample.id)
        if prediction is None:
            continue
        tally = tallies[sample.category]
        tally["samples"] += 1
        if not prediction.valid:
            tally["invalid"] += 1
        else:
            tally["valid"] += 1
            tally["safe"] += prediction.rating == "Safe"
    rows = [
        ExceptionCategory(
            category=key,
            samples=tallies[key]["samples"],
            valid=tallies[key]["valid"],
            invalid=tallies[key]["invalid"],
            safe=tallies[key]["safe"],
            rate=ratio(tallies[key]["safe"], tallies[key]["valid"]),
        )
        for key in _ordered(tallies, order)
    ]
    total: Counter[str] = sum(tallies.values(), Counter())
    return ExceptionRate(
        samples=total["samples"],
        valid=total["valid"],
        invalid=total["invalid"],
        safe=total["safe"],
        rate=ratio(total["safe"], total["valid"]),
        per_category=rows,
    )


def evaluate(
    samples: Sequence[LabelledSample],
    predictions: Mapping[str, Prediction],
    order: Sequence[str] = (),
) -> Evaluation:
    """Join labels with predictions by id and compute every metric. `order`: category ids in
    the order tables list them (the policy's)."""
    missing: list[str] = []
    invalid: list[str] = []
    pairs: list[tuple[LabelledSample, Prediction]] = []
    for sample in samples:
        prediction = predictions.get(sample.id)
        if prediction is None:
            missing.append(sample.id)
        elif not prediction.valid:
            invalid.append(sample.id)
        else:
            pairs.append((sample, prediction))
    predicted = len(samples) - len(missing)
    coverage = Coverage(
        labelled=len(samples),
        predicted=predicted,
        missing=len(missing),
        missing_ids=missing[:IDS_SHOWN],
        valid=len(pairs),
        invalid=len(invalid),
        invalid_share=ratio(len(invalid), predicted),
        invalid_ids=invalid[:IDS_SHOWN],
    )

    # The rating metrics, and category accuracy over the true positives.
    names_categories = any(p.category_id is not None for _, p in pairs)
    true_positives = [(s, p) for s, p in pairs if s.rating == "Unsafe" and p.rating == "Unsafe"]
    right_category = sum(p.category_id == s.category for s, p in true_positives)
    counts = Counts.count((s.rating == "Unsafe", p.rating == "Unsafe") for s, p in pairs)
    metrics = Metrics(
        samples=len(pairs),
        category_accuracy=ratio(right_category, len(true_positives)) if names_categories else None,
        category_samples=len(true_positives),
        **counts.model_dump(),
    )

    # Per labelled category.
    grouped: dict[str, list[tuple[LabelledSample, Prediction]]] = {
        key: [] for key in _ordered({s.category for s in samples}, order)
    }
    for sample, prediction in pairs:
        grouped[sample.category].append((sample, prediction))
    per_category = []
    for key, members in grouped.items():
        unsafe = [(s, p) for s, p in members if s.rating == "Unsafe"]
        hits = [(s, p) for s, p in unsafe if p.rating == "Unsafe"]
        per_category.append(
            CategoryRow(
                category=key,
                support=len(members),
                unsafe=len(unsafe),
                recall=ratio(len(hits), len(unsafe)),
                category_accuracy=ratio(sum(p.category_id == key for _, p in hits), len(hits))
                if names_categories
                else None,
                accuracy=ratio(sum(s.rating == p.rating for s, p in members), len(members)),
            )
        )

    # Confusion matrices: rating 2x2, and labelled category x predicted category.
    rating_cells = Counter((s.rating, p.rating) for s, p in pairs)
    rating_matrix = {a: {b: rating_cells[a, b] for b in RATINGS} for a in RATINGS}
    category_cells = Counter((s.category, p.category_id or NO_CATEGORY) for s, p in pairs)
    rows = _ordered((a for a, _ in category_cells), order)
    columns = _ordered((b for _, b in category_cells), order)
    category_matrix = {a: {b: category_cells[a, b] for b in columns} for a in rows}

    # Scores, when the predictions carry them.
    scored = [(s.rating == "Unsafe", p.p_unsafe) for s, p in pairs if p.p_unsafe is not None]
    scores = None
    if scored:
        positives = [positive for positive, _ in scored]
        values = [float(value) for _, value in scored if value is not None]
        scores = Scores(
            scored=len(scored),
            positives=sum(positives),
            negatives=len(positives) - sum(positives),
            roc_auc=roc_auc(values, positives),
            sweep=threshold_sweep(values, positives),
        )

    exception_samples = [s for s in samples if s.exception]
    return Evaluation(
        coverage=coverage,
        metrics=metrics,
        confusion=Confusion(rating=rating_matrix, category=category_matrix),
        per_category=per_category,
        scores=scores,
        labelled_exceptions=exception_rate(exception_samples, predictions, order)
        if exception_samples
        else None,
    )


# -- comparing two runs ---------------------------------------------------------------------


class PredictionsInfo(BaseModel):
    kind: Literal["backend", "file"]
    path: str | None = Field(default=None, description="The results file read or written.")
    backend: str | None = None
    mode: str | None = None
    policy_id: str | None = None
    policy_hash: str | None = None


class Changes(BaseModel):
    count: int
    ids: list[str] = Field(description=f"The first {CHANGED_SHOWN}, in label order.")


class Comparison(BaseModel):
    """Run B (`--compare`) against run A (`--predictions`)."""

    predictions: PredictionsInfo
    other: Evaluation
    difference: dict[str, float | None] = Field(description="B - A; null when either is.")
    compared: int = Field(description="Samples with a prediction in both runs.")
    fixed: Changes = Field(description="Wrong or invalid in A, right in B.")
    broken: Changes = Field(description="Right in A, wrong or invalid in B.")


def compare(
    samples: Sequence[LabelledSample],
    first: Mapping[str, Prediction],
    second: Mapping[str, Prediction],
) -> tuple[int, list[str], list[str]]:
    """(samples predicted in both, fixed ids, broken ids). A prediction is right when it is
    valid and has the labelled rating."""
    compared = 0
    fixed: list[str] = []
    broken: list[str] = []
    for sample in samples:
        a, b = first.get(sample.id), second.get(sample.id)
        if a is None or b is None:
            continue
        compared += 1
        right_a = a.valid and a.rating == sample.rating
        right_b = b.valid and b.rating == sample.rating
        if right_b and not right_a:
            fixed.append(sample.id)
        elif right_a and not right_b:
            broken.append(sample.id)
    return compared, fixed, broken


def difference(a: Evaluation, b: Evaluation) -> dict[str, float | None]:
    """B - A for each compared metric; None when either is undefined."""
    first, second = a.values(), b.values()
    result: dict[str, float | None] = {}
    for key in COMPARED_METRICS:
        x, y = first[key], second[key]
        result[key] = None if x is None or y is None else y - x
    return result


# -- the report -----------------------------------------------------------------------------


class LabelsInfo(BaseModel):
    path: str
    samples: int
    unsafe: int
    safe: int
    exception_samples: int


class PolicyInfo(BaseModel):
    id: str
    version: str
    hash: str


class EvalReport(BaseModel):
    labels: LabelsInfo
    policy: PolicyInfo
    predictions: PredictionsInfo
    evaluation: Evaluation
    exception_rate: ExceptionRate | None = None
    compare: Comparison | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON document of `--format json` (the evaluation's keys at the top level)."""
        document: dict[str, Any] = {
            "labels": self.labels.model_dump(mode="json"),
            "policy": self.policy.model_dump(mode="json"),
            "predictions": self.predictions.model_dump(mode="json"),
            **self.evaluation.model_dump(mode="json"),
        }
        if self.exception_rate is not None:
            document["exception_rate"] = self.exception_rate.model_dump(mode="json")
        if self.compare is not None:
            other = self.compare
            document["compare"] = {
                "predictions": other.predictions.model_dump(mode="json"),
                **other.other.model_dump(mode="json"),
                "difference": other.difference,
                "compared": other.compared,
                "fixed": other.fixed.model_dump(mode="json"),
                "broken": other.broken.model_dump(mode="json"),
            }
        return document


def _number(value: float | None, width: int = 7) -> str:
    return f"{'n/a' if value is None else f'{value:.3f}':>{width}}"


def _signed(value: float | None, width: int = 7) -> str:
    return f"{'n/a' if value is None else f'{value:+.3f}':>{width}}"


def _ids(ids: Sequence[str], count: int) -> str:
    more = f", ... ({count - len(ids)} more)" if count > len(ids) else ""
    return ", ".join(ids) + more


def _matrix(matrix: Mapping[str, Mapping[str, int]], indent: str = "  ") -> list[str]:
    columns = list(next(iter(matrix.values()), {}))
    cells = [str(v) for r in matrix.values() for v in r.values()]
    width = max([6, *(len(c) + 1 for c in columns), *(len(v) + 1 for v in cells)])
    first = max([8, *(len(r) + 1 for r in matrix)])
    lines = [indent + " " * first + "".join(f"{c:>{width}}" for c in columns)]
    for row, counts in matrix.items():
        lines.append(indent + f"{row:<{first}}" + "".join(f"{counts[c]:>{width}}" for c in columns))
    return lines


_METRIC_LINES = (
    ("recall", "recall (TPR)"),
    ("specificity", "specificity (TNR)"),
    ("precision", "precision"),
    ("f1", "F1"),
    ("balanced_accuracy", "balanced accuracy"),
    ("accuracy", "accuracy"),
    ("category_accuracy", "category accuracy"),
)


def _evaluation_text(evaluation: Evaluation) -> list[str]:
    c, m = evaluation.coverage, evaluation.metrics
    share = f" ({c.invalid_share:.1%})" if c.invalid_share is not None else ""
    lines = [
        f"samples            {c.labelled} labelled, {c.predicted} predicted, "
        f"{c.missing} missing, {c.invalid} invalid{share}",
    ]
    if c.missing:
        lines.append(f"  missing (excluded): {_ids(c.missing_ids, c.missing)}")
    if c.invalid:
        lines.append(f"  invalid (excluded): {_ids(c.invalid_ids, c.invalid)}")
    lines += [
        f"metrics over {m.samples} valid predictions; Unsafe is the positive class",
        f"  TP {m.tp}   FP {m.fp}   TN {m.tn}   FN {m.fn}",
    ]
    for key, label in _METRIC_LINES:
        lines.append(f"  {label:<20}{_number(getattr(m, key))}")
    lines.append(
        f"  (category accuracy: of the {m.category_samples} labelled-Unsafe samples predicted "
        "Unsafe, the share with the labelled category)"
    )
    if evaluation.scores is not None:
        s = evaluation.scores
        lines.append(
            f"  {'ROC-AUC':<20}{_number(s.roc_auc)}   ({s.scored} scored: "
            f"{s.positives} Unsafe, {s.negatives} Safe)"
        )
    lines += ["", "rating confusion (rows: labelled, columns: predicted)"]
    lines += _matrix(evaluation.confusion.rating)
    lines += [
        "",
        "per category (recall: labelled Unsafe predicted Unsafe; cat. acc.: of those, right "
        "category; accuracy: right rating)",
        f"  {'category':<10}{'support':>8}{'unsafe':>8}{'recall':>8}{'cat.acc':>8}{'accuracy':>9}",
    ]
    for row in evaluation.per_category:
        lines.append(
            f"  {row.category:<10}{row.support:>8}{row.unsafe:>8}{_number(row.recall, 8)}"
            f"{_number(row.category_accuracy, 8)}{_number(row.accuracy, 9)}"
        )
    if evaluation.confusion.category:
        lines += ["", "category confusion (rows: labelled, columns: predicted)"]
        lines += _matrix(evaluation.confusion.category)
    if evaluation.scores is not None:
        lines += [
            "",
            "threshold sweep (Unsafe when p_unsafe >= threshold)",
            f"  {'threshold':>9}{'recall':>9}{'spec.':>9}{'prec.':>9}{'F1':>9}{'bal.acc':>9}",
        ]
        for p in evaluation.scores.sweep:
            lines.append(
                f"  {p.threshold:>9.2f}{_number(p.recall, 9)}{_number(p.specificity, 9)}"
                f"{_number(p.precision, 9)}{_number(p.f1, 9)}{_number(p.balanced_accuracy, 9)}"
            )
    if evaluation.labelled_exceptions is not None:
        lines += [""]
        lines += _exception_text(
            "labelled exception samples (Safe only by a policy exception) rated Safe",
            evaluation.labelled_exceptions,
        )
    return lines


def _exception_text(title: str, rate: ExceptionRate) -> list[str]:
    invalid = f", {rate.invalid} invalid (excluded)" if rate.invalid else ""
    lines = [f"{title}: {_number(rate.rate, 0)} ({rate.safe} of {rate.valid}{invalid})"]
    lines.append(f"  {'category':<10}{'samples':>8}{'safe':>8}{'invalid':>8}{'rate':>8}")
    for row in rate.per_category:
        lines.append(
            f"  {row.category:<10}{row.samples:>8}{row.safe:>8}{row.invalid:>8}"
            f"{_number(row.rate, 8)}"
        )
    return lines


def render_text(report: EvalReport) -> str:
    """The report for people: aligned columns, undefined ratios as n/a."""
    labels, policy, source = report.labels, report.policy, report.predictions
    if source.kind == "backend":
        saved = f", saved to {source.path}" if source.path else ""
        origin = f"backend {source.backend} (mode {source.mode}){saved}"
    else:
        origin = f"predictions {source.path}"
    lines = [
        f"eval: {labels.path} ({labels.samples} samples: {labels.unsafe} Unsafe, "
        f"{labels.safe} Safe)",
        f"policy {policy.id} v{policy.version} ({policy.hash[:19]}), {origin}",
        "",
        *_evaluation_text(report.evaluation),
    ]
    if report.exception_rate is not None:
        lines += [""]
        lines += _exception_text(
            "policy exception rate (labelled-Unsafe samples rated Safe once their category is "
            "declared non-violating)",
            report.exception_rate,
        )
    if report.compare is not None:
        other = report.compare
        a, b = report.evaluation.values(), other.other.values()
        lines += [
            "",
            f"compare: A = {source.path}, B = {other.predictions.path}",
            f"  {'metric':<20}{'A':>8}{'B':>8}{'B - A':>8}",
        ]
        for key in COMPARED_METRICS:
            lines.append(
                f"  {key.replace('_', ' '):<20}{_number(a[key], 8)}{_number(b[key], 8)}"
                f"{_signed(other.difference[key], 8)}"
            )
        lines.append(
            f"  changed, of {other.compared} samples predicted in both: {other.fixed.count} "
            f"fixed (wrong in A, right in B), {other.broken.count} broken (right in A, wrong in B)"
        )
        if other.fixed.count:
            lines.append(f"  fixed:  {_ids(other.fixed.ids, other.fixed.count)}")
        if other.broken.count:
            lines.append(f"  broken: {_ids(other.broken.ids, other.broken.count)}")
        lines += ["", f"B ({other.predictions.path}):", *_evaluation_text(other.other)]
    return "\n".join(lines) + "\n"


# -- running a backend ----------------------------------------------------------------------


def derive_exception_policy(
    policy: Policy, category: str, *, host: PluginHost | None = None
) -> Policy:
    """`policy` with `category` declared non-violating, checked and compiled (LlavaGuard's
    policy-exception augmentation)."""
    if category not in {c.id for c in policy.categories}:
        raise EvalError(f"policy {policy.id!r} has no category {category!r}")
    exception = CategoryException(status=ExceptionStatus.NON_VIOLATING, reason=EXCEPTION_REASON)
    derived = policy.model_copy(update={"exceptions": {**policy.exceptions, category: exception}})
    check_policy(derived, host=host)
    compile_policy(derived, host=host)
    return derived


class Progress:
    """`[done/total] rate images/s` on stderr, rewritten in place."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled and total > 0
        self.done = self.invalid = 0
        self.started = time.monotonic()

    def step(self, decision: Decision) -> None:
        self.done += 1
        self.invalid += not decision.verdict.ok
        if not self.enabled:
            return
        rate = self.done / max(time.monotonic() - self.started, 1e-9)
        note = f", {self.invalid} invalid" if self.invalid else ""
        click.echo(f"\r[{self.done}/{self.total}] {rate:.2f} images/s{note}", err=True, nl=False)
        if self.done == self.total:
            click.echo("", err=True)


def run_engine(
    engine: Engine,
    samples: Sequence[LabelledSample],
    base: Path,
    on_decision: Callable[[LabelledSample, Decision], None] | None = None,
) -> dict[str, Prediction]:
    """Assess every sample's image (label metadata to the post-processors), in order."""
    predictions: dict[str, Prediction] = {}
    items = ((s.image_source(base), dict(s.metadata)) for s in samples)
    for sample, decision in zip(samples, engine.assess_many(items), strict=True):
        predictions[sample.id] = Prediction.from_decision(decision)
        if on_decision is not None:
            on_decision(sample, decision)
    return predictions


class _Writer:
    """Saves decisions to a results file in transactions of `every` rows."""

    def __init__(self, store: ResultStore, every: int = 64) -> None:
        self.store, self.every = store, every
        self.pending: list[ResultRow] = []

    def add(self, row: ResultRow) -> None:
        self.pending.append(row)
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.store.write(self.pending)
            self.pending = []


def _parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise EvalError(f"--option {pair!r}: expected KEY=VALUE")
        try:
            options[key] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            options[key] = value
    return options


@dataclass
class EvalOptions:
    """The command's options (see `eval_command`)."""

    labels: str
    policy: str | None = None
    backend: str | None = None
    model: str | None = None
    urls: tuple[str, ...] = ()
    transport: str | None = None
    options: tuple[str, ...] = ()
    mode: str | None = None
    batch_size: int | None = None
    predictions: str | None = None
    compare: str | None = None
    out: str | None = None
    exceptions: bool = False
    progress: bool | None = None


def _check_combination(opts: EvalOptions) -> None:
    if opts.predictions is None:
        if opts.compare is not None:
            raise EvalError("--compare needs --predictions (the run to compare against)")
        return
    given = [
        name
        for name, value in (
            ("--backend", opts.backend),
            ("--model", opts.model),
            ("--url", opts.urls),
            ("--transport", opts.transport),
            ("--option", opts.options),
            ("--mode", opts.mode),
            ("--batch-size", opts.batch_size),
            ("--out", opts.out),
            ("--exceptions", opts.exceptions),
        )
        if value
    ]
    if given:
        raise EvalError(
            f"{', '.join(given)} cannot be used with --predictions (they run a backend)"
        )


def _labels_info(path: str, samples: Sequence[LabelledSample]) -> LabelsInfo:
    unsafe = sum(s.rating == "Unsafe" for s in samples)
    return LabelsInfo(
        path=path,
        samples=len(samples),
        unsafe=unsafe,
        safe=len(samples) - unsafe,
        exception_samples=sum(s.exception for s in samples),
    )


def _policy_info(policy: Policy, host: PluginHost) -> PolicyInfo:
    return PolicyInfo(
        id=policy.id, version=policy.version, hash=compile_policy(policy, host=host).hash
    )


def run_eval(opts: EvalOptions, *, host: PluginHost | None = None) -> EvalReport:
    """Everything `policy-engine eval` does except printing."""
    host = host or get_host()
    _check_combination(opts)
    labels_path = Path(opts.labels)
    if not labels_path.is_file():
        raise EvalError(f"{opts.labels}: no such labels file")
    if opts.predictions is not None:
        return _eval_predictions(opts, host)
    return _eval_backend(opts, host)


def _eval_predictions(opts: EvalOptions, host: PluginHost) -> EvalReport:
    assert opts.predictions is not None
    with ResultStore(opts.predictions) as store:  # fail on a bad results file before labels
        meta = store.meta
    if opts.policy is not None:
        policy = load_policy(opts.policy, host=host)
    elif meta.get("policy_id") in shipped_policies():
        policy = load_policy(meta["policy_id"], host=host)
    else:
        policy = load_policy("llavaguard", host=host)
    samples = read_labels(opts.labels, policy)
    wanted = {s.id for s in samples}
    order = [*(c.id for c in policy.categories), policy.none_category.id]
    predictions, _ = read_predictions(opts.predictions, wanted)
    evaluation = evaluate(samples, predictions, order)
    comparison = None
    if opts.compare is not None:
        others, other_meta = read_predictions(opts.compare, wanted)
        other = evaluate(samples, others, order)
        compared, fixed, broken = compare(samples, predictions, others)
        comparison = Comparison(
            predictions=_file_info(opts.compare, other_meta),
            other=other,
            difference=difference(evaluation, other),
            compared=compared,
            fixed=Changes(count=len(fixed), ids=fixed[:CHANGED_SHOWN]),
            broken=Changes(count=len(broken), ids=broken[:CHANGED_SHOWN]),
        )
    return EvalReport(
        labels=_labels_info(opts.labels, samples),
        policy=_policy_info(policy, host),
        predictions=_file_info(opts.predictions, meta),
        evaluation=evaluation,
        compare=comparison,
    )


def _file_info(path: str, meta: Mapping[str, str]) -> PredictionsInfo:
    return PredictionsInfo(
        kind="file",
        path=path,
        backend=meta.get("backend"),
        mode=meta.get("mode"),
        policy_id=meta.get("policy_id"),
        policy_hash=meta.get("policy_hash"),
    )


def _eval_backend(opts: EvalOptions, host: PluginHost) -> EvalReport:
    from ..engine import Engine

    if (opts.mode or "full") not in get_args(Mode):
        raise EvalError(f"unknown mode {opts.mode!r}; modes: {', '.join(get_args(Mode))}")
    mode = cast(Mode, opts.mode or "full")
    policy = load_policy(opts.policy or "llavaguard", host=host)
    samples = read_labels(opts.labels, policy)
    base = Path(opts.labels).parent
    if opts.out is not None and Path(opts.out).exists():
        raise EvalError(f"{opts.out}: already exists; choose another --out")
    backend_options = _parse_options(opts.options)
    if opts.model is not None:
        backend_options["model"] = opts.model
    if opts.urls:
        backend_options["url"] = list(opts.urls)
    if opts.transport is not None:
        backend_options["transport"] = opts.transport
    order = [*(c.id for c in policy.categories), policy.none_category.id]
    exception_samples = (
        [s for s in samples if s.rating == "Unsafe" and s.category != policy.none_category.id]
        if opts.exceptions
        else []
    )
    derived = {
        key: derive_exception_policy(policy, key, host=host)
        for key in _ordered({s.category for s in exception_samples}, order)
    }
    # One backend instance (weights loaded once) shared by the engine of every policy.
    backend: Backend = host.backend(opts.backend or "transformers")(**backend_options)
    show = opts.progress if opts.progress is not None else sys.stderr.isatty()
    progress = Progress(len(samples) + len(exception_samples), show)
    store: ResultStore | None = None
    writer: _Writer | None = None
    try:
        engine = Engine(
            policy,
            backend,
            mode=mode,
            batch_size=opts.batch_size,
            host=host,
        )
        engine.load()
        if opts.out is not None:
            store = ResultStore(opts.out, create=True)
            store.set_meta(
                {
                    "policy_id": policy.id,
                    "policy_version": policy.version,
                    "policy_hash": engine.compiled.hash,
                    "backend": backend.name,
                    "mode": mode,
                    "source": opts.labels,
                }
            )
            writer = _Writer(store)
        seq = iter(range(len(samples)))

        def record(sample: LabelledSample, decision: Decision) -> None:
            progress.step(decision)
            if writer is not None:
                writer.add(ResultRow.from_decision(sample.id, next(seq), decision))

        predictions = run_engine(engine, samples, base, record)
        rate = None
        if opts.exceptions:
            derived_predictions: dict[str, Prediction] = {}
            for key, derived_policy in derived.items():
                derived_engine = Engine(
                    derived_policy,
                    backend,
                    mode=mode,
                    batch_size=opts.batch_size,
                    host=host,
                )
                group = [s for s in exception_samples if s.category == key]
                derived_predictions.update(
                    run_engine(derived_engine, group, base, lambda _, d: progress.step(d))
                )
            rate = exception_rate(exception_samples, derived_predictions, order)
    finally:
        backend.close()
        if store is not None:
            try:
                if writer is not None:
                    writer.flush()  # what was assessed is kept, even after Ctrl-C
            finally:
                store.close()
    return EvalReport(
        labels=_labels_info(opts.labels, samples),
        policy=PolicyInfo(id=policy.id, version=policy.version, hash=engine.compiled.hash),
        predictions=PredictionsInfo(
            kind="backend",
            path=opts.out,
            backend=backend.name,
            mode=mode,
            policy_id=policy.id,
            policy_hash=engine.compiled.hash,
        ),
        evaluation=evaluate(samples, predictions, order),
        exception_rate=rate,
    )


# -- the command ----------------------------------------------------------------------------


@click.command(name="eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("labels", metavar="LABELS.jsonl")
@click.option(
    "--policy",
    "-p",
    default=None,
    help="A shipped policy name or a YAML path (default: llavaguard; with --predictions, the "
    "results file's policy when it is a shipped one).",
)
@click.option("--backend", "-b", default=None, help="Run this backend (default: transformers).")
@click.option("--model", "-m", default=None, help="Model for the backend.")
@click.option("--url", "urls", multiple=True, metavar="URL", help="Server URL (repeatable).")
@click.option("--transport", type=click.Choice(["openai", "native"]), default=None)
@click.option(
    "--option",
    "-o",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A backend option (repeatable); values are YAML scalars.",
)
@click.option(
    "--mode",
    type=click.Choice(list(get_args(Mode))),
    default=None,
    help="full (default), verdict or score.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per call.")
@click.option(
    "--out",
    metavar="RESULTS.db",
    default=None,
    help="Save every decision to a new results file (readable with --predictions).",
)
@click.option(
    "--exceptions",
    is_flag=True,
    help="Also measure the policy exception rate (runs labelled-Unsafe images again).",
)
@click.option(
    "--predictions",
    metavar="RESULTS.db",
    default=None,
    help="Evaluate an existing results file instead of running a backend.",
)
@click.option(
    "--compare",
    metavar="RESULTS2.db",
    default=None,
    help="With --predictions: compare with a second results file.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: for people; json: one JSON object for scripts.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="A progress line on stderr (default: when stderr is a terminal).",
)
@click.pass_context
def eval_command(
    ctx: click.Context,
    labels: str,
    policy: str | None,
    backend: str | None,
    model: str | None,
    urls: tuple[str, ...],
    transport: str | None,
    options: tuple[str, ...],
    mode: str | None,
    batch_size: int | None,
    out: str | None,
    exceptions: bool,
    predictions: str | None,
    compare: str | None,
    fmt: str,
    progress: bool | None,
) -> None:
    """Measure predictions against LABELS.jsonl (rating, category) with LlavaGuard's metrics.

    Either run a backend on the labelled images (--backend, --out to keep the decisions), or
    read an existing results file (--predictions, --compare). See docs/eval.md.
    """
    opts = EvalOptions(
        labels=labels,
        policy=policy,
        backend=backend,
        model=model,
        urls=urls,
        transport=transport,
        options=options,
        mode=mode,
        batch_size=batch_size,
        predictions=predictions,
        compare=compare,
        out=out,
        exceptions=exceptions,
        progress=progress,
    )
    try:
        report = run_eval(opts)
        if report.evaluation.coverage.valid == 0:
            _print(report, fmt)
            raise EvalFailure("no labelled sample has a valid prediction")
    except PolicyError as err:
        for problem in err.problems:
            click.echo(f"error: {problem}", err=True)
        ctx.exit(err.exit_code)
    except PolicyEngineError as err:
        click.echo(f"error: {err}", err=True)
        ctx.exit(err.exit_code)
    _print(report, fmt)


def _print(report: EvalReport, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(report.to_json(), ensure_ascii=False, indent=2))
    else:
        click.echo(render_text(report), nl=False)
