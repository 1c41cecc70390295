"""What the composite backends (`cascade`, `ensemble`) share: judges declared by backend name,
options and mode, built through the plugin host, run on a batch and read strictly.

A judge is any registered backend (a composite one too). Each judge's answer becomes a Verdict
with `build_verdict`, exactly as the engine reads a backend's answer: an unreadable reply or a
failed call is an error, never a Safe. The composite then writes its combined answer in the
batch's policy layout and mode (so the engine reads it like any other backend's) and keeps every
judge's answer (`Generation.judges`) and its reason (`Generation.decided_by`).

The composite builds its judges at construction (options are validated then, nothing loads),
loads them in `load()` and closes them in `release()`: it owns them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from policy_engine import (
    Backend,
    BackendError,
    Batch,
    Calibration,
    CalibrationError,
    Capabilities,
    CompiledPolicy,
    Generation,
    JudgeVerdict,
    Mode,
    PluginHost,
    PolicyEngineError,
    Verdict,
    build_verdict,
    calibrate,
    check_fitted,
    get_host,
    load_calibration,
    load_policy,
)

if TYPE_CHECKING:
    from policy_engine import LoadedImage  # Pillow: imported when images are judged

log = logging.getLogger(__name__)


class JudgeSpec(BaseModel):
    """One judge: a registered backend with its options, and how it is asked."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field(description="A registered backend name (`policy-engine backends`).")
    options: dict[str, Any] = Field(default_factory=dict, description="The backend's options.")
    name: str | None = Field(default=None, description="Shown in verdicts; default: a role.")
    mode: Mode | None = Field(default=None, description="How it is asked; default: the batch's.")
    policy: str | None = Field(
        default=None, description="A policy name or file for this judge; default: the batch's."
    )
    score_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Its rating in score mode: p_unsafe >= this."
    )
    lenient: bool = Field(default=False, description="Read replies wrapped in prose.")
    calibration: str | None = Field(
        default=None,
        description="A calibration file (`policy-engine calibrate`) for this judge's P(Unsafe), "
        "applied before the composite reads it (a cascade's band compares calibrated scores).",
    )


class CompositeOptions(BaseModel):
    """Options of a composite backend. `config` names a YAML file holding (some of) them: the
    honest way to declare nested judges on a command line; options given directly win."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(default=None, description="A YAML file with these options.")

    @model_validator(mode="before")
    @classmethod
    def _from_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("config"):
            return data
        path = Path(str(data["config"])).expanduser()
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ValueError(f"config {str(path)!r}: {err.strerror or err}") from None
        except yaml.YAMLError as err:
            raise ValueError(f"config {str(path)!r}: not YAML ({err})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config {str(path)!r}: expected a mapping of options")
        if "config" in loaded:
            raise ValueError(f"config {str(path)!r}: a config file cannot name another")
        return {**loaded, **data}


@dataclass
class Judge:
    """A built judge: its spec, its backend (owned by the composite) and its own policy."""

    name: str
    spec: JudgeSpec
    backend: Backend
    compiled: CompiledPolicy | None  # None: the batch's policy
    calibration: Calibration | None = None

    def mode(self, batch: Batch) -> Mode:
        return self.spec.mode or batch.mode

    def run(self, batch: Batch, images: Sequence[LoadedImage]) -> list[tuple[Generation, Verdict]]:
        """This judge's answer for each image, read strictly; a failed call (any exception) or
        a broken one-to-one contract is an error for the images of that call only."""
        if not images:
            return []
        compiled = self.compiled or batch.compiled
        mode = self.mode(batch)
        caps = self.backend.capabilities
        size = max(1, caps.max_batch_size if caps.batching else 1)
        refused = self._refused(compiled, mode)
        results: list[tuple[Generation, Verdict]] = []
        for start in range(0, len(images), size):
            chunk = tuple(images[start : start + size])
            sub = Batch(compiled, mode, chunk, batch.max_new_tokens)
            if refused is not None:  # never a score mapped by another model's calibration
                generations = [Generation(error=refused) for _ in chunk]
            else:
                generations = self._generate(sub)
            for image, generation in zip(chunk, generations, strict=True):
                scored, calibrated = calibrate(self.calibration, generation)
                verdict = build_verdict(
                    compiled,
                    mode,
                    scored,
                    source=image.source,
                    score_threshold=self.spec.score_threshold,
                    lenient=self.spec.lenient,
                )
                results.append((generation, calibrated(verdict)))
        return results

    def _refused(self, compiled: CompiledPolicy, mode: str) -> str | None:
        """Why this judge's calibration does not fit this prompt, mode or model (None: it
        fits, or there is none)."""
        if self.calibration is None:
            return None
        model = getattr(getattr(self.backend, "options", None), "model", None)
        try:
            check_fitted(
                self.calibration, compiled, mode, model if isinstance(model, str) else None
            )
        except CalibrationError as err:
            return f"judge {self.name!r}: {err.message}"
        return None

    def _generate(self, batch: Batch) -> list[Generation]:
        try:
            generations = self.backend.generate(batch)
        except BackendError as err:
            return [Generation(error=err.message, retryable=err.retryable) for _ in batch.images]
        except Exception as err:  # a judge's bug or fault: its images get errors, not Safe
            log.warning("judge %r raised %s: %s", self.name, type(err).__name__, err)
            message = f"judge {self.name!r} failed unexpectedly: {type(err).__name__}"
            return [Generation(error=message) for _ in batch.images]
        if len(generations) != len(batch):
            message = (
                f"judge {self.name!r} returned {len(generations)} answers for {len(batch)} images"
            )
            return [Generation(error=message) for _ in batch.images]
        return generations

    def verdict(self, verdict: Verdict, batch: Batch, *, decided: bool = False) -> JudgeVerdict:
        """What this judge said, as the composite's verdict records it."""
        return JudgeVerdict(
            name=self.name,
            backend=self.backend.name,
            model=verdict.model,
            mode=self.mode(batch),
            policy_id=verdict.policy_id,
            decoding=verdict.decoding,
            rating=verdict.rating,
            category_id=verdict.category_id,
            p_unsafe=verdict.p_unsafe,
            error=verdict.error.message if verdict.error is not None else None,
            decided=decided,
        )


def build_judge(name: str, spec: JudgeSpec, host: PluginHost) -> Judge:
    """A judge by spec: its backend constructed (options validated, nothing loaded), its own
    policy (if any) loaded and compiled through `host`."""
    try:
        backend = host.backend(spec.backend)(**spec.options)
    except PolicyEngineError as err:
        raise PolicyEngineError(f"judge {name!r}: {err.message}") from None
    mode = spec.mode
    if mode == "score" and not backend.capabilities.scores:
        raise PolicyEngineError(
            f"judge {name!r}: backend {spec.backend!r} cannot score (mode 'score')"
        )
    compiled = None
    if spec.policy is not None:
        compiled = host.compile(load_policy(spec.policy, host=host))
    calibration = None
    if spec.calibration is not None:
        try:
            calibration = load_calibration(spec.calibration)
        except CalibrationError as err:
            raise PolicyEngineError(f"judge {name!r}: {err.message}") from None
    judge = Judge(name, spec, backend, compiled, calibration)
    if compiled is not None and calibration is not None:  # its own policy: refuse a misfit now
        refused = judge._refused(compiled, mode or calibration.fitted_for.mode)
        if refused is not None:
            raise PolicyEngineError(refused)
    return judge


def judge_names(specs: Sequence[JudgeSpec], defaults: Sequence[str]) -> list[str]:
    """Each judge's name: its own, else the default (a role or its backend); a name used twice
    is numbered, a given name used twice is an error."""
    given = [s.name for s in specs if s.name]
    twice = sorted({n for n in given if given.count(n) > 1})
    if twice:
        raise PolicyEngineError(f"two judges are named {twice[0]!r}: names must differ")
    names = [s.name or d for s, d in zip(specs, defaults, strict=True)]
    counts: dict[str, int] = {}
    result = []
    for name, spec in zip(names, specs, strict=True):
        if spec.name or names.count(name) == 1:
            result.append(name)
            continue
        counts[name] = counts.get(name, 0) + 1
        result.append(f"{name}#{counts[name]}")
    return result


class CompositeBackend(Backend):
    """A backend made of judges; subclasses build `self.judges` and combine their answers."""

    judges: list[Judge]

    def __init__(self, *, host: PluginHost | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.host = host or get_host()

    def derive_capabilities(self) -> None:
        """Capabilities from the judges: scores only if every judge can score, images and
        schema-constrained decoding only if all have them; batches as large as the largest
        judge's (each judge gets its own batch size); concurrent if any judge is."""
        caps = [j.backend.capabilities for j in self.judges]
        self.capabilities = Capabilities(
            images=all(c.images for c in caps),
            json_schema=all(c.json_schema for c in caps),
            scores=all(c.scores for c in caps),
            batching=True,
            max_batch_size=max(c.max_batch_size if c.batching else 1 for c in caps),
            concurrent=any(c.concurrent for c in caps),
        )

    def load(self) -> None:
        for judge in self.judges:
            judge.backend.ensure_loaded()

    def release(self) -> None:
        failure: Exception | None = None
        for judge in self.judges:
            try:
                judge.backend.close()
            except Exception as err:  # close every judge, then report the first failure
                failure = failure or err
        if failure is not None:
            raise failure

    def health(self) -> str | None:
        for judge in self.judges:
            problem = judge.backend.health()
            if problem is not None:
                return f"judge {judge.name!r}: {problem}"
        return None


def answer(
    batch: Batch,
    verdict: Verdict,
    *,
    rationale: str,
    judges: list[JudgeVerdict],
    decided_by: str,
    p_unsafe: float | None,
    category_scores: dict[str, float] | None,
    model: str | None,
    decoding: dict[str, Any] | None,
    timings: dict[str, float] | None = None,
) -> Generation:
    """The composite's answer for one image from a deciding verdict (rating, category,
    severity, rationale), written in the batch's policy layout and mode, so that the engine
    reads it like any backend's. An Unsafe verdict whose category is not one of the batch
    policy's (a judge asked with another policy) is an error, not a guess."""
    compiled = batch.compiled
    policy = compiled.policy
    base = Generation(
        p_unsafe=p_unsafe,
        category_scores=_known_scores(category_scores, compiled),
        model=model,
        decoding=decoding,
        judges=judges,
        decided_by=decided_by,
        timings=dict(timings or {}),
    )
    if batch.mode == "score":
        return base
    known = {c.id for c in policy.categories}
    if verdict.rating == "Unsafe":
        if verdict.category_id not in known:
            missing = verdict.category_id or "none"
            return replace(
                base,
                error=f"{decided_by}; but the deciding category ({missing}) is not a category of "
                f"policy {policy.id!r}",
            )
        category_id = verdict.category_id
        assert category_id is not None
        severity = policy.category(category_id).severity
        categories = [category_id]
    else:
        category_id = policy.none_category.id
        severity = policy.severity_levels[0]
        categories = []
    if verdict.severity in policy.severity_levels and verdict.rating == "Unsafe":
        severity = verdict.severity
    labels = {v: k for k, v in compiled.labels.items()}
    limit = policy.output.rationale_max_chars
    text = (rationale or decided_by).strip() or decided_by
    if limit is not None and len(text) > limit:
        text = text[: max(1, limit - 1)] + "…"
    fields: dict[str, object] = {
        "rating": verdict.rating,
        "category": labels[category_id],
        "rationale": text,
        "severity": severity,
        "categories": [labels[c] for c in categories],
    }
    return replace(base, text=compiled.layout_for(batch.mode).dumps(fields))


def _known_scores(
    scores: dict[str, float] | None, compiled: CompiledPolicy
) -> dict[str, float] | None:
    """Category scores restricted to the batch policy's categories (None if none remain)."""
    if not scores:
        return None
    known = {c.id for c in compiled.policy.categories}
    kept = {k: v for k, v in scores.items() if k in known}
    return kept or None


def band_text(low: float, high: float) -> str:
    return f"[{low:g}, {high:g}]"
