"""The report of an audit: a summary of a results file, as text, JSON or one HTML file.

`summarize` reads the rows once, in input order, and keeps only counters, histograms and
bounded samples, so its memory does not grow with the number of rows: a reservoir of at most
N flagged (Unsafe) examples per category (seeded, so the same file gives the same report),
and at most 5 distinct messages per error kind. `write_html` turns that into one
self-contained HTML file (inline CSS, inline SVG charts, thumbnails as JPEG data URLs) that
needs nothing but a browser and prints cleanly. `report_command` is the `policy-engine report`
command.

Only the standard library, click and policy_engine are imported here; Pillow is imported when
thumbnails are made.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import random
import sqlite3
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from ..errors import ImageError, PolicyEngineError
from .store import ResultRow, ResultStore, StoreError

__all__ = [
    "ERROR_EXAMPLES",
    "EXAMPLES_PER_CATEGORY",
    "HISTOGRAM_BINS",
    "CategoryStats",
    "Example",
    "Histogram",
    "Summary",
    "Throughput",
    "render_html",
    "render_text",
    "report_command",
    "summarize",
    "write_html",
]

EXAMPLES_PER_CATEGORY = 12
"""Default number of flagged examples (thumbnails) kept per category."""
ERROR_EXAMPLES = 5
"""Distinct example messages kept per error kind."""
HISTOGRAM_BINS = 10
SAMPLING_SEED = 0
"""Seed of the reservoir sampler: the same results file always gives the same examples."""

_MAX_RATIONALE = 1000  # characters of a rationale kept in an example
_MAX_MESSAGE = 300  # characters of an error message kept
_UNKNOWN_KIND = "unknown"


# --- the summary ------------------------------------------------------------------------------


@dataclass
class Histogram:
    """Values in [0, 1] in `bins` equal bins (the last one includes 1.0); out-of-range values
    are clamped into the first or last bin."""

    bins: int = HISTOGRAM_BINS
    counts: list[int] = field(default_factory=list)
    count: int = 0
    total: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * self.bins

    def add(self, value: float) -> None:
        if math.isnan(value):
            return
        index = min(self.bins - 1, max(0, int(value * self.bins)))
        self.counts[index] += 1
        self.count += 1
        self.total += value
        self.low = min(self.low, value)
        self.high = max(self.high, value)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def edges(self) -> list[float]:
        return [round(i / self.bins, 6) for i in range(self.bins + 1)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "edges": self.edges,
            "counts": list(self.counts),
            "count": self.count,
            "mean": self.mean,
            "min": self.low if self.count else None,
            "max": self.high if self.count else None,
        }


@dataclass(frozen=True)
class Example:
    """One flagged row kept for the report (a bounded copy, not the row itself)."""

    id: str
    seq: int
    source: str
    rating: str | None
    category_id: str | None
    severity: str | None
    p_unsafe: float | None
    actions: tuple[str, ...]
    rationale: str | None

    @classmethod
    def from_row(cls, row: ResultRow) -> Example:
        verdict = row.decision.get("verdict")
        rationale = verdict.get("rationale") if isinstance(verdict, dict) else None
        if rationale is not None:
            rationale = _clip(str(rationale), _MAX_RATIONALE)
        return cls(
            id=row.id,
            seq=row.seq,
            source=row.source,
            rating=row.rating,
            category_id=row.category_id,
            severity=row.severity,
            p_unsafe=row.p_unsafe,
            actions=tuple(row.actions),
            rationale=rationale,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "seq": self.seq,
            "source": self.source,
            "rating": self.rating,
            "category_id": self.category_id,
            "severity": self.severity,
            "p_unsafe": self.p_unsafe,
            "actions": list(self.actions),
            "rationale": self.rationale,
        }


@dataclass
class CategoryStats:
    """The rows whose verdict named one category."""

    id: str
    name: str | None = None
    policy_severity: str | None = None
    in_policy: bool = False
    rows: int = 0
    flagged: int = 0
    ratings: Counter[str] = field(default_factory=Counter)
    p_unsafe: Histogram = field(default_factory=Histogram)
    examples: list[Example] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "policy_severity": self.policy_severity,
            "in_policy": self.in_policy,
            "rows": self.rows,
            "flagged": self.flagged,
            "ratings": dict(self.ratings),
            "p_unsafe": self.p_unsafe.to_dict() if self.p_unsafe.count else None,
            "examples": [e.to_dict() for e in self.examples],
        }


@dataclass(frozen=True)
class Throughput:
    """Images per second and what it was measured from: `basis` is "meta" (the audit's
    `started`/`finished`) or "rows" (first to last row written)."""

    images_per_second: float
    seconds: float
    images: int
    basis: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "images_per_second": self.images_per_second,
            "seconds": self.seconds,
            "images": self.images,
            "basis": self.basis,
        }


@dataclass
class ErrorGroup:
    count: int = 0
    examples: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "examples": [dict(e) for e in self.examples]}


@dataclass
class Summary:
    """Everything the report shows; `to_dict()` is its JSON form (see docs/report.md)."""

    file: str
    meta: dict[str, str]
    policy: dict[str, Any] | None = None
    rows: int = 0
    ok: int = 0
    errors: int = 0
    flagged: int = 0
    expected: int | None = None
    ratings: Counter[str] = field(default_factory=Counter)
    categories: dict[str, CategoryStats] = field(default_factory=dict)
    severities: Counter[str] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)
    error_groups: dict[str, ErrorGroup] = field(default_factory=dict)
    throughput: Throughput | None = None
    generation_seconds: float | None = None
    p_unsafe: Histogram = field(default_factory=Histogram)
    started: float | None = None
    finished: float | None = None
    first_row: float | None = None
    last_row: float | None = None
    examples_per_category: int = EXAMPLES_PER_CATEGORY

    @property
    def policy_id(self) -> str | None:
        return self.meta.get("policy_id") or _str_or_none((self.policy or {}).get("id"))

    @property
    def policy_version(self) -> str | None:
        return self.meta.get("policy_version") or _str_or_none((self.policy or {}).get("version"))

    @property
    def policy_hash(self) -> str | None:
        return self.meta.get("policy_hash") or _str_or_none((self.policy or {}).get("hash"))

    @property
    def kept_examples(self) -> int:
        return sum(len(c.examples) for c in self.categories.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "policy": {
                "id": self.policy_id,
                "version": self.policy_version,
                "hash": self.policy_hash,
            },
            "totals": {
                "rows": self.rows,
                "ok": self.ok,
                "errors": self.errors,
                "flagged": self.flagged,
                "expected": self.expected,
            },
            "ratings": dict(self.ratings),
            "categories": {cid: c.to_dict() for cid, c in self.categories.items()},
            "severities": dict(self.severities),
            "actions": dict(self.actions),
            "errors": {kind: g.to_dict() for kind, g in self.error_groups.items()},
            "throughput": self.throughput.to_dict() if self.throughput else None,
            "generation_seconds": self.generation_seconds,
            "p_unsafe": self.p_unsafe.to_dict() if self.p_unsafe.count else None,
            "times": {
                "started": self.started,
                "finished": self.finished,
                "first_row": self.first_row,
                "last_row": self.last_row,
            },
            "sampling": {
                "method": "reservoir",
                "per_category": self.examples_per_category,
                "seed": SAMPLING_SEED,
            },
            "meta": dict(self.meta),
        }


def summarize(store: ResultStore, *, examples: int = EXAMPLES_PER_CATEGORY) -> Summary:
    """Read every row once (streamed) and summarize it.

    Keeps at most `examples` flagged (rating Unsafe) rows per category, chosen by reservoir
    sampling with a fixed seed: a uniform sample of the whole run, the same for the same file,
    shown in input order. Raises StoreError if the file cannot be read as results.
    """
    if examples < 0:
        raise ValueError(f"examples must be >= 0, got {examples}")
    try:
        meta = store.meta
    except sqlite3.Error as err:
        raise StoreError(f"{store.path}: not a results file ({err})") from None
    summary = Summary(file=str(store.path), meta=meta, examples_per_category=examples)
    summary.policy = _policy_from_meta(meta)
    summary.expected = _int_or_none(meta.get("total"))
    summary.started = _float_or_none(meta.get("started"))
    summary.finished = _float_or_none(meta.get("finished"))
    _add_policy_categories(summary)

    rng = random.Random(SAMPLING_SEED)
    seen_flagged: Counter[str] = Counter()
    generation = 0.0
    timed = False
    try:
        for row in store.rows():
            summary.rows += 1
            if row.ok:
                summary.ok += 1
            else:
                summary.errors += 1
                _add_error(summary, row)
            if row.rating is not None:
                summary.ratings[row.rating] += 1
            if row.severity is not None:
                summary.severities[row.severity] += 1
            for name in dict.fromkeys(row.actions):
                summary.actions[name] += 1
            if row.p_unsafe is not None:
                summary.p_unsafe.add(row.p_unsafe)
            if row.seconds is not None:
                generation += row.seconds
                timed = True
            summary.first_row = _min(summary.first_row, row.finished)
            summary.last_row = _max(summary.last_row, row.finished)
            if row.rating == "Unsafe":
                summary.flagged += 1
            if row.category_id is None:
                continue
            stats = _category(summary, row)
            stats.rows += 1
            if row.rating is not None:
                stats.ratings[row.rating] += 1
            if row.p_unsafe is not None:
                stats.p_unsafe.add(row.p_unsafe)
            if row.rating == "Unsafe":
                stats.flagged += 1
                seen_flagged[stats.id] += 1
                _reservoir(stats.examples, row, seen_flagged[stats.id], examples, rng)
    except (sqlite3.Error, json.JSONDecodeError) as err:
        raise StoreError(f"{store.path}: unreadable results ({err})") from None

    for stats in summary.categories.values():
        stats.examples.sort(key=lambda e: (e.seq, e.id))
    # Policy categories no row named are dropped: the report shows what is present.
    summary.categories = {cid: c for cid, c in summary.categories.items() if c.rows}
    summary.generation_seconds = generation if timed else None
    summary.throughput = _throughput(summary)
    return summary


def _reservoir(
    kept: list[Example], row: ResultRow, seen: int, size: int, rng: random.Random
) -> None:
    """Algorithm R: after `seen` items, each has been kept with probability size/seen."""
    if size <= 0:
        return
    if len(kept) < size:
        kept.append(Example.from_row(row))
        return
    slot = rng.randrange(seen)
    if slot < size:
        kept[slot] = Example.from_row(row)


def _add_error(summary: Summary, row: ResultRow) -> None:
    kind = row.error_kind or _UNKNOWN_KIND
    group = summary.error_groups.setdefault(kind, ErrorGroup())
    group.count += 1
    message = _clip(row.error or "(no message)", _MAX_MESSAGE)
    if len(group.examples) < ERROR_EXAMPLES and all(
        e["message"] != message for e in group.examples
    ):
        group.examples.append({"id": row.id, "message": message})


def _category(summary: Summary, row: ResultRow) -> CategoryStats:
    assert row.category_id is not None
    stats = summary.categories.get(row.category_id)
    if stats is None:
        stats = summary.categories[row.category_id] = CategoryStats(id=row.category_id)
    if stats.name is None:
        verdict = row.decision.get("verdict")
        if isinstance(verdict, dict) and verdict.get("category_name"):
            stats.name = str(verdict["category_name"])
    return stats


def _add_policy_categories(summary: Summary) -> None:
    """Seed the categories in the policy's order, with their names and severities."""
    policy = summary.policy or {}
    entries: list[Any] = []
    categories = policy.get("categories")
    if isinstance(categories, list):
        entries += categories
    if isinstance(policy.get("none"), dict):
        entries.append(policy["none"])
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        summary.categories[entry["id"]] = CategoryStats(
            id=entry["id"],
            name=_str_or_none(entry.get("name")),
            policy_severity=_str_or_none(entry.get("severity")),
            in_policy=True,
        )


def _policy_from_meta(meta: dict[str, str]) -> dict[str, Any] | None:
    text = meta.get("policy")
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _throughput(summary: Summary) -> Throughput | None:
    if summary.started is not None and summary.finished is not None:
        seconds = summary.finished - summary.started
        if seconds > 0 and summary.rows:
            return Throughput(summary.rows / seconds, seconds, summary.rows, "meta")
    if summary.first_row is not None and summary.last_row is not None and summary.rows > 1:
        # n rows written over the span between the first and the last: n - 1 intervals.
        seconds = summary.last_row - summary.first_row
        if seconds > 0:
            return Throughput((summary.rows - 1) / seconds, seconds, summary.rows, "rows")
    return None


# --- text -------------------------------------------------------------------------------------


def render_text(summary: Summary) -> str:
    """A readable summary for a terminal."""
    lines = [f"Audit report: {_t(summary.file)}"]
    policy = summary.policy_id or "(unknown policy)"
    if summary.policy_version:
        policy += f" v{summary.policy_version}"
    if summary.policy_hash:
        policy += f" ({summary.policy_hash})"
    meta = summary.meta
    header = [
        ("policy", policy),
        ("backend", _join(meta.get("backend"), meta.get("mode") and f"mode {meta['mode']}")),
        ("source", _join(meta.get("source"), meta.get("shard") and f"shard {meta['shard']}")),
        ("started", _when(summary.started)),
        ("finished", _when(summary.finished)),
    ]
    if summary.throughput:
        t = summary.throughput
        basis = "audit start to finish" if t.basis == "meta" else "first to last row written"
        header.append(("throughput", f"{t.images_per_second:.2f} images/s ({basis})"))
    if summary.generation_seconds is not None:
        header.append(("model time", f"{summary.generation_seconds:.1f} s"))
    lines += [f"  {key:<11}{_t(value)}" for key, value in header if value]
    lines.append("")
    if not summary.rows:
        lines.append("no results yet")
        return "\n".join(lines) + "\n"

    done = f"{summary.rows}"
    if summary.expected is not None:
        done += f" of {summary.expected}"
    lines += [
        "Totals",
        f"  {'rows':<11}{done}",
        f"  {'ok':<11}{summary.ok}",
        f"  {'errors':<11}{summary.errors}",
        f"  {'flagged':<11}{summary.flagged} ({_percent(summary.flagged, summary.rows)})",
        "",
    ]
    lines += _text_counts("Ratings", summary.ratings, summary.rows)
    if summary.categories:
        lines.append("Categories (rows, flagged)")
        width = max(len(_t(cid)) for cid in summary.categories)
        for cid, stats in summary.categories.items():
            name = f"  {_t(stats.name)}" if stats.name else ""
            lines.append(f"  {_t(cid):<{width}}  {stats.rows:>7} {stats.flagged:>7}{name}")
        lines.append("")
    lines += _text_counts("Severities", summary.severities, summary.rows)
    lines += _text_counts("Actions (rows carrying each)", summary.actions, summary.rows)
    if summary.error_groups:
        lines.append("Errors")
        for kind, group in summary.error_groups.items():
            lines.append(f"  {_t(kind)}: {group.count}")
            lines += [f"    {_t(e['id'])}: {_t(e['message'])}" for e in group.examples]
        lines.append("")
    if summary.p_unsafe.count:
        hist = summary.p_unsafe
        lines.append(f"p_unsafe (n={hist.count}, mean {hist.mean:.3f})")
        peak = max(hist.counts)
        for i, count in enumerate(hist.counts):
            bar = "#" * round(30 * count / peak) if peak else ""
            low, high = hist.edges[i], hist.edges[i + 1]
            lines.append(f"  {low:.1f}-{high:.1f} {count:>7} {bar}")
        lines.append("")
    return "\n".join(lines)


def _text_counts(title: str, counts: Counter[str], rows: int) -> list[str]:
    if not counts:
        return []
    width = max(len(_t(k)) for k in counts)
    out = [title]
    for key, count in counts.most_common():
        out.append(f"  {_t(key):<{width}}  {count:>7}  {_percent(count, rows)}")
    return [*out, ""]


# --- HTML -------------------------------------------------------------------------------------


def write_html(
    store: ResultStore,
    path: str | os.PathLike[str],
    *,
    thumbnails: int = EXAMPLES_PER_CATEGORY,
    thumb_size: int = 160,
) -> None:
    """Write the report as one self-contained HTML file (nothing external is referenced).

    `thumbnails` flagged examples at most per category (see `summarize`), each shrunk to fit
    `thumb_size` pixels square; a source that is not a readable image file gets a placeholder
    saying why. Relative sources are looked up from the current directory, then from the
    results file's directory. Raises StoreError if the store cannot be read, OSError if `path`
    cannot be written.
    """
    if thumb_size < 1:
        raise ValueError(f"thumb_size must be >= 1, got {thumb_size}")
    summary = summarize(store, examples=thumbnails)
    page = render_html(summary, thumb_size=thumb_size, base_dir=Path(store.path).parent)
    Path(path).write_text(page, encoding="utf-8")


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
        f"<footer>Generated {_e(_when(datetime.now(UTC).timestamp()))} by policy-engine report"
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
        ("Started", _when(summary.started)),
        ("Finished", _when(summary.finished)),
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
        ("Flagged (Unsafe)", f"{summary.flagged} ({_percent(summary.flagged, summary.rows)})"),
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
            return None, f"cannot make a thumbnail: {_clip(str(err), 120)}"
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


# --- the command ------------------------------------------------------------------------------


@click.command("report")
@click.argument("results", type=click.Path(path_type=Path))
@click.option(
    "--html",
    "html_out",
    type=click.Path(path_type=Path),
    help="Also write a self-contained HTML report to this file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option(
    "--thumbnails",
    type=click.IntRange(min=0),
    default=EXAMPLES_PER_CATEGORY,
    show_default=True,
    help="Flagged examples kept (and thumbnails shown) per category.",
)
def report_command(results: Path, html_out: Path | None, as_json: bool, thumbnails: int) -> None:
    """Summarize an audit's RESULTS file: counts, errors, throughput, scores.

    Prints a text summary (or JSON with --json) on stdout; --html also writes one
    self-contained HTML file with charts and thumbnails of flagged images.
    """
    try:
        with ResultStore(results) as store:
            summary = summarize(store, examples=thumbnails)
            if html_out is not None:
                page = render_html(summary, base_dir=results.parent)
                try:
                    html_out.write_text(page, encoding="utf-8")
                except OSError as err:
                    raise PolicyEngineError(
                        f"{html_out}: cannot write the report ({err.strerror or err})"
                    ) from None
    except PolicyEngineError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), ensure_ascii=False, indent=2))
    else:
        click.echo(render_text(summary), nl=False)
    if html_out is not None:
        click.echo(f"wrote {html_out}", err=True)


# --- helpers ----------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _t(value: object) -> str:
    """Data made safe for one line of a terminal: no line breaks, no control sequences."""
    text = " ".join(str(value).splitlines())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _anchor(index: int) -> str:
    return f"category-{index + 1}"


def _category_label(stats: CategoryStats) -> str:
    return f"{stats.id} {stats.name}" if stats.name else stats.id


def _rating_class(rating: str) -> str:
    return {"Safe": "safe", "Unsafe": "unsafe"}.get(rating, "neutral")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return str(ts)


def _span(first: float | None, last: float | None) -> str:
    if first is None or last is None:
        return ""
    return f"{_when(first)} to {_when(last)}"


def _join(*parts: str | None) -> str:
    return ", ".join(p for p in parts if p)


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _int_or_none(text: str | None) -> int | None:
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _float_or_none(text: str | None) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _min(current: float | None, value: float) -> float:
    return value if current is None else min(current, value)


def _max(current: float | None, value: float) -> float:
    return value if current is None else max(current, value)
