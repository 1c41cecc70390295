"""The report of an audit as one self-contained HTML page: `render_html` of a `Summary`.

Inline CSS, inline SVG charts and thumbnails as JPEG data URLs: the page needs nothing but a
browser and prints cleanly.

Only the standard library and policy_engine are imported here; Pillow is imported when
thumbnails are made.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import UTC, datetime
from pathlib import Path

from ..errors import ImageError
from .summary import CategoryStats, Example, Histogram, Summary, clip, percent, utc_time

__all__ = ["render_html"]


def render_html(summary: Summary, *, thumb_size: int = 160, base_dir: Path | None = None) -> str:
    """The HTML page for a summary (thumbnails are made from the examples' sources)."""
    thumbs = _Thumbnailer(thumb_size, base_dir)
    title = f"Audit report: {summary.policy_id or Path(summary.file).name}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        _html_header(summary, title),
    ]
    if not summary.rows:
        parts.append('<p class="empty">no results yet</p>')
    else:
        parts += [
            _html_nav(summary),
            _html_totals(summary),
            _html_overview(summary),
            _html_errors(summary),
        ]
        for index, stats in enumerate(summary.categories.values()):
            parts.append(_html_category(summary, stats, index, thumbs))
    parts += [
        f"<footer>Generated {_e(utc_time(datetime.now(UTC).timestamp()))} by policy-engine report"
        f" from {_e(summary.file)}.</footer>",
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def _html_header(summary: Summary, title: str) -> str:
    meta = summary.meta
    throughput = ""
    if summary.throughput:
        t = summary.throughput
        basis = "audit start to finish" if t.basis == "meta" else "first to last row written"
        throughput = f"{t.images_per_second:.2f} images/s ({basis}, {t.seconds:.1f} s)"
    rows = [
        ("Policy", summary.policy_id),
        ("Version", summary.policy_version),
        ("Hash", summary.policy_hash),
        ("Backend", meta.get("backend")),
        ("Mode", meta.get("mode")),
        ("Source", meta.get("source")),
        ("Shard", meta.get("shard")),
        ("Started", utc_time(summary.started)),
        ("Finished", utc_time(summary.finished)),
        ("Rows written", _span(summary.first_row, summary.last_row)),
        ("Throughput", throughput),
        ("Results file", summary.file),
    ]
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows if v)
    return f"<header><h1>{_e(title)}</h1><dl>{items}</dl></header>"


def _html_nav(summary: Summary) -> str:
    links = ['<a href="#totals">Totals</a>']
    if summary.error_groups:
        links.append('<a href="#errors">Errors</a>')
    for index, stats in enumerate(summary.categories.values()):
        links.append(f'<a href="#{_anchor(index)}">{_e(stats.id)}</a>')
    return f"<nav>{' · '.join(links)}</nav>"


def _html_totals(summary: Summary) -> str:
    done = str(summary.rows)
    if summary.expected is not None:
        done += f" of {summary.expected}"
    cells = [
        ("Rows", done),
        ("OK", str(summary.ok)),
        ("Errors", str(summary.errors)),
        ("Flagged (Unsafe)", f"{summary.flagged} ({percent(summary.flagged, summary.rows)})"),
    ]
    if summary.p_unsafe.count and summary.p_unsafe.mean is not None:
        cells.append(("Mean p_unsafe", f"{summary.p_unsafe.mean:.3f}"))
    if summary.generation_seconds is not None:
        cells.append(("Model time", f"{summary.generation_seconds:.1f} s"))
    body = "".join(f'<div class="tile"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v in cells)
    return f'<section id="totals"><h2>Totals</h2><div class="tiles">{body}</div></section>'


def _html_overview(summary: Summary) -> str:
    charts = []
    categories = [
        (_category_label(c), c.rows, "unsafe" if c.flagged else "neutral")
        for c in summary.categories.values()
    ]
    if categories:
        charts.append(_figure("Rows per category", _bar_chart(categories)))
    ratings = [(k, v, _rating_class(k)) for k, v in summary.ratings.most_common()]
    if summary.errors:
        ratings.append(("error", summary.errors, "error"))
    if ratings:
        charts.append(_figure("Rows per rating", _bar_chart(ratings)))
    if summary.severities:
        severities = [(k, v, "neutral") for k, v in summary.severities.most_common()]
        charts.append(_figure("Rows per severity", _bar_chart(severities)))
    if summary.actions:
        actions = [(k, v, "action") for k, v in summary.actions.most_common()]
        charts.append(_figure("Rows per action", _bar_chart(actions)))
    if summary.p_unsafe.count:
        charts.append(_figure("p_unsafe, all rows", _histogram_chart(summary.p_unsafe)))
    body = "".join(charts)
    return f'<section id="overview"><h2>Overview</h2><div class="charts">{body}</div></section>'


def _html_errors(summary: Summary) -> str:
    if not summary.error_groups:
        return ""
    rows = []
    for kind, group in summary.error_groups.items():
        examples = "".join(
            f"<li><code>{_e(e['id'])}</code>: {_e(e['message'])}</li>" for e in group.examples
        )
        rows.append(
            f"<tr><th>{_e(kind)}</th><td>{group.count}</td><td><ul>{examples}</ul></td></tr>"
        )
    return (
        '<section id="errors"><h2>Errors</h2><table><thead><tr><th>Kind</th><th>Rows</th>'
        f"<th>Examples</th></tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def _html_category(summary: Summary, stats: CategoryStats, index: int, thumbs: _Thumbnailer) -> str:
    heading = _e(stats.id) + (f" — {_e(stats.name)}" if stats.name else "")
    facts = [f"{stats.rows} rows", f"{stats.flagged} flagged"]
    if stats.policy_severity:
        facts.append(f"policy severity {stats.policy_severity}")
    if not stats.in_policy and summary.policy:
        facts.append("not in the policy")
    if stats.p_unsafe.count:
        chart = _figure("p_unsafe", _histogram_chart(stats.p_unsafe))
    else:
        split = [(k, v, _rating_class(k)) for k, v in stats.ratings.most_common()]
        chart = _figure("Ratings", _bar_chart(split)) if split else ""
    if stats.examples:
        shown = len(stats.examples)
        how = (
            f"all {shown} flagged"
            if shown == stats.flagged
            else f"{shown} of {stats.flagged} flagged, sampled uniformly"
        )
        figures = "".join(_html_example(e, thumbs) for e in stats.examples)
        gallery = f'<p class="note">{_e(how)}</p><div class="thumbs">{figures}</div>'
    elif stats.flagged:
        gallery = '<p class="note">thumbnails switched off</p>'
    else:
        gallery = '<p class="note">no flagged images in this category</p>'
    return (
        f'<section class="category" id="{_anchor(index)}"><h2>{heading}</h2>'
        f'<p class="facts">{_e(" · ".join(facts))}</p>{chart}{gallery}</section>'
    )


def _html_example(example: Example, thumbs: _Thumbnailer) -> str:
    data_url, reason = thumbs.get(example.source)
    tooltip = example.rationale or ""
    if data_url is not None:
        picture = f'<img src="{data_url}" alt="{_e(example.id)}" title="{_e(tooltip)}">'
    else:
        picture = (
            f'<div class="placeholder" role="img" aria-label="{_e("no thumbnail: " + reason)}" '
            f'title="{_e(example.source)}">no thumbnail<br>{_e(reason)}</div>'
        )
    details = [example.rating or "no rating"]
    if example.p_unsafe is not None:
        details.append(f"p_unsafe {example.p_unsafe:.3f}")
    if example.severity:
        details.append(example.severity)
    actions = ", ".join(example.actions) if example.actions else "no action"
    rationale = f'<span class="why">{_e(example.rationale)}</span>' if example.rationale else ""
    return (
        f'<figure class="thumb">{picture}<figcaption><code>{_e(example.id)}</code>'
        f"<span>{_e(' · '.join(details))}</span><span>{_e(actions)}</span>"
        f'<span class="src">{_e(example.source)}</span>{rationale}</figcaption></figure>'
    )


def _figure(caption: str, svg: str) -> str:
    return f'<figure class="chart">{svg}<figcaption>{_e(caption)}</figcaption></figure>'


def _bar_chart(items: list[tuple[str, int, str]]) -> str:
    """Horizontal bars: (label, count, css class) each."""
    label_width, bar_width, count_width, row = 190, 260, 80, 22
    width = label_width + bar_width + count_width
    height = row * len(items) + 8
    peak = max((count for _, count, _ in items), default=0) or 1
    bars = []
    for i, (label, count, css) in enumerate(items):
        y = 4 + i * row
        length = max(1.0, bar_width * count / peak) if count else 0.0
        short = label if len(label) <= 28 else label[:27] + "…"
        bars.append(
            f"<g><title>{_e(label)}: {count}</title>"
            f'<text x="{label_width - 6}" y="{y + 15}" text-anchor="end">{_e(short)}</text>'
            f'<rect class="{css}" x="{label_width}" y="{y + 3}" width="{length:.1f}" '
            f'height="{row - 6}"></rect>'
            f'<text x="{label_width + length + 4:.1f}" y="{y + 15}">{count}</text></g>'
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img">{"".join(bars)}</svg>'
    )


def _histogram_chart(hist: Histogram) -> str:
    """Vertical bars over [0, 1], one per bin, with the bin edges below."""
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
        bar = (plot - 6) * count / peak
        if count:
            bar = max(bar, 1.0)
        css = "unsafe" if edges[i] >= 0.5 else "safe"
        parts.append(
            f"<g><title>{edges[i]:.1f} to {edges[i + 1]:.1f}: {count}</title>"
            f'<rect class="{css}" x="{x + 2}" y="{plot - bar:.1f}" width="{bin_width - 4}" '
            f'height="{bar:.1f}"></rect></g>'
        )
    for i in range(0, hist.bins + 1, 2):
        x = left + i * bin_width
        parts.append(f'<text x="{x}" y="{plot + 16}" text-anchor="middle">{edges[i]:.1f}</text>')
    parts.append(
        f'<text x="{left + bin_width * hist.bins / 2}" y="{plot + 30}" '
        'text-anchor="middle">p_unsafe</text>'
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img">{"".join(parts)}</svg>'
    )


class _Thumbnailer:
    """Thumbnails as JPEG data URLs, or the reason there is none; cached per source."""

    def __init__(self, size: int, base_dir: Path | None) -> None:
        self.size = size
        self.base_dir = base_dir
        self.cache: dict[str, tuple[str | None, str]] = {}

    def get(self, source: str) -> tuple[str | None, str]:
        if source not in self.cache:
            self.cache[source] = self._make(source)
        return self.cache[source]

    def _make(self, source: str) -> tuple[str | None, str]:
        lowered = source.lower()
        if lowered.startswith("data:") or source.startswith("<"):
            return None, "not a file: an in-memory image or data URL"
        if "://" in source:
            return None, "not a local file (a URL; the report never downloads)"
        path = self._find(source)
        if path is None:
            return None, "file not found (moved, deleted, or not a file path)"
        from ..images import describe_source, load_image

        try:
            image = load_image(str(path)).image
            image.thumbnail((self.size, self.size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
        except ImageError as err:
            prefix = f"cannot load image {describe_source(str(path))}: "
            message = str(err)
            return None, message[len(prefix) :] if message.startswith(prefix) else message
        except (OSError, ValueError) as err:
            return None, f"cannot make a thumbnail: {clip(str(err), 120)}"
        payload = base64.b64encode(buffer.getvalue()).decode("ascii")
        return f"data:image/jpeg;base64,{payload}", ""

    def _find(self, source: str) -> Path | None:
        try:
            candidate = Path(source).expanduser()
            if candidate.is_file():
                return candidate
            if self.base_dir is not None and not candidate.is_absolute():
                relative = self.base_dir / candidate
                if relative.is_file():
                    return relative
        except (OSError, ValueError):  # ValueError: a NUL character in the "path"
            return None
        return None


_CSS = """
:root { --safe: #2e7d32; --unsafe: #c62828; --neutral: #1565c0; --error: #6d4c41;
  --action: #6a1b9a; --line: #ddd; --muted: #666; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
  margin: 0 auto; max-width: 1200px; padding: 16px 24px; }
h1 { font-size: 22px; margin: 0 0 8px; }
h2 { font-size: 18px; border-bottom: 1px solid var(--line); padding-bottom: 4px; margin-top: 28px; }
header dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
header dt { color: var(--muted); }
header dd { margin: 0; overflow-wrap: anywhere; }
nav { margin: 16px 0; overflow-wrap: anywhere; }
nav a { color: var(--neutral); text-decoration: none; }
.tiles { display: flex; flex-wrap: wrap; gap: 12px; }
.tile { border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.tile b { display: block; font-size: 20px; }
.tile span { color: var(--muted); }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; }
figure.chart { border: 1px solid var(--line); border-radius: 6px; padding: 8px; }
figure.chart figcaption { color: var(--muted); text-align: center; }
svg { max-width: 100%; height: auto; font-size: 12px; }
svg text { fill: #222; }
svg .axis { stroke: #999; }
.safe { fill: var(--safe); } .unsafe { fill: var(--unsafe); } .neutral { fill: var(--neutral); }
.error { fill: var(--error); } .action { fill: var(--action); }
table { border-collapse: collapse; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
td ul { margin: 0; padding-left: 18px; }
.facts, .note { color: var(--muted); }
.empty { font-size: 18px; color: var(--muted); }
.thumbs { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 12px; }
.thumb { border: 1px solid var(--line); border-radius: 6px; padding: 6px; break-inside: avoid; }
.thumb img, .placeholder { display: block; margin: 0 auto; max-width: 100%; }
.placeholder { width: 160px; height: 120px; background: #f3f3f3; border: 1px dashed #aaa;
  color: var(--muted); display: flex; align-items: center; justify-content: center;
  text-align: center; padding: 8px; font-size: 12px; overflow: hidden; }
.thumb figcaption { font-size: 12px; margin-top: 4px; overflow-wrap: anywhere; }
.thumb figcaption span, .thumb figcaption code { display: block; }
.thumb .src { color: var(--muted); }
.thumb .why { max-height: 7.5em; overflow: auto; border-top: 1px solid var(--line);
  margin-top: 4px; padding-top: 4px; }
footer { margin-top: 32px; color: var(--muted); font-size: 12px; }
@media print {
  body { max-width: none; padding: 0; }
  nav { display: none; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  section.category { break-before: page; }
  .thumb .why { max-height: none; overflow: visible; }
  figure { break-inside: avoid; }
}
"""


# --- helpers ----------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _anchor(index: int) -> str:
    return f"category-{index + 1}"


def _category_label(stats: CategoryStats) -> str:
    return f"{stats.id} {stats.name}" if stats.name else stats.id


def _rating_class(rating: str) -> str:
    return {"Safe": "safe", "Unsafe": "unsafe"}.get(rating, "neutral")


def _span(first: float | None, last: float | None) -> str:
    if first is None or last is None:
        return ""
    return f"{utc_time(first)} to {utc_time(last)}"
