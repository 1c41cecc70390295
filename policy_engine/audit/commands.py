"""CLI commands for dataset audits: `audit`, `merge`, `export` (see docs/audit.md).

Registered on the CLI group by `policy_engine.cli`; heavy work is imported inside the commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..cli import EngineChoice, EngineCommand, engine_options
from ..errors import PolicyEngineError
from ..progress import Progress, wanted


@click.command(cls=EngineCommand)
@click.argument("source", metavar="SOURCE")
@engine_options()
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The results file (SQLite); run the same command again to continue.",
)
@click.option("--shard", default="1/1", show_default=True, help="Shard I/N of the source.")
@click.option("--retry-errors", is_flag=True, help="Re-run only the items whose row is an error.")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="Requests in flight (HTTP backends) or batches in flight.",
)
@click.option("--image-column", default=None, help="Datasets: the column holding images.")
@click.option("--id-column", default=None, help="Datasets: the column holding ids.")
@click.option(
    "--durable",
    is_flag=True,
    help="fsync every commit: survives power loss too, at some speed (see docs/audit.md).",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="A progress bar on stderr (default: when stderr is a terminal).",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process; ray: an actor pool on Ray Data (the `ray` extra; docs/scale.md).",
)
@click.option(
    "--ray-address",
    default=None,
    metavar="ADDRESS",
    help="Ray: the cluster to join (default: start a local Ray for this run).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Ray: actors, each with its own loaded backend [default: 1].",
)
@click.option(
    "--cpus-per-worker",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Ray: CPUs reserved per actor [default: 1].",
)
@click.option(
    "--gpus-per-worker",
    type=click.FloatRange(min=0),
    default=None,
    help="Ray: GPUs reserved per actor [default: 0].",
)
def audit(
    source: str,
    out: Path,
    shard: str,
    retry_errors: bool,
    concurrency: int | None,
    image_column: str | None,
    id_column: str | None,
    durable: bool,
    progress: bool | None,
    executor: str,
    ray_address: str | None,
    workers: int | None,
    cpus_per_worker: float | None,
    gpus_per_worker: float | None,
    engine: EngineChoice,
) -> None:
    """Judge every image of SOURCE into a resumable results file.

    SOURCE is a folder (recursive), a glob, a .txt list of paths, a .jsonl or .csv manifest
    (`id`, `path`, other columns become metadata), or a Hugging Face dataset (save_to_disk
    folder or parquet files). Kill it at any moment and run the same command again: it
    continues, and every input ends up exactly once in the results.

    `--executor ray` spreads the work over Ray actors (a local Ray, or --ray-address's
    cluster) with the same results file and guarantees (docs/scale.md).

    Exit status 1 when rows are errors (each has its reason: `policy-engine report`).
    """
    ray_given = {
        "--ray-address": ray_address,
        "--workers": workers,
        "--cpus-per-worker": cpus_per_worker,
        "--gpus-per-worker": gpus_per_worker,
    }
    misplaced = [name for name, value in ray_given.items() if value is not None]
    if executor != "ray" and misplaced:
        raise PolicyEngineError(f"{misplaced[0]} applies to --executor ray only")
    if executor == "ray" and engine.shadow is not None:
        raise PolicyEngineError("--shadow runs with --executor local only")
    if executor == "ray":
        from ..ray import require_ray

        require_ray()  # before anything is loaded or created
    from .runner import audit_meta, check_resumable, run_audit
    from .sources import Shard, Source
    from .store import ResultStore

    the_shard = Shard.parse(shard)
    the_source = Source.open(source, image_column=image_column, id_column=id_column)
    built = engine.build(concurrency=concurrency)
    show = wanted(progress)
    new_file = not out.exists()
    store = ResultStore(out, create=True, durable=durable)
    with store, built:
        check_resumable(store, audit_meta(built, the_source, the_shard))  # before loading
        if show:
            where = " in each Ray worker" if executor == "ray" else ""
            click.echo(f"loading backend {built.backend.name!r}{where}…", err=True)
        try:
            if executor == "local":
                built.load()  # Ray workers load their own; the driver never does
        except BaseException:
            if new_file:  # a start that failed leaves no empty results file behind
                store.close()
                for leftover in (out, *(out.with_name(out.name + s) for s in ("-wal", "-shm"))):
                    leftover.unlink(missing_ok=True)
            raise
        with Progress(None, enabled=show) as bar:
            if executor == "ray":
                from .ray_executor import RaySettings, run_ray_audit

                settings = RaySettings(
                    address=ray_address,
                    workers=workers or 1,
                    cpus_per_worker=cpus_per_worker or 1.0,
                    gpus_per_worker=gpus_per_worker or 0.0,
                )
                stats = run_ray_audit(
                    built,
                    the_source,
                    store,
                    settings,
                    shard=the_shard,
                    retry_errors=retry_errors,
                    metadata=engine.metadata,
                    progress=bar if show else None,
                )
            else:
                stats = run_audit(
                    built,
                    the_source,
                    store,
                    shard=the_shard,
                    retry_errors=retry_errors,
                    metadata=engine.metadata,
                    progress=bar if show else None,
                )
        total, errors = store.count(), store.count(errors_only=True)
        retryable = store.count(errors_only=True, retryable=True)
    summary = {"results": str(out), "total": total, "errors": errors, "run": stats.to_dict()}
    click.echo(json.dumps(summary, ensure_ascii=False))
    if stats.interrupted:
        click.echo(
            f"interrupted after {stats.assessed:,} images; run the same command to continue",
            err=True,
        )
        sys.exit(130)
    if stats.duplicates:
        click.echo(
            f"note: {stats.duplicates:,} inputs share their id with another input; the results "
            "hold one row per id (give manifests unique ids)",
            err=True,
        )
    if errors:
        hint = f"`policy-engine report {out}` shows why"
        if retryable:
            hint += f"; `--retry-errors` re-runs them ({retryable:,} may succeed on a new try)"
        click.echo(f"error: {errors:,} of {total:,} rows are errors: {hint}", err=True)
        sys.exit(1)


@click.command()
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--source",
    "source",
    default=None,
    help="Also check that every input of SOURCE is in the merged results exactly once.",
)
@click.option("--image-column", default=None)
@click.option("--id-column", default=None)
def merge(
    shards: tuple[Path, ...],
    out: Path,
    source: str | None,
    image_column: str | None,
    id_column: str | None,
) -> None:
    """Combine the results files of an audit's shards (--shard I/N) into one, checking that
    the shards belong together, that none is missing or unfinished, and that no input is in
    two of them."""
    from .merge import merge_shards
    from .sources import Source

    the_source = None
    if source is not None:
        the_source = Source.open(source, image_column=image_column, id_column=id_column)
    report = merge_shards(list(shards), out, source=the_source)
    click.echo(json.dumps(report, ensure_ascii=False))


@click.command(name="export")
@click.argument("results", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("target", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "parquet"]),
    default=None,
    help="Default: from TARGET's extension.",
)
@click.option("--errors-only", is_flag=True, help="Only the error rows.")
def export_command(results: Path, target: Path, fmt: str | None, errors_only: bool) -> None:
    """Write an audit's results as JSONL (one Decision row per line) or Parquet."""
    from .export import export

    fmt = fmt or ("parquet" if target.suffix.lower() == ".parquet" else "jsonl")
    if fmt == "jsonl" and target.suffix.lower() not in (".jsonl", ".ndjson", ".json", ""):
        raise PolicyEngineError(f"{target}: say --format (jsonl or parquet)")
    count = export(results, target, fmt, errors_only=errors_only)
    click.echo(json.dumps({"rows": count, "target": str(target), "format": fmt}))


@click.command(name="test", cls=EngineCommand)
@click.argument("policy", metavar="POLICY")
@engine_options(policy=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per case on stdout.")
def test_command(policy: str, as_json: bool, engine: EngineChoice) -> None:
    """Run the test cases POLICY carries (its `tests:`) and exit 1 if any fails.

    A case judges its image with the chosen backend, or assumes the verdict it gives
    (`given:`, no model needed), and compares the rating, category and actions it expects: a
    policy's post-processing is checked in CI like code.
    """
    from .policy_tests import run_policy_tests

    built = engine.with_policy(policy).build()
    if not built.policy.tests:
        raise PolicyEngineError(f"{policy}: the policy has no tests (add a `tests:` list)")
    with built:  # the backend loads only if a case has an image to judge
        results = run_policy_tests(built)
    failed = [r for r in results if not r.passed]
    for result in results:
        if as_json:
            click.echo(json.dumps(result.to_dict(), ensure_ascii=False))
            continue
        mark = "PASS" if result.passed else "FAIL"
        click.echo(f"{mark}  {result.index + 1}. {result.title}")
        for failure in result.failures:
            click.echo(f"      {failure}")
    summary = f"{len(results) - len(failed)} of {len(results)} cases passed"
    click.echo(summary if not failed else f"error: {summary}", err=True)
    if failed:
        sys.exit(1)
