"""Which model, decoding, backend and policy produced a results file's verdicts.

The results file's meta says what the run was asked to use (backend, model, options, policy);
every row's verdict says what actually answered: `verdict.model` (a random-weights model names
itself with `RANDOM_WEIGHTS_MARKER`) and `verdict.decoding` (`{"method": "greedy"}`, the
sampling settings, or a score mode's description). `Provenance` collects both in one streamed
pass, keeping at most a few distinct values, and says "mixed" when rows differ. The report
(text, JSON, HTML) and `export` show it, with a warning when any verdict came from random
weights.

Only the standard library is imported here.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RANDOM_WEIGHTS_MARKER",
    "Provenance",
    "describe_decoding",
    "is_random_weights",
    "random_weights_warning",
]

RANDOM_WEIGHTS_MARKER = "(random weights)"
"""How a model with random weights names itself in `verdict.model` (e.g. the offline
`tiny-random`): its verdicts exercise the pipeline and mean nothing about the images."""

DISTINCT_KEPT = 8
"""Distinct models and decodings kept with their row counts; more are counted as "others"."""


def is_random_weights(model: object) -> bool:
    """Whether a verdict's `model` names a random-weights model."""
    return isinstance(model, str) and RANDOM_WEIGHTS_MARKER in model


def random_weights_warning(models: list[str], rows: int, total: int) -> str:
    """The one warning line shown wherever verdicts of a random-weights model are reported."""
    names = ", ".join(repr(m) for m in models) or "a random-weights model"
    share = "all rows" if rows == total else f"{rows} of {total} rows"
    return (
        f"RANDOM WEIGHTS: {share} were judged by {names}, a model with random weights; "
        "these verdicts are meaningless (a pipeline test, not an assessment of the images)"
    )


def describe_decoding(decoding: object) -> str:
    """A decoding as words: `greedy`, `sampling (temperature 0.2, top_p 0.95, top_k 50, seed
    none)`, `score: one forward pass, temperature 1`; "not recorded" for None."""
    if decoding is None:
        return "not recorded"
    if not isinstance(decoding, dict):
        return str(decoding)
    rest = [f"{k} {_word(v)}" for k, v in decoding.items() if k != "method"]
    if "method" in decoding:
        head = _word(decoding["method"])
        return f"{head} ({', '.join(rest)})" if rest else head
    return ", ".join(f"{k}: {_word(v)}" for k, v in decoding.items()) or "not recorded"


@dataclass
class Provenance:
    """What produced the rows: the meta's backend, mode and model, and the verdicts' models and
    decodings with row counts (bounded: `DISTINCT_KEPT` distinct values of each)."""

    backend: str | None = None
    mode: str | None = None
    meta_model: str | None = None
    rows: int = 0
    models: Counter[str] = field(default_factory=Counter)
    model_unrecorded: int = 0
    model_others: int = 0
    decodings: dict[str, int] = field(default_factory=dict)  # canonical JSON -> rows
    decoding_values: dict[str, dict[str, Any]] = field(default_factory=dict)  # as first seen
    decoding_unrecorded: int = 0
    decoding_others: int = 0
    random_weights_rows: int = 0
    random_weights_models: list[str] = field(default_factory=list)

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> Provenance:
        return cls(
            backend=meta.get("backend") or None,
            mode=meta.get("mode") or None,
            meta_model=meta.get("model") or None,
        )

    def add(self, decision: dict[str, Any]) -> None:
        """Count one row's verdict (its Decision as stored)."""
        self.rows += 1
        verdict = decision.get("verdict")
        verdict = verdict if isinstance(verdict, dict) else {}
        model = verdict.get("model")
        if isinstance(model, str) and model:
            if model in self.models or len(self.models) < DISTINCT_KEPT:
                self.models[model] += 1
            else:
                self.model_others += 1
            if is_random_weights(model):
                self.random_weights_rows += 1
                known = self.random_weights_models
                if model not in known and len(known) < DISTINCT_KEPT:
                    known.append(model)
        else:
            self.model_unrecorded += 1
        decoding = verdict.get("decoding")
        if decoding is None:
            self.decoding_unrecorded += 1
            return
        key = json.dumps(decoding, sort_keys=True, ensure_ascii=False)
        if key in self.decodings or len(self.decodings) < DISTINCT_KEPT:
            self.decodings[key] = self.decodings.get(key, 0) + 1
            if key not in self.decoding_values:
                value = decoding if isinstance(decoding, dict) else {"value": decoding}
                self.decoding_values[key] = value
        else:
            self.decoding_others += 1

    # -- what the report shows -----------------------------------------------------------------
    @property
    def model(self) -> str | None:
        """The model that answered (the verdicts'), "mixed: a, b" when rows name several, else
        the model the meta records."""
        names = list(self.models)
        if len(names) == 1 and not self.model_others:
            return names[0]
        if names:
            more = " and others" if self.model_others else ""
            return "mixed: " + ", ".join(names) + more
        return self.meta_model

    @property
    def mixed_decoding(self) -> bool:
        return len(self.decodings) + (1 if self.decoding_others else 0) > 1

    @property
    def decoding(self) -> dict[str, Any] | str | None:
        """The one decoding every recorded verdict used, "mixed" when they differ, None when
        no verdict recorded one."""
        if self.mixed_decoding:
            return "mixed"
        if self.decodings:
            return self.decoding_values[next(iter(self.decodings))]
        return None

    @property
    def decoding_text(self) -> str:
        """The decoding in words; "mixed: greedy (3 rows), sampling (…) (2 rows)" when rows
        differ."""
        if not self.mixed_decoding:
            return describe_decoding(self.decoding)
        parts = [
            f"{describe_decoding(self.decoding_values[k])} ({n} rows)"
            for k, n in self.decodings.items()
        ]
        if self.decoding_others:
            parts.append(f"others ({self.decoding_others} rows)")
        return "mixed: " + ", ".join(parts)

    @property
    def random_weights(self) -> bool:
        return self.random_weights_rows > 0

    @property
    def warning(self) -> str | None:
        if not self.random_weights:
            return None
        return random_weights_warning(
            self.random_weights_models, self.random_weights_rows, self.rows
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "models": dict(self.models),
            "backend": self.backend,
            "mode": self.mode,
            "decoding": self.decoding,
            "decoding_text": self.decoding_text,
            "decodings": [
                {"decoding": self.decoding_values[k], "rows": n} for k, n in self.decodings.items()
            ],
            "other_models_rows": self.model_others,
            "other_decodings_rows": self.decoding_others,
            "rows_without_model": self.model_unrecorded,
            "rows_without_decoding": self.decoding_unrecorded,
            "random_weights": self.random_weights,
            "random_weights_rows": self.random_weights_rows,
        }


def _word(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
