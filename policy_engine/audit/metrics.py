"""The metrics of `policy-engine eval`: labelled samples joined with predictions, counted.

LlavaGuard's metrics with Unsafe as the positive class (counts, ratios, category accuracy,
confusion matrices), ROC-AUC, a threshold sweep and calibration figures (ECE, Brier,
reliability bins) over p_unsafe, the policy exception rate, and
the comparison of two runs. Pure functions over `LabelledSample` and `Prediction`: no I/O, and
everything is plain counting (no numpy, no sklearn).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

from pydantic import BaseModel, Field

from .labels import RATINGS, LabelledSample, Prediction
from .reliability import CalibrationFigures

NO_CATEGORY = "-"  # a prediction without a category (score mode without category scores)
IDS_SHOWN = 10  # ids listed for missing and invalid predictions
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
    "ece",
    "brier",
)


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
    calibration: CalibrationFigures | None = Field(
        default=None, description="ECE, Brier score and the reliability diagram of p_unsafe."
    )


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
        calibration = self.scores.calibration if self.scores else None
        values["ece"] = calibration.ece if calibration else None
        values["brier"] = calibration.brier if calibration else None
        return values


def ordered(keys: Iterable[str], order: Sequence[str]) -> list[str]:
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
        for key in ordered(tallies, order)
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
        key: [] for key in ordered({s.category for s in samples}, order)
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
    rows = ordered((a for a, _ in category_cells), order)
    columns = ordered((b for _, b in category_cells), order)
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
            calibration=CalibrationFigures.of(values, positives),
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
