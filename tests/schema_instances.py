"""JSON instances for a JSON Schema: what a server that constrains decoding would answer.

`instance_for(schema, rng)` builds one valid instance (see its docstring for the keywords it
supports) and checks it with jsonschema; the loopback servers answer with it, serialised with
`indent=4` as LlavaGuard writes its verdicts.
"""

from __future__ import annotations

import copy
import json
import math
import random
import threading
from collections.abc import Callable
from typing import Any

import jsonschema
from fake_model import WORDS, plain_reply, sentence_words
from jsonschema.validators import validator_for

_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "$defs",
        "definitions",
        "deprecated",
        "readOnly",
        "writeOnly",
    }
)
_SUPPORTED = frozenset(
    {
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "minProperties",
        "maxProperties",
        "items",
        "minItems",
        "maxItems",
        "uniqueItems",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
    }
)
_MAX_DEPTH = 32


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_VALIDATORS: dict[str, Any] = {}
_VALIDATORS_LOCK = threading.Lock()


def validator(schema: dict[str, Any]) -> Any:
    """A checked validator for `schema`, cached: every request of a run sends the same schema,
    and checking a schema costs milliseconds (the server must stay cheap for the benchmark).
    Raises jsonschema.SchemaError for a schema that is not one."""
    key = json.dumps(schema, sort_keys=True)
    with _VALIDATORS_LOCK:
        found = _VALIDATORS.get(key)
    if found is None:
        cls = validator_for(schema)
        cls.check_schema(schema)
        found = cls(schema)
        with _VALIDATORS_LOCK:
            if len(_VALIDATORS) > 256:
                _VALIDATORS.clear()
            _VALIDATORS[key] = found
    return found


class _InstanceMaker:
    """Builds one JSON instance for a JSON Schema (see `instance_for`)."""

    def __init__(self, root: dict[str, Any], rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.validator = validator(root)

    def resolve(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ValueError(f"only local $ref ('#/$defs/...') is supported, not {ref!r}")
        node: Any = self.root
        pointer = ref[1:]
        if pointer and not pointer.startswith("/"):
            raise ValueError(f"unsupported $ref {ref!r}")
        for raw in pointer.split("/")[1:]:
            key = raw.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or key not in node:
                raise ValueError(f"$ref {ref!r} points nowhere")
            node = node[key]
        return node

    def make(self, schema: Any, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise ValueError("the schema nests too deeply (a recursive $ref?)")
        if schema is True:
            return plain_reply(self.rng)
        if schema is False:
            raise ValueError("the schema `false` admits no value")
        if not isinstance(schema, dict):
            raise ValueError(f"a schema must be an object or a boolean, not {schema!r}")
        unknown = sorted(set(schema) - _SUPPORTED - _ANNOTATIONS)
        if unknown:
            raise ValueError(f"unsupported schema keyword(s): {', '.join(unknown)}")
        if "$ref" in schema:
            target = self.resolve(schema["$ref"])
            rest = {k: v for k, v in schema.items() if k != "$ref" and k not in _ANNOTATIONS}
            if not rest:
                return self.make(target, depth + 1)
            if not isinstance(target, dict):
                raise ValueError(f"$ref {schema['$ref']!r} with siblings must point to an object")
            return self.make({**target, **rest}, depth + 1)
        if "allOf" in schema:
            return self.make(self.merge_all_of(schema), depth + 1)
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                return self.one_of_branches(schema, keyword, depth)
        if "const" in schema:
            return copy.deepcopy(schema["const"])
        if "enum" in schema:
            choices = schema["enum"]
            if not isinstance(choices, list) or not choices:
                raise ValueError("enum must be a non-empty list")
            return copy.deepcopy(self.rng.choice(choices))
        kind = schema.get("type")
        if isinstance(kind, list):
            return self.type_list(schema, kind, depth)
        if kind is None:
            kind = self.infer_type(schema)
        makers: dict[str, Callable[[dict[str, Any], int], Any]] = {
            "object": self.make_object,
            "array": self.make_array,
            "string": self.make_string,
            "integer": self.make_integer,
            "number": self.make_number,
            "boolean": lambda _s, _d: self.rng.choice([True, False]),
            "null": lambda _s, _d: None,
        }
        if kind not in makers:
            raise ValueError(f"unsupported type {kind!r}")
        return makers[kind](schema, depth)

    def merge_all_of(self, schema: dict[str, Any]) -> dict[str, Any]:
        parts = schema["allOf"]
        if not isinstance(parts, list) or not parts:
            raise ValueError("allOf must be a non-empty list")
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in parts:
            while isinstance(part, dict) and set(part) - _ANNOTATIONS == {"$ref"}:
                part = self.resolve(part["$ref"])
            if not isinstance(part, dict):
                raise ValueError("allOf entries must be schema objects")
            for key, value in part.items():
                if key in _ANNOTATIONS:
                    continue
                if key in merged and merged[key] != value:
                    raise ValueError(f"allOf with conflicting {key!r} is not supported")
                merged[key] = value
        return merged

    def one_of_branches(self, schema: dict[str, Any], keyword: str, depth: int) -> Any:
        branches = schema[keyword]
        if not isinstance(branches, list) or not branches:
            raise ValueError(f"{keyword} must be a non-empty list")
        rest = {k: v for k, v in schema.items() if k != keyword}
        order = list(branches)
        self.rng.shuffle(order)
        problems: list[str] = []
        for branch in order:
            candidate = {**rest, **branch} if isinstance(branch, dict) else branch
            try:
                value = self.make(candidate, depth + 1)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if keyword == "oneOf":
                matching = sum(
                    1 for b in branches if self.validator.evolve(schema=b).is_valid(value)
                )
                if matching != 1:
                    problems.append("the value matched more than one oneOf branch")
                    continue
            return value
        raise ValueError(f"no {keyword} branch can be satisfied: {'; '.join(problems)}")

    def type_list(self, schema: dict[str, Any], kinds: list[Any], depth: int) -> Any:
        if not kinds:
            raise ValueError("an empty type list admits no value")
        order = list(kinds)
        self.rng.shuffle(order)
        problems: list[str] = []
        for kind in order:
            try:
                return self.make({**schema, "type": kind}, depth + 1)
            except ValueError as exc:
                problems.append(str(exc))
        raise ValueError(f"no type of {kinds!r} can be satisfied: {'; '.join(problems)}")

    @staticmethod
    def infer_type(schema: dict[str, Any]) -> str:
        keys = set(schema)
        if keys & {"properties", "required", "additionalProperties", "minProperties"}:
            return "object"
        if keys & {"items", "minItems", "maxItems", "uniqueItems"}:
            return "array"
        if keys & {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}:
            return "number"
        return "string"

    def make_object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        extra_schema = schema.get("additionalProperties", True)
        if not isinstance(props, dict):
            raise ValueError("properties must be an object")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError("required must be a list of strings")
        required = list(dict.fromkeys(required))
        chosen = [name for name in props if name in required]
        outside = [name for name in required if name not in props]
        min_props = schema.get("minProperties", 0)
        max_props = schema.get("maxProperties")
        optional = [name for name in props if name not in required]
        while len(chosen) + len(outside) < min_props and optional:
            chosen.append(optional.pop(0))
        filler = 0
        while len(chosen) + len(outside) < min_props:
            outside.append(f"extra_{filler}")
            filler += 1
        if max_props is not None and len(chosen) + len(outside) > max_props:
            raise ValueError("maxProperties is smaller than the required properties")
        if outside and extra_schema is False:
            raise ValueError(
                f"properties {outside!r} are required but additionalProperties is false"
            )
        keep = set(chosen)
        result: dict[str, Any] = {}
        for name, sub in props.items():
            if name in keep:
                result[name] = self.make(sub, depth + 1)
        for name in outside:
            sub = extra_schema if isinstance(extra_schema, dict) else {"type": "string"}
            result[name] = self.make(sub, depth + 1)
        return result

    def make_array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        items = schema.get("items", {})
        if isinstance(items, list):
            raise ValueError("tuple-form items (a list) is not supported")
        low = schema.get("minItems", 0)
        high = schema.get("maxItems")
        if not is_int(low) or low < 0 or (high is not None and (not is_int(high) or high < 0)):
            raise ValueError("minItems/maxItems must be non-negative integers")
        if high is not None and low > high:
            raise ValueError("minItems is larger than maxItems")
        count = self.rng.randint(max(low, 1), max(low, 1) + 2)
        if high is not None:
            count = min(count, high)
        if items is False:
            if low > 0:
                raise ValueError("items is false but minItems > 0")
            return []
        values: list[Any] = []
        if not schema.get("uniqueItems", False):
            return [self.make(items, depth + 1) for _ in range(count)]
        seen: set[str] = set()
        for _ in range(count * 20):
            if len(values) == count:
                break
            value = self.make(items, depth + 1)
            key = json.dumps(value, sort_keys=True)
            if key not in seen:
                seen.add(key)
                values.append(value)
        if len(values) < low:
            raise ValueError(f"cannot find {low} unique items for uniqueItems")
        return values

    def make_string(self, schema: dict[str, Any], depth: int) -> str:
        low = schema.get("minLength", 0)
        high = schema.get("maxLength")
        if not is_int(low) or low < 0 or (high is not None and (not is_int(high) or high < 0)):
            raise ValueError("minLength/maxLength must be non-negative integers")
        if high is not None and low > high:
            raise ValueError("minLength is larger than maxLength")
        # Free text is long on purpose (50..80 words): a full verdict then overflows a
        # 128-token budget, so a client that forgets max_new_tokens sees truncation.
        text = sentence_words(self.rng, self.rng.randint(50, 80))
        while len(text) < low:
            text += " " + self.rng.choice(WORDS)
        if high is not None and len(text) > high:
            cut = text[:high]
            boundary = cut.rfind(" ")
            if boundary >= max(low, 1):
                cut = cut[:boundary]
            text = cut
        return text

    @staticmethod
    def bounds(schema: dict[str, Any]) -> tuple[float | None, bool, float | None, bool]:
        low, high = schema.get("minimum"), schema.get("maximum")
        ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        for name, value in (
            ("minimum", low),
            ("maximum", high),
            ("exclusiveMinimum", ex_low),
            ("exclusiveMaximum", ex_high),
        ):
            if value is not None and not is_number(value):
                raise ValueError(f"{name} must be a number")
        low_open = high_open = False
        if ex_low is not None and (low is None or ex_low >= low):
            low, low_open = ex_low, True
        if ex_high is not None and (high is None or ex_high <= high):
            high, high_open = ex_high, True
        return low, low_open, high, high_open

    def make_integer(self, schema: dict[str, Any], depth: int) -> int:
        low, low_open, high, high_open = self.bounds(schema)
        lo = None if low is None else (math.floor(low) + 1 if low_open else math.ceil(low))
        hi = None if high is None else (math.ceil(high) - 1 if high_open else math.floor(high))
        if lo is None and hi is None:
            lo, hi = 0, 100
        elif lo is None:
            assert hi is not None
            lo = hi - 100
        elif hi is None:
            hi = lo + 100
        if lo > hi:
            raise ValueError("no integer lies within minimum/maximum")
        return self.rng.randint(lo, hi)

    def make_number(self, schema: dict[str, Any], depth: int) -> float:
        low, low_open, high, high_open = self.bounds(schema)
        lo = 0.0 if low is None else float(low)
        hi = (lo + 100.0) if high is None else float(high)
        if low is None and high is not None:
            lo = hi - 100.0
        if low_open:
            lo = math.nextafter(lo, math.inf)
        if high_open:
            hi = math.nextafter(hi, -math.inf)
        if lo > hi:
            raise ValueError("no number lies within minimum/maximum")
        value = self.rng.uniform(lo, hi)
        rounded = round(value, 4)
        return rounded if lo <= rounded <= hi else value


def instance_for(schema: dict[str, Any], rng: random.Random) -> Any:
    """A JSON instance valid against `schema`, drawn with `rng`.

    Supports object (all `required` properties, in `properties` order, and no others), string
    (enum, const, free words within minLength/maxLength), integer/number (minimum/maximum and
    their exclusive forms), boolean, null, array (items, minItems/maxItems, uniqueItems),
    enum/const at any level, anyOf/oneOf, allOf of compatible parts, local `$ref`
    (`#/$defs/...`, `#/definitions/...`) and type lists. Raises ValueError for anything it
    cannot satisfy (pattern, format, multipleOf, ...) and checks the result with jsonschema.
    """
    if not isinstance(schema, dict):
        raise ValueError("the schema must be a JSON object")
    try:
        validator(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message}") from exc
    maker = _InstanceMaker(schema, rng)
    value = maker.make(schema)
    errors = sorted(maker.validator.iter_errors(value), key=lambda e: list(e.path))
    if errors:
        raise ValueError(f"cannot satisfy the schema: {errors[0].message}")
    return value
