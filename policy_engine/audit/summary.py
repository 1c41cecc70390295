"""The summary of an audit's results file: counts, histograms and bounded samples.

`summarize` reads the rows once, in input order, and keeps only counters, histograms and
bounded samples, so its memory does not grow with the number of rows: a reservoir of at most
N flagged (Unsafe) examples per category (seeded, so the same file gives the same report),
and at most 5 distinct messages per error kind. `Summary.to_dict()` is the report's JSON form;
`report_text` and `report_html` render it, `report` is the command.

Only the standard library and policy_engine are imported here.
"""

from __future__ import annotations

import json
import math
import random
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

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
    "summarize",
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
            rationale = clip(str(rationale), _MAX_RATIONALE)
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
    message = clip(row.error or "(no message)", _MAX_MESSAGE)
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


# --- helpers ----------------------------------------------------------------------------------


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, an ellipsis marking a cut (shared with the
    renderers, like `percent` and `utc_time`)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def percent(part: int, whole: int) -> str:
    """`part` as a percentage of `whole` with one decimal, "-" when `whole` is 0."""
    return f"{100 * part / whole:.1f}%" if whole else "-"


def utc_time(ts: float | None) -> str:
    """A Unix time as a UTC date and time, "" for None, the number itself if out of range."""
    if ts is None:
        return ""
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return str(ts)


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
