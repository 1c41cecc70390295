"""`policy-engine calibrate`: fit a calibration of P(Unsafe) on a labelled set, and optionally
per-category thresholds for a target, from predictions that exist (docs/tuning.md).

    policy-engine calibrate labels.jsonl --predictions run.db --out calibration.yaml
    policy-engine calibrate labels.jsonl --predictions run.db --out calibration.yaml \\
        --target recall=0.9 --write-policy tuned.yaml

The labelled samples with a scored prediction are split, stratified by rating and seeded, into a
fit part and a held-out part; the calibration and the thresholds are chosen on the fit part
and every figure is reported for both parts, so "achieved on held-out" is honest. The scores
fitted are the model's raw ones (`p_unsafe_raw` where a calibration was already applied).
Only the standard library, click, pydantic, yaml and policy_engine's light modules.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..calibration import (
    CATEGORY_KEY,
    DEFAULT_BINS,
    METHODS,
    Calibration,
    FittedFor,
    Method,
    category_nll,
    fit_category_temperature,
    fit_isotonic,
    fit_temperature,
)
from ..cli.group import user_errors
from ..host import PluginHost, get_host
from ..loader import load_policy, shipped_policies
from ..policy import Policy
from .calibrate_report import CalibrateReport, CategoryFit, Part, render_text, write_policy
from .fit_thresholds import Scored, Target, fit_thresholds, threshold_group
from .labels import EvalError, LabelledSample, Prediction, read_labels
from .predictions import Provenance, peek, read_predictions
from .reliability import CalibrationFigures

MIN_SAMPLES = 10  # scored samples needed to fit anything


@dataclass
class CalibrateOptions:
    labels: str
    predictions: str
    out: str
    policy: str | None = None
    mode: str | None = None
    method: Method = "temperature"
    name: str | None = None
    holdout: float = 0.3
    seed: int = 0
    bins: int = DEFAULT_BINS
    target: str | None = None
    min_samples: int = 20
    confidence: float = 0.95
    write_policy: str | None = None
    policy_id: str | None = None


def split(
    items: Sequence[tuple[LabelledSample, float]], holdout: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices of the fit and held-out parts: within each rating, ids sorted then shuffled by
    `seed`, and round(holdout * n) of them held out. The same inputs give the same split."""
    fit: list[int] = []
    held: list[int] = []
    rng = random.Random(seed)
    for rating in ("Unsafe", "Safe"):
        members = sorted(
            (i for i, (s, _) in enumerate(items) if s.rating == rating),
            key=lambda i: items[i][0].id,
        )
        rng.shuffle(members)
        count = round(holdout * len(members))
        held += members[:count]
        fit += members[count:]
    return sorted(fit), sorted(held)


def _policy(opts: CalibrateOptions, first_policy: str | None, host: PluginHost) -> Policy:
    if opts.policy is None and first_policy in shipped_policies():
        return load_policy(first_policy, host=host)
    return load_policy(opts.policy or "llavaguard", host=host)


def _raw(prediction: Prediction) -> float:
    if prediction.p_unsafe_raw is not None:
        return prediction.p_unsafe_raw
    assert prediction.p_unsafe is not None
    return prediction.p_unsafe


def _made_by(
    opts: CalibrateOptions, prov: Provenance, policy: Policy, policy_hash: str
) -> tuple[str, str]:
    """(model, mode) of the predictions: one model, made under `policy`, one mode."""
    if prov.model is None:
        named = ", ".join(prov.models) or "none"
        raise EvalError(
            f"{opts.predictions}: a calibration is fitted for one model; the predictions name "
            f"{named} (use a results file or the Decision lines of assess)"
        )
    if prov.policy_hash is not None and prov.policy_hash != policy_hash:
        raise EvalError(
            f"{opts.predictions}: the predictions were made under policy {prov.policy_id!r} "
            f"({prov.policy_hash[:19]}), not {policy.id!r} ({policy_hash[:19]}); give that "
            "policy with --policy"
        )
    if len(prov.policy_hashes) > 1:
        raise EvalError(f"{opts.predictions}: the predictions were made under several policies")
    mode = prov.mode or opts.mode
    if mode is None:
        raise EvalError(f"{opts.predictions}: the file does not record the mode; give --mode")
    if opts.mode is not None and opts.mode != mode:
        raise EvalError(
            f"{opts.predictions}: the predictions were made in mode {mode!r}, not {opts.mode!r}"
        )
    return prov.model, mode


def _category_row(
    sample: LabelledSample, prediction: Prediction, policy: Policy
) -> tuple[dict[str, float], str] | None:
    """(the raw category scores, the labelled category) of a labelled-Unsafe sample with a
    policy category and category scores; None for any other."""
    scores = prediction.category_scores_raw or prediction.category_scores
    if sample.rating != "Unsafe" or scores is None:
        return None
    if sample.category not in {c.id for c in policy.categories}:
        return None
    return scores, sample.category


def fit_categories(
    rows: Sequence[tuple[dict[str, float], str] | None],
    fit_index: Sequence[int],
    held_index: Sequence[int],
) -> CategoryFit:
    """A temperature of the category scores (a distribution given Unsafe), fitted on the
    labelled-Unsafe fit samples that have them, with the NLL of the labelled category before
    and after on both parts; or why there is none."""
    fit = [row for i in fit_index if (row := rows[i]) is not None]
    held = [row for i in held_index if (row := rows[i]) is not None]
    result = CategoryFit(fit_samples=len(fit), heldout_samples=len(held))
    if len(fit) < MIN_SAMPLES:
        result.note = (
            f"{len(fit)} labelled-Unsafe fit samples have category scores; {MIN_SAMPLES} needed"
        )
        return result
    if any(abs(sum(scores.values()) - 1) > 0.02 for scores, _ in fit + held):
        result.note = "the category scores do not sum to 1 (not a distribution): left as they are"
        return result
    temperature = round(fit_category_temperature(fit), 6)
    result.temperature = temperature
    result.nll = {
        name: {"before": category_nll(part), "after": category_nll(part, temperature)}
        for name, part in (("fit", fit), ("heldout", held))
        if part
    }
    return result


def run_calibrate(opts: CalibrateOptions, *, host: PluginHost | None = None) -> CalibrateReport:
    """Everything `policy-engine calibrate` does except printing; writes --out (and
    --write-policy)."""
    host = host or get_host()
    if opts.method not in METHODS:
        raise EvalError(f"--method {opts.method!r}: one of {', '.join(METHODS)}")
    if not 0.5 <= opts.confidence < 1:
        raise EvalError(f"--confidence {opts.confidence}: from 0.5 (none) to under 1")
    if not 0 < opts.holdout < 1:
        raise EvalError(f"--holdout {opts.holdout}: a share strictly between 0 and 1")
    target = Target.parse(opts.target) if opts.target is not None else None
    if opts.write_policy is not None and target is None:
        raise EvalError("--write-policy needs --target (the thresholds it writes)")
    for path in (opts.out, opts.write_policy):
        if path is not None and Path(path).exists():
            raise EvalError(f"{path}: already exists; choose another name")
    first = peek(opts.predictions)
    policy = _policy(opts, first.policy_id, host)
    compiled = host.compile(policy)
    samples = read_labels(opts.labels, policy)
    read = read_predictions(opts.predictions, samples, Path(opts.labels).parent)

    model, mode = _made_by(opts, read.provenance, policy, compiled.hash)

    items: list[tuple[LabelledSample, float]] = []
    predictions: list[Prediction] = []
    for sample in samples:
        prediction = read.predictions.get(sample.id)
        if prediction is None or not prediction.valid or prediction.p_unsafe is None:
            continue
        items.append((sample, _raw(prediction)))
        predictions.append(prediction)
    unsafe = sum(s.rating == "Unsafe" for s, _ in items)
    if len(items) < MIN_SAMPLES or unsafe == 0 or unsafe == len(items):
        raise EvalError(
            f"{opts.predictions}: {len(items)} labelled samples have a scored prediction "
            f"({unsafe} Unsafe); calibrating needs at least {MIN_SAMPLES}, of both ratings"
        )
    fit_index, held_index = split(items, opts.holdout, opts.seed)
    if not held_index or len({items[i][0].rating for i in fit_index}) < 2:
        raise EvalError("the split leaves a part without samples of both ratings; label more")

    def part(indices: Sequence[int]) -> tuple[list[float], list[bool]]:
        return [items[i][1] for i in indices], [items[i][0].rating == "Unsafe" for i in indices]

    fit_scores, fit_labels = part(fit_index)
    parameters: dict[str, Any]
    if opts.method == "temperature":
        parameters = {"temperature": round(fit_temperature(fit_scores, fit_labels), 6)}
    else:
        x, y = fit_isotonic(fit_scores, fit_labels)
        parameters = {"x": [round(v, 6) for v in x], "y": [round(v, 6) for v in y]}
    categories = fit_categories(
        [
            _category_row(sample, p, policy)
            for (sample, _), p in zip(items, predictions, strict=True)
        ],
        fit_index,
        held_index,
    )
    if categories.temperature is not None:
        parameters[CATEGORY_KEY] = categories.temperature
    fitted_for = FittedFor.of(compiled, mode, model)
    probe = Calibration.make(opts.method, parameters, fitted_for, name=opts.name)

    def figures(indices: Sequence[int]) -> Part:
        scores, labels = part(indices)
        return Part(
            samples=len(indices),
            unsafe=sum(labels),
            before=CalibrationFigures.of(scores, labels, opts.bins),
            after=CalibrationFigures.of([probe(p) for p in scores], labels, opts.bins),
        )

    fit_part, held_part = figures(fit_index), figures(held_index)
    split_info = {
        "holdout": opts.holdout,
        "seed": opts.seed,
        "stratified_by": "rating",
        "fit": len(fit_index),
        "heldout": len(held_index),
        "bins": opts.bins,
    }
    summary = {
        part_name: {
            when: {"ece": getattr(p, when).ece, "brier": getattr(p, when).brier}
            for when in ("before", "after")
        }
        for part_name, p in (("fit", fit_part), ("heldout", held_part))
    }
    calibration = Calibration.make(
        opts.method,
        parameters,
        fitted_for,
        name=opts.name,
        fit={
            "labels": opts.labels,
            "predictions": opts.predictions,
            "split": split_info,
            **summary,
        },
    )

    thresholds = None
    if target is not None:
        ids = [c.id for c in policy.categories]
        scored = [
            Scored(
                calibration(score),
                sample.rating == "Unsafe",
                threshold_group(prediction.category_id, prediction.category_scores, ids),
            )
            for (sample, score), prediction in zip(items, predictions, strict=True)
        ]
        thresholds = fit_thresholds(
            [scored[i] for i in fit_index],
            [scored[i] for i in held_index],
            target,
            ids,
            min_samples=opts.min_samples,
            confidence=opts.confidence,
        )

    Path(opts.out).write_text(calibration.dump(), encoding="utf-8")
    replaced: list[str] = []
    if opts.write_policy is not None and thresholds is not None:
        ref = opts.policy if opts.policy is not None else policy.id
        replaced = write_policy(
            Path(opts.write_policy), ref, policy, Path(opts.out), thresholds, opts.policy_id
        )
        load_policy(opts.write_policy, host=host)  # what we wrote must load

    return CalibrateReport(
        labels=opts.labels,
        predictions=opts.predictions,
        predictions_format=read.kind,
        policy={"id": policy.id, "version": policy.version, "hash": compiled.hash},
        calibration={
            "name": calibration.name,
            "hash": calibration.hash,
            "method": calibration.method,
            "parameters": calibration.parameters,
            "fitted_for": fitted_for.model_dump(),
        },
        out=opts.out,
        split=split_info,
        fit=fit_part,
        heldout=held_part,
        already_calibrated=sum(p.p_unsafe_raw is not None for p in predictions),
        categories=categories,
        thresholds=thresholds,
        policy_written=opts.write_policy,
        replaced_steps=replaced,
    )


# -- the command ----------------------------------------------------------------------------


@click.command(name="calibrate", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("labels", metavar="LABELS.jsonl")
@click.option(
    "--predictions",
    required=True,
    metavar="FILE",
    help="Scored predictions of the labelled images: a results database, or JSONL "
    "from `export` or `assess` (as `eval --predictions` reads them).",
)
@click.option(
    "--out", required=True, metavar="CALIBRATION.yaml", help="The calibration file to write (new)."
)
@click.option(
    "--method",
    type=click.Choice(list(METHODS)),
    default="temperature",
    show_default=True,
    help="temperature: one parameter, smooth; isotonic: a monotone step function "
    "(needs more data).",
)
@click.option(
    "--policy",
    "-p",
    default=None,
    help="The policy the predictions were made with (default: the file's, when shipped).",
)
@click.option(
    "--mode",
    type=click.Choice(["full", "verdict", "score"]),
    default=None,
    help="The mode the predictions were made in, when the file does not record it.",
)
@click.option("--name", default=None, help="The calibration's name (default: METHOD-HASH).")
@click.option(
    "--holdout",
    type=float,
    default=0.3,
    show_default=True,
    help="Share of each rating held out to measure the fit.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split.")
@click.option(
    "--bins",
    type=click.IntRange(min=2, max=100),
    default=DEFAULT_BINS,
    show_default=True,
    help="Equal-width bins of ECE and the reliability diagram.",
)
@click.option(
    "--target",
    default=None,
    metavar="recall=X|precision=Y|fpr=Z",
    help="Also choose per-category thresholds reaching this on the fit part.",
)
@click.option(
    "--min-samples",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Fit samples a category needs for a threshold of its own.",
)
@click.option(
    "--confidence",
    type=float,
    default=0.95,
    show_default=True,
    help="The target must hold on the fit part with this one-sided Wilson confidence "
    "(0.5: the plain figure).",
)
@click.option(
    "--write-policy",
    default=None,
    metavar="POLICY.yaml",
    help="Write a policy extending --policy with the calibration and the thresholds.",
)
@click.option("--policy-id", default=None, help="The written policy's id (default: ID-tuned).")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.pass_context
def calibrate_command(ctx: click.Context, /, fmt: str, **params: Any) -> None:
    """Fit a calibration of P(Unsafe) (and, with --target, per-category thresholds) on
    LABELS.jsonl and scored predictions of its images, reporting ECE and Brier before and
    after on a fit part and a held-out part. See docs/tuning.md.

    Exit status 1 when --target is not met on the held-out part.
    """
    with user_errors(ctx):
        report = run_calibrate(CalibrateOptions(**params))
    if fmt == "json":
        click.echo(json.dumps(report.to_json(), ensure_ascii=False, indent=2))
    else:
        click.echo(render_text(report), nl=False)
    t = report.thresholds
    if t is not None and t.met_on_heldout is False:
        click.echo(f"error: the target {t.target} is not met on the held-out part", err=True)
        ctx.exit(1)


__all__ = ["CalibrateOptions", "CalibrateReport", "calibrate_command", "run_calibrate"]
