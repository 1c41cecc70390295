"""The building blocks of a report's summary (`summary.Summary`): the `p_unsafe` histogram,
the examples kept for the galleries, per-category counts, error groups, throughput and the
first batch it is estimated from, and small formatting helpers shared with the renderers.

Only the standard library and policy_engine are imported here.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .store import ResultRow

__all__ = [
    "HISTOGRAM_BINS",
    "CategoryStats",
    "ErrorGroup",
    "Example",
    "FirstBatch",
    "Histogram",
    "Throughput",
    "clip",
    "duration",
    "percent",
    "utc_time",
]

HISTOGRAM_BINS = 10
MAX_RATIONALE = 1000
"""Characters of a rationale kept in an example."""
MAX_FLAGGED_PARTS = 8
"""Flagged frames (or a post's images) kept per example."""


@dataclass(frozen=True)
class FlaggedPart:
    """A video frame or a post's image that its verdict rated Unsafe (or decided by)."""

    index: int
    timestamp: float | None
    source: str
    p_unsafe: float | None
    deciding: bool

    def label(self) -> str:
        """'frame 12 at 1.20 s' or 'image 2', with P(Unsafe) when known."""
        what = (
            f"frame {self.index} at {self.timestamp:.2f} s"
            if self.timestamp is not None
            else (f"image {self.index}")
        )
        score = f" (p_unsafe {self.p_unsafe:.3f})" if self.p_unsafe is not None else ""
        return f"{what}{score}{' deciding' if self.deciding else ''}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "timestamp": self.timestamp,
            "source": self.source,
            "p_unsafe": self.p_unsafe,
            "deciding": self.deciding,
        }


def flagged_parts(verdict: Any) -> tuple[FlaggedPart, ...]:
    """The deciding part and the parts rated Unsafe of a verdict (as stored: a dict), at most
    MAX_FLAGGED_PARTS, deciding one first; () for a single image."""
    if not isinstance(verdict, dict) or not isinstance(verdict.get("parts"), list):
        return ()
    deciding = verdict.get("deciding_part")
    found = []
    for part in verdict["parts"]:
        if not isinstance(part, dict) or not isinstance(part.get("index"), int):
            continue
        if part["index"] == deciding or part.get("rating") == "Unsafe":
            found.append(
                FlaggedPart(
                    index=part["index"],
                    timestamp=part.get("timestamp"),
                    source=str(part.get("source") or ""),
                    p_unsafe=part.get("p_unsafe"),
                    deciding=part["index"] == deciding,
                )
            )
    found.sort(key=lambda p: (not p.deciding, p.index))
    return tuple(found[:MAX_FLAGGED_PARTS])


@dataclass
class Histogram:
    """Values in [0, 1] in `bins` equal bins (the last one includes 1.0); out-of-range values
    are clamped into the first or last bin. `unsafe_counts` counts, per bin, the values of rows
    whose final rating is Unsafe (the rest are Safe or have no rating)."""

    bins: int = HISTOGRAM_BINS
    counts: list[int] = field(default_factory=list)
    unsafe_counts: list[int] = field(default_factory=list)
    count: int = 0
    total: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * self.bins
        if not self.unsafe_counts:
            self.unsafe_counts = [0] * self.bins

    def add(self, value: float, *, unsafe: bool = False) -> None:
        if math.isnan(value):
            return
        index = min(self.bins - 1, max(0, int(value * self.bins)))
        self.counts[index] += 1
        if unsafe:
            self.unsafe_counts[index] += 1
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
            "unsafe_counts": list(self.unsafe_counts),
            "count": self.count,
            "mean": self.mean,
            "min": self.low if self.count else None,
            "max": self.high if self.count else None,
        }


@dataclass(frozen=True)
class Example:
    """One row kept for the report's galleries (a bounded copy, not the row itself)."""

    id: str
    seq: int
    source: str
    rating: str | None
    category_id: str | None
    category_name: str | None
    severity: str | None
    p_unsafe: float | None
    actions: tuple[str, ...]
    rationale: str | None
    parts: tuple[FlaggedPart, ...] = ()  # a video's or a post's flagged parts, deciding first

    @property
    def thumb_source(self) -> str:
        """What a thumbnail shows: the deciding frame or image of a video or a post."""
        return self.parts[0].source if self.parts and self.parts[0].deciding else self.source

    @classmethod
    def from_row(cls, row: ResultRow) -> Example:
        verdict = row.decision.get("verdict")
        rationale = verdict.get("rationale") if isinstance(verdict, dict) else None
        if rationale is not None:
            rationale = clip(str(rationale), MAX_RATIONALE)
        name = row.decision.get("category_name")
        return cls(
            id=row.id,
            seq=row.seq,
            source=row.source,
            rating=row.rating,
            category_id=row.category_id,
            category_name=None if name is None else str(name),
            severity=row.severity,
            p_unsafe=row.p_unsafe,
            actions=tuple(row.actions),
            rationale=rationale,
            parts=flagged_parts(verdict),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "seq": self.seq,
            "source": self.source,
            "rating": self.rating,
            "category_id": self.category_id,
            "category_name": self.category_name,
            "severity": self.severity,
            "p_unsafe": self.p_unsafe,
            "actions": list(self.actions),
            "rationale": self.rationale,
            **({"parts": [p.to_dict() for p in self.parts]} if self.parts else {}),
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
    `started`/`finished`) or "rows" (estimated from the rows' times: from the start of the
    first batch, its finish time less its generation time, to the last row written)."""

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
class FirstBatch:
    """The batch that finished first, found in one pass: the rows of one engine batch all
    carry the same generation share (the batch's time divided among its images) and finish
    within moments of each other (less than one share apart; the next batch finishes a whole
    batch time later), so its wall time is that share times its rows."""

    finished: float | None = None
    share: float | None = None
    rows: int = 0

    def add(self, finished: float, share: float | None) -> None:
        if share is None:
            return
        same = (
            self.finished is not None
            and share == self.share
            and abs(finished - self.finished) <= share
        )
        if same:
            self.rows += 1
            self.finished = min(finished, self.finished or finished)
        elif self.finished is None or finished < self.finished:
            self.finished, self.share, self.rows = finished, share, 1

    @property
    def started(self) -> float | None:
        """When the first batch went to the backend (its finish less its generation time)."""
        if self.finished is None or self.share is None:
            return None
        return self.finished - self.share * self.rows


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, an ellipsis marking a cut (shared with the
    renderers, like `percent` and `utc_time`)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def duration(seconds: float) -> str:
    """Seconds for a reader: `70.5 s`, `0.004 s` (a short span keeps its digits)."""
    return f"{seconds:.1f} s" if seconds >= 10 else f"{seconds:.3g} s"


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
