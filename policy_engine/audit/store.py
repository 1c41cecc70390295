"""The results store of an audit: one SQLite file in WAL mode, one row per input id.

Crash safety: rows are written in transactions of a few dozen, each committed before the next
batch is read from the source. SQLite's write-ahead log makes a committed transaction survive
the process being killed at any instant (SIGKILL included); an uncommitted one vanishes whole.
On restart the audit skips the ids already present and redoes the rest, and a row is keyed by
its input id (`INSERT OR REPLACE`), so every input ends up exactly once, whatever was lost.
`synchronous=NORMAL` (the default here) does not fsync each commit: a power cut or OS crash may
lose the last commits (they are redone), never corrupt the file; `durable=True` fsyncs every
commit (`synchronous=FULL`), slower.

Readers (report, eval, merge, export) open the file read-only and iterate rows in input order
without loading them all.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PolicyEngineError
from ..verdict import Decision

SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    source TEXT NOT NULL,
    ok INTEGER NOT NULL,
    rating TEXT,
    category_id TEXT,
    severity TEXT,
    p_unsafe REAL,
    actions TEXT NOT NULL,
    error_kind TEXT,
    error TEXT,
    decision TEXT NOT NULL,
    seconds REAL,
    finished REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_seq ON results (seq);
CREATE INDEX IF NOT EXISTS results_ok ON results (ok);
"""


class StoreError(PolicyEngineError):
    """The results file is missing, not a results file, or belongs to another audit."""


@dataclass(frozen=True)
class ResultRow:
    """One input's outcome. `decision` is the full Decision as JSON-compatible data."""

    id: str
    seq: int
    source: str
    ok: bool
    rating: str | None
    category_id: str | None
    severity: str | None
    p_unsafe: float | None
    actions: list[str]
    error_kind: str | None
    error: str | None
    decision: dict[str, Any]
    seconds: float | None = None
    finished: float = field(default_factory=time.time)

    @classmethod
    def from_decision(
        cls,
        item_id: str,
        seq: int,
        decision: Decision,
        seconds: float | None = None,
        source: str | None = None,
    ) -> ResultRow:
        verdict = decision.verdict
        error = verdict.error
        return cls(
            id=item_id,
            seq=seq,
            source=source or verdict.source or item_id,
            ok=verdict.ok,
            rating=decision.rating,
            category_id=decision.category_id,
            severity=decision.severity,
            p_unsafe=verdict.p_unsafe,
            actions=[a.name for a in decision.actions],
            error_kind=error.kind if error else None,
            error=error.message if error else None,
            decision=decision.model_dump(mode="json", exclude_none=True),
            seconds=seconds,
        )


class ResultStore:
    """An audit's results file. `ResultStore(path)` opens an existing one read-only;
    `ResultStore(path, create=True)` opens or creates one for writing."""

    def __init__(self, path: str | Path, *, create: bool = False, durable: bool = False) -> None:
        self.path = Path(path)
        self.writable = create
        if not create and not self.path.is_file():
            raise StoreError(f"{self.path}: no such results file")
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self.db.executescript(_SCHEMA)
                self.db.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                )
            else:
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                self.db = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
            version = self.meta.get("schema_version")
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path}: not a results file ({err})") from None
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: results format {version!r}, this version reads {SCHEMA_VERSION!r}"
            )

    # -- meta ------------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, values: dict[str, str]) -> None:
        with self._transaction():
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())

    # -- writing ---------------------------------------------------------------------------
    def write(self, rows: Iterable[ResultRow]) -> None:
        """Store rows in one transaction (a row replaces an earlier one with its id)."""
        records = [
            (
                r.id,
                r.seq,
                r.source,
                int(r.ok),
                r.rating,
                r.category_id,
                r.severity,
                r.p_unsafe,
                json.dumps(r.actions),
                r.error_kind,
                r.error,
                json.dumps(r.decision, ensure_ascii=False),
                r.seconds,
                r.finished,
            )
            for r in rows
        ]
        with self._transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", records
            )

    def _transaction(self) -> Any:
        if not self.writable:
            raise StoreError(f"{self.path}: opened read-only")
        return _Transaction(self.db)

    # -- reading ---------------------------------------------------------------------------
    def present(self, ids: list[str]) -> set[str]:
        """Which of these ids already have a row (asked in chunks: memory stays flat)."""
        found: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT id FROM results WHERE id IN ({marks})"
            found.update(row[0] for row in self.db.execute(query, chunk))
        return found

    def status(self, ids: list[str]) -> dict[str, bool]:
        """For each of these ids that has a row: whether it succeeded (chunked queries)."""
        found: dict[str, bool] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT id, ok FROM results WHERE id IN ({marks})"
            found.update((row[0], bool(row[1])) for row in self.db.execute(query, chunk))
        return found

    def errors(self) -> Iterator[ResultRow]:
        return self.rows(errors_only=True)

    def rows(self, *, errors_only: bool = False) -> Iterator[ResultRow]:
        """Every row in input order, streamed."""
        where = "WHERE ok = 0 " if errors_only else ""
        cursor = self.db.execute(f"SELECT * FROM results {where}ORDER BY seq, id")
        for record in cursor:
            yield _row(record)

    def get(self, item_id: str) -> ResultRow | None:
        record = self.db.execute("SELECT * FROM results WHERE id = ?", (item_id,)).fetchone()
        return _row(record) if record else None

    def count(self, *, errors_only: bool = False, retryable: bool = False) -> int:
        """Rows; `errors_only`: error rows; `retryable` too: those a new try may fix."""
        where = " WHERE ok = 0" if errors_only or retryable else ""
        if retryable:
            where += " AND json_extract(decision, '$.verdict.error.retryable') = 1"
        return int(self.db.execute(f"SELECT COUNT(*) FROM results{where}").fetchone()[0])

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *exc: object) -> None:
        self.db.execute("ROLLBACK" if kind else "COMMIT")


def _row(record: tuple[Any, ...]) -> ResultRow:
    (
        item_id,
        seq,
        source,
        ok,
        rating,
        category_id,
        severity,
        p_unsafe,
        actions,
        error_kind,
        error,
        decision,
        seconds,
        finished,
    ) = record
    return ResultRow(
        id=item_id,
        seq=seq,
        source=source,
        ok=bool(ok),
        rating=rating,
        category_id=category_id,
        severity=severity,
        p_unsafe=p_unsafe,
        actions=json.loads(actions),
        error_kind=error_kind,
        error=error,
        decision=json.loads(decision),
        seconds=seconds,
        finished=finished,
    )
