"""`policy-engine audit --executor ray`: the audit's ledger, Ray Data's workers.

The driver (this process) keeps everything that makes an audit trustworthy, exactly as the
local audit does: it reads the source's ids and asks the SQLite ledger which are still to do
(`pending_items`), and it alone writes rows, in small transactions, as results stream back.
Ray supplies only the parallelism: a Dataset of ids and image paths (never image bytes, except
for datasets that embed them), mapped by an actor pool where each actor holds one loaded
Engine built from the same options as the CLI's and reads its images itself.

Exactly once: rows are keyed by id; a run skips the ids already in the ledger; an id that comes
back twice within a run (a retried batch) is written once. Killing the driver (SIGKILL
included) loses at most the uncommitted rows, which the next run redoes. A dead actor is Ray's
to restart; its batch is retried (Ray Data's actor pools retry by default).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from .. import errors
from ..aggregate import Post
from ..engine import Engine
from ..errors import PolicyEngineError
from ..progress import Progress
from ..verdict import Decision
from .runner import (
    WHOLE,
    AuditStats,
    RowWriter,
    audit_meta,
    check_resumable,
    finish_audit,
    pending_items,
)
from .sources import Shard, Source
from .store import ResultRow, ResultStore

log = logging.getLogger(__name__)

ROWS_PER_CALL = 16  # images per actor call: small enough to lose little when an actor dies
MAX_BLOCKS = 100_000  # beyond this, blocks grow instead (Ray's per-block bookkeeping)


@dataclass(frozen=True)
class RaySettings:
    """`--ray-address`, `--workers`, `--cpus-per-worker`, `--gpus-per-worker`."""

    address: str | None = None
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


def run_ray_audit(
    engine: Engine,
    source: Source,
    store: ResultStore,
    settings: RaySettings,
    *,
    shard: Shard = WHOLE,
    retry_errors: bool = False,
    metadata: dict[str, Any] | None = None,
    progress: Progress | None = None,
    commit_every: int = 64,
    commit_seconds: float = 1.0,
) -> AuditStats:
    """Like `run_audit`, with `engine` (built, not loaded: the driver never loads the model)
    rebuilt in each of `settings.workers` Ray actors."""
    from ..ray import EngineActor, EngineSpec, ray_session

    meta = audit_meta(engine, source, shard)
    check_resumable(store, meta)
    started = store.meta.get("started", str(time.time()))
    store.set_meta({**meta, "executor": "ray", "started": started})
    stats = AuditStats()
    todo = [
        {
            "id": item.id,
            "seq": item.seq,
            "source": item.source,
            "path": item.image if isinstance(item.image, str) else "",
            "data": item.image if isinstance(item.image, bytes) else b"",
            # a post (a manifest row's list of paths) as JSON; "" for one image or video
            "post": json.dumps(list(item.image.images)) if isinstance(item.image, Post) else "",
            "metadata": json.dumps({**(metadata or {}), **item.metadata}, default=str),
        }
        for item in pending_items(source, store, stats, shard=shard, retry_errors=retry_errors)
    ]
    stats.total = len(todo)
    if progress is not None:
        progress.set_total(stats.total)
    if todo:
        need = settings.workers * settings.cpus_per_worker
        with ray_session(settings.address, num_cpus=need) as ray:
            logging.getLogger("ray.data").setLevel(logging.WARNING)  # plans, "finished in"
            # its warning that progress bars are off: they are, on purpose
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False  # ours is the one progress line
            blocks = block_count(len(todo), settings.workers)
            dataset = ray.data.from_items(todo, override_num_blocks=blocks).map_batches(
                EngineActor,
                fn_constructor_kwargs={"spec": EngineSpec.from_engine(engine), "output": "ledger"},
                compute=ray.data.ActorPoolStrategy(size=settings.workers),
                batch_size=ROWS_PER_CALL,
                num_cpus=settings.cpus_per_worker,
                num_gpus=settings.gpus_per_worker or None,
            )
            try:
                _collect(dataset, store, stats, progress, commit_every, commit_seconds)
            except ray.exceptions.RayError as err:
                raise _as_user_error(err) from None
    finish_audit(store, stats, retry_errors=retry_errors)
    return stats


def block_count(items: int, workers: int) -> int:
    """How many blocks to cut `items` inputs into: one per actor call, so each result streams
    back (and is committed) as soon as its call ends and a retried call redoes few images; at
    least one per worker, so a small job still uses every worker (12 images in one block kept
    one of two actors idle)."""
    return min(MAX_BLOCKS, max(math.ceil(items / ROWS_PER_CALL), min(items, workers)))


def _collect(
    dataset: Any,
    store: ResultStore,
    stats: AuditStats,
    progress: Progress | None,
    commit_every: int,
    commit_seconds: float,
) -> None:
    """Write results as they stream back (in completion order), each id once."""
    written: set[str] = set()
    writer = RowWriter(store, commit_every, commit_seconds)
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for item_id, seq, source, text, seconds in zip(
                batch["id"],
                batch["seq"],
                batch["source"],
                batch["decision"],
                batch["seconds"],
                strict=True,
            ):
                item_id = str(item_id)
                if item_id in written:
                    log.debug("ray returned %r twice; kept the first", item_id)
                    continue
                written.add(item_id)
                decision = Decision.model_validate_json(str(text))
                took = None if math.isnan(seconds) else float(seconds)
                writer.add(ResultRow.from_decision(item_id, int(seq), decision, took, str(source)))
                stats.count(decision)
                if progress is not None:
                    progress.update(decision)
    except KeyboardInterrupt:
        stats.interrupted = True
    finally:
        writer.flush()


_ENGINE_ERROR = re.compile(r"^policy_engine\.errors\.(\w+): (.+)$", re.M)


def _as_user_error(err: Exception) -> PolicyEngineError:
    """A Ray job failure in one line. Ray does not hand back the worker's exception object
    (an actor that failed to start arrives as ActorDiedError with the traceback as text): an
    engine error in that text keeps its message and exit status; anything else is a fault."""
    log.debug("the Ray job failed", exc_info=err)
    found = _ENGINE_ERROR.findall(str(err))
    if found:
        name, message = found[-1]
        error = PolicyEngineError(f"a Ray worker failed: {message.strip()}")
        error.exit_code = getattr(errors, name, PolicyEngineError).exit_code
        return error
    first = next((line for line in str(err).splitlines() if line.strip()), "")
    error = PolicyEngineError(f"the Ray job failed: {type(err).__name__}: {first.strip()}")
    error.exit_code = 1
    return error
