"""Exporting a results file: JSONL (one row per line) or Parquet (typed columns).

Every exported row says where its verdict came from: the model and decoding that answered,
whether that model has random weights, and the policy id, version and hash (all read from the
row's verdict), beside the full Decision. Parquet files also carry the results file's meta
(`policy_engine.meta` in the schema's metadata). When rows came from a random-weights model
the export logs a warning (the CLI prints it on stderr).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import PolicyEngineError
from .report_provenance import Provenance, is_random_weights
from .store import ResultRow, ResultStore

__all__ = ["BATCH", "export", "row_record"]

BATCH = 1024
META_KEY = b"policy_engine.meta"
"""The Parquet schema metadata key holding the results file's meta as JSON."""

log = logging.getLogger(__name__)


def row_record(row: ResultRow) -> dict[str, Any]:
    """One row as plain data: the columns, the verdict's provenance (model, decoding,
    random_weights, policy id/version/hash), and the full Decision under `decision`."""
    verdict = row.decision.get("verdict")
    verdict = verdict if isinstance(verdict, dict) else {}
    model = verdict.get("model")
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
        "model": model if isinstance(model, str) else None,
        "decoding": verdict.get("decoding"),
        "random_weights": is_random_weights(model),
        "policy_id": _text(verdict.get("policy_id")),
        "policy_version": _text(verdict.get("policy_version")),
        "policy_hash": _text(verdict.get("policy_hash")),
        "decision": row.decision,
    }


def export(results: Path, target: Path, fmt: str, *, errors_only: bool = False) -> int:
    """Write the rows (streamed, in input order) to `target` atomically; returns the count.

    Logs a warning when some rows were judged by a random-weights model."""
    partial = target.with_name(target.name + ".partial")
    provenance = Provenance()
    with ResultStore(results) as store:
        meta = store.meta
        rows = _counted(store.rows(errors_only=errors_only), provenance)
        count = _parquet(rows, partial, meta) if fmt == "parquet" else _jsonl(rows, partial)
    os.replace(partial, target)
    if provenance.warning:
        log.warning("%s: %s", target, provenance.warning)
    return count


def _counted(rows: Iterable[ResultRow], provenance: Provenance) -> Iterator[ResultRow]:
    for row in rows:
        provenance.add(row.decision)
        yield row


def _jsonl(rows: Iterable[ResultRow], path: Path) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row_record(row), ensure_ascii=False) + "\n")
            count += 1
    return count


def _parquet(rows: Iterable[ResultRow], path: Path, meta: dict[str, str]) -> int:
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
            ("model", pa.string()),
            ("decoding", pa.string()),  # the verdict's decoding as JSON text
            ("random_weights", pa.bool_()),
            ("policy_id", pa.string()),
            ("policy_version", pa.string()),
            ("policy_hash", pa.string()),
            ("decision", pa.string()),  # the full Decision as JSON text
        ],
        metadata={META_KEY: json.dumps(meta, ensure_ascii=False).encode("utf-8")},
    )
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in rows:
            record = row_record(row)
            record["decision"] = json.dumps(record["decision"], ensure_ascii=False)
            if record["decoding"] is not None:
                record["decoding"] = json.dumps(record["decoding"], ensure_ascii=False)
            batch.append(record)
            if len(batch) >= BATCH:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count += len(batch)
                batch = []
        if batch or count == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    return count


def _text(value: object) -> str | None:
    return None if value is None else str(value)
