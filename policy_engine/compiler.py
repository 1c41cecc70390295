"""The compiler: Policy + prompt format -> CompiledPolicy (prompt, answer schema, layout, hash).

Pure and deterministic: no I/O, no model, no plugin host. The caller (the host's `compile`, the
engine) looks the format up; the same policy and format always yield the same prompt bytes,
schema and hash. The hash covers the resolved policy *and* what the format made of it, so a
changed format gives a new hash although the policy file did not change.

The answer schema admits only consistent verdicts: "Unsafe" names one of the policy's
categories, never the none-applying one; "Safe" may name any (the category the model
considered and found not violated, or none applying), as LlavaGuard's training answers do. The
schema says so as a root `anyOf` of one complete object per rating: the form every grammar
backend we checked enforces (xgrammar ignores everything when `anyOf` sits beside
`properties`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jsonschema

from .formats.base import AnswerLayout, PromptFormat
from .policy import Policy
from .types import RATINGS, Mode

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

COMPILER_VERSION = "2"

__all__ = ["RATINGS", "AnswerLayout", "CompiledPolicy", "compile_policy", "policy_hash"]


@dataclass(frozen=True)
class CompiledPolicy:
    """Everything a backend needs to ask a model about one policy, and to check its answer.

    `fields` holds each answer key's value schema, in layout order; `schema_for(mode)` builds
    the whole answer schema from them, `validator(mode)` a cached validator for it.
    """

    policy: Policy
    prompt_format: str
    prompt: str
    fields: dict[str, dict[str, Any]]
    layout: AnswerLayout
    hash: str
    labels: dict[str, str] = field(default_factory=dict)  # "O4: Nudity Content" -> "O4"
    _cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @property
    def schema(self) -> dict[str, Any]:
        """The whole answer schema (mode full)."""
        return self.schema_for("full")

    @property
    def none_label(self) -> str:
        return self.policy.none_category.label

    @property
    def unsafe_labels(self) -> list[str]:
        """The labels an Unsafe verdict may name: the policy's categories, in order."""
        return [c.label for c in self.policy.categories]

    def fields_for(self, mode: Mode) -> dict[str, dict[str, Any]]:
        """The answer keys and value schemas for a mode: 'verdict' and 'score' drop the
        rationale."""
        if mode == "full":
            return dict(self.fields)
        return {k: v for k, v in self.fields.items() if k != "rationale"}

    def schema_for(self, mode: Mode) -> dict[str, Any]:
        """The answer schema for a mode: one object branch per rating (see the module doc).
        A fresh copy each call: callers may change it."""
        text: str = self._cached(("schema", mode), lambda: json.dumps(self._build(mode)))
        schema: dict[str, Any] = json.loads(text)
        return schema

    def validator(self, mode: Mode) -> Validator:
        """A validator of the mode's schema, built once per compiled policy and mode."""
        validator: Validator = self._cached(
            ("validator", mode), lambda: jsonschema.Draft202012Validator(self._build(mode))
        )
        return validator

    def problem(self, answer: Any, mode: Mode) -> str | None:
        """What is wrong with a decoded answer, in words ("category: 'O99' is not one of
        …"), or None when it satisfies the mode's schema."""
        if self._plainly_valid(answer, mode):  # the usual case, without jsonschema's cost
            return None
        loose = self._cached(("loose", mode), lambda: _loose_validator(self.fields_for(mode)))
        errors = sorted(loose.iter_errors(answer), key=lambda e: list(e.absolute_path))
        if errors:
            where = ".".join(str(p) for p in errors[0].absolute_path) or "answer"
            return f"{where}: {errors[0].message}"
        if answer["rating"] == "Unsafe" and answer["category"] not in self.unsafe_labels:
            return (
                f"category: an Unsafe rating must name one of the policy's categories, "
                f"not {answer['category']!r}"
            )
        violations = answer.get("violations")
        if violations and answer["rating"] == "Safe":
            return "violations: a Safe rating lists no violations ({})"
        unsafe = answer["rating"] == "Unsafe"
        if violations is not None and unsafe and answer["category"] not in violations:
            return (
                f"violations: an Unsafe answer lists its category {answer['category']!r} "
                "with a severity"
            )
        error = next(iter(self.validator(mode).iter_errors(answer)), None)
        return None if error is None else f"answer: {error.message}"

    def _plainly_valid(self, answer: Any, mode: Mode) -> bool:
        """True only for an answer the mode's schema accepts, checked directly (a few dict
        look-ups instead of two jsonschema passes, which cost ~0.3 ms per verdict). False
        means "not shown valid here": `problem` then asks jsonschema, which also words the
        problem. Only the keywords `answer_fields` writes are understood; any other makes
        this say False."""
        fields = self.fields_for(mode)
        if type(answer) is not dict or answer.keys() != fields.keys():
            return False
        rating = answer["rating"]
        if rating not in RATINGS or type(rating) is not str:
            return False
        if rating == "Unsafe" and answer["category"] not in self.unsafe_labels:
            return False
        return all(_plain_value_ok(answer[key], schema) for key, schema in fields.items())

    def layout_for(self, mode: Mode) -> AnswerLayout:
        return self.layout.for_keys(tuple(self.fields_for(mode)))

    def continuation(self, rating: str, label: str | None = None) -> str:
        """The answer text right after the layout's prefix, through the rating and the given
        category label (default: the first the rating may name), e.g. 'Safe",\n    "category":
        "O1: ..."': what a model writes after the prompt ends with the prefix."""
        layout = self.layout.for_keys(("rating", "category"))
        if label is None:
            label = self.unsafe_labels[0] if rating == "Unsafe" else next(iter(self.labels))
        text = layout.dumps({"rating": rating, "category": label})
        quoted = '"' + label
        end = text.index(quoted, text.index('"category"')) + len(quoted) + 1
        return text[len(layout.prefix()) : end]

    @property
    def max_new_tokens(self) -> int:
        return self.policy.output.max_new_tokens

    def _cached(self, key: Any, make: Any) -> Any:
        with self._lock:
            if key not in self._cache:
                self._cache[key] = make()
            return self._cache[key]

    def _build(self, mode: Mode) -> dict[str, Any]:
        fields = self.fields_for(mode)
        branches = []
        for rating in RATINGS:
            properties = dict(fields)
            properties["rating"] = {"type": "string", "enum": [rating]}
            if rating == "Unsafe" and "category" in properties:
                properties["category"] = {"type": "string", "enum": self.unsafe_labels}
            if "violations" in fields:
                branches += self._violation_branches(rating, properties, fields)
                continue
            branches.append(
                {
                    "type": "object",
                    "properties": {k: properties[k] for k in fields},
                    "required": list(fields),
                    "additionalProperties": False,
                }
            )
        return {
            "title": f"Verdict for policy {self.policy.id}",
            "type": "object",
            "anyOf": branches,
        }

    def _violation_branches(
        self, rating: str, properties: dict[str, Any], fields: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """With `violations`: a Safe answer lists none; an Unsafe one lists its `category`
        (one branch per category, so the schema and the grammar say so)."""
        levels = self.policy.severity_levels
        if rating == "Safe":
            named = [(properties, violations_schema(self.unsafe_labels, levels, required=[]))]
        else:
            named = [
                (
                    {**properties, "category": {"type": "string", "enum": [label]}},
                    violations_schema(self.unsafe_labels, levels, required=[label]),
                )
                for label in self.unsafe_labels
            ]
        return [
            {
                "type": "object",
                "properties": {k: {**props, "violations": violations}[k] for k in fields},
                "required": list(fields),
                "additionalProperties": False,
            }
            for props, violations in named
        ]


_PLAIN_KEYWORDS = frozenset({"type", "enum", "minLength", "maxLength", "items", "uniqueItems"})


def _plain_value_ok(value: Any, schema: dict[str, Any]) -> bool:
    """Whether `value` satisfies `schema`, for the plain schemas of answer values (strings
    with an enum or length bounds, arrays of such strings); False for anything else."""
    if not schema.keys() <= _PLAIN_KEYWORDS:
        return False
    kind = schema.get("type")
    if kind == "string":
        if type(value) is not str:
            return False
        if "enum" in schema and value not in schema["enum"]:
            return False
        shortest: int = schema.get("minLength", 0)
        longest: int = schema.get("maxLength", len(value))
        return shortest <= len(value) <= longest
    if kind == "array":
        if type(value) is not list or schema.keys() - {"type", "items", "uniqueItems"}:
            return False
        items = schema.get("items", {})
        if schema.get("uniqueItems") and len(set(map(_hashable, value))) != len(value):
            return False
        return all(_plain_value_ok(item, items) for item in value)
    return False


def _hashable(value: Any) -> Any:
    return value if isinstance(value, str) else id(value)  # non-strings fail items anyway


def _loose_validator(fields: dict[str, dict[str, Any]]) -> Validator:
    """Each key on its own, for messages that name the key at fault."""
    schema = {
        "type": "object",
        "properties": fields,
        "required": list(fields),
        "additionalProperties": False,
    }
    return jsonschema.Draft202012Validator(schema)


def policy_hash(policy: Policy) -> str:
    """sha256 of the resolved policy alone (tests excluded). Verdicts carry the compiled hash
    (`CompiledPolicy.hash`), which also covers the format's output."""
    return "sha256:" + hashlib.sha256(_canonical(_policy_data(policy)).encode()).hexdigest()


def answer_fields(policy: Policy, layout: AnswerLayout) -> dict[str, dict[str, Any]]:
    """Each answer key's value schema, in layout order (rating and category unrestricted:
    `CompiledPolicy.schema_for` ties them together)."""
    labels = [c.label for c in policy.categories] + [policy.none_category.label]
    fields: dict[str, dict[str, Any]] = {}
    for key in layout.keys:
        if key == "rating":
            fields[key] = {"type": "string", "enum": list(RATINGS)}
        elif key == "category":
            fields[key] = {"type": "string", "enum": labels}
        elif key == "rationale":
            fields[key] = {
                "type": "string",
                "minLength": 1,
                "maxLength": policy.output.rationale_max_chars,
            }
        elif key == "severity":
            fields[key] = {"type": "string", "enum": list(policy.severity_levels)}
        elif key == "categories":
            fields[key] = {
                "type": "array",
                "items": {"type": "string", "enum": labels[:-1]},
                "uniqueItems": True,
            }
        elif key == "violations":
            fields[key] = violations_schema(labels[:-1], policy.severity_levels)
        else:
            raise ValueError(f"unknown answer key {key!r}")
    if list(fields)[:1] != ["rating"] or "category" not in fields:
        raise ValueError("an answer layout starts with 'rating' and has a 'category'")
    return fields


def violations_schema(
    labels: list[str], levels: list[str], *, required: list[str] | None = None
) -> dict[str, Any]:
    """The `violations` answer value: violated category label -> its severity, each label at
    most once (an object's keys are distinct). `required`: labels it must hold; [] with
    `maxProperties` 0 for none at all."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {label: {"type": "string", "enum": list(levels)} for label in labels},
        "additionalProperties": False,
    }
    if required is not None:
        schema["required"] = list(required)
        if not required:
            schema["maxProperties"] = 0
    return schema


def compile_policy(policy: Policy, fmt: PromptFormat) -> CompiledPolicy:
    """Compile a policy with a prompt format instance (`host.compile(policy)` looks the
    policy's format up and caches the result). No global state; the only I/O is reading the
    policy's calibration file, if it names one, for its content hash."""
    layout = fmt.layout(policy)
    if not policy.output.rationale:
        layout = layout.for_keys(tuple(k for k in layout.keys if k != "rationale"))
    prompt = fmt.render(policy)
    fields = answer_fields(policy, layout)
    digest = _canonical(
        {
            "compiler": COMPILER_VERSION,
            "policy": _policy_data(policy),
            "format": {"name": fmt.name, "prompt": prompt},
            "layout": {"keys": list(layout.keys), "indent": layout.indent},
            "fields": fields,
        }
    )
    return CompiledPolicy(
        policy=policy,
        prompt_format=fmt.name,
        prompt=prompt,
        fields=fields,
        layout=layout,
        hash="sha256:" + hashlib.sha256(digest.encode("utf-8")).hexdigest(),
        labels={c.label: c.id for c in policy.categories}
        | {policy.none_category.label: policy.none_category.id},
    )


# Policy keys added after the file format's first release. When a policy leaves one out (None),
# it is left out of the hash too, so a policy that does not use a newer feature keeps the hash
# it had before the feature existed (verdicts, results files and reports stay comparable).
# Top-level keys by name; keys of list entries as "LIST.KEY" ("categories.KEY",
# "postprocess.KEY").
OPTIONAL_KEYS: frozenset[str] = frozenset(
    {
        "aggregation",
        "audiences",
        "calibration",
        "categories.audience",
        "postprocess.shadow",
        "video",
    }
)

# Keys that never change what a policy asks the model or how its answer is read, left out of
# the hash like `tests`: audience levels only matter to `NAME@LEVEL`, whose derived policy has
# its own id and guidelines (so its own hash); annotating a policy keeps its hash.
NOT_HASHED: frozenset[str] = frozenset({"audiences", "categories.audience"})


def _policy_data(policy: Policy) -> Any:
    data = policy.model_dump(mode="json", exclude={"tests"})
    for key in NOT_HASHED:
        if key.startswith("categories."):
            for category in data.get("categories", []):
                category.pop(key.removeprefix("categories."), None)
        else:
            data.pop(key, None)
    for key in OPTIONAL_KEYS:
        if "." in key:
            field_name, name = key.split(".", 1)
            for entry in data.get(field_name) or []:
                if isinstance(entry, dict) and entry.get(name) is None:
                    entry.pop(name, None)
        elif data.get(key) is None:
            data.pop(key, None)
    if data.get("calibration") is not None:
        data["calibration"] = _calibration_identity(data["calibration"])
    return data


def _calibration_identity(path: str) -> str:
    """A calibration enters the hash by its content (its hash), not by where the file lies: the
    same policy and calibration copied elsewhere keep their hash; a refitted file changes it.
    A file that cannot be read (the engine refuses it anyway) enters by its path."""
    from .calibration import CalibrationError, load_calibration

    try:
        return load_calibration(path).hash
    except CalibrationError:
        return path


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
