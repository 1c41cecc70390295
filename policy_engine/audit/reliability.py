"""Calibration figures of a set of predictions, for `eval` and `calibrate`: ECE, Brier score
and a reliability diagram (equal-width bins), as JSON data, text and an inline SVG.

Only the standard library and pydantic (the measures live in `policy_engine.calibration`).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from pydantic import BaseModel, Field

from ..calibration import DEFAULT_BINS, ReliabilityBin, brier, ece, reliability


class CalibrationFigures(BaseModel):
    """How well P(Unsafe) matches the observed share of Unsafe labels."""

    bins: int = Field(description="Equal-width bins over [0, 1] for ECE and the diagram.")
    ece: float | None = Field(description="Expected calibration error (count-weighted).")
    brier: float | None = Field(description="Mean (p_unsafe - outcome)^2, outcome 1 = Unsafe.")
    reliability: list[ReliabilityBin]

    @classmethod
    def of(
        cls, scores: Sequence[float], labels: Sequence[bool], bins: int = DEFAULT_BINS
    ) -> CalibrationFigures:
        return cls(
            bins=bins,
            ece=ece(scores, labels, bins),
            brier=brier(scores, labels),
            reliability=reliability(scores, labels, bins),
        )


def _cell(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:5.2f}"


def reliability_text(figures: CalibrationFigures, width: int = 20) -> list[str]:
    """One line per bin: range, count, mean score, observed share, and a bar of the observed
    share with `|` at the mean score (a calibrated bin has the bar end at the mark)."""
    lines = [
        f"  {'bin':<11}{'count':>6}{'score':>7}{'observed':>9}  0{' ' * (width - 2)}1",
    ]
    for row in figures.reliability:
        bar = ""
        if row.count and row.observed is not None and row.mean_score is not None:
            cells = ["#" if i < round(row.observed * width) else " " for i in range(width)]
            mark = min(width - 1, int(row.mean_score * width))
            cells[mark] = "|"
            bar = "".join(cells).rstrip()
        lines.append(
            f"  [{row.low:.2f},{row.high:.2f}){row.count:>6}  {_cell(row.mean_score)}"
            f"    {_cell(row.observed)}  {bar}"
        )
    return lines


def reliability_svg(
    series: Sequence[tuple[str, CalibrationFigures]], size: int = 260, title: str = ""
) -> str:
    """A reliability diagram: observed Unsafe share against mean score per bin, one polyline
    per series (e.g. before and after calibration), the diagonal for perfect calibration."""
    pad = 30
    span = size - 2 * pad

    def x(v: float) -> float:
        return pad + v * span

    def y(v: float) -> float:
        return size - pad - v * span

    colours = ("#c0392b", "#2471a3", "#229954", "#7d3c98")
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size + 20 * len(series)}"'
        f' role="img" aria-label="{escape(title or "reliability diagram")}">',
        f'<rect x="{pad}" y="{pad}" width="{span}" height="{span}" fill="none" stroke="#999"/>',
        f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(1)}" y2="{y(1)}" stroke="#bbb" '
        'stroke-dasharray="4 3"/>',
        f'<text x="{size / 2}" y="{size - 6}" font-size="11" text-anchor="middle">'
        "mean P(Unsafe) in bin</text>",
        f'<text x="10" y="{size / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 10 {size / 2})">observed Unsafe share</text>',
    ]
    for index, (name, figures) in enumerate(series):
        colour = colours[index % len(colours)]
        points = [
            (x(b.mean_score), y(b.observed))
            for b in figures.reliability
            if b.count and b.mean_score is not None and b.observed is not None
        ]
        if points:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}"/>')
            parts += [
                f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{colour}"/>'
                for px, py in points
            ]
        ece_text = "n/a" if figures.ece is None else f"{figures.ece:.3f}"
        parts.append(
            f'<text x="{pad}" y="{size + 14 + 20 * index}" font-size="12" fill="{colour}">'
            f"{escape(name)}: ECE {ece_text}</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts)
