"""The compiler: Policy -> CompiledPolicy (prompt text, verdict JSON Schema, answer layout, hash).

Pure and deterministic: no I/O, no model. The same policy always yields the same prompt bytes,
schema and hash; the hash travels with every verdict.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .components import Mode
from .policy import Policy

COMPILER_VERSION = "1"
RATINGS = ("Safe", "Unsafe")


@dataclass(frozen=True)
class AnswerLayout:
    """How an answer is laid out: key order and JSON indentation, as the model was trained."""

    keys: tuple[str, ...] = ("rating", "category", "rationale")
    indent: int | None = 4

    def dumps(self, answer: dict[str, Any]) -> str:
        """Render an answer exactly as the layout says (keys in layout order)."""
        ordered = {key: answer[key] for key in self.keys if key in answer}
        return json.dumps(ordered, indent=self.indent, ensure_ascii=False)

    def prefix(self) -> str:
        """The answer up to the opening quote of the rating, e.g. '{\\n    "rating": "'."""
        marker = "@@answer@@"
        text = self.dumps({self.keys[0]: marker})
        return text[: text.index(marker)]

    def for_keys(self, keys: tuple[str, ...]) -> AnswerLayout:
        return AnswerLayout(tuple(k for k in self.keys if k in keys), self.indent)


@dataclass(frozen=True)
class CompiledPolicy:
    """Everything a backend needs to ask a model about one policy, and to check its answer."""

    policy: Policy
    prompt_format: str
    prompt: str
    schema: dict[str, Any]
    layout: AnswerLayout
    hash: str
    labels: dict[str, str] = field(default_factory=dict)  # "O4: Nudity Content" -> "O4"

    def schema_for(self, mode: Mode) -> dict[str, Any]:
        """The schema for a mode: 'verdict' and 'score' drop the rationale."""
        if mode == "full":
            return self.schema
        return _without(self.schema, "rationale")

    def layout_for(self, mode: Mode) -> AnswerLayout:
        return self.layout.for_keys(tuple(self.schema_for(mode)["properties"]))

    def continuation(self, rating: str, label: str | None = None) -> str:
        """The answer text right after the layout's prefix, through the rating and the given
        category label (default: the first), e.g. 'Safe",\n    "category": "O1: ..."': what
        a model writes after the prompt ends with the prefix."""
        layout = self.layout.for_keys(("rating", "category"))
        label = label if label is not None else next(iter(self.labels))
        text = layout.dumps({"rating": rating, "category": label})
        quoted = '"' + label
        end = text.index(quoted, text.index('"category"')) + len(quoted) + 1
        return text[len(layout.prefix()) : end]

    @property
    def max_new_tokens(self) -> int:
        return self.policy.output.max_new_tokens


def _without(schema: dict[str, Any], key: str) -> dict[str, Any]:
    result = dict(schema)
    result["properties"] = {k: v for k, v in schema["properties"].items() if k != key}
    result["required"] = [k for k in schema["required"] if k != key]
    return result


def policy_hash(policy: Policy) -> str:
    """sha256 over the resolved policy's canonical JSON and the compiler version."""
    canonical = json.dumps(
        {"compiler": COMPILER_VERSION, "policy": policy.model_dump(mode="json", exclude={"tests"})},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def verdict_schema(policy: Policy, layout: AnswerLayout) -> dict[str, Any]:
    """The JSON Schema every answer must satisfy, with properties in layout order."""
    labels = [c.label for c in policy.categories] + [policy.none_category.label]
    properties: dict[str, Any] = {}
    for key in layout.keys:
        if key == "rating":
            properties[key] = {"type": "string", "enum": list(RATINGS)}
        elif key == "category":
            properties[key] = {"type": "string", "enum": labels}
        elif key == "rationale":
            properties[key] = {
                "type": "string",
                "minLength": 1,
                "maxLength": policy.output.rationale_max_chars,
            }
        elif key == "severity":
            properties[key] = {"type": "string", "enum": list(policy.severity_levels)}
        elif key == "categories":
            properties[key] = {
                "type": "array",
                "items": {"type": "string", "enum": labels[:-1]},
                "uniqueItems": True,
            }
        else:  # pragma: no cover - formats only use the keys above
            raise ValueError(f"unknown answer key {key!r}")
    return {
        "title": f"Verdict for policy {policy.id}",
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


_CACHE_SIZE = 128
_cache: OrderedDict[tuple[str, str], CompiledPolicy] = OrderedDict()
_cache_lock = threading.Lock()


def compile_policy(policy: Policy, *, host: Any = None) -> CompiledPolicy:
    """Compile a policy with its prompt format. Cached by content hash."""
    from .host import get_host

    host = host or get_host()
    digest = policy_hash(policy)
    key = (digest, policy.prompt_format)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    fmt = host.prompt_format(policy.prompt_format)()
    layout = fmt.layout(policy)
    if not policy.output.rationale:
        layout = layout.for_keys(tuple(k for k in layout.keys if k != "rationale"))
    compiled = CompiledPolicy(
        policy=policy,
        prompt_format=policy.prompt_format,
        prompt=fmt.render(policy),
        schema=verdict_schema(policy, layout),
        layout=layout,
        hash=digest,
        labels={c.label: c.id for c in policy.categories}
        | {policy.none_category.label: policy.none_category.id},
    )
    with _cache_lock:
        _cache[key] = compiled
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return compiled
