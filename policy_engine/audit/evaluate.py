"""`policy-engine eval`: measure a model and policy against a labelled set of images.

    policy-engine eval labels.jsonl --policy llavaguard --backend sglang --url http://gpu:30000
    policy-engine eval labels.jsonl --predictions results.db --compare results-v2.db

Predictions come from running the labelled images through an Engine (optionally saved as an
audit results file with `--out`) or from an existing file (a results database, or JSONL from
`export`, `assess` or another tool). The metrics are LlavaGuard's, with Unsafe as the positive
class; `--exceptions` adds LlavaGuard's policy exception rate. This module runs a backend or
reads predictions, and holds the command; `labels` reads the labels, `predictions` the
prediction files, `metrics` measures them and `eval_report` prints the report.

This module imports only the standard library, click, pydantic and policy_engine's light
modules; the Engine (and with it Pillow) is imported when a backend actually runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..backend import Backend
from ..cli import EngineChoice, EngineCommand, engine_options
from ..cli.group import user_errors
from ..errors import PolicyEngineError
from ..host import PluginHost, get_host
from ..loader import check_policy, load_policy, shipped_policies
from ..policy import CategoryException, ExceptionStatus, Policy
from ..progress import Progress
from ..progress import wanted as progress_wanted
from ..types import check_mode
from ..verdict import Decision
from .agreement import Kappa, cohen_kappa, judge_agreement, judges_of
from .eval_report import (
    CHANGED_SHOWN,
    Changes,
    Comparison,
    EvalReport,
    LabelsInfo,
    PolicyInfo,
    PredictionsInfo,
    render_text,
)
from .labels import EvalError, LabelledSample, Prediction, read_labels
from .metrics import compare, difference, evaluate, exception_rate, ordered
from .predictions import PredictionFile, ProvenanceCollector, peek, read_predictions
from .store import ResultRow, ResultStore

if TYPE_CHECKING:
    from ..engine import Engine

EXCEPTION_REASON = "eval: policy exception rate"


class EvalFailure(PolicyEngineError):
    """The evaluation ran but measured nothing (exit 1)."""

    exit_code = 1


# -- running a backend ----------------------------------------------------------------------


def derive_exception_policy(
    policy: Policy, category: str, *, host: PluginHost | None = None
) -> Policy:
    """`policy` with `category` declared non-violating, checked and compiled (LlavaGuard's
    policy-exception augmentation)."""
    if category not in {c.id for c in policy.categories}:
        raise EvalError(f"policy {policy.id!r} has no category {category!r}")
    exception = CategoryException(status=ExceptionStatus.NON_VIOLATING, reason=EXCEPTION_REASON)
    # the derived prompt differs: a calibration fitted for the policy's prompt does not apply
    update = {"exceptions": {**policy.exceptions, category: exception}, "calibration": None}
    derived = policy.model_copy(update=update)
    check_policy(derived, host=host)
    (host or get_host()).compile(derived)
    return derived


def run_engine(
    engine: Engine,
    samples: Sequence[LabelledSample],
    base: Path,
    on_decision: Callable[[LabelledSample, Decision], None] | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Prediction]:
    """Assess every sample's image, in order, with request metadata for the post-processors:
    the label's own over `metadata` (--meta), the label winning on a shared key."""
    predictions: dict[str, Prediction] = {}
    items = ((s.image_source(base), {**(metadata or {}), **s.metadata}) for s in samples)
    for sample, decision in zip(samples, engine.assess_many(items), strict=True):
        predictions[sample.id] = Prediction.from_decision(decision)
        if on_decision is not None:
            on_decision(sample, decision)
    return predictions


class _Writer:
    """Saves decisions to a results file in transactions of `every` rows."""

    def __init__(self, store: ResultStore, every: int = 64) -> None:
        self.store, self.every = store, every
        self.pending: list[ResultRow] = []

    def add(self, row: ResultRow) -> None:
        self.pending.append(row)
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.store.write(self.pending)
            self.pending = []


# -- the options ----------------------------------------------------------------------------


@dataclass
class EvalOptions:
    """The command's options (see `eval_command`). `engine` holds the options shared with
    `assess` (`policy_engine.cli.engine_options`), `given` the flags of those set on the
    command line: with --predictions, all of them but --policy are refused (they run a
    backend), and an unset --policy means the results file's policy."""

    labels: str
    engine: EngineChoice
    given: tuple[str, ...] = ()
    predictions: str | None = None
    compare: str | None = None
    out: str | None = None
    exceptions: bool = False
    progress: bool | None = None

    @classmethod
    def from_args(cls, args: Sequence[str]) -> EvalOptions:
        """The options of the command line `policy-engine eval ARGS` (for scripts, tests)."""
        from ..cli import engine_choice

        with eval_command.make_context("eval", list(args)) as ctx:
            params = {key: value for key, value in ctx.params.items() if key != "fmt"}
            engine = engine_choice(ctx, params)
            return cls(engine=engine, given=engine.given, **params)


def _check_combination(opts: EvalOptions) -> None:
    if opts.predictions is None:
        if opts.compare is not None:
            raise EvalError("--compare needs --predictions (the run to compare against)")
        return
    given = [flag for flag in opts.given if flag != "--policy"]
    own = (("--out", opts.out), ("--exceptions", opts.exceptions))
    given += [flag for flag, value in own if value]
    if given:
        raise EvalError(
            f"{', '.join(given)} cannot be used with --predictions (they run a backend)"
        )


def _engine_values(choice: EngineChoice) -> tuple[dict[str, Any], dict[str, Any]]:
    """The backend options and the request metadata. A pair that is not KEY=VALUE is an
    EvalError (one line, like every eval error) rather than EngineChoice's usage error."""
    for flag, pairs in (("--option", choice.options), ("--meta", choice.meta)):
        for pair in pairs:
            key, sep, _ = pair.partition("=")
            if not sep or not key:
                raise EvalError(f"{flag} {pair!r}: expected KEY=VALUE")
    return choice.backend_options(), choice.metadata


# -- evaluating -----------------------------------------------------------------------------


def _labels_info(path: str, samples: Sequence[LabelledSample]) -> LabelsInfo:
    unsafe = sum(s.rating == "Unsafe" for s in samples)
    return LabelsInfo(
        path=path,
        samples=len(samples),
        unsafe=unsafe,
        safe=len(samples) - unsafe,
        exception_samples=sum(s.exception for s in samples),
    )


def _policy_info(policy: Policy, host: PluginHost) -> PolicyInfo:
    return PolicyInfo(id=policy.id, version=policy.version, hash=host.compile(policy).hash)


def run_eval(opts: EvalOptions, *, host: PluginHost | None = None) -> EvalReport:
    """Everything `policy-engine eval` does except printing."""
    host = host or get_host()
    _check_combination(opts)
    labels_path = Path(opts.labels)
    if not labels_path.is_file():
        raise EvalError(f"{opts.labels}: no such labels file")
    if opts.predictions is not None:
        return _eval_predictions(opts, host)
    return _eval_backend(opts, host)


def _eval_predictions(opts: EvalOptions, host: PluginHost) -> EvalReport:
    assert opts.predictions is not None
    # fail on a bad predictions file before reading the labels
    first = peek(opts.predictions)
    if opts.compare is not None:
        peek(opts.compare)
    made_by = first.policy_id or ""
    shipped = made_by.rpartition("@")[0] or made_by  # ID@LEVEL: a shipped policy at a level
    if "--policy" not in opts.given and shipped in shipped_policies():
        policy = load_policy(made_by, host=host)
    else:
        policy = load_policy(opts.engine.policy or "llavaguard", host=host)
    samples = read_labels(opts.labels, policy)
    base = Path(opts.labels).parent
    order = [*(c.id for c in policy.categories), policy.none_category.id]
    read = read_predictions(opts.predictions, samples, base)
    evaluation = evaluate(samples, read.predictions, order)
    comparison = None
    if opts.compare is not None:
        other_read = read_predictions(opts.compare, samples, base)
        other = evaluate(samples, other_read.predictions, order)
        compared, fixed, broken = compare(samples, read.predictions, other_read.predictions)
        comparison = Comparison(
            predictions=_file_info(other_read),
            other=other,
            difference=difference(evaluation, other),
            compared=compared,
            fixed=Changes(count=len(fixed), ids=fixed[:CHANGED_SHOWN]),
            broken=Changes(count=len(broken), ids=broken[:CHANGED_SHOWN]),
            kappa=_kappa(samples, read.predictions, other_read.predictions),
            judges=judge_agreement(other_read.judges),
        )
    return EvalReport(
        labels=_labels_info(opts.labels, samples),
        policy=_policy_info(policy, host),
        predictions=_file_info(read),
        evaluation=evaluation,
        compare=comparison,
        judges=judge_agreement(read.judges),
    )


def _kappa(
    samples: Sequence[LabelledSample],
    a: Mapping[str, Prediction],
    b: Mapping[str, Prediction],
) -> Kappa:
    """Cohen's kappa of runs A and B on the samples both rated validly."""
    pairs = []
    for sample in samples:
        first, second = a.get(sample.id), b.get(sample.id)
        if first is not None and second is not None and first.valid and second.valid:
            pairs.append((first.rating, second.rating))
    return cohen_kappa("A", "B", pairs)


def _file_info(read: PredictionFile) -> PredictionsInfo:
    return PredictionsInfo(
        kind="file",
        path=read.path,
        format=read.kind,
        matching=read.matching,
        **read.provenance.model_dump(),
    )


def _eval_backend(opts: EvalOptions, host: PluginHost) -> EvalReport:
    from ..engine import Engine, make_backend

    choice = opts.engine
    mode = check_mode(choice.mode)
    policy = load_policy(choice.policy or "llavaguard", host=host)
    samples = read_labels(opts.labels, policy)
    base = Path(opts.labels).parent
    if opts.out is not None and Path(opts.out).exists():
        raise EvalError(f"{opts.out}: already exists; choose another --out")
    backend_options, metadata = _engine_values(choice)
    order = [*(c.id for c in policy.categories), policy.none_category.id]
    exception_samples = (
        [s for s in samples if s.rating == "Unsafe" and s.category != policy.none_category.id]
        if opts.exceptions
        else []
    )
    derived = {
        key: derive_exception_policy(policy, key, host=host)
        for key in ordered({s.category for s in exception_samples}, order)
    }
    # One backend instance (weights loaded once) shared by the engine of every policy: hence
    # not EngineChoice.build, whose Engine makes a backend of its own.
    backend: Backend = make_backend(choice.backend, backend_options, host)
    progress = Progress(
        len(samples) + len(exception_samples), enabled=progress_wanted(opts.progress)
    )
    store: ResultStore | None = None
    writer: _Writer | None = None
    try:
        engine = Engine(
            policy,
            backend,
            mode=mode,
            batch_size=choice.batch_size,
            host=host,
            shadow=choice.shadow,  # recorded in --out's rows; the metrics are the live policy's
            calibration=choice.calibration,
        )
        engine.load()
        if opts.out is not None:
            store = ResultStore(opts.out, create=True)
            from .runner import results_meta  # the engine's module: imported when running

            store.set_meta(results_meta(engine, opts.labels))
            writer = _Writer(store)
        seq = iter(range(len(samples)))
        judges: dict[str, dict[str, str | None]] = {}
        collector = ProvenanceCollector(
            {
                "policy_id": policy.id,
                "policy_version": policy.version,
                "policy_hash": engine.compiled.hash,
            }
        )

        def record(sample: LabelledSample, decision: Decision) -> None:
            progress.update(decision)
            said = judges_of(decision.verdict.model_dump(mode="json", include={"judges"}))
            if said is not None:
                judges[sample.id] = said
            collector.add(decision.verdict.model_dump(mode="json", exclude_none=True))
            if writer is not None:
                writer.add(ResultRow.from_decision(sample.id, next(seq), decision))

        predictions = run_engine(engine, samples, base, record, metadata=metadata)
        rate = None
        if opts.exceptions:
            derived_predictions: dict[str, Prediction] = {}
            for key, derived_policy in derived.items():
                derived_engine = Engine(
                    derived_policy,
                    backend,
                    mode=mode,
                    batch_size=choice.batch_size,
                    host=host,
                )
                group = [s for s in exception_samples if s.category == key]
                derived_predictions.update(
                    run_engine(
                        derived_engine,
                        group,
                        base,
                        lambda _, d: progress.update(d),
                        metadata=metadata,
                    )
                )
            rate = exception_rate(exception_samples, derived_predictions, order)
    finally:
        progress.close()
        backend.close()
        if store is not None:
            try:
                if writer is not None:
                    writer.flush()  # what was assessed is kept, even after Ctrl-C
            finally:
                store.close()
    return EvalReport(
        labels=_labels_info(opts.labels, samples),
        policy=PolicyInfo(id=policy.id, version=policy.version, hash=engine.compiled.hash),
        predictions=PredictionsInfo(
            kind="backend",
            path=opts.out,
            **collector.result(backend=backend.name, mode=mode).model_dump(),
        ),
        evaluation=evaluate(samples, predictions, order),
        exception_rate=rate,
        judges=judge_agreement(judges),
    )


# -- the command ----------------------------------------------------------------------------


@click.command(
    name="eval", cls=EngineCommand, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.argument("labels", metavar="LABELS.jsonl")
@engine_options()
@click.option(
    "--out",
    metavar="RESULTS.db",
    default=None,
    help="Save every decision to a new results file (readable with --predictions).",
)
@click.option(
    "--exceptions",
    is_flag=True,
    help="Also measure the policy exception rate (runs labelled-Unsafe images again).",
)
@click.option(
    "--predictions",
    metavar="FILE",
    default=None,
    help="Evaluate existing predictions instead of running a backend: a results database, "
    "JSONL from `export`, the JSONL `assess` prints (matched by image path), or minimal JSONL "
    '({"id", "rating", "category_id", "p_unsafe"}). The backend options do not apply; '
    "--policy defaults to the file's policy when it is a shipped one.",
)
@click.option(
    "--compare",
    metavar="FILE",
    default=None,
    help="With --predictions: compare with a second predictions file (any of those kinds).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "html"]),
    default="text",
    show_default=True,
    help="text: for people; json: one JSON object for scripts; html: a page with the "
    "reliability diagram.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="A progress bar on stderr (default: when stderr is a terminal).",
)
@click.pass_context
def eval_command(ctx: click.Context, /, fmt: str, engine: EngineChoice, **params: Any) -> None:
    """Measure predictions against LABELS.jsonl (rating, category) with LlavaGuard's metrics.

    Either run a backend on the labelled images (with the options `assess` takes; --out to keep
    the decisions), or read existing predictions (--predictions, --compare): a results file,
    or JSONL from `export`, `assess` or another tool. See docs/eval.md.
    """
    with user_errors(ctx):
        report = run_eval(EvalOptions(engine=engine, given=engine.given, **params))
        if report.evaluation.coverage.valid == 0:
            _print(report, fmt)
            raise EvalFailure("no labelled sample has a valid prediction")
    _print(report, fmt)
    coverage = report.evaluation.coverage
    if coverage.invalid:
        click.echo(
            f"error: {coverage.invalid} of {coverage.predicted} predictions are errors "
            "(excluded from the metrics; the report lists their ids)",
            err=True,
        )
        ctx.exit(1)


def _print(report: EvalReport, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(report.to_json(), ensure_ascii=False, indent=2))
    elif fmt == "html":
        from .eval_html import render_html

        click.echo(render_html(report), nl=False)
    else:
        click.echo(render_text(report), nl=False)
