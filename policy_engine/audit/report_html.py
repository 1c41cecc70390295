"""The report of a results file as one self-contained HTML page: `render_html` of a `Summary`.

Inline CSS, HTML and inline-SVG charts with legends, thumbnails as JPEG data URLs: the page
needs nothing but a browser, runs no JavaScript, and prints cleanly. Flagged thumbnails are
blurred until clicked (a CSS checkbox per thumbnail, and one for the whole page); a sample of
Safe images sits beside them to spot-check. The header says which model and decoding made the
verdicts, and a banner at the very top warns when the model has random weights.

Only the standard library and policy_engine are imported here; Pillow is imported when
thumbnails are made.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from pathlib import Path

from .report_charts import Bar, Segment, bar_chart, histogram_chart, legend
from .report_style import CSS
from .report_thumbs import Thumbnailer
from .summary import CategoryStats, Example, Summary, duration, percent, utc_time

__all__ = ["render_html"]

_RATING_LEGEND = [
    ("unsafe", "Unsafe: flagged (the final rating, after the policy's post-processors)"),
    ("safe", "Safe"),
    ("error", "error: no usable verdict"),
]


def render_html(summary: Summary, *, thumb_size: int = 160, base_dir: Path | None = None) -> str:
    """The HTML page for a summary (thumbnails are made from the examples' sources)."""
    thumbs = Thumbnailer(thumb_size, base_dir)
    title = f"Audit report: {summary.policy_id or Path(summary.file).name}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        # Before the page, so that CSS can reveal every flagged thumbnail when it is checked.
        '<input type="checkbox" id="reveal-all" class="toggle">',
        '<div class="page">',
        _html_banner(summary),
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
            summary.shadow.html_section(),
        ]
        for index, stats in enumerate(summary.categories.values()):
            parts.append(_html_category(summary, stats, index, thumbs))
        parts.append(_html_safe_sample(summary, thumbs))
    parts += [
        f"<footer>Generated {_e(utc_time(datetime.now(UTC).timestamp()))} by policy-engine report"
        f" from {_e(summary.file)}.</footer>",
        "</div>",
        "</body>",
        "</html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def _html_banner(summary: Summary) -> str:
    if not summary.warnings:
        return ""
    items = "".join(f"<p>{_e(w)}</p>" for w in summary.warnings)
    return f'<div class="banner" role="alert"><strong>Warning</strong>{items}</div>'


def _html_header(summary: Summary, title: str) -> str:
    meta = summary.meta
    provenance = summary.provenance
    throughput = ""
    if summary.throughput:
        t = summary.throughput
        basis = (
            "audit start to finish"
            if t.basis == "meta"
            else "estimated from the rows: first batch's start to last row"
        )
        throughput = f"{t.images_per_second:.2f} images/s ({duration(t.seconds)}, {basis})"
    policy = summary.policy_id or ""
    if policy and summary.policy_version:
        policy += f" v{summary.policy_version}"
    decoding = _e(provenance.decoding_text)
    chosen = provenance.decoding
    if (
        isinstance(chosen, dict)
        and chosen.get("method") == "sampling"
        and chosen.get("seed") is None
    ):
        decoding += (
            ' <span class="muted">(sampled, no seed: a rerun may give other verdicts)</span>'
        )
    elif provenance.decoding == "mixed":
        decoding += ' <span class="muted">(rows were decoded differently)</span>'
    model = _e(provenance.model or "not recorded")
    if provenance.random_weights:
        model += ' <span class="tag unsafe">random weights</span>'
    rows = [
        ("Model", model),
        ("Decoding", decoding),
        ("Backend", _e(meta.get("backend") or "")),
        ("Mode", _e(meta.get("mode") or "")),
        ("Policy", _e(policy)),
        ("Policy hash", _e(summary.policy_hash or "")),
        ("Source", _e(meta.get("source") or "")),
        ("Shard", _e(meta.get("shard") or "")),
        ("Started", _e(utc_time(summary.started))),
        ("Finished", _e(utc_time(summary.finished))),
        ("Rows written", _e(_span(summary.first_row, summary.last_row))),
        ("Throughput", _e(throughput)),
        ("Results file", _e(summary.file)),
    ]
    items = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in rows if v)
    return f'<header><h1>{_e(title)}</h1><dl class="provenance">{items}</dl></header>'


def _html_nav(summary: Summary) -> str:
    links = ['<a href="#totals">Totals</a>', '<a href="#overview">Charts</a>']
    if summary.error_groups:
        links.append('<a href="#errors">Errors</a>')
    if summary.shadow.sources:
        links.append('<a href="#shadow">Shadow vs live</a>')
    for index, stats in enumerate(summary.categories.values()):
        links.append(f'<a href="#{_anchor(index)}">{_e(stats.id)}</a>')
    links.append('<a href="#safe-sample">Safe sample</a>')
    reveal = (
        '<label for="reveal-all" class="button"><span class="when-blurred">Reveal all flagged '
        'thumbnails</span><span class="when-revealed">Blur flagged thumbnails again</span></label>'
    )
    return f"<nav>{' · '.join(links)}{reveal}</nav>"


def _html_totals(summary: Summary) -> str:
    done = str(summary.rows)
    if summary.expected is not None:
        done += f" of {summary.expected}"
    cells = [
        ("Rows", done),
        ("OK", str(summary.ok)),
        ("Errors", str(summary.errors)),
        ("Flagged (Unsafe)", f"{summary.flagged} ({percent(summary.flagged, summary.rows)})"),
        ("Safe", f"{summary.safe} ({percent(summary.safe, summary.rows)})"),
    ]
    if summary.p_unsafe.count and summary.p_unsafe.mean is not None:
        cells.append(("Mean p_unsafe", f"{summary.p_unsafe.mean:.3f}"))
    if summary.generation_seconds is not None:
        cells.append(("Model time", f"{summary.generation_seconds:.1f} s"))
    body = "".join(f'<div class="tile"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v in cells)
    return f'<section id="totals"><h2>Totals</h2><div class="tiles">{body}</div></section>'


def _html_overview(summary: Summary) -> str:
    charts = []
    if summary.categories:
        bars = [
            Bar(
                _category_label(c),
                (Segment(c.flagged, "unsafe"), Segment(c.ratings.get("Safe", 0), "safe")),
                f"{c.flagged} flagged of {c.rows}",
            )
            for c in summary.categories.values()
        ]
        key = legend(
            [("unsafe", "flagged: final rating Unsafe"), ("safe", "Safe")],
            "A bar is every row whose verdict named the category; its red part is the rows "
            "flagged in it, its green part the Safe rows that named it (e.g. the none-applying "
            "category). Error rows name no category.",
        )
        charts.append(
            bar_chart(
                bars, caption="Rows per category: flagged and all", legend_html=key, wide=True
            )
        )
    ratings = [
        Bar(k, (Segment(v, _rating_class(k)),), f"{v} ({percent(v, summary.rows)})")
        for k, v in summary.ratings.most_common()
    ]
    if summary.errors:
        text = f"{summary.errors} ({percent(summary.errors, summary.rows)})"
        ratings.append(Bar("error", (Segment(summary.errors, "error"),), text))
    if ratings:
        key = legend(_rating_legend(ratings))
        charts.append(bar_chart(ratings, caption="Rows per rating", legend_html=key))
    severities = summary.severities_in_order()
    if severities:
        bars = [Bar(k, (Segment(v, "neutral"),)) for k, v in severities]
        key = legend([], "In the policy's severity scale, lowest first (not by count).")
        charts.append(bar_chart(bars, caption="Rows per severity", legend_html=key))
    if summary.actions:
        bars = [Bar(k, (Segment(v, "action"),)) for k, v in summary.actions.most_common()]
        key = legend([], "Rows carrying each action; a row may carry several.")
        charts.append(bar_chart(bars, caption="Rows per action", legend_html=key))
    if summary.p_unsafe.count:
        charts.append(histogram_chart(summary.p_unsafe, caption="p_unsafe, all rows"))
    body = "".join(charts)
    return f'<section id="overview"><h2>Charts</h2><div class="charts">{body}</div></section>'


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


def _html_category(summary: Summary, stats: CategoryStats, index: int, thumbs: Thumbnailer) -> str:
    heading = _e(stats.id) + (f" — {_e(stats.name)}" if stats.name else "")
    facts = [_rows(stats.rows), f"{stats.flagged} flagged"]
    if stats.policy_severity:
        facts.append(f"policy severity {stats.policy_severity}")
    if not stats.in_policy and summary.policy:
        facts.append("not in the policy")
    if stats.p_unsafe.count:
        chart = histogram_chart(stats.p_unsafe, caption="p_unsafe of its rows")
    else:
        split = [
            Bar(k, (Segment(v, _rating_class(k)),), f"{v} ({percent(v, stats.rows)})")
            for k, v in stats.ratings.most_common()
        ]
        key = legend(_rating_legend(split))
        chart = bar_chart(split, caption="Its rows per rating", legend_html=key) if split else ""
    if stats.examples:
        shown = len(stats.examples)
        how = (
            f"all {shown} flagged"
            if shown == stats.flagged
            else f"{shown} of {stats.flagged} flagged, sampled uniformly"
        )
        figures = "".join(_html_example(e, thumbs, blurred=True) for e in stats.examples)
        gallery = (
            f'<p class="note">{_e(how)}; blurred: click a picture to reveal it</p>'
            f'<div class="thumbs">{figures}</div>'
        )
    elif stats.flagged:
        gallery = '<p class="note">thumbnails switched off</p>'
    elif stats.ratings.get("Safe"):
        gallery = (
            '<p class="note">no flagged images in this category; its Safe images may be in '
            '<a href="#safe-sample">the Safe sample</a></p>'
        )
    else:
        gallery = '<p class="note">no flagged images in this category</p>'
    return (
        f'<section class="category" id="{_anchor(index)}"><h2>{heading}</h2>'
        f'<p class="facts">{_e(" · ".join(facts))}</p><div class="category-body">'
        f'<div class="charts">{chart}</div><div class="gallery">{gallery}</div></div></section>'
    )


def _html_safe_sample(summary: Summary, thumbs: Thumbnailer) -> str:
    shown = len(summary.safe_examples)
    if shown:
        how = (
            f"all {shown} Safe rows"
            if shown == summary.safe
            else f"{shown} of {summary.safe} Safe rows, sampled uniformly"
        )
        figures = "".join(_html_example(e, thumbs, blurred=False) for e in summary.safe_examples)
        body = (
            f'<p class="note">{_e(how)}, not blurred: what the model let through, to check '
            "that nothing was missed.</p>"
            f'<div class="thumbs">{figures}</div>'
        )
    elif summary.safe:
        body = '<p class="note">thumbnails switched off</p>'
    else:
        body = '<p class="note">no Safe rows</p>'
    return (
        '<section class="sample" id="safe-sample"><h2>Safe images: a sample to spot-check</h2>'
        f"{body}</section>"
    )


def _html_example(example: Example, thumbs: Thumbnailer, *, blurred: bool) -> str:
    data_url, reason = thumbs.get(example.thumb_source)
    tooltip = example.rationale or ""
    if data_url is None:
        picture = (
            f'<div class="placeholder" role="img" aria-label="{_e("no thumbnail: " + reason)}" '
            f'title="{_e(example.source)}">no thumbnail<br>{_e(reason)}</div>'
        )
    elif blurred:
        # A checkbox in the label: a click (or Space) toggles it and CSS lifts the blur.
        picture = (
            '<label class="reveal"><input type="checkbox" class="toggle">'
            f'<img class="blurred" src="{data_url}" alt="{_e(example.id)} (flagged; blurred)" '
            f'title="{_e(tooltip)}"><span class="hint">flagged: click to reveal</span></label>'
        )
    else:
        picture = f'<img src="{data_url}" alt="{_e(example.id)}" title="{_e(tooltip)}">'
    details = [example.rating or "no rating"]
    if example.category_id:
        details.append(example.category_id)
    if example.p_unsafe is not None:
        details.append(f"p_unsafe {example.p_unsafe:.3f}")
    if example.severity:
        details.append(example.severity)
    actions = ", ".join(example.actions) if example.actions else "no action"
    rationale = f'<span class="why">{_e(example.rationale)}</span>' if example.rationale else ""
    if example.parts:  # a video's flagged frames, a post's flagged images
        listed = "".join(f"<li>{_e(part.label())}</li>" for part in example.parts)
        rationale += f'<ul class="parts">{listed}</ul>'
    return (
        f'<figure class="thumb">{picture}<figcaption><code>{_e(example.id)}</code>'
        f"<span>{_e(' · '.join(details))}</span><span>{_e(actions)}</span>"
        f'<span class="src">{_e(example.source)}</span>{rationale}</figcaption></figure>'
    )


# --- helpers ----------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _anchor(index: int) -> str:
    return f"category-{index + 1}"


def _category_label(stats: CategoryStats) -> str:
    return f"{stats.id} {stats.name}" if stats.name else stats.id


def _rating_legend(bars: list[Bar]) -> list[tuple[str, str]]:
    """The rating legend's entries for the colours these bars use."""
    used = {s.css for bar in bars for s in bar.segments}
    return [(css, text) for css, text in _RATING_LEGEND if css in used]


def _rows(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"


def _rating_class(rating: str) -> str:
    return {"Safe": "safe", "Unsafe": "unsafe"}.get(rating, "neutral")


def _span(first: float | None, last: float | None) -> str:
    if first is None or last is None:
        return ""
    return f"{utc_time(first)} to {utc_time(last)}"
