"""The predictions `policy-engine eval --predictions` measures, read from a file, and where they
came from.

Four kinds of file, told apart by content (an SQLite header, then the first JSON line's keys):

- `results`: an audit or `eval --out` results database, matched to labels by id;
- `export`: the JSONL rows `policy-engine export` writes (`id`, `rating`, `category_id`,
  `p_unsafe`, `ok`, `error`, `decision`, ...), matched by id;
- `assess`: the Decision lines `policy-engine assess` prints, matched by the image path they
  carry (`verdict.source`);
- `minimal`: `{"id", "rating", "category_id"?, "p_unsafe"?, "error"?}` lines from another tool,
  matched by id.

A file holds one kind; a line of another kind, or one that is none of them, is an `EvalError`
naming FILE:LINE. Provenance (backend, mode, model, decoding, policy) comes from the results
meta and from the verdicts the rows keep; a minimal file has none. Only the standard library,
pydantic and policy_engine's light modules are imported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .agreement import judges_of
from .labels import EvalError, LabelledSample, Prediction, Rating
from .store import ResultStore

Kind = Literal["results", "export", "assess", "minimal"]
KIND_NAMES: dict[str, str] = {
    "results": "results database",
    "export": "rows of `policy-engine export`",
    "assess": "Decision lines of `policy-engine assess`",
    "minimal": "minimal JSONL predictions",
}
_KIND_ONE = {
    "export": "a row of `policy-engine export`",
    "assess": "a Decision line of `policy-engine assess`",
    "minimal": "a minimal prediction",
}
SQLITE_HEADER = b"SQLite format 3\x00"
RANDOM_WEIGHTS = "(random weights)"  # the marker a backend puts in the model name it reports
EXAMPLES_SHOWN = 10  # unmatched predictions listed


class Provenance(BaseModel):
    """Who made the predictions. None: not recorded (always, for a minimal file)."""

    backend: str | None = None
    mode: str | None = None
    model: str | None = Field(default=None, description="The model, when exactly one is named.")
    models: list[str] = Field(default_factory=list, description="Every model named, in order.")
    decoding: dict[str, Any] | None = Field(
        default=None, description="How answers were decoded, when all agree."
    )
    decodings: list[dict[str, Any]] = Field(default_factory=list)
    policy_id: str | None = None
    policy_version: str | None = None
    policy_hash: str | None = Field(default=None, description="When exactly one policy.")
    policy_hashes: list[str] = Field(default_factory=list)
    random_weights: bool = Field(
        default=False, description="A model named is marked '(random weights)'."
    )


class Matching(BaseModel):
    """How a file's predictions were joined with the labels."""

    by: Literal["id", "source"]
    records: int = Field(description="Predictions read (rows or lines).")
    matched: int = Field(description="Of those, the ones that belong to a labelled sample.")
    unmatched: int = Field(description="Ignored: no labelled sample has their id / image.")
    unmatched_examples: list[str] = Field(description=f"The first {EXAMPLES_SHOWN}.")
    relative_to: list[str] | None = Field(
        default=None, description="by source: the folders relative image paths are tried in."
    )


@dataclass
class PredictionFile:
    """A predictions file read against labels: predictions by sample id, and their origin."""

    path: str
    kind: Kind
    predictions: dict[str, Prediction]
    provenance: Provenance
    matching: Matching
    judges: dict[str, dict[str, str | None]] = field(default_factory=dict)  # id -> judge -> rating


class ProvenanceCollector:
    """Gathers what verdicts say about their origin (model, decoding, policy), in order."""

    def __init__(self, meta: Mapping[str, str] | None = None) -> None:
        self.meta = dict(meta or {})
        self.models: dict[str, None] = {}
        self.decodings: dict[str, dict[str, Any]] = {}
        self.policies: dict[str, tuple[str | None, str | None]] = {}

    def add(self, verdict: Any) -> None:
        """Take note of one verdict (as JSON data; anything else is ignored)."""
        if not isinstance(verdict, Mapping):
            return
        model = verdict.get("model")
        if isinstance(model, str) and model:
            self.models.setdefault(model)
        decoding = verdict.get("decoding")
        if isinstance(decoding, dict):
            self.decodings.setdefault(json.dumps(decoding, sort_keys=True), decoding)
        policy_hash = verdict.get("policy_hash")
        if isinstance(policy_hash, str) and policy_hash:
            self.policies.setdefault(
                policy_hash, (verdict.get("policy_id"), verdict.get("policy_version"))
            )

    def result(self, *, backend: str | None = None, mode: str | None = None) -> Provenance:
        meta = self.meta
        models = list(self.models) or ([meta["model"]] if meta.get("model") else [])
        decodings = list(self.decodings.values())
        policy_id, version = meta.get("policy_id"), meta.get("policy_version")
        hashes = [meta["policy_hash"]] if meta.get("policy_hash") else list(self.policies)
        if not meta.get("policy_hash") and len(self.policies) == 1:
            policy_id, version = next(iter(self.policies.values()))
        return Provenance(
            backend=backend or meta.get("backend") or None,
            mode=mode or meta.get("mode") or None,
            model=models[0] if len(models) == 1 else None,
            models=models,
            decoding=decodings[0] if len(decodings) == 1 else None,
            decodings=decodings,
            policy_id=policy_id if len(hashes) <= 1 else None,
            policy_version=version if len(hashes) <= 1 else None,
            policy_hash=hashes[0] if len(hashes) == 1 else None,
            policy_hashes=hashes,
            random_weights=any(RANDOM_WEIGHTS in m for m in models),
        )


# -- telling the kinds apart ----------------------------------------------------------------


@dataclass(frozen=True)
class Peek:
    """What the start of a predictions file says: its kind and the policy it names."""

    kind: Kind
    policy_id: str | None


def peek(path: str | Path) -> Peek:
    """The kind of a predictions file and its policy id, from its start (cheap). Raises
    EvalError for a missing file or one that is none of the kinds."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such predictions file")
    if _is_sqlite(path):
        with ResultStore(path) as store:
            return Peek("results", store.meta.get("policy_id"))
    for number, record in _records(path):
        kind = _kind_of(record, path, number)
        verdict = _verdict_of(kind, record)
        policy_id = verdict.get("policy_id") if isinstance(verdict, Mapping) else None
        return Peek(kind, policy_id if isinstance(policy_id, str) else None)
    raise EvalError(f"{path}: no predictions (the file is empty)")


def _is_sqlite(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError as err:
        raise EvalError(f"{path}: {err.strerror or err}") from None


def _neither(path: Path, number: int, what: str) -> EvalError:
    return EvalError(
        f"{path}:{number}: neither a results database (SQLite) nor JSONL predictions: {what}"
    )


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) for every non-blank line; the first line's failure says the
    file is none of the kinds, later ones name the line."""
    if path.suffix.lower() == ".parquet":
        raise EvalError(
            f"{path}: Parquet is not read; export JSONL instead "
            "(policy-engine export RESULTS.db predictions.jsonl) or pass the results database"
        )
    first = True

    def fail(number: int, what: str) -> EvalError:
        if first:
            return _neither(path, number, what)
        return EvalError(f"{path}:{number}: {what}")

    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, 1):
                try:
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise fail(number, "not UTF-8 text") from None
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    raise fail(number, f"invalid JSON ({err.msg} at column {err.colno})") from None
                if not isinstance(record, dict):
                    raise fail(number, f"expected a JSON object, got {type(record).__name__}")
                first = False
                yield number, record
    except OSError as err:
        raise EvalError(f"{path}: {err.strerror or err}") from None


def _kind_of(record: Mapping[str, Any], path: Path, number: int) -> Kind:
    if "verdict" in record:
        return "assess"
    if "decision" in record:
        return "export"
    if "id" in record or "rating" in record:
        return "minimal"
    keys = ", ".join(sorted(record)) or "none"
    raise EvalError(
        f"{path}:{number}: not a prediction: expected a Decision line of `policy-engine assess` "
        '(with "verdict"), a row of `policy-engine export` (with "decision") or a minimal '
        f'{{"id": ..., "rating": ...}}; this line has keys: {keys}'
    )


def _verdict_of(kind: Kind, record: Mapping[str, Any]) -> Any:
    if kind == "assess":
        return record.get("verdict")
    if kind == "export":
        decision = record.get("decision")
        return decision.get("verdict") if isinstance(decision, Mapping) else None
    return None


# -- the line formats -----------------------------------------------------------------------


class _ExportRow(BaseModel):
    """The fields eval reads of an export row (export writes more: they are ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    id: str | int
    ok: bool | None = None
    rating: Rating | None = None
    category_id: str | None = None
    p_unsafe: float | None = Field(default=None, ge=0.0, le=1.0)
    error: str | None = None
    decision: dict[str, Any]


class _MinimalRow(BaseModel):
    """A prediction from another tool. Unknown keys are errors: a misspelt `p_unsafe` must
    not silently drop the scores."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str | int
    rating: Rating | None = None
    category_id: str | None = None
    p_unsafe: float | None = Field(default=None, ge=0.0, le=1.0)
    error: str | None = None


class _ErrorPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message: str = "error"


class _VerdictPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    source: str = Field(min_length=1)
    p_unsafe: float | None = Field(default=None, ge=0.0, le=1.0)
    error: _ErrorPart | None = None


class _DecisionLine(BaseModel):
    """A Decision as assess prints it: final `rating`/`category_id` at the top (absent for an
    error), the model's verdict below."""

    model_config = ConfigDict(extra="ignore", strict=True)

    verdict: _VerdictPart
    rating: Rating | None = None
    category_id: str | None = None


def _field_errors(err: ValidationError, allowed: Sequence[str]) -> str:
    parts = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "line"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown key {where!r}; allowed: {', '.join(allowed)}")
        elif item["type"] == "missing":
            parts.append(f"{where}: required")
        else:
            parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def _prediction(
    rating: str | None, category: str | None, p_unsafe: float | None, error: str | None
) -> Prediction:
    if error is None and rating is None:
        error = "no rating"
    return Prediction(rating, category, p_unsafe, error)


def _parse_line(kind: Kind, record: dict[str, Any]) -> tuple[str, Prediction]:
    """(the id or image source, the prediction) of one line; ValidationError when bad."""
    key, prediction = _parse_fields(kind, record)
    return key, prediction.with_scores(_verdict_of(kind, record))


def _parse_fields(kind: Kind, record: dict[str, Any]) -> tuple[str, Prediction]:
    if kind == "assess":
        line = _DecisionLine.model_validate(record)
        verdict = line.verdict
        error = verdict.error.message if verdict.error is not None else None
        return verdict.source, _prediction(line.rating, line.category_id, verdict.p_unsafe, error)
    if kind == "export":
        row = _ExportRow.model_validate(record)
        error = row.error or ("error" if row.ok is False else None)
        return str(row.id), _prediction(row.rating, row.category_id, row.p_unsafe, error)
    minimal = _MinimalRow.model_validate(record)
    if "rating" not in record and minimal.error is None:
        raise ValueError('rating: required ("Safe" or "Unsafe"; null with an "error")')
    return str(minimal.id), _prediction(
        minimal.rating, minimal.category_id, minimal.p_unsafe, minimal.error
    )


# -- matching -------------------------------------------------------------------------------


def image_key(path: str | Path) -> str:
    """One spelling per file: absolute, `~` expanded, symlinks and `..` resolved (as far as
    they can be: a symlink loop or an odd name keeps the plain absolute path)."""
    try:
        return str(Path(path).expanduser().resolve())
    except (OSError, RuntimeError, ValueError):
        return os.path.abspath(os.path.expanduser(path))


class _Matcher:
    """Joins predictions with labelled samples by id or by image, and counts what matched."""

    def __init__(
        self,
        by: Literal["id", "source"],
        samples: Sequence[LabelledSample],
        labels_base: Path | None = None,
        bases: Sequence[Path] = (),
    ) -> None:
        self.by, self.bases = by, list(bases)
        self.records = self.matched = self.unmatched_count = 0
        self.unmatched: list[str] = []
        self.ids = {s.id for s in samples}
        self.images: dict[str, list[str]] = {}
        if by == "source":
            for sample in samples:
                if sample.image[:5].lower() != "data:":
                    key = image_key(sample.image_source(labels_base or Path()))
                    self.images.setdefault(key, []).append(sample.id)

    def find(self, key: str) -> tuple[str, list[str]] | None:
        """(the match's key, the sample ids it belongs to), or None."""
        self.records += 1
        if self.by == "id":
            found: tuple[str, list[str]] | None = (key, [key]) if key in self.ids else None
        else:
            found = None
            if key[:5].lower() != "data:":
                path = Path(key).expanduser()
                candidates = [path] if path.is_absolute() else [b / path for b in self.bases]
                for candidate in candidates:
                    resolved = image_key(candidate)
                    if resolved in self.images:
                        found = (resolved, self.images[resolved])
                        break
        if found is None:
            self.unmatched_count += 1
            if len(self.unmatched) < EXAMPLES_SHOWN:
                self.unmatched.append(key)
        else:
            self.matched += 1
        return found

    def result(self) -> Matching:
        return Matching(
            by=self.by,
            records=self.records,
            matched=self.matched,
            unmatched=self.unmatched_count,
            unmatched_examples=self.unmatched,
            relative_to=[str(b) for b in self.bases] if self.by == "source" else None,
        )


def source_bases(path: Path) -> list[Path]:
    """Where a Decision line's relative image path is looked for: the predictions file's
    folder (as labels resolve theirs against the labels file's), then the current folder
    (where `assess` most likely ran)."""
    bases = [path.parent.resolve(), Path.cwd().resolve()]
    return bases[:1] if bases[0] == bases[1] else bases


# -- reading --------------------------------------------------------------------------------


def read_predictions(
    path: str | Path, samples: Sequence[LabelledSample], labels_base: Path
) -> PredictionFile:
    """The predictions of a file for the labelled `samples` (whose relative images resolve
    against `labels_base`), how they matched, and their provenance. Predictions that match
    no sample are counted and ignored. Raises EvalError naming FILE or FILE:LINE."""
    path = Path(path)
    kind = peek(path).kind
    if kind == "results":
        return _read_results(path, samples)
    matcher = (
        _Matcher("source", samples, labels_base, source_bases(path))
        if kind == "assess"
        else _Matcher("id", samples)
    )
    collector = ProvenanceCollector()
    predictions: dict[str, Prediction] = {}
    judges: dict[str, dict[str, str | None]] = {}
    first_line: dict[str, int] = {}
    for number, record in _records(path):
        line_kind = _kind_of(record, path, number)
        if line_kind != kind:
            raise EvalError(
                f"{path}:{number}: {_KIND_ONE[line_kind]} in a file of {KIND_NAMES[kind]}; "
                "one kind per file"
            )
        try:
            key, prediction = _parse_line(kind, record)
        except ValidationError as err:
            allowed = list(_MinimalRow.model_fields) if kind == "minimal" else []
            raise EvalError(
                f"{path}:{number}: {_KIND_ONE[kind]}: {_field_errors(err, allowed)}"
            ) from None
        except ValueError as err:
            raise EvalError(f"{path}:{number}: {_KIND_ONE[kind]}: {err}") from None
        collector.add(_verdict_of(kind, record))
        match = matcher.find(key)
        if match is None:
            continue
        matched_key, sample_ids = match
        if matched_key in first_line:
            what = "image" if kind == "assess" else "id"
            raise EvalError(
                f"{path}:{number}: a second prediction for {what} {key!r} "
                f"(first on line {first_line[matched_key]})"
            )
        first_line[matched_key] = number
        said = judges_of(_verdict_of(kind, record))
        for sample_id in sample_ids:
            predictions[sample_id] = prediction
            if said is not None:
                judges[sample_id] = said
    if matcher.records == 0:
        raise EvalError(f"{path}: no predictions (the file is empty)")
    return PredictionFile(
        str(path), kind, predictions, collector.result(), matcher.result(), judges
    )


def _read_results(path: Path, samples: Sequence[LabelledSample]) -> PredictionFile:
    matcher = _Matcher("id", samples)
    predictions: dict[str, Prediction] = {}
    judges: dict[str, dict[str, str | None]] = {}
    with ResultStore(path) as store:
        collector = ProvenanceCollector(store.meta)
        for row in store.rows():
            collector.add(row.decision.get("verdict"))
            if matcher.find(row.id) is not None:
                predictions[row.id] = Prediction.from_row(row)
                said = judges_of(row.decision.get("verdict"))
                if said is not None:
                    judges[row.id] = said
    return PredictionFile(
        str(path), "results", predictions, collector.result(), matcher.result(), judges
    )


def _readable(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def describe_decoding(decoding: Mapping[str, Any]) -> str:
    """`{"method": "greedy"}` -> "greedy"; `{"method": "sampling", "temperature": 0.2,
    "seed": None}` -> "sampling (temperature 0.2)"; without a method, the settings."""
    rest = ", ".join(
        f"{k} {_readable(v)}" for k, v in decoding.items() if k != "method" and v is not None
    )
    method = decoding.get("method")
    if method is None:
        return rest or "unknown"
    return f"{method} ({rest})" if rest else str(method)
