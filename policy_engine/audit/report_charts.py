"""The HTML report's charts: bar charts as HTML (labels never clipped), the `p_unsafe`
histogram as inline SVG, and the legends that say what each colour means.

Colours are CSS classes (`unsafe`, `safe`, `error`, `neutral`, `action`) defined by the page's
stylesheet (`report_html`).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from .summary import Histogram

__all__ = ["Bar", "Segment", "bar_chart", "histogram_chart", "legend"]


@dataclass(frozen=True)
class Segment:
    """A part of a bar: `count` rows drawn in the colour of `css`."""

    count: int
    css: str


@dataclass(frozen=True)
class Bar:
    """One row of a bar chart: a label (shown whole, wrapped if long), the segments of the
    bar (stacked left to right) and the text beside it (the count by default)."""

    label: str
    segments: tuple[Segment, ...]
    text: str | None = None

    @property
    def total(self) -> int:
        return sum(s.count for s in self.segments)


def bar_chart(bars: list[Bar], *, caption: str, legend_html: str = "", wide: bool = False) -> str:
    """Horizontal bars as an HTML grid (label, bar, count): a label is never cut, it wraps.
    Every bar is scaled to the largest total of the chart; `wide` asks for more room."""
    peak = max((b.total for b in bars), default=0) or 1
    rows = []
    for bar in bars:
        segments = "".join(
            f'<span class="seg {_e(s.css)}" style="width:{100 * s.count / peak:.2f}%"></span>'
            for s in bar.segments
            if s.count
        )
        text = bar.text if bar.text is not None else str(bar.total)
        rows.append(
            f'<div class="bar-label">{_e(bar.label)}</div>'
            f'<div class="bar-track" aria-hidden="true">{segments}</div>'
            f'<div class="bar-count">{_e(text)}</div>'
        )
    css = "chart wide" if wide else "chart"
    return (
        f'<figure class="{css}"><figcaption>{_e(caption)}</figcaption>'
        f'<div class="bars">{"".join(rows)}</div>{legend_html}</figure>'
    )


def legend(items: list[tuple[str, str]], note: str = "") -> str:
    """A legend: (css class, meaning) per colour, and a sentence on how to read the chart."""
    keys = "".join(
        f'<li><span class="key {_e(css)}" aria-hidden="true"></span>{_e(text)}</li>'
        for css, text in items
    )
    extra = f"<p>{_e(note)}</p>" if note else ""
    return f'<div class="legend"><ul>{keys}</ul>{extra}</div>'


def histogram_chart(hist: Histogram, *, caption: str) -> str:
    """`p_unsafe` in bins over [0, 1]: each bar stacks the rows rated Unsafe (on top) over the
    others, with the bin edges below and a legend."""
    left, bin_width, plot, bottom = 40, 30, 120, 34
    width = left + bin_width * hist.bins + 10
    height = plot + bottom
    peak = max(hist.counts) or 1
    parts = [
        f'<text x="{left - 4}" y="12" text-anchor="end">{peak}</text>',
        f'<text x="{left - 4}" y="{plot}" text-anchor="end">0</text>',
        f'<line class="axis" x1="{left}" y1="{plot}" x2="{width - 10}" y2="{plot}"></line>',
    ]
    edges = hist.edges
    for i, count in enumerate(hist.counts):
        x = left + i * bin_width
        unsafe = hist.unsafe_counts[i]
        other = count - unsafe
        scale = (plot - 6) / peak
        low = max(other * scale, 1.0) if other else 0.0
        high = max(unsafe * scale, 1.0) if unsafe else 0.0
        title = f"{edges[i]:.1f} to {edges[i + 1]:.1f}: {count} rows, {unsafe} rated Unsafe"
        parts.append(
            f"<g><title>{_e(title)}</title>"
            f'<rect class="safe" x="{x + 2}" y="{plot - low:.1f}" width="{bin_width - 4}" '
            f'height="{low:.1f}"></rect>'
            f'<rect class="unsafe" x="{x + 2}" y="{plot - low - high:.1f}" '
            f'width="{bin_width - 4}" height="{high:.1f}"></rect></g>'
        )
    for i in range(0, hist.bins + 1, 2):
        x = left + i * bin_width
        parts.append(f'<text x="{x}" y="{plot + 16}" text-anchor="middle">{edges[i]:.1f}</text>')
    parts.append(
        f'<text x="{left + bin_width * hist.bins / 2}" y="{plot + 30}" '
        'text-anchor="middle">p_unsafe</text>'
    )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{_e(caption)}">'
        f"{''.join(parts)}</svg>"
    )
    key = legend(
        [("unsafe", "rated Unsafe (final rating)"), ("safe", "not rated Unsafe")],
        "Rows per p_unsafe bin (the model's probability of Unsafe); the tallest bar is "
        f"{peak} {'row' if peak == 1 else 'rows'}.",
    )
    return (
        f'<figure class="chart histogram"><figcaption>{_e(caption)}</figcaption>{svg}{key}</figure>'
    )


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)
