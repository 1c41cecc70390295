"""The inputs of `policy-engine eval`: a labelled set of images and the predictions to measure.

A labels file is JSONL, one labelled image a line, checked against the policy the labels were
made for. A `Prediction` is what was said about one sample, from an Engine's decision or a
predictions file (`predictions` reads those). Only the standard library, pydantic and
policy_engine's light modules are imported.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import PolicyEngineError
from ..policy import ExceptionStatus, Policy
from ..verdict import Decision
from .store import ResultRow

Rating = Literal["Safe", "Unsafe"]
RATINGS: tuple[Rating, ...] = get_args(Rating)


class EvalError(PolicyEngineError):
    """A user error: bad labels, options that do not go together, a missing file (exit 2)."""


class LabelledSample(BaseModel):
    """One labelled image. `category` is a category id of the policy or its none id ("NA")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    image: str = Field(description="As written: a path relative to the labels file, or data:.")
    rating: Rating
    category: str = "NA"
    exception: bool = Field(
        default=False,
        description="Safe only because the policy declares `category` non-violating.",
    )
    metadata: dict[str, Any] = Field(default_factory=dict)
    line: int = 0

    def image_source(self, base: Path) -> str:
        """The image to load: a data: URL as it is, a path resolved against `base` (an
        absolute or `~` path as it is), like an audit's JSONL manifest."""
        if self.image[:5].lower() == "data:":
            return self.image
        return str(base / Path(self.image).expanduser())


class _LabelLine(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    image: str = Field(min_length=1)
    rating: Rating
    category: str | None = None
    id: str | int | None = None
    exception: bool = False
    metadata: dict[str, Any] = Field(default_factory=dict)


def _validation_message(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "line"
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(_LabelLine.model_fields)
            parts.append(f"unknown key {where!r}; allowed: {allowed}")
        elif item["type"] == "missing":
            parts.append(f"{where}: required")
        else:
            parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def category_id(value: str, policy: Policy) -> str:
    """A label's category (an id, a full label, "NA") as the policy's category id."""
    none = policy.none_category
    ids = {c.id for c in policy.categories}
    if value in ids:
        return value
    if value in ("NA", none.id, none.label):
        return none.id
    for category in policy.categories:
        if value == category.label:
            return category.id
    known = ", ".join([*(c.id for c in policy.categories), none.id])
    raise ValueError(f"unknown category {value!r} in policy {policy.id!r}; categories: {known}")


def parse_labels(lines: Iterable[str], policy: Policy, *, name: str) -> list[LabelledSample]:
    """Parse JSONL label lines against a policy; errors name `name`:LINE."""
    samples: list[LabelledSample] = []
    first_line: dict[str, int] = {}
    none_id = policy.none_category.id
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue

        def fail(message: str, number: int = number) -> EvalError:
            return EvalError(f"{name}:{number}: {message}")

        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise fail(f"invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise fail(f"expected a JSON object, got {type(record).__name__}")
        try:
            row = _LabelLine.model_validate(record)
        except ValidationError as err:
            raise fail(_validation_message(err)) from None
        try:
            category = category_id(row.category, policy) if row.category else none_id
        except ValueError as err:
            raise fail(f"category: {err}") from None
        if row.rating == "Unsafe" and category == none_id:
            raise fail(f"category: an Unsafe sample needs a category of the policy, not {none_id}")
        if row.exception:
            if row.rating != "Safe" or category == none_id:
                raise fail(
                    "exception: an exception sample is rated Safe and names the category "
                    "its policy declares non-violating"
                )
            declared = policy.exception_for(category)
            if declared is None or declared.status != ExceptionStatus.NON_VIOLATING:
                raise fail(
                    f"exception: policy {policy.id!r} does not declare {category} "
                    "non-violating (evaluate with the policy the labels were made for)"
                )
        sample_id = row.image if row.id is None else str(row.id)
        if sample_id in first_line:
            raise fail(f"duplicate id {sample_id!r} (first on line {first_line[sample_id]})")
        first_line[sample_id] = number
        samples.append(
            LabelledSample(
                id=sample_id,
                image=row.image,
                rating=row.rating,
                category=category,
                exception=row.exception,
                metadata=row.metadata,
                line=number,
            )
        )
    return samples


def read_labels(path: str | Path, policy: Policy) -> list[LabelledSample]:
    """Read a labels file (JSONL). Raises EvalError naming FILE or FILE:LINE."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such labels file")
    try:
        with path.open(encoding="utf-8") as handle:
            samples = parse_labels(handle, policy, name=str(path))
    except UnicodeDecodeError:
        raise EvalError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise EvalError(f"{path}: {err.strerror or err}") from None
    if not samples:
        raise EvalError(f"{path}: no labelled samples")
    return samples


@dataclass(frozen=True)
class Prediction:
    """What the model (and the policy's post-processors) said about one sample."""

    rating: str | None
    category_id: str | None = None
    p_unsafe: float | None = None
    error: str | None = None
    category_scores: dict[str, float] | None = None  # the verdict's, when it has them
    p_unsafe_raw: float | None = None  # the model's score before a calibration, if one applied
    category_scores_raw: dict[str, float] | None = None  # likewise, the category scores

    @property
    def valid(self) -> bool:
        return self.error is None and self.rating in RATINGS

    def with_scores(self, verdict: Any) -> Prediction:
        """This prediction with the category scores and raw P(Unsafe) of a verdict given as
        JSON data (ignored when it has none, or is no mapping)."""
        if not isinstance(verdict, dict):
            return self
        raw = verdict.get("p_unsafe_raw")
        update: dict[str, Any] = {}
        for key in ("category_scores", "category_scores_raw"):
            scores = verdict.get(key)
            if isinstance(scores, dict) and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in scores.values()
            ):
                update[key] = {str(k): float(v) for k, v in scores.items()}
        if isinstance(raw, int | float) and not isinstance(raw, bool) and 0 <= raw <= 1:
            update["p_unsafe_raw"] = float(raw)
        return replace(self, **update) if update else self

    @classmethod
    def from_row(cls, row: ResultRow) -> Prediction:
        error = None if row.ok else (row.error or "error")
        prediction = cls(row.rating, row.category_id, row.p_unsafe, error)
        return prediction.with_scores(row.decision.get("verdict"))

    @classmethod
    def from_decision(cls, decision: Decision) -> Prediction:
        verdict = decision.verdict
        error = verdict.error.message if verdict.error is not None else None
        return cls(
            decision.rating,
            decision.category_id,
            verdict.p_unsafe,
            error,
            verdict.category_scores,
            verdict.p_unsafe_raw,
            verdict.category_scores_raw,
        )
