"""The report of `policy-engine eval`: what was measured, as JSON for scripts and text for people.

`EvalReport` holds where the labels, policy and predictions came from, the evaluation, and
optionally the policy exception rate and a comparison with a second run. Only the standard
library, pydantic and policy_engine's light modules are imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from .agreement import JudgeAgreement, Kappa
from .metrics import COMPARED_METRICS, Evaluation, ExceptionRate
from .predictions import KIND_NAMES, RANDOM_WEIGHTS, Kind, Matching, Provenance, describe_decoding
from .reliability import reliability_text

CHANGED_SHOWN = 20  # ids listed for fixed and broken samples in a comparison


class PredictionsInfo(Provenance):
    """Where predictions came from: a backend run (`path`: its --out file) or a file, with
    who made them (`Provenance`) and, for a file, how they matched the labels."""

    kind: Literal["backend", "file"]
    path: str | None = Field(default=None, description="The predictions file read or written.")
    format: Kind | None = Field(default=None, description="The kind of file; None for a run.")
    matching: Matching | None = None

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        first = ("kind", "path", "format")
        return {**{key: data.pop(key) for key in first}, **data}

    def random_weights_warning(self, name: str = "the predictions") -> str | None:
        """The warning no reader may miss: the model had random weights."""
        if not self.random_weights:
            return None
        models = ", ".join(m for m in self.models if RANDOM_WEIGHTS in m)
        return (
            f"{name} come from a model with random weights ({models}): these metrics say "
            "nothing about a real model"
        )

    def mixed_warnings(self, name: str = "the predictions") -> list[str]:
        """Predictions of several models or policies (a merged or concatenated file)."""
        found = []
        if len(self.models) > 1:
            found.append(f"{name} were made by {len(self.models)} models: {', '.join(self.models)}")
        if len(self.policy_hashes) > 1:
            found.append(
                f"{name} were made under {len(self.policy_hashes)} policies: "
                + ", ".join(h[:19] for h in self.policy_hashes)
            )
        return found


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
    kappa: Kappa | None = Field(default=None, description="A and B's agreement on ratings.")
    judges: JudgeAgreement | None = Field(default=None, description="B's judges' agreement.")


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
    judges: JudgeAgreement | None = None  # the agreement of a composite backend's judges

    def warnings(self) -> list[str]:
        """The report's warnings, the random-weights one first (text: the first lines)."""
        runs = [(self.predictions, "the predictions")]
        if self.compare is not None:
            other = self.compare.predictions
            runs = [
                (self.predictions, f"A's predictions ({self.predictions.path})"),
                (other, f"B's predictions ({other.path})"),
            ]
        first = [w for info, name in runs if (w := info.random_weights_warning(name))]
        return first + [w for info, name in runs for w in info.mixed_warnings(name)]

    def to_json(self) -> dict[str, Any]:
        """The JSON document of `--format json` (the evaluation's keys at the top level)."""
        document: dict[str, Any] = {
            "warnings": self.warnings(),
            "labels": self.labels.model_dump(mode="json"),
            "policy": self.policy.model_dump(mode="json"),
            "predictions": self.predictions.to_json(),
            **self.evaluation.model_dump(mode="json"),
        }
        if self.exception_rate is not None:
            document["exception_rate"] = self.exception_rate.model_dump(mode="json")
        if self.judges is not None:
            document["judges"] = self.judges.model_dump(mode="json")
        if self.compare is not None:
            other = self.compare
            document["compare"] = {
                "predictions": other.predictions.to_json(),
                **other.other.model_dump(mode="json"),
                "difference": other.difference,
                "compared": other.compared,
                "fixed": other.fixed.model_dump(mode="json"),
                "broken": other.broken.model_dump(mode="json"),
            }
            if other.kappa is not None:
                document["compare"]["kappa"] = other.kappa.model_dump(mode="json")
            if other.judges is not None:
                document["compare"]["judges"] = other.judges.model_dump(mode="json")
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
        if s.calibration is not None:
            lines.append(
                f"  {'ECE':<20}{_number(s.calibration.ece)}   ({s.calibration.bins} "
                "equal-width bins of p_unsafe)"
            )
            lines.append(f"  {'Brier score':<20}{_number(s.calibration.brier)}")
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
    if evaluation.scores is not None and evaluation.scores.calibration is not None:
        lines += [
            "",
            "reliability (per bin of p_unsafe: the observed Unsafe share, # bar, against the "
            "mean score, |)",
            *reliability_text(evaluation.scores.calibration),
        ]
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


def _unknown(value: str | None) -> str:
    return value or "unknown"


def _policy_text(info: PredictionsInfo) -> str:
    if len(info.policy_hashes) > 1:
        return "policies " + ", ".join(h[:19] for h in info.policy_hashes)
    if info.policy_id is None and info.policy_hash is None:
        return "policy unknown"
    version = f" v{info.policy_version}" if info.policy_version else ""
    digest = f" ({info.policy_hash[:19]})" if info.policy_hash else ""
    return f"policy {_unknown(info.policy_id)}{version}{digest}"


def _provenance_text(info: PredictionsInfo) -> list[str]:
    """Who made the predictions, and (for a file) how they matched the labels."""
    models = ("models " if len(info.models) > 1 else "model ") + (
        ", ".join(info.models) or "unknown"
    )
    decodings = [describe_decoding(d) for d in info.decodings]
    decoding = "decoding " + ("; ".join(decodings) if decodings else "unknown")
    lines = [
        f"made by: {models}; backend {_unknown(info.backend)}; {decoding}; "
        f"mode {_unknown(info.mode)}; {_policy_text(info)}"
    ]
    match = info.matching
    if match is not None:
        unit = {"assess": "Decision lines", "minimal": "lines"}.get(info.format or "", "rows")
        if match.by == "source":
            where = ", then ".join(match.relative_to or [])
            how = f"matched by image path (relative paths tried in {where})"
            what = "name a labelled image"
        else:
            how, what = "matched by id", "have a labelled id"
        line = f"{how}: {match.matched} of {match.records} {unit} {what}"
        if match.unmatched:
            shown = _ids(match.unmatched_examples, match.unmatched)
            line += f"; {match.unmatched} ignored: {shown}"
        lines.append(line)
    return lines


def _origin(info: PredictionsInfo) -> str:
    if info.kind == "backend":
        saved = f", saved to {info.path}" if info.path else ""
        return f"backend {info.backend} (mode {info.mode}){saved}"
    kind = f" ({KIND_NAMES[info.format]})" if info.format else ""
    return f"predictions {info.path}{kind}"


def render_text(report: EvalReport) -> str:
    """The report for people: warnings first, aligned columns, undefined ratios as n/a."""
    labels, policy, source = report.labels, report.policy, report.predictions
    lines = [f"WARNING: {warning}" for warning in report.warnings()]
    lines += [
        f"eval: {labels.path} ({labels.samples} samples: {labels.unsafe} Unsafe, "
        f"{labels.safe} Safe)",
        f"policy {policy.id} v{policy.version} ({policy.hash[:19]}), {_origin(source)}",
        *_provenance_text(source),
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
    if report.judges is not None:
        lines += ["", *_judges_text(report.judges)]
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
        if other.kappa is not None:
            lines.append(f"  {_kappa_text(other.kappa)}")
        lines += [
            "",
            f"B: {_origin(other.predictions)}",
            *_provenance_text(other.predictions),
            *_evaluation_text(other.other),
        ]
        if other.judges is not None:
            lines += ["", *_judges_text(other.judges)]
    return "\n".join(lines) + "\n"


def _kappa_text(kappa: Kappa) -> str:
    return (
        f"agreement of {kappa.a} and {kappa.b} on ratings: Cohen's kappa "
        f"{_number(kappa.kappa, 0)}, observed {_number(kappa.agreement, 0)} "
        f"over {kappa.compared} samples rated by both"
    )


def _judges_text(agreement: JudgeAgreement) -> list[str]:
    """The pairwise agreement of a composite backend's judges."""
    lines = [
        f"judges' agreement (Cohen's kappa on ratings; {agreement.items} samples recorded "
        f"judges: {', '.join(agreement.judges)})",
        f"  {'judge A':<16}{'judge B':<16}{'rated both':>11}{'observed':>9}{'kappa':>8}",
    ]
    for pair in agreement.pairs:
        lines.append(
            f"  {pair.a:<16}{pair.b:<16}{pair.compared:>11}{_number(pair.agreement, 9)}"
            f"{_number(pair.kappa, 8)}"
        )
    return lines
