"""The report of `policy-engine calibrate` (JSON and text) and the policy it writes.

Only the standard library, pydantic, yaml and policy_engine's light modules.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from ..loader import is_path_like
from ..policy import Policy
from .fit_thresholds import ThresholdFit
from .predictions import KIND_NAMES
from .reliability import CalibrationFigures, reliability_text

STEP_ID = "fitted-thresholds"


class Part(BaseModel):
    """ECE and Brier (and the reliability bins) of one part, before and after."""

    samples: int
    unsafe: int
    before: CalibrationFigures
    after: CalibrationFigures


class CategoryFit(BaseModel):
    """The category scores' temperature (None: not fitted, `note` says why) and the mean NLL of
    the labelled category before and after, per part (labelled-Unsafe samples only)."""

    fit_samples: int
    heldout_samples: int
    temperature: float | None = None
    nll: dict[str, dict[str, float]] | None = None
    note: str | None = None


class CalibrateReport(BaseModel):
    labels: str
    predictions: str
    predictions_format: str
    policy: dict[str, str]
    calibration: dict[str, Any]
    out: str
    split: dict[str, Any]
    fit: Part
    heldout: Part
    already_calibrated: int
    categories: CategoryFit | None = None
    thresholds: ThresholdFit | None = None
    policy_written: str | None = None
    replaced_steps: list[str] = []

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def write_policy(
    path: Path,
    ref: str,
    policy: Policy,
    calibration: Path,
    thresholds: ThresholdFit,
    policy_id: str | None,
) -> list[str]:
    """Write a policy that extends `ref` with the calibration and a `thresholds` step (action
    flip) before the parent's own steps; the parent's `thresholds` steps are left out (they
    would re-rate by other numbers). Returns the ids of the steps left out."""
    folder = path.resolve().parent
    parent = ref if not is_path_like(ref) else os.path.relpath(Path(ref).resolve(), folder)
    kept: list[dict[str, Any]] = []
    replaced: list[str] = []
    for index, step in enumerate(policy.postprocess):
        if step.name == "thresholds":
            replaced.append(step.id or f"{index}:{step.name}")
        else:
            kept.append(step.model_dump(mode="json", exclude_none=True))
    fitted: dict[str, Any] = {
        "name": "thresholds",
        "id": STEP_ID,
        "params": {"p_unsafe": dict(thresholds.thresholds), "action": "flip"},
    }
    data = {
        "extends": parent,
        "id": policy_id or f"{policy.id}-tuned",
        "calibration": os.path.relpath(calibration.resolve(), folder),
        "postprocess": [fitted, *kept],
    }
    header = (
        f"# Written by `policy-engine calibrate`: thresholds for {thresholds.target} on "
        "calibrated P(Unsafe).\n# Figures on the held-out part: "
        + "; ".join(
            f"{g.group} {g.threshold:g}: recall {_num(g.heldout.recall)}, precision "
            f"{_num(g.heldout.precision)}, fpr {_num(g.heldout.fpr)}"
            for g in thresholds.groups
        )
        + "\n"
    )
    path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return replaced


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def render_text(report: CalibrateReport) -> str:
    cal = report.calibration
    fitted = cal["fitted_for"]
    params = cal["parameters"]
    described = (
        f"T = {params['temperature']:g}"
        if cal["method"] == "temperature"
        else f"{len(params['x'])} steps"
    )
    s = report.split
    lines = [
        f"calibrate: {report.labels}, predictions {report.predictions} "
        f"({KIND_NAMES[report.predictions_format]})",
        f"fitted for: model {fitted['model']}, mode {fitted['mode']}, policy "
        f"{fitted['policy_id']} v{fitted['policy_version']} ({fitted['policy_hash'][:19]})",
        f"split: {s['fit']} fit, {s['heldout']} held out (holdout {s['holdout']:g}, seed "
        f"{s['seed']}, stratified by rating)",
    ]
    if report.already_calibrated:
        lines.append(
            f"  ({report.already_calibrated} predictions were calibrated already: fitted on "
            "their raw scores, p_unsafe_raw)"
        )
    lines += [
        f"method {cal['method']}: {described}",
        f"  {'part':<10}{'samples':>8}{'ECE before':>12}{'after':>8}{'Brier before':>14}"
        f"{'after':>8}   (ECE over {s['bins']} equal-width bins)",
    ]
    for name, p in (("fit", report.fit), ("held-out", report.heldout)):
        lines.append(
            f"  {name:<10}{p.samples:>8}{_num(p.before.ece):>12}{_num(p.after.ece):>8}"
            f"{_num(p.before.brier):>14}{_num(p.after.brier):>8}"
        )
    categories = report.categories
    if categories is not None and categories.temperature is not None and categories.nll:
        nll = "; ".join(
            f"{'held-out' if name == 'heldout' else name} {v['before']:.3f} -> {v['after']:.3f}"
            for name, v in categories.nll.items()
        )
        lines.append(
            f"category scores: T = {categories.temperature:g}; mean NLL of the labelled "
            f"category (labelled Unsafe: {categories.fit_samples} fit, "
            f"{categories.heldout_samples} held out): {nll}"
        )
    elif categories is not None:
        lines.append(f"category scores: not calibrated: {categories.note}")
    lines += ["", "reliability on the held-out part, before (# observed, | mean score):"]
    lines += reliability_text(report.heldout.before)
    lines += ["after:"]
    lines += reliability_text(report.heldout.after)
    lines += ["", f"wrote {report.out}: calibration {cal['name']} ({cal['hash'][:19]})"]
    t = report.thresholds
    if t is not None:
        lines += [
            "",
            f"thresholds for {t.target} on calibrated P(Unsafe), chosen on the fit part with "
            f"{t.confidence:g} confidence (a category needs {t.min_samples} fit samples of both "
            "ratings, else default applies):",
            f"  {'category':<10}{'threshold':>10}{'fitted on':>10}{'held n':>8}{'recall':>8}"
            f"{'prec.':>8}{'fpr':>8}  held-out target",
        ]
        for g in t.groups:
            met = {True: "met", False: "NOT met", None: "n/a"}[g.met_on_heldout]
            lines.append(
                f"  {g.group:<10}{g.threshold:>10g}{g.fitted_on:>10}{g.heldout.samples:>8}"
                f"{_num(g.heldout.recall):>8}{_num(g.heldout.precision):>8}"
                f"{_num(g.heldout.fpr):>8}  {met}"
                + ("" if g.reached_on_fit else " (unreachable on the fit part)")
            )
        o = t.overall_heldout
        met = {True: "met", False: "NOT met", None: "n/a"}[t.met_on_heldout]
        lines.append(
            f"  {'overall':<10}{'':>10}{t.overall_fit.samples:>10}{o.samples:>8}"
            f"{_num(o.recall):>8}{_num(o.precision):>8}{_num(o.fpr):>8}  {met}"
        )
    if report.policy_written:
        lines.append(
            f"wrote {report.policy_written}: calibration and a `thresholds` step ({STEP_ID}, "
            f"action flip); check it with `policy-engine check {report.policy_written}`"
        )
        if report.replaced_steps:
            lines.append(
                f"  (left out the parent's thresholds steps: {', '.join(report.replaced_steps)})"
            )
    return "\n".join(lines) + "\n"
