"""The HTML page of `policy-engine eval --format html`: one self-contained file (inline styles
and SVG, nothing fetched) with the headline metrics, the confusion matrix, the per-category
table, the reliability diagram of p_unsafe (A and B with --compare) and the threshold sweep.
"""

from __future__ import annotations

from html import escape

from .eval_report import _METRIC_LINES, EvalReport, _origin, _provenance_text
from .metrics import Evaluation
from .reliability import CalibrationFigures, reliability_svg
from .report_style import CSS

TABLE_CSS = """
table.grid { border-collapse: collapse; margin: 8px 0; }
table.grid th, table.grid td { border: 1px solid var(--line); padding: 2px 8px; text-align: right; }
table.grid th:first-child, table.grid td:first-child { text-align: left; }
"""


def _n(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _e(value: object) -> str:
    return escape(str(value))


def _table(head: list[str], rows: list[list[str]]) -> str:
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="grid"><tr>{header}</tr>{body}</table>'


def _headline(report: EvalReport) -> str:
    runs: list[tuple[str, Evaluation]] = [("A" if report.compare else "value", report.evaluation)]
    if report.compare is not None:
        runs.append(("B", report.compare.other))
    keys = [(key, label) for key, label in _METRIC_LINES]
    keys += [("roc_auc", "ROC-AUC"), ("ece", "ECE"), ("brier", "Brier score")]
    rows = []
    for key, label in keys:
        row = [label, *(_n(evaluation.values()[key]) for _, evaluation in runs)]
        if report.compare is not None:
            row.append(_n(report.compare.difference.get(key)))
        rows.append(row)
    head = ["metric", *(name for name, _ in runs)] + (["B - A"] if report.compare else [])
    return _table(head, rows)


def _reliability(report: EvalReport) -> str:
    series: list[tuple[str, CalibrationFigures]] = []
    for name, evaluation in [("A", report.evaluation)] + (
        [("B", report.compare.other)] if report.compare is not None else []
    ):
        scores = evaluation.scores
        if scores is not None and scores.calibration is not None:
            series.append((name if report.compare else "p_unsafe", scores.calibration))
    if not series:
        return "<p class='muted'>No prediction carries p_unsafe.</p>"
    parts = [reliability_svg(series, size=320, title="reliability diagram")]
    for name, figures in series:
        rows = [
            [f"[{b.low:.2f}, {b.high:.2f})", str(b.count), _n(b.mean_score), _n(b.observed)]
            for b in figures.reliability
        ]
        parts.append(f"<h3>{_e(name)}: ECE {_n(figures.ece)}, Brier {_n(figures.brier)}</h3>")
        parts.append(_table(["bin", "count", "mean p_unsafe", "observed Unsafe share"], rows))
    return "\n".join(parts)


def render_html(report: EvalReport) -> str:
    """The whole page."""
    evaluation = report.evaluation
    labels, policy = report.labels, report.policy
    banner = "".join(
        f'<div class="banner"><strong>warning</strong><p>{_e(w)}</p></div>'
        for w in report.warnings()
    )
    lines = _provenance_text(report.predictions)
    provenance = (
        "<dd>" + "<br>".join(_e(line.removeprefix("made by: ")) for line in lines) + "</dd>"
    )
    c = evaluation.coverage
    rating = evaluation.confusion.rating
    confusion = _table(
        ["labelled \\ predicted", *next(iter(rating.values()), {}).keys()],
        [[row, *(str(v) for v in cells.values())] for row, cells in rating.items()],
    )
    per_category = _table(
        ["category", "support", "unsafe", "recall", "category accuracy", "accuracy"],
        [
            [
                r.category,
                str(r.support),
                str(r.unsafe),
                _n(r.recall),
                _n(r.category_accuracy),
                _n(r.accuracy),
            ]
            for r in evaluation.per_category
        ],
    )
    sweep = ""
    if evaluation.scores is not None:
        sweep = "<h2>Threshold sweep (Unsafe when p_unsafe &ge; threshold)</h2>" + _table(
            ["threshold", "recall", "specificity", "precision", "F1", "balanced accuracy"],
            [
                [
                    f"{p.threshold:.2f}",
                    _n(p.recall),
                    _n(p.specificity),
                    _n(p.precision),
                    _n(p.f1),
                    _n(p.balanced_accuracy),
                ]
                for p in evaluation.scores.sweep
            ],
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>eval: {_e(labels.path)}</title>
<style>{CSS}{TABLE_CSS}</style></head>
<body><div class="page">
{banner}
<header><h1>eval: {_e(labels.path)}</h1><dl>
<dt>labels</dt><dd>{labels.samples} samples: {labels.unsafe} Unsafe, {labels.safe} Safe</dd>
<dt>policy</dt><dd>{_e(policy.id)} v{_e(policy.version)} ({_e(policy.hash[:19])})</dd>
<dt>predictions</dt><dd>{_e(_origin(report.predictions))}</dd>
<dt>made by</dt>{provenance}
<dt>coverage</dt><dd>{c.predicted} predicted, {c.missing} missing, {c.invalid} invalid</dd>
</dl></header>
<h2>Metrics (Unsafe is the positive class)</h2>
{_headline(report)}
<h2>Rating confusion</h2>
{confusion}
<h2>Per category</h2>
{per_category}
<h2>Reliability of p_unsafe</h2>
<p class="muted">Per equal-width bin of p_unsafe: the observed share of Unsafe labels against
the bin's mean score. On the dashed diagonal the scores are calibrated; below it they are
overconfident about Unsafe.</p>
{_reliability(report)}
{sweep}
</div></body></html>
"""
