"""Exporting an audit's results: JSONL (one row per line) or Parquet (typed columns)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import PolicyEngineError
from .store import ResultRow, ResultStore

BATCH = 1024


def row_record(row: ResultRow) -> dict[str, Any]:
    """One row as plain data: the columns, and the full Decision under `decision`."""
    return {
        "id": row.id,
        "seq": row.seq,
        "source": row.source,
        "ok": row.ok,
        "rating": row.rating,
        "category_id": row.category_id,
        "severity": row.severity,
        "p_unsafe": row.p_unsafe,
        "actions": row.actions,
        "error_kind": row.error_kind,
        "error": row.error,
        "seconds": row.seconds,
        "finished": row.finished,
        "decision": row.decision,
    }


def export(results: Path, target: Path, fmt: str, *, errors_only: bool = False) -> int:
    """Write the rows (streamed, in input order) to `target` atomically; returns the count."""
    partial = target.with_name(target.name + ".partial")
    with ResultStore(results) as store:
        rows = store.rows(errors_only=errors_only)
        count = _parquet(rows, partial) if fmt == "parquet" else _jsonl(rows, partial)
    os.replace(partial, target)
    return count


def _jsonl(rows: Any, path: Path) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row_record(row), ensure_ascii=False) + "\n")
            count += 1
    return count


def _parquet(rows: Any, path: Path) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise PolicyEngineError(
            "Parquet export needs pyarrow: pip install 'policy-engine[audit]'"
        ) from None
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("seq", pa.int64()),
            ("source", pa.string()),
            ("ok", pa.bool_()),
            ("rating", pa.string()),
            ("category_id", pa.string()),
            ("severity", pa.string()),
            ("p_unsafe", pa.float64()),
            ("actions", pa.list_(pa.string())),
            ("error_kind", pa.string()),
            ("error", pa.string()),
            ("seconds", pa.float64()),
            ("finished", pa.float64()),
            ("decision", pa.string()),  # the full Decision as JSON text
        ]
    )
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in rows:
            record = row_record(row)
            record["decision"] = json.dumps(record["decision"], ensure_ascii=False)
            batch.append(record)
            if len(batch) >= BATCH:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count += len(batch)
                batch = []
        if batch or count == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    return count
