"""The summary of a results file (an audit's, or eval's `--out`): counts, histograms, samples.

`summarize` reads the rows once, in input order, and keeps only counters, histograms and
bounded samples, so its memory does not grow with the number of rows: a reservoir of at most
N flagged (Unsafe) examples per category and one of N Safe examples (seeded, so the same file
gives the same report), at most 5 distinct messages per error kind, and the provenance (which
model and decoding answered, `report_provenance`). `Summary.to_dict()` is the report's JSON
form; `report_text` and `report_html` render it, `report` is the command.

Only the standard library and policy_engine are imported here.
"""

from __future__ import annotations

import json
import math
import random
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..policy import DEFAULT_SEVERITY_LEVELS
from .report_data import (
    HISTOGRAM_BINS,
    CategoryStats,
    ErrorGroup,
    Example,
    FirstBatch,
    Histogram,
    Throughput,
    clip,
    duration,
    percent,
    utc_time,
)
from .report_provenance import Provenance
from .report_shadow import ShadowComparison
from .store import ResultRow, ResultStore, StoreError

__all__ = [
    "ERROR_EXAMPLES",
    "EXAMPLES_PER_CATEGORY",
    "HISTOGRAM_BINS",
    "CategoryStats",
    "ErrorGroup",
    "Example",
    "FirstBatch",
    "Histogram",
    "Summary",
    "Throughput",
    "clip",
    "duration",
    "percent",
    "summarize",
    "utc_time",
]

EXAMPLES_PER_CATEGORY = 12
"""Default number of flagged examples (thumbnails) kept per category, and of Safe examples."""
ERROR_EXAMPLES = 5
"""Distinct example messages kept per error kind."""
SAMPLING_SEED = 0
"""Seed of the reservoir samplers: the same results file always gives the same examples."""
SAFE_SAMPLING_SEED = 1
"""The Safe sample's own sampler, so it does not change which flagged examples are kept."""

_MAX_MESSAGE = 300  # characters of an error message kept
_UNKNOWN_KIND = "unknown"


@dataclass
class Summary:
    """Everything the report shows; `to_dict()` is its JSON form (see docs/report.md)."""

    file: str
    meta: dict[str, str]
    policy: dict[str, Any] | None = None
    provenance: Provenance = field(default_factory=Provenance)
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
    safe_examples: list[Example] = field(default_factory=list)
    started: float | None = None
    finished: float | None = None
    first_row: float | None = None
    last_row: float | None = None
    first_batch: FirstBatch = field(default_factory=FirstBatch)
    examples_per_category: int = EXAMPLES_PER_CATEGORY
    shadow: ShadowComparison = field(default_factory=ShadowComparison)

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
        """Flagged examples kept, over all categories (the Safe sample not included)."""
        return sum(len(c.examples) for c in self.categories.values())

    @property
    def safe(self) -> int:
        return self.ratings.get("Safe", 0)

    @property
    def recorded_scale(self) -> list[str] | None:
        """The severity levels (lowest first) of the policy the file records, if it records
        them."""
        levels = (self.policy or {}).get("severity_levels")
        if isinstance(levels, list) and all(isinstance(v, str) for v in levels):
            return list(levels)
        return None

    @property
    def severity_scale(self) -> list[str]:
        """The policy's severity levels, lowest first: the recorded ones, else the default
        scale (a policy file's `severity_levels` default)."""
        return self.recorded_scale or list(DEFAULT_SEVERITY_LEVELS)

    def severities_in_order(self) -> list[tuple[str, int]]:
        """Rows per severity in the scale's order, lowest first; a level the scale does not
        know comes after, by count. Levels of the policy's own scale that no row has are
        listed with 0 (with the default scale, only the levels present)."""
        scale = self.severity_scale
        known = [(level, self.severities.get(level, 0)) for level in scale]
        if self.recorded_scale is None:
            known = [(level, count) for level, count in known if count]
        unknown = [(k, v) for k, v in self.severities.most_common() if k not in scale]
        return known + unknown

    @property
    def warnings(self) -> list[str]:
        """What a reader must not miss: the random-weights warning."""
        warning = self.provenance.warning
        return [warning] if warning else []

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "warnings": self.warnings,
            "policy": {
                "id": self.policy_id,
                "version": self.policy_version,
                "hash": self.policy_hash,
            },
            "provenance": self.provenance.to_dict(),
            "totals": {
                "rows": self.rows,
                "ok": self.ok,
                "errors": self.errors,
                "flagged": self.flagged,
                "expected": self.expected,
            },
            "ratings": dict(self.ratings),
            "categories": {cid: c.to_dict() for cid, c in self.categories.items()},
            "severities": dict(self.severities_in_order()),
            "severity_scale": self.severity_scale,
            "actions": dict(self.actions),
            "errors": {kind: g.to_dict() for kind, g in self.error_groups.items()},
            "throughput": self.throughput.to_dict() if self.throughput else None,
            "generation_seconds": self.generation_seconds,
            "p_unsafe": self.p_unsafe.to_dict() if self.p_unsafe.count else None,
            "safe_sample": {
                "rows": self.safe,
                "examples": [e.to_dict() for e in self.safe_examples],
            },
            "times": {
                "started": self.started,
                "finished": self.finished,
                "first_row": self.first_row,
                "last_row": self.last_row,
            },
            "sampling": {
                "method": "reservoir",
                "per_category": self.examples_per_category,
                "safe": self.examples_per_category,
                "seed": SAMPLING_SEED,
                "safe_seed": SAFE_SAMPLING_SEED,
            },
            "meta": dict(self.meta),
        } | ({"shadow": self.shadow.to_dict()} if self.shadow.sources else {})


def summarize(store: ResultStore, *, examples: int = EXAMPLES_PER_CATEGORY) -> Summary:
    """Read every row once (streamed) and summarize it.

    Keeps at most `examples` flagged (rating Unsafe) rows per category, and `examples` Safe
    rows over the whole run, each chosen by reservoir sampling with a fixed seed: a uniform
    sample of the whole run, the same for the same file, shown in input order. Raises
    StoreError if the file cannot be read as results.
    """
    if examples < 0:
        raise ValueError(f"examples must be >= 0, got {examples}")
    try:
        meta = store.meta
    except sqlite3.Error as err:
        raise StoreError(f"{store.path}: not a results file ({err})") from None
    summary = Summary(file=str(store.path), meta=meta, examples_per_category=examples)
    summary.policy = _policy_from_meta(meta)
    summary.provenance = Provenance.from_meta(meta)
    summary.expected = _int_or_none(meta.get("total"))
    summary.started = _float_or_none(meta.get("started"))
    summary.finished = _float_or_none(meta.get("finished"))
    _add_policy_categories(summary)

    rng = random.Random(SAMPLING_SEED)
    safe_rng = random.Random(SAFE_SAMPLING_SEED)
    seen_flagged: Counter[str] = Counter()
    generation = 0.0
    timed = False
    try:
        for row in store.rows():
            summary.rows += 1
            summary.provenance.add(row.decision)
            summary.shadow.add(row)
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
            unsafe = row.rating == "Unsafe"
            if row.p_unsafe is not None:
                summary.p_unsafe.add(row.p_unsafe, unsafe=unsafe)
            share = _generation_share(row)
            if share is not None:
                generation += share
                timed = True
            summary.first_row = _min(summary.first_row, row.finished)
            summary.last_row = _max(summary.last_row, row.finished)
            summary.first_batch.add(row.finished, share)
            if unsafe:
                summary.flagged += 1
            elif row.rating == "Safe":
                _reservoir(summary.safe_examples, row, summary.ratings["Safe"], examples, safe_rng)
            if row.category_id is None:
                continue
            stats = _category(summary, row)
            stats.rows += 1
            if row.rating is not None:
                stats.ratings[row.rating] += 1
            if row.p_unsafe is not None:
                stats.p_unsafe.add(row.p_unsafe, unsafe=unsafe)
            if unsafe:
                stats.flagged += 1
                seen_flagged[stats.id] += 1
                _reservoir(stats.examples, row, seen_flagged[stats.id], examples, rng)
    except (sqlite3.Error, json.JSONDecodeError) as err:
        raise StoreError(f"{store.path}: unreadable results ({err})") from None

    for stats in summary.categories.values():
        stats.examples.sort(key=lambda e: (e.seq, e.id))
    summary.safe_examples.sort(key=lambda e: (e.seq, e.id))
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
    """Images per second: over the audit's recorded start to finish when the file has them;
    otherwise from the rows' own times (an eval results file, an audit still running).

    Rows are written in engine batches: every row of a batch finishes at about the same
    moment, so the span from the first row to the last misses the whole first batch (and is
    almost nothing when all rows came in one batch). The span therefore starts when the first
    batch started, known from its rows' generation times. Rows without timings (older files)
    fall back to n - 1 intervals over the span from the first row to the last.
    """
    if summary.started is not None and summary.finished is not None:
        seconds = summary.finished - summary.started
        if seconds > 0 and summary.rows:
            return Throughput(summary.rows / seconds, seconds, summary.rows, "meta")
    if summary.first_row is None or summary.last_row is None:
        return None
    batch_started = summary.first_batch.started
    if batch_started is not None:
        seconds = summary.last_row - min(summary.first_row, batch_started)
        if seconds > 0 and summary.rows:
            return Throughput(summary.rows / seconds, seconds, summary.rows, "rows")
        return None
    if summary.rows > 1:
        # n rows written over the span between the first and the last: n - 1 intervals.
        seconds = summary.last_row - summary.first_row
        if seconds > 0:
            return Throughput((summary.rows - 1) / seconds, seconds, summary.rows, "rows")
    return None


def _generation_share(row: ResultRow) -> float | None:
    """The row's share of its batch's generation time: the `seconds` column (audits), else
    the verdict's `timings.generate` (eval's results files leave the column empty)."""
    if row.seconds is not None:
        return row.seconds
    verdict = row.decision.get("verdict")
    timings = verdict.get("timings") if isinstance(verdict, dict) else None
    value = timings.get("generate") if isinstance(timings, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


# --- helpers ----------------------------------------------------------------------------------


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
