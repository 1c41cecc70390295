"""Merging the results files of a sharded audit, with the checks that make it trustworthy."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from .runner import IDENTITY
from .sources import Shard, Source
from .store import ResultStore, StoreError

SAME = tuple(key for key in IDENTITY if key not in ("shard", "source"))


def merge_shards(paths: list[Path], out: Path, *, source: Source | None = None) -> dict[str, Any]:
    """Copy every shard's rows into `out` and say what was merged. Refuses (StoreError):
    shards of different audits (policy, backend, mode), a missing, repeated or unfinished
    shard, an input present in two shards, and, given the source, inputs that are missing."""
    if out.exists():
        raise StoreError(f"{out} exists; merge into a new file")
    stores = [ResultStore(path) for path in paths]
    try:
        metas = [store.meta for store in stores]
        first = metas[0]
        for path, meta in zip(paths[1:], metas[1:], strict=True):
            for key in SAME:
                if meta.get(key) != first.get(key):
                    raise StoreError(
                        f"{path} is another audit than {paths[0]} ({key.replace('_', ' ')} "
                        f"{meta.get(key)!r} vs {first.get(key)!r})"
                    )
        shards = _check_shards(paths, metas)
        with ResultStore(out, create=True) as merged:
            for store in stores:
                try:
                    _copy(store, merged)
                except sqlite3.IntegrityError:
                    raise StoreError(
                        f"an input is in two shards ({store.path} and an earlier one): were "
                        "they run with different --shard counts?"
                    ) from None
            merged.set_meta(
                {
                    **{k: v for k, v in first.items() if k not in ("shard", "schema_version")},
                    "shard": "",
                    "merged_from": ", ".join(str(p) for p in paths),
                    "started": min(m.get("started", "") for m in metas) or "",
                    "finished": max(m.get("finished", "") for m in metas) or "",
                    "total": str(merged.count()),
                }
            )
            report: dict[str, Any] = {
                "out": str(out),
                "shards": shards,
                "rows": merged.count(),
                "errors": merged.count(errors_only=True),
            }
            if source is not None:
                report["coverage"] = _coverage(source, merged)
    finally:
        for store in stores:
            store.close()
    return report


def _check_shards(paths: list[Path], metas: list[dict[str, str]]) -> int:
    specs = [meta.get("shard", "") for meta in metas]
    if len(paths) == 1 and not specs[0]:
        return 1
    parsed = []
    for path, spec in zip(paths, specs, strict=True):
        if not spec:
            raise StoreError(f"{path} is not a shard (it was run without --shard)")
        parsed.append((Shard.parse(spec), path))
    counts = {shard.count for shard, _ in parsed}
    if len(counts) != 1:
        raise StoreError(f"the shards were cut differently: {', '.join(specs)}")
    count = counts.pop()
    seen: dict[int, Path] = {}
    for shard, path in parsed:
        if shard.index in seen:
            raise StoreError(f"shard {shard} twice: {seen[shard.index]} and {path}")
        seen[shard.index] = path
    missing = [f"{i}/{count}" for i in range(1, count + 1) if i not in seen]
    if missing:
        raise StoreError(f"missing shard(s) {', '.join(missing)}")
    for path, meta in zip(paths, metas, strict=True):
        if "finished" not in meta:
            raise StoreError(f"{path} is unfinished: run its audit command again to complete it")
    return count


def _copy(store: ResultStore, merged: ResultStore) -> None:
    merged.db.execute("ATTACH DATABASE ? AS shard", (str(store.path),))
    try:
        merged.db.execute("BEGIN IMMEDIATE")
        try:
            merged.db.execute("INSERT INTO results SELECT * FROM shard.results")
        except BaseException:
            merged.db.execute("ROLLBACK")
            raise
        merged.db.execute("COMMIT")
    finally:
        merged.db.execute("DETACH DATABASE shard")


def _coverage(source: Source, merged: ResultStore) -> dict[str, Any]:
    """Every input of the source exactly once: ids missing from the results, and rows that
    are not in the source (a stale or foreign row)."""
    missing: list[str] = []
    total = 0
    chunk: list[str] = []

    def flush() -> None:
        found = merged.present(chunk)
        missing.extend(i for i in chunk if i not in found)
        chunk.clear()

    for item_id in source.ids():
        total += 1
        chunk.append(item_id)
        if len(chunk) >= 500:
            flush()
    flush()
    extra = merged.count() - (total - len(missing))
    result = {"inputs": total, "missing": len(missing), "extra": extra}
    if missing or extra:
        raise StoreError(
            f"coverage: {len(missing)} of {total} inputs missing"
            + (f" (e.g. {', '.join(missing[:5])})" if missing else "")
            + (f", {extra} rows not in the source" if extra else "")
        )
    return result
