"""Calibrated P(Unsafe): the calibration file, its fitting, and how an engine applies it.

A guard model's raw P(Unsafe) ranks images well but is overconfident (Liu et al., "On
Calibration of LLM-based Guard Models", ICLR 2025): a 0.9 is not right nine times in ten, so
a threshold on it means little. `policy-engine calibrate` fits a monotone map from the raw
score to an observed frequency on a labelled set and writes it as a YAML file:

- `temperature`: p' = sigmoid(logit(p) / T), T chosen by minimising the negative
  log-likelihood (a golden-section search over log T; deterministic);
- `isotonic`: the pool-adjacent-violators fit, a non-decreasing step function, applied by
  linear interpolation between the blocks' mean scores.

Where the predictions carry category scores that form a distribution (the probability of each
category given Unsafe), a `category_temperature` is fitted too: p_c^(1/T) renormalised, T
minimising the NLL of the labelled category over the labelled-Unsafe samples. It keeps the
likeliest category; it changes how sure the scores are (the `thresholds` step's
`category_scores` products).

A calibration is fitted for one (model, prompt, mode): the scores of another model, another
policy text or another mode are other numbers, so `check` refuses to apply it there. The
policy hash is recorded but not required to match: post-processing steps (thresholds, rules)
and the `calibration` key itself change the policy hash without changing a single score; the
prompt hash (the compiled prompt and prompt format) is what decides the scores.

An engine maps each backend answer through `calibrate` before the verdict is built (so score
mode rates by the calibrated score) and the verdict carries both numbers (`p_unsafe` calibrated,
`p_unsafe_raw` as the model said it; `category_scores` and `category_scores_raw` likewise when
the calibration has a category temperature) and the calibration's name and hash.

Only the standard library, pydantic and yaml: the engine imports this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import cached_property
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import PolicyEngineError, one_line

if TYPE_CHECKING:
    from .backend import Backend, Generation
    from .compiler import CompiledPolicy
    from .verdict import Verdict

FORMAT: Literal["policy-engine-calibration/1"] = "policy-engine-calibration/1"
Method = Literal["temperature", "isotonic"]
METHODS: tuple[str, ...] = ("temperature", "isotonic")
DEFAULT_BINS = 10
EPSILON = 1e-6  # scores are clipped to [EPSILON, 1 - EPSILON] before logit
CATEGORY_KEY = "category_temperature"  # optional parameter: a temperature of category scores


class CalibrationError(PolicyEngineError):
    """A calibration file that cannot be read, or one fitted for another model/prompt/mode."""


# -- the measures --------------------------------------------------------------------------


def _check_pairs(scores: Sequence[float], labels: Sequence[bool]) -> None:
    if len(scores) != len(labels):
        raise ValueError("scores and labels differ in length")


def brier(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Mean squared difference between the score and the outcome (1 Unsafe, 0 Safe)."""
    _check_pairs(scores, labels)
    if not scores:
        return None
    return sum((p - float(y)) ** 2 for p, y in zip(scores, labels, strict=True)) / len(scores)


class ReliabilityBin(BaseModel):
    """One bin of a reliability diagram: scores in [low, high) (the last bin includes 1)."""

    low: float
    high: float
    count: int
    mean_score: float | None = Field(description="Mean score of the bin; null when empty.")
    observed: float | None = Field(description="Share labelled Unsafe; null when empty.")


def reliability(
    scores: Sequence[float], labels: Sequence[bool], bins: int = DEFAULT_BINS
) -> list[ReliabilityBin]:
    """Equal-width bins over [0, 1]: count, mean score and observed Unsafe share of each."""
    _check_pairs(scores, labels)
    sums = [0.0] * bins
    hits = [0] * bins
    counts = [0] * bins
    for p, y in zip(scores, labels, strict=True):
        index = min(bins - 1, max(0, int(p * bins)))
        sums[index] += p
        hits[index] += bool(y)
        counts[index] += 1
    return [
        ReliabilityBin(
            low=i / bins,
            high=(i + 1) / bins,
            count=counts[i],
            mean_score=sums[i] / counts[i] if counts[i] else None,
            observed=hits[i] / counts[i] if counts[i] else None,
        )
        for i in range(bins)
    ]


def ece(scores: Sequence[float], labels: Sequence[bool], bins: int = DEFAULT_BINS) -> float | None:
    """Expected calibration error: over equal-width bins, the count-weighted mean of
    |mean score - observed Unsafe share|."""
    if not scores:
        return None
    total = 0.0
    for row in reliability(scores, labels, bins):
        if row.count and row.mean_score is not None and row.observed is not None:
            total += row.count * abs(row.mean_score - row.observed)
    return total / len(scores)


class Figures(BaseModel):
    """ECE and Brier score of one set of scores."""

    samples: int
    ece: float | None
    brier: float | None

    @classmethod
    def of(cls, scores: Sequence[float], labels: Sequence[bool], bins: int) -> Figures:
        return cls(samples=len(scores), ece=ece(scores, labels, bins), brier=brier(scores, labels))


# -- the maps --------------------------------------------------------------------------------


def logit(p: float) -> float:
    p = min(1 - EPSILON, max(EPSILON, p))
    return math.log(p / (1 - p))


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    z = math.exp(x)
    return z / (1 + z)


def _nll(temperature: float, logits: Sequence[float], labels: Sequence[bool]) -> float:
    total = 0.0
    for z, y in zip(logits, labels, strict=True):
        # -log sigmoid(s) = log(1 + e^-s), computed stably
        s = z / temperature if y else -z / temperature
        total += max(-s, 0.0) + math.log1p(math.exp(-abs(s)))
    return total


def fit_temperature(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """The T minimising the negative log-likelihood of sigmoid(logit(p) / T): golden-section
    search over log T in [-7, 7] (the NLL is unimodal in it), 200 steps, deterministic."""
    _check_pairs(scores, labels)
    if not scores:
        raise ValueError("no scores to fit")
    logits = [logit(p) for p in scores]
    return _golden(lambda t: _nll(t, logits, labels), -7.0, 7.0, steps=200)


def fit_isotonic(
    scores: Sequence[float], labels: Sequence[bool]
) -> tuple[list[float], list[float]]:
    """Pool adjacent violators: the non-decreasing step function closest (least squares) to
    the outcomes ordered by score. Returns each block's mean score (x, increasing) and its
    fitted value (y, non-decreasing); equal scores always share a block."""
    _check_pairs(scores, labels)
    if not scores:
        raise ValueError("no scores to fit")
    pairs = sorted(zip(scores, labels, strict=True), key=lambda pair: pair[0])
    # blocks: [sum of scores, sum of outcomes, count]
    blocks: list[list[float]] = []
    for p, y in pairs:
        if blocks and blocks[-1][0] / blocks[-1][2] == p:
            block = blocks[-1]
            block[0] += p
            block[1] += float(y)
            block[2] += 1
        else:
            blocks.append([p, float(y), 1.0])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] >= blocks[-1][1] / blocks[-1][2]:
            last = blocks.pop()
            for i in range(3):
                blocks[-1][i] += last[i]
    return [b[0] / b[2] for b in blocks], [b[1] / b[2] for b in blocks]


def temper(scores: dict[str, float], temperature: float) -> dict[str, float]:
    """A distribution sharpened (T < 1) or flattened (T > 1): p^(1/T), renormalised. Zeros
    stay zero; all zeros stay as they are."""
    powered = {k: max(0.0, v) ** (1 / temperature) if v > 0 else 0.0 for k, v in scores.items()}
    total = sum(powered.values())
    return {k: v / total for k, v in powered.items()} if total > 0 else dict(scores)


def category_nll(rows: Sequence[tuple[dict[str, float], str]], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labelled category under the tempered scores."""
    total = 0.0
    for scores, label in rows:
        total -= math.log(max(EPSILON, temper(scores, temperature).get(label, 0.0)))
    return total / len(rows) if rows else 0.0


def fit_category_temperature(rows: Sequence[tuple[dict[str, float], str]]) -> float:
    """The T minimising `category_nll`: golden-section search over log T in [-3, 3] (a model
    that is always right would be sharpened without end; e^-3 bounds it), deterministic."""
    if not rows:
        raise ValueError("no category scores to fit")
    return _golden(lambda t: category_nll(rows, t), -3.0, 3.0)


def _golden(loss: Callable[[float], float], low: float, high: float, steps: int = 120) -> float:
    """exp of the log-temperature in [low, high] minimising a unimodal loss of e^x."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(math.exp(a)), loss(math.exp(b))
    for _ in range(steps):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(math.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(math.exp(b))
    return math.exp((low + high) / 2)


def interpolate(x: Sequence[float], y: Sequence[float], value: float) -> float:
    """Piecewise-linear through (x, y), constant beyond the ends."""
    if value <= x[0]:
        return y[0]
    if value >= x[-1]:
        return y[-1]
    i = bisect_right(x, value)
    x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
    return y0 + (y1 - y0) * (value - x0) / (x1 - x0) if x1 > x0 else y1


# -- the file --------------------------------------------------------------------------------


class FittedFor(BaseModel):
    """What the calibrated scores came from. `prompt_hash` and `mode` and `model` must match
    where the calibration is applied."""

    model_config = ConfigDict(extra="forbid")

    model: str
    mode: str
    prompt_hash: str = Field(description="sha256 of the prompt format and compiled prompt.")
    policy_id: str
    policy_version: str
    policy_hash: str

    @classmethod
    def of(cls, compiled: CompiledPolicy, mode: str, model: str) -> FittedFor:
        """What scores of `model` in `mode` under the compiled policy were fitted for."""
        policy = compiled.policy
        return cls(
            model=model,
            mode=mode,
            prompt_hash=prompt_hash(compiled),
            policy_id=policy.id,
            policy_version=policy.version,
            policy_hash=compiled.hash,
        )


class Calibration(BaseModel):
    """A calibration file (YAML). `parameters`: {"temperature": T} or {"x": [...], "y": [...]}."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["policy-engine-calibration/1"] = FORMAT
    name: str = Field(min_length=1)
    hash: str = Field(description="sha256 of method, parameters and fitted_for.")
    method: Method
    parameters: dict[str, Any]
    fitted_for: FittedFor
    fit: dict[str, Any] = Field(
        default_factory=dict, description="How it was fitted and the figures before and after."
    )

    @staticmethod
    def content_hash(method: str, parameters: dict[str, Any], fitted_for: FittedFor) -> str:
        data = {"method": method, "parameters": parameters, "fitted_for": fitted_for.model_dump()}
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def make(
        cls,
        method: Method,
        parameters: dict[str, Any],
        fitted_for: FittedFor,
        *,
        name: str | None = None,
        fit: dict[str, Any] | None = None,
    ) -> Calibration:
        digest = cls.content_hash(method, parameters, fitted_for)
        return cls(
            name=name or f"{method}-{digest[7:19]}",
            hash=digest,
            method=method,
            parameters=parameters,
            fitted_for=fitted_for,
            fit=fit or {},
        )

    @cached_property
    def mapper(self) -> Callable[[float], float]:
        """The score map: raw P(Unsafe) -> calibrated P(Unsafe)."""
        if self.method == "temperature":
            temperature = float(self.parameters["temperature"])
            return lambda p: sigmoid(logit(p) / temperature)
        x = [float(v) for v in self.parameters["x"]]
        y = [float(v) for v in self.parameters["y"]]
        return lambda p: min(1.0, max(0.0, interpolate(x, y, p)))

    def __call__(self, p: float) -> float:
        return self.mapper(p)

    @property
    def category_temperature(self) -> float | None:
        value = self.parameters.get(CATEGORY_KEY)
        return None if value is None else float(value)

    def categories(self, scores: dict[str, float]) -> dict[str, float]:
        """Category scores (a distribution over the categories given Unsafe) with the category
        temperature: p_c^(1/T) renormalised; unchanged without one."""
        temperature = self.category_temperature
        return scores if temperature is None else temper(scores, temperature)

    @property
    def stamp(self) -> dict[str, str]:
        """What a verdict records of it."""
        return {"name": self.name, "hash": self.hash}

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _check_parameters(calibration: Calibration, where: str) -> None:
    params = dict(calibration.parameters)
    if CATEGORY_KEY in params:
        value = params.pop(CATEGORY_KEY)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise CalibrationError(f"{where}: {CATEGORY_KEY} must be a number > 0")
    if calibration.method == "temperature":
        value = params.get("temperature")
        if set(params) != {"temperature"} or not isinstance(value, int | float) or value <= 0:
            raise CalibrationError(f"{where}: temperature parameters are {{temperature: T > 0}}")
        return
    x, y = params.get("x"), params.get("y")
    if (
        set(params) != {"x", "y"}
        or not isinstance(x, list)
        or not isinstance(y, list)
        or not x
        or len(x) != len(y)
        or not all(isinstance(v, int | float) for v in [*x, *y])
        or any(b < a for a, b in pairwise(x))
        or any(b < a for a, b in pairwise(y))
    ):
        raise CalibrationError(
            f"{where}: isotonic parameters are {{x: [...], y: [...]}}, equally long, non-decreasing"
        )


def load_calibration(path: str | Path) -> Calibration:
    """Read and check a calibration file; CalibrationError (one line) when it is not one."""
    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no such calibration file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CalibrationError(f"{path}: not a calibration file ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"{path}: not a calibration file (expected a mapping)")
    try:
        calibration = Calibration.model_validate(data)
    except ValidationError as err:
        raise CalibrationError(f"{path}: {one_line(err)}") from None
    _check_parameters(calibration, str(path))
    expected = Calibration.content_hash(
        calibration.method, calibration.parameters, calibration.fitted_for
    )
    if calibration.hash != expected:
        raise CalibrationError(
            f"{path}: its hash does not match its content (edited by hand?); fit it again"
        )
    return calibration


# -- applying it -----------------------------------------------------------------------------


def prompt_hash(compiled: CompiledPolicy) -> str:
    """What decides the scores a model gives for a policy: its prompt format and prompt."""
    text = f"{compiled.prompt_format}\n{compiled.prompt}"
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def check_fitted(
    calibration: Calibration, compiled: CompiledPolicy, mode: str, model: str | None
) -> None:
    """Refuse a calibration fitted for another mode, prompt or model (`model`: the backend's
    option, compared without a marker such as "(random weights)"; None: not known yet, and
    each answer's own model is checked exactly by `calibrate`)."""
    fitted = calibration.fitted_for
    name = calibration.name
    if fitted.mode != mode:
        raise CalibrationError(
            f"calibration {name!r} was fitted for mode {fitted.mode!r}, not {mode!r}; "
            "fit one for this mode"
        )
    if fitted.prompt_hash != prompt_hash(compiled):
        raise CalibrationError(
            f"calibration {name!r} was fitted for policy {fitted.policy_id!r} "
            f"({fitted.policy_hash[:19]}), whose prompt differs from policy "
            f"{compiled.policy.id!r}'s; fit one for this policy"
        )
    if model is not None and _bare(model) != _bare(fitted.model):
        raise CalibrationError(
            f"calibration {name!r} was fitted for model {fitted.model!r}, not {model!r}; "
            "fit one for this model"
        )


def _bare(model: str) -> str:
    """A model name without the marker a backend may add to it ("tiny-random (random
    weights)"): a backend's `model` option is compared with the name its answers carry."""
    return re.sub(r" \([^()]*\)$", "", model)


def engine_calibration(
    given: Calibration | str | Path | None,
    compiled: CompiledPolicy,
    mode: str,
    backend: Backend,
) -> Calibration | None:
    """The calibration an engine applies: `given` (an engine option) or else the policy's
    `calibration` key, checked against the engine's prompt, mode and (when the backend's
    options name it) model. None when neither is set."""
    source = given if given is not None else getattr(compiled.policy, "calibration", None)
    if source is None:
        return None
    calibration = source if isinstance(source, Calibration) else load_calibration(source)
    model = getattr(getattr(backend, "options", None), "model", None)
    check_fitted(calibration, compiled, mode, model if isinstance(model, str) else None)
    return calibration


def calibrate(
    calibration: Calibration | None, generation: Generation
) -> tuple[Generation, Callable[[Verdict], Verdict]]:
    """(the answer with P(Unsafe) calibrated, what to do to the verdict built from it). With
    no calibration, or an answer without a score, both unchanged. An answer from another model
    than the calibration's becomes a `config` error verdict: never a score mapped wrongly."""
    if calibration is None or generation.error is not None:
        return generation, _same
    fitted = calibration.fitted_for.model
    if generation.model is not None and generation.model != fitted:
        message = (
            f"calibration {calibration.name!r} was fitted for model {fitted!r}, "
            f"not {generation.model!r}"
        )
        return generation, lambda verdict: _config_error(verdict, message)
    raw, raw_categories = generation.p_unsafe, generation.category_scores
    update: dict[str, Any] = {}
    if raw is not None:
        generation = replace(generation, p_unsafe=calibration(raw))
        update["p_unsafe_raw"] = raw
    if raw_categories is not None and calibration.category_temperature is not None:
        generation = replace(generation, category_scores=calibration.categories(raw_categories))
        update["category_scores_raw"] = raw_categories
    if not update:
        return generation, _same
    update["calibration"] = calibration.stamp
    return generation, lambda verdict: verdict.model_copy(update=update)


def _same(verdict: Verdict) -> Verdict:
    return verdict


def _config_error(verdict: Verdict, message: str) -> Verdict:
    from .verdict import VerdictError

    cleared = dict.fromkeys(
        ("rating", "category_id", "category_name", "severity", "categories", "p_unsafe")
    )
    return verdict.model_copy(
        update={
            **cleared,
            "category_scores": None,
            "error": VerdictError(kind="config", message=message),
        }
    )
