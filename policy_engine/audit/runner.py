"""The audit loop: a source's items (one shard of them) through an Engine into a ResultStore.

Resumable by construction: before an item is handed to the engine, the store is asked whether
its id already has a row; rows are committed in small transactions as decisions come back, in
input order. Killing the process loses at most the uncommitted rows, which the next run redoes.
The source is streamed in chunks and ids are looked up chunk by chunk, so memory stays flat
whatever the dataset's size.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine, batched
from ..progress import Progress
from ..verdict import Decision
from .sources import Shard, Source, SourceItem
from .store import ResultRow, ResultStore, StoreError

log = logging.getLogger(__name__)

CHUNK = 256
WHOLE = Shard()


@dataclass
class AuditStats:
    """What one run did (not the whole results file: see `policy-engine report`)."""

    assessed: int = 0
    skipped: int = 0  # already in the results file
    seen: int = 0  # inputs of this shard read from the source
    duplicates: int = 0  # inputs whose id another input already has (one row per id)
    errors: int = 0
    ratings: Counter[str] = field(default_factory=Counter)
    categories: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    total: int | None = None  # items this run will assess, once counted
    interrupted: bool = False

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def count(self, decision: Decision) -> None:
        """One more assessed input: its final rating, or its error."""
        self.assessed += 1
        if decision.verdict.ok:
            self.ratings[decision.rating or "?"] += 1
            if decision.rating == "Unsafe" and decision.category_id:
                self.categories[decision.category_id] += 1
        else:
            self.errors += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "assessed": self.assessed,
            "skipped": self.skipped,
            "errors": self.errors,
            "duplicates": self.duplicates,
            "ratings": dict(self.ratings),
            "categories": dict(self.categories),
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.assessed / max(self.seconds, 1e-9), 2),
            "interrupted": self.interrupted,
        }


class RowWriter:
    """Rows into the ledger in small transactions: once `every` rows wait, or `seconds` have
    passed since the last commit; `flush` commits the rest."""

    def __init__(self, store: ResultStore, every: int, seconds: float) -> None:
        self.store, self.every, self.seconds = store, every, seconds
        self.rows: list[ResultRow] = []
        self.last_commit = time.monotonic()

    def add(self, row: ResultRow) -> None:
        self.rows.append(row)
        now = time.monotonic()
        if len(self.rows) >= self.every or now - self.last_commit >= self.seconds:
            self.flush()
            self.last_commit = now

    def flush(self) -> None:
        if self.rows:
            self.store.write(self.rows)
            self.rows = []


def audit_meta(engine: Engine, source: Source, shard: Shard) -> dict[str, str]:
    """What identifies an audit: resuming with a different one is refused."""
    return {**results_meta(engine, _source_key(source)), "shard": str(shard)}


def results_meta(engine: Engine, source: str) -> dict[str, str]:
    """What every results file records of the run that wrote it (audit and eval alike): the
    policy, the backend, its model and options, the mode, the source, the calibration's hash
    (empty without one)."""
    policy = engine.policy
    shadow: dict[str, str] = {}
    if engine.shadow is not None:  # recorded, not part of the audit's identity
        shadow = {
            "shadow_policy_id": engine.shadow.policy.id,
            "shadow_policy_hash": engine.shadow.compiled.hash,
        }
    return {
        **shadow,
        "policy_id": policy.id,
        "policy_version": policy.version,
        "policy_hash": engine.compiled.hash,
        "policy": json.dumps(
            {
                "id": policy.id,
                "version": policy.version,
                "hash": engine.compiled.hash,
                "categories": [
                    {"id": c.id, "name": c.name, "severity": c.severity} for c in policy.categories
                ],
                "none": {"id": policy.none_category.id, "name": policy.none_category.name},
            }
        ),
        "backend": engine.backend.name,
        "model": str(getattr(engine.backend.options, "model", None) or ""),
        "backend_options": engine.backend.options.model_dump_json(),
        "mode": engine.mode,
        "source": source,
        "calibration": engine.calibration.hash if engine.calibration is not None else "",
    }


IDENTITY = ("policy_hash", "backend", "model", "mode", "source", "shard", "calibration")


def check_resumable(store: ResultStore, meta: dict[str, str]) -> None:
    """A results file that holds rows of another audit (policy, backend, mode, source, shard
    or calibration) is not continued: mixing them would make every count meaningless."""
    existing = store.meta
    if "policy_hash" not in existing:
        return
    for key in IDENTITY:
        if existing.get(key, "") != meta[key]:
            raise StoreError(
                f"{store.path} holds an audit with another {key.replace('_', ' ')} "
                f"({existing.get(key) or 'none'!r}, now {meta[key] or 'none'!r}); "
                "use another --out"
            )
    if existing.get("backend_options") != meta["backend_options"]:
        log.warning(
            "continuing with other backend options than the earlier run (was %s)",
            existing.get("backend_options"),
        )


def run_audit(
    engine: Engine,
    source: Source,
    store: ResultStore,
    *,
    shard: Shard = WHOLE,
    retry_errors: bool = False,
    metadata: dict[str, Any] | None = None,
    progress: Progress | None = None,
    commit_every: int = 64,
    commit_seconds: float = 1.0,
) -> AuditStats:
    """Assess every item of `source` in `shard` that `store` lacks (with `retry_errors`:
    only those whose row is an error), committing rows as they come. Ctrl-C stops after
    committing what is done (stats.interrupted)."""
    meta = audit_meta(engine, source, shard)
    check_resumable(store, meta)
    store.set_meta(
        {**meta, "executor": "local", "started": store.meta.get("started", str(time.time()))}
    )
    stats = AuditStats()
    if progress is not None:
        _counter(source, shard, store, retry_errors, stats).start()
    pending: deque[SourceItem] = deque()

    def todo() -> Iterator[tuple[Any, dict[str, Any]]]:
        for item in pending_items(source, store, stats, shard=shard, retry_errors=retry_errors):
            pending.append(item)
            yield item.image, {**(metadata or {}), **item.metadata}

    writer = RowWriter(store, commit_every, commit_seconds)
    progress_total_set = False
    try:
        for decision in engine.assess_many(todo()):
            item = pending.popleft()
            seconds = decision.verdict.timings.get("generate")
            writer.add(ResultRow.from_decision(item.id, item.seq, decision, seconds, item.source))
            stats.count(decision)
            if progress is not None:
                if stats.total is not None and not progress_total_set:
                    progress.set_total(stats.total)  # counted in the background
                    progress_total_set = True
                progress.update(decision)
    except KeyboardInterrupt:
        stats.interrupted = True
    finally:
        writer.flush()
    finish_audit(store, stats, retry_errors=retry_errors)
    return stats


def pending_items(
    source: Source,
    store: ResultStore,
    stats: AuditStats,
    *,
    shard: Shard = WHOLE,
    retry_errors: bool = False,
) -> Iterator[SourceItem]:
    """The items of `shard` that `store` lacks (with `retry_errors`: whose row is an error),
    looked up chunk by chunk; counts what it reads and skips in `stats`."""
    for chunk in batched((item for item in source.items() if shard.holds(item.id)), CHUNK):
        status = store.status([item.id for item in chunk])
        stats.seen += len(chunk)
        for item in chunk:
            state = status.get(item.id)
            if (state is False) if retry_errors else (state is None):
                yield item
            else:
                stats.skipped += 1


def finish_audit(store: ResultStore, stats: AuditStats, *, retry_errors: bool) -> None:
    """A run that saw its whole source records that it finished, and how many rows."""
    if not stats.interrupted and not retry_errors:
        total = store.count()
        stats.duplicates = max(0, stats.seen - total)
        store.set_meta({"finished": str(time.time()), "total": str(total)})


def _source_key(source: Source) -> str:
    spec = source.spec
    return os.path.abspath(os.path.expanduser(spec)) if os.path.exists(spec) else spec


def _counter(
    source: Source, shard: Shard, store: ResultStore, retry_errors: bool, stats: AuditStats
) -> threading.Thread:
    """Counts, in the background, how many items this run has to do (for the ETA)."""

    def count() -> None:
        try:
            if retry_errors:
                with ResultStore(store.path) as reader:
                    stats.total = reader.count(errors_only=True)
                return
            in_shard = sum(1 for item_id in source.ids() if shard.holds(item_id))
            with ResultStore(store.path) as reader:
                done_before = reader.count() - stats.assessed
            stats.total = max(0, in_shard - done_before)
        except Exception:  # an ETA is a nicety; the audit itself reports real errors
            stats.total = None

    return threading.Thread(target=count, name="policy-engine-count", daemon=True)
