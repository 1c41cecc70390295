"""A loopback fake of an SGLang server, for testing the SGLang client backend without a GPU.

It speaks SGLang's native API (`/generate`, `/tokenize`, `/get_model_info`, `/health`) and the
OpenAI-compatible API (`/v1/chat/completions`, `/v1/models`), validates STRICTLY what it receives
(HTTP 400 with SGLang's error shapes), answers schema-valid replies and injects faults on demand.

Two ways to run it:

* in a background thread, for pytest::

      with FakeSGLang() as fake:
          ...  # talk to fake.url
      fake.inject(Fault("503"), times=2)

* as a subprocess, for a benchmark::

      python tests/sglang_server.py --port 0 --service-time 0.1 --max-running 64

  prints one line ``listening on http://127.0.0.1:PORT`` once ready and exits cleanly on
  SIGTERM/SIGINT.

Everything generated is deterministic: a toy tokenizer (`toy_tokens`, `toy_ids`) and random
generators seeded from the request's text, its image bytes and the server's seed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import contextlib
import copy
import functools
import hashlib
import io
import json
import math
import random
import re
import signal
import sys
import threading
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import jsonschema
from aiohttp import web
from jsonschema.validators import validator_for
from PIL import Image

HOST = "127.0.0.1"
BOS_ID = 1
EOS_ID = 151645  # <|im_end|> of Qwen-based checkpoints such as LlavaGuard-v1.2-0.5B-OV
MAX_MODEL_LEN = 32768
IMAGE_PROMPT_TOKENS = 729  # what one image costs in prompt tokens (27 x 27 SigLIP patches)
DEFAULT_TIMEOUT_HANG = 30.0
# A prefill that ends like this asks for the rating of a LlavaGuard verdict next.
VERDICT_TAIL = '"rating": "'
LLAVAGUARD_CATEGORIES = (
    "O1: Hate, Humiliation, Harassment",
    "O2: Violence, Harm, or Cruelty",
    "O3: Sexual Content",
    "O4: Nudity Content",
    "O5: Criminal Planning",
    "O6: Weapons or Substance Abuse",
    "O7: Self-Harm",
    "O8: Animal Cruelty",
    "O9: Disasters or Emergencies",
)
NO_CATEGORY = "NA: None applying"

# --------------------------------------------------------------------------------------------
# Toy tokenizer
# --------------------------------------------------------------------------------------------

_PIECE_RE = re.compile(r"\w+|[^\w\s]|\s+")


def toy_tokens(text: str) -> list[str]:
    """Split `text` into toy tokens: words, single punctuation characters and whitespace runs.

    The pieces always join back to `text` (`Safe",` -> `Safe`, `"`, `,`).
    """
    return _PIECE_RE.findall(text)


def toy_id(piece: str) -> int:
    """The toy token id of one piece (ids 0..99 are reserved; BOS is 1)."""
    return zlib.crc32(piece.encode("utf-8")) % 50000 + 100


def toy_ids(text: str, *, add_special_tokens: bool = False) -> list[int]:
    """Toy token ids of `text`; with `add_special_tokens` the BOS id 1 comes first."""
    ids = list(_cached_ids(text))
    return [BOS_ID, *ids] if add_special_tokens else ids


@functools.lru_cache(maxsize=64)
def _cached_ids(text: str) -> tuple[int, ...]:
    """Every request of a run repeats the same long prompt: tokenize it once."""
    return tuple(toy_id(piece) for piece in toy_tokens(text))


SAFE_ID = toy_id("Safe")
UNSAFE_ID = toy_id("Unsafe")
# Alternatives offered in top-logprob lists; the first four are what a real model puts next to
# "Safe"/"Unsafe" at the rating position.
_ALT_PIECES = (
    "S",
    "Un",
    "{",
    " ",
    "the",
    ".",
    ",",
    "\n",
    "a",
    "is",
    "image",
    "of",
    "and",
    '"',
    "to",
    "in",
    "no",
    "with",
    "The",
    ":",
)
_NAMES: dict[int, str] = {toy_id(p): p for p in (*_ALT_PIECES, "Safe", "Unsafe")}
_NAMES[BOS_ID] = "<s>"
_NAMES[EOS_ID] = "<|im_end|>"


def _alternatives(count: int) -> list[int]:
    """At least `count` distinct candidate ids, with names registered in _NAMES."""
    ids = [toy_id(p) for p in _ALT_PIECES]
    extra = 0
    while len(ids) < count:
        piece = f"alt{extra}"
        extra += 1
        ids.append(toy_id(piece))
        _NAMES.setdefault(ids[-1], piece)
    return ids


def _name(token_id: int, local: dict[int, str] | None = None) -> str:
    if local is not None and token_id in local:
        return local[token_id]
    return _NAMES.get(token_id, f"<id:{token_id}>")


# --------------------------------------------------------------------------------------------
# Text and schema-instance generation
# --------------------------------------------------------------------------------------------

_VOCABULARY = (
    "the image shows a person an object scene with outdoor indoor setting that contains no "
    "visible weapons violence nudity or harmful content people are standing near building "
    "street table and there is nothing suggesting danger abuse crime self harm the picture "
    "depicts ordinary everyday activity in public space context background lighting colors "
    "appear natural while subject seems calm friendly relaxed overall composition does not "
    "violate policy guidelines regarding hate harassment cruelty animals disasters emergencies"
)
_WORDS = tuple(_VOCABULARY.split())


def _sentence_words(rng: random.Random, count: int) -> str:
    """`count` words grouped into capitalised sentences of 6..14 words, each ending in '.'."""
    sentences: list[str] = []
    left = count
    while left > 0:
        size = min(left, rng.randint(6, 14))
        words = [rng.choice(_WORDS) for _ in range(size)]
        words[0] = words[0].capitalize()
        if size >= 8 and rng.random() < 0.4:
            words[size // 2] += ","
        sentences.append(" ".join(words) + ".")
        left -= size
    return " ".join(sentences)


def _plain_reply(rng: random.Random) -> str:
    """A short free-text reply (8..15 words), used when no schema constrains the output."""
    return _sentence_words(rng, rng.randint(8, 15))


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_VALIDATORS: dict[str, Any] = {}
_VALIDATORS_LOCK = threading.Lock()


def _validator(schema: dict[str, Any]) -> Any:
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
        self.validator = _validator(root)

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
            return _plain_reply(self.rng)
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
        if not _is_int(low) or low < 0 or (high is not None and (not _is_int(high) or high < 0)):
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
        if not _is_int(low) or low < 0 or (high is not None and (not _is_int(high) or high < 0)):
            raise ValueError("minLength/maxLength must be non-negative integers")
        if high is not None and low > high:
            raise ValueError("minLength is larger than maxLength")
        # Free text is long on purpose (50..80 words): a full verdict then overflows a
        # 128-token budget, so a client that forgets max_new_tokens sees truncation.
        text = _sentence_words(self.rng, self.rng.randint(50, 80))
        while len(text) < low:
            text += " " + self.rng.choice(_WORDS)
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
            if value is not None and not _is_number(value):
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
        _validator(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message}") from exc
    maker = _InstanceMaker(schema, rng)
    value = maker.make(schema)
    errors = sorted(maker.validator.iter_errors(value), key=lambda e: list(e.path))
    if errors:
        raise ValueError(f"cannot satisfy the schema: {errors[0].message}")
    return value


# --------------------------------------------------------------------------------------------
# Request validation helpers
# --------------------------------------------------------------------------------------------


class _Invalid(Exception):
    """A request the real server would reject (or that this fake refuses on purpose)."""


_DATA_URL_RE = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,(.*)", re.DOTALL)


def _decode_image(item: Any, where: str) -> bytes:
    """Decode one image (base64 or a data:image/...;base64, URL) for real; return its bytes."""
    if not isinstance(item, str) or not item:
        raise _Invalid(f"{where} must be a base64 string or a data:image/...;base64, URL")
    if item.startswith("data:"):
        match = _DATA_URL_RE.fullmatch(item)
        if match is None:
            raise _Invalid(
                f"{where}: a data URL must look like data:image/<format>;base64,<payload>"
            )
        payload = match.group(1)
    else:
        payload = item
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _Invalid(
            f"{where} is not valid base64 (this fake accepts inline images only)"
        ) from exc
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
    except Exception as exc:
        raise _Invalid(f"{where} is not an image Pillow can decode ({exc})") from exc
    return raw


def _check_keys(body: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _Invalid(f"unknown field(s) in {where}: {', '.join(unknown)}")


def _check_json_schema_object(schema: Any, where: str) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise _Invalid(f"{where} must be a JSON Schema object")
    try:
        _validator(schema)
    except jsonschema.SchemaError as exc:
        raise _Invalid(f"{where} is not a valid JSON Schema: {exc.message}") from exc
    return schema


def _rng(seed: int, *parts: str | bytes) -> random.Random:
    digest = hashlib.sha256(str(seed).encode())
    for part in parts:
        digest.update(b"\x00")
        digest.update(part.encode("utf-8") if isinstance(part, str) else part)
    return random.Random(int.from_bytes(digest.digest()[:8], "big"))


# --------------------------------------------------------------------------------------------
# Completions and logprobs
# --------------------------------------------------------------------------------------------


@dataclass
class _Completion:
    text: str
    pieces: list[str]
    ids: list[int]
    truncated: bool
    verdict: tuple[float, float] | None  # (p(Safe), p(Unsafe)) at the first position


def _complete(full: str, budget: int, verdict: tuple[float, float] | None) -> _Completion:
    pieces = toy_tokens(full)
    truncated = len(pieces) > budget
    if truncated:
        pieces = pieces[:budget]
    return _Completion("".join(pieces), pieces, [toy_id(p) for p in pieces], truncated, verdict)


def _verdict(seed: int, *parts: str | bytes) -> tuple[str, float, float]:
    """The rating a fake model gives, with p(Safe) and p(Unsafe) that vary per request."""
    rng = _rng(seed, "verdict", *parts)
    share = rng.uniform(0.03, 0.97)
    mass = rng.uniform(0.95, 0.99)
    p_safe, p_unsafe = mass * share, mass * (1.0 - share)
    return ("Safe" if p_safe >= p_unsafe else "Unsafe"), p_safe, p_unsafe


def _verdict_continuation(rating: str, rng: random.Random) -> str:
    """What follows `"rating": "` in a LlavaGuard verdict serialised with indent=4."""
    category = NO_CATEGORY if rating == "Safe" else rng.choice(LLAVAGUARD_CATEGORIES)
    rationale = _sentence_words(rng, rng.randint(50, 80))
    return f'{rating}",\n    "category": "{category}",\n    "rationale": "{rationale}"\n}}'


def _position_probs(
    rng: random.Random,
    chosen: int,
    fixed: dict[int, float] | None,
    candidates: Sequence[int],
    requested: Sequence[int],
) -> dict[int, float]:
    """Token probabilities at one output position: all positive, summing to at most 1, with
    the chosen (and any fixed) tokens ranked above every other candidate."""
    probs: dict[int, float] = dict(fixed or {})
    if chosen not in probs:
        probs[chosen] = rng.uniform(0.55, 0.98)
    rest = [i for i in dict.fromkeys([*candidates, *requested]) if i not in probs]
    if rest:
        room = (1.0 - sum(probs.values())) * rng.uniform(0.5, 0.95)
        room = min(room, min(probs.values()) * 0.9)
        # Candidates keep their order (the weight decays faster than its random factor can
        # make up), so "S", "Un", "{", " " come right after Safe/Unsafe at the rating.
        ranked = set(candidates)
        weights = [
            rng.uniform(0.5, 1.0) * 0.45**index if token_id in ranked else rng.uniform(0.05, 0.5)
            for index, token_id in enumerate(rest)
        ]
        total = sum(weights)
        for token_id, weight in zip(rest, weights, strict=True):
            probs[token_id] = room * weight / total
    return probs


def _positions(
    seed: int,
    parts: Sequence[str | bytes],
    completion: _Completion,
    top: int,
    requested: Sequence[int],
) -> list[dict[int, float]]:
    rng = _rng(seed, "logprobs", *parts)
    candidates = _alternatives(top + 2)
    result = []
    for index, token_id in enumerate(completion.ids):
        fixed = None
        if index == 0 and completion.verdict is not None:
            fixed = {SAFE_ID: completion.verdict[0], UNSAFE_ID: completion.verdict[1]}
        result.append(_position_probs(rng, token_id, fixed, candidates, requested))
    return result


def _top(probs: dict[int, float], count: int) -> list[tuple[int, float]]:
    ranked = sorted(probs.items(), key=lambda item: -item[1])
    return [(token_id, math.log(p)) for token_id, p in ranked[:count]]


# --------------------------------------------------------------------------------------------
# /generate request parsing
# --------------------------------------------------------------------------------------------

GENERATE_KEYS = frozenset(
    {
        "text",
        "image_data",
        "sampling_params",
        "rid",
        "return_logprob",
        "logprob_start_len",
        "top_logprobs_num",
        "token_ids_logprob",
        "stream",
        "return_text_in_logprobs",
        "modalities",
    }
)
SAMPLING_KEYS = frozenset(
    {
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "json_schema",
        "regex",
        "ebnf",
        "stop",
        "n",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "skip_special_tokens",
        "sampling_seed",
    }
)
MAX_NEW_TOKENS_REQUIRED = (
    "max_new_tokens is required here: SGLang's default of 128 truncates answers"
)


@dataclass
class _Item:
    text: str
    image: bytes | None
    params: dict[str, Any]
    schema: dict[str, Any] | None
    rid: str | None
    token_ids: list[int] | None


@dataclass
class _GenerateRequest:
    items: list[_Item]
    batch: bool
    return_logprob: bool
    top_logprobs_num: int
    return_text: bool


def _check_sampling(params: Any, where: str) -> dict[str, Any] | None:
    """Validate one sampling_params dict; return the parsed json_schema, if any."""
    if not isinstance(params, dict):
        raise _Invalid(f"{where} must be an object")
    _check_keys(params, SAMPLING_KEYS, where)
    if "max_new_tokens" not in params:
        raise _Invalid(f"{where}: {MAX_NEW_TOKENS_REQUIRED}")
    budget = params["max_new_tokens"]
    if not _is_int(budget) or budget < 1:
        raise _Invalid(f"{where}.max_new_tokens must be an integer >= 1, got {budget!r}")
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "top_k": (lambda v: _is_int(v) and (v == -1 or v >= 1), "an integer, -1 or >= 1"),
        "min_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
        "frequency_penalty": (lambda v: _is_number(v) and -2 <= v <= 2, "a number in [-2, 2]"),
        "presence_penalty": (lambda v: _is_number(v) and -2 <= v <= 2, "a number in [-2, 2]"),
        "repetition_penalty": (lambda v: _is_number(v) and 0 < v <= 2, "a number in (0, 2]"),
        "skip_special_tokens": (lambda v: isinstance(v, bool), "a boolean"),
        "sampling_seed": (_is_int, "an integer"),
        "n": (lambda v: _is_int(v) and v == 1, "1 (this fake returns one sample per prompt)"),
        "stop": (
            lambda v: (
                isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))
            ),
            "a string or a list of strings",
        ),
        "regex": (lambda v: isinstance(v, str), "a string"),
        "ebnf": (lambda v: isinstance(v, str), "a string"),
    }
    for key, (ok, wanted) in checks.items():
        if key in params and not ok(params[key]):
            raise _Invalid(f"{where}.{key} must be {wanted}, got {params[key]!r}")
    constraints = [k for k in ("json_schema", "regex", "ebnf") if k in params]
    if len(constraints) > 1:
        raise _Invalid(f"{where}: only one of json_schema, regex, ebnf may be set")
    if "regex" in params or "ebnf" in params:
        raise _Invalid(f"{where}: regex/ebnf constraints are not simulated by this fake server")
    if "json_schema" not in params:
        return None
    raw = params["json_schema"]
    if isinstance(raw, dict):
        raise _Invalid(
            f"{where}.json_schema must be a JSON string (json.dumps(schema)), not an object: "
            "SGLang takes the schema as a string"
        )
    if not isinstance(raw, str):
        raise _Invalid(f"{where}.json_schema must be a JSON string")
    try:
        schema = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _Invalid(f"{where}.json_schema is not valid JSON: {exc}") from exc
    return _check_json_schema_object(schema, f"{where}.json_schema")


def _parse_generate(body: Any, image_token: str) -> _GenerateRequest:
    if not isinstance(body, dict):
        raise _Invalid("the request body must be a JSON object")
    if "input_ids" in body:
        raise _Invalid(
            "input_ids is not accepted by this fake: send the prompt as `text` "
            "(so the chat template and image token can be checked)"
        )
    _check_keys(body, GENERATE_KEYS, "the request")
    if "text" not in body:
        raise _Invalid("text is required (a string or a non-empty list of strings)")
    text = body["text"]
    if isinstance(text, str):
        texts, batch = [text], False
    elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
        texts, batch = list(text), True
    else:
        raise _Invalid("text must be a string or a non-empty list of strings")
    size = len(texts)

    if body.get("stream", False) is not False:
        raise _Invalid("stream must be false (streaming is not simulated)")
    for key in ("return_logprob", "return_text_in_logprobs"):
        if key in body and not isinstance(body[key], bool):
            raise _Invalid(f"{key} must be a boolean")
    return_logprob = bool(body.get("return_logprob", False))
    start = body.get("logprob_start_len", -1)
    if not _is_int(start) or start < -1:
        raise _Invalid("logprob_start_len must be an integer >= -1")
    top_num = body.get("top_logprobs_num", 0)
    if top_num is None:
        top_num = 0
    if not _is_int(top_num) or top_num < 0:
        raise _Invalid("top_logprobs_num must be an integer >= 0")
    if top_num > 0 and not return_logprob:
        raise _Invalid("top_logprobs_num requires return_logprob: true")
    modalities = body.get("modalities")
    if modalities is not None and not (
        isinstance(modalities, list)
        and all(m in ("image", "multi-images", "video") for m in modalities)
    ):
        raise _Invalid("modalities must be a list of 'image', 'multi-images' or 'video'")

    token_ids: list[list[int] | None] = [None] * size
    if "token_ids_logprob" in body and body["token_ids_logprob"] is not None:
        if not return_logprob:
            raise _Invalid("token_ids_logprob requires return_logprob: true")
        raw_ids = body["token_ids_logprob"]

        def id_list(value: Any) -> bool:
            return (
                isinstance(value, list)
                and bool(value)
                and all(_is_int(v) and v >= 0 for v in value)
            )

        if id_list(raw_ids):
            token_ids = [list(raw_ids)] * size
        elif (
            batch
            and isinstance(raw_ids, list)
            and len(raw_ids) == size
            and all(id_list(v) for v in raw_ids)
        ):
            token_ids = [list(v) for v in raw_ids]
        else:
            raise _Invalid(
                "token_ids_logprob must be a non-empty list of token ids "
                "(or, for a list of texts, one such list per text)"
            )

    rids: list[str | None] = [None] * size
    if "rid" in body and body["rid"] is not None:
        rid = body["rid"]
        if not batch and isinstance(rid, str):
            rids = [rid]
        elif (
            batch
            and isinstance(rid, list)
            and len(rid) == size
            and all(isinstance(r, str) for r in rid)
        ):
            rids = list(rid)
        else:
            raise _Invalid("rid must be a string (or a list of strings, one per text)")

    if "sampling_params" not in body or body["sampling_params"] is None:
        raise _Invalid(f"sampling_params: {MAX_NEW_TOKENS_REQUIRED}")
    raw_params = body["sampling_params"]
    if isinstance(raw_params, dict):
        params_list = [raw_params] * size
    elif isinstance(raw_params, list):
        if not batch:
            raise _Invalid("sampling_params must be an object for a single text")
        if len(raw_params) != size:
            raise _Invalid(
                f"sampling_params has {len(raw_params)} entries but text has {size}: "
                "give one object for all or one per text"
            )
        params_list = list(raw_params)
    else:
        raise _Invalid("sampling_params must be an object (or a list of objects, one per text)")
    schemas = [
        _check_sampling(
            p,
            "sampling_params"
            if not batch or isinstance(raw_params, dict)
            else f"sampling_params[{i}]",
        )
        for i, p in enumerate(params_list)
    ]

    images: list[bytes | None] = [None] * size
    if "image_data" in body and body["image_data"] is not None:
        raw_images = body["image_data"]
        if not batch:
            if isinstance(raw_images, list):
                raise _Invalid("for a single text, image_data must be one image (a string)")
            images = [_decode_image(raw_images, "image_data")]
        else:
            if not isinstance(raw_images, list):
                raise _Invalid("for a list of texts, image_data must be a list (one per text)")
            if len(raw_images) != size:
                raise _Invalid(
                    f"image_data has {len(raw_images)} entries but text has {size}: "
                    "give one image per text"
                )
            images = [_decode_image(img, f"image_data[{i}]") for i, img in enumerate(raw_images)]
        for i, t in enumerate(texts):
            found = t.count(image_token)
            if found != 1:
                where = f"text[{i}]" if batch else "text"
                raise _Invalid(
                    f"{where} contains the image token {image_token!r} {found} times, expected "
                    "exactly once when image_data is given (wrong chat template?)"
                )
    else:
        for i, t in enumerate(texts):
            if image_token in t:
                where = f"text[{i}]" if batch else "text"
                raise _Invalid(
                    f"{where} contains the image token {image_token!r} but no image_data was given"
                )

    items = []
    for i in range(size):
        if schemas[i] is not None and texts[i].endswith(VERDICT_TAIL):
            raise _Invalid(
                "json_schema with a text that ends inside a JSON answer: the grammar applies "
                "from the first generated token, so the JSON would restart after the prefill"
            )
        items.append(_Item(texts[i], images[i], params_list[i], schemas[i], rids[i], token_ids[i]))
    return _GenerateRequest(
        items, batch, return_logprob, top_num, bool(body.get("return_text_in_logprobs", False))
    )


# --------------------------------------------------------------------------------------------
# /v1/chat/completions request parsing
# --------------------------------------------------------------------------------------------

CHAT_KEYS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "n",
        "stop",
        "seed",
        "response_format",
        "logprobs",
        "top_logprobs",
        "continue_final_message",
        "add_generation_prompt",
        "stream",
        "user",
    }
)
FLAT_SCHEMA_MESSAGE = (
    "response_format: the schema must be nested under json_schema, i.e. "
    '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}; a flat '
    '"schema" key is silently ignored by some servers (llama.cpp decodes unconstrained)'
)


@dataclass
class _ChatRequest:
    model: str
    budget: int
    schema: dict[str, Any] | None
    prefill: str | None
    logprobs: bool
    top_logprobs: int
    image: bytes
    prompt_text: str


def _text_of(content: Any, where: str, image_token: str) -> str:
    if isinstance(content, str):
        text = content
    elif isinstance(content, list) and content:
        return _text_parts(content, where, 0, image_token)
    else:
        raise _Invalid(f"{where} must be a string or a non-empty list of parts")
    _no_image_token(text, where, image_token)
    return text


def _text_parts(content: list[Any], where: str, start: int, image_token: str) -> str:
    """The text parts of `content[start:]`, joined; any other part is an error."""
    texts = []
    for j, part in enumerate(content[start:], start=start):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise _Invalid(
                f"{where}[{j}] must be a text part (only one image is allowed, "
                "first in the first user message)"
            )
        texts.append(_text_part(part, f"{where}[{j}]"))
    text = "\n".join(texts)
    _no_image_token(text, where, image_token)
    return text


def _no_image_token(text: str, where: str, image_token: str) -> None:
    if image_token in text:
        raise _Invalid(
            f"{where} contains the image token {image_token!r}: the chat template inserts it "
            "for the image_url part"
        )


def _text_part(part: dict[str, Any], where: str) -> str:
    _check_keys(part, frozenset({"type", "text"}), where)
    if not isinstance(part.get("text"), str):
        raise _Invalid(f"{where}.text must be a string")
    return str(part["text"])


def _parse_response_format(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        raise _Invalid("response_format must be an object")
    kind = value.get("type")
    if kind == "text":
        _check_keys(value, frozenset({"type"}), "response_format")
        return None
    if kind != "json_schema":
        raise _Invalid("response_format.type must be 'json_schema' or 'text'")
    if "schema" in value:
        raise _Invalid(FLAT_SCHEMA_MESSAGE)
    _check_keys(value, frozenset({"type", "json_schema"}), "response_format")
    inner = value.get("json_schema")
    if not isinstance(inner, dict):
        raise _Invalid(
            'response_format.json_schema must be an object {"name": ..., "schema": {...}}'
        )
    _check_keys(
        inner, frozenset({"name", "schema", "strict", "description"}), "response_format.json_schema"
    )
    if not isinstance(inner.get("name"), str) or not inner["name"]:
        raise _Invalid("response_format.json_schema.name is required (a non-empty string)")
    if "strict" in inner and not isinstance(inner["strict"], bool):
        raise _Invalid("response_format.json_schema.strict must be a boolean")
    if "schema" not in inner:
        raise _Invalid("response_format.json_schema.schema is required")
    return _check_json_schema_object(inner["schema"], "response_format.json_schema.schema")


def _parse_chat(body: Any, image_token: str) -> _ChatRequest:
    if not isinstance(body, dict):
        raise _Invalid("the request body must be a JSON object")
    _check_keys(body, CHAT_KEYS, "the request")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Invalid("model is required (a non-empty string)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Invalid("messages must be a non-empty list")

    if "max_tokens" in body and "max_completion_tokens" in body:
        raise _Invalid("give only one of max_tokens and max_completion_tokens")
    budget_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if budget_key not in body:
        raise _Invalid(
            "max_tokens (or max_completion_tokens) is required here: send the generation "
            "budget explicitly"
        )
    budget = body[budget_key]
    if not _is_int(budget) or budget < 1:
        raise _Invalid(f"{budget_key} must be an integer >= 1, got {budget!r}")
    if "temperature" not in body:
        raise _Invalid("temperature is required here: send it explicitly")
    if not _is_number(body["temperature"]) or body["temperature"] < 0:
        raise _Invalid(f"temperature must be a number >= 0, got {body['temperature']!r}")
    if "top_p" in body and not (_is_number(body["top_p"]) and 0 < body["top_p"] <= 1):
        raise _Invalid("top_p must be a number in (0, 1]")
    if "top_k" in body and not (
        _is_int(body["top_k"]) and (body["top_k"] == -1 or body["top_k"] >= 1)
    ):
        raise _Invalid("top_k must be an integer, -1 or >= 1")
    if "n" in body and not (_is_int(body["n"]) and body["n"] == 1):
        raise _Invalid("n must be 1 (this fake returns one choice)")
    if "seed" in body and not _is_int(body["seed"]):
        raise _Invalid("seed must be an integer")
    if "user" in body and not isinstance(body["user"], str):
        raise _Invalid("user must be a string")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise _Invalid("stop must be a string or a list of strings")
    if body.get("stream", False) is not False:
        raise _Invalid("stream must be false (streaming is not simulated)")
    for key in ("logprobs", "continue_final_message", "add_generation_prompt"):
        if key in body and not isinstance(body[key], bool):
            raise _Invalid(f"{key} must be a boolean")
    logprobs = bool(body.get("logprobs", False))
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is None:
        top_logprobs = 0
    if not _is_int(top_logprobs) or not 0 <= top_logprobs <= 20:
        raise _Invalid("top_logprobs must be an integer in [0, 20]")
    if top_logprobs > 0 and not logprobs:
        raise _Invalid("top_logprobs requires logprobs: true")
    schema = None
    if "response_format" in body:
        schema = _parse_response_format(body["response_format"])

    image: bytes | None = None
    texts: list[str] = []
    first_user = True
    prefill: str | None = None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _Invalid(f"{where} must be an object")
        _check_keys(message, frozenset({"role", "content", "name"}), where)
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise _Invalid(f"{where}.role must be 'system', 'user' or 'assistant', got {role!r}")
        content = message.get("content")
        if role == "user" and first_user:
            first_user = False
            image, text = _first_user_content(content, f"{where}.content", image_token)
            texts.append(f"{role}: {text}")
            continue
        if role == "assistant" and i == len(messages) - 1:
            if not isinstance(content, str):
                raise _Invalid(f"{where}.content: an assistant prefill must be a string")
            if body.get("continue_final_message") is not True:
                raise _Invalid(
                    "the last message is an assistant prefill: set continue_final_message: "
                    "true (otherwise the prefill is closed and a new turn starts)"
                )
            prefill = content
            continue
        texts.append(f"{role}: {_text_of(content, f'{where}.content', image_token)}")
    if image is None:
        raise _Invalid("messages must contain a user message whose content starts with an image")
    if body.get("continue_final_message") is True and prefill is None:
        raise _Invalid("continue_final_message is true but the last message is not an assistant")
    if prefill is not None and schema is not None:
        raise _Invalid(
            "response_format json_schema cannot be combined with an assistant prefill: the "
            "grammar applies from the first generated token, so the JSON would restart after "
            "the prefill"
        )
    prompt_text = "\n".join(texts) + ("" if prefill is None else f"\nassistant: {prefill}")
    return _ChatRequest(model, budget, schema, prefill, logprobs, top_logprobs, image, prompt_text)


def _first_user_content(content: Any, where: str, image_token: str) -> tuple[bytes, str]:
    if not isinstance(content, list) or len(content) < 2:
        raise _Invalid(
            f"{where} of the first user message must be a list: an image_url part, then a text part"
        )
    head = content[0]
    if not isinstance(head, dict) or head.get("type") != "image_url":
        raise _Invalid(f"{where}[0] must be an image_url part (the image comes first)")
    _check_keys(head, frozenset({"type", "image_url"}), f"{where}[0]")
    image_url = head.get("image_url")
    if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
        raise _Invalid(f'{where}[0].image_url must be {{"url": "data:image/...;base64,..."}}')
    _check_keys(image_url, frozenset({"url", "detail"}), f"{where}[0].image_url")
    url = image_url["url"]
    if not url.startswith("data:image/"):
        raise _Invalid(f"{where}[0].image_url.url must be a data:image/...;base64, URL")
    image = _decode_image(url, f"{where}[0].image_url.url")
    return image, _text_parts(content, where, 1, image_token)


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

FaultKind = Literal["500", "503", "429", "timeout", "drop", "malformed", "slow", "shape"]
FAULT_KINDS: frozenset[str] = frozenset(get_args(FaultKind))


@dataclass(frozen=True)
class Fault:
    """One injected failure, consumed by the next matching POST request (before validation)."""

    kind: FaultKind
    path: str | None = None  # only requests to this path; None = any POST
    retry_after: float | None = None  # "429": Retry-After seconds (no header when None)
    delay: float = 0.0  # "slow": extra seconds; "timeout": hang time (0 means 30 s)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {sorted(FAULT_KINDS)}")
        if self.delay < 0 or (self.retry_after is not None and self.retry_after < 0):
            raise ValueError("delay and retry_after must not be negative")


@dataclass
class Received:
    """One POST request that reached a handler."""

    path: str
    body: dict[str, Any] | list[Any] | None  # None when the body was not JSON (or a scalar)
    headers: dict[str, str]
    fault: str | None = None  # the injected fault kind, if one was consumed
    status: int = 0  # 0 while being handled, or when no reply was sent (timeout, drop)


def _retry_after_value(seconds: float) -> str:
    if float(seconds).is_integer():
        return str(int(seconds))
    return format(seconds, ".6f").rstrip("0").rstrip(".")


def _native_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


_OPENAI_ERROR_TYPES = {
    400: "BadRequestError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def _openai_error(status: int, message: str) -> web.Response:
    body = {
        "object": "error",
        "message": message,
        "type": _OPENAI_ERROR_TYPES.get(status, "Error"),
        "code": status,
    }
    return web.json_response(body, status=status)


def _error_for(path: str, status: int, message: str) -> web.Response:
    if path.startswith("/v1/"):
        return _openai_error(status, message)
    return _native_error(status, message)


_Handler = Callable[[Any], Awaitable[web.StreamResponse]]


class FakeSGLang:
    """A fake SGLang server on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        *,
        model_path: str = "AIML-TUDA/LlavaGuard-v1.2-0.5B-OV",
        image_token: str = "<image>",
        api_key: str | None = None,
        service_time: float = 0.0,
        max_running: int = 64,
        seed: int = 0,
        port: int = 0,
    ) -> None:
        if max_running < 1:
            raise ValueError("max_running must be >= 1")
        if service_time < 0:
            raise ValueError("service_time must not be negative")
        self.model_path = model_path
        self.image_token = image_token
        self.api_key = api_key
        self.service_time = service_time
        self.max_running = max_running
        self.seed = seed
        self.port = port
        self.url = ""
        self.received: list[Received] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.max_in_flight = 0
        self.max_busy_slots = 0  # the highest number of generation slots held at once
        self._lock = threading.Lock()
        self._faults: collections.deque[Fault] = collections.deque()
        self._in_flight = 0
        self._busy = 0
        self._slots: asyncio.Semaphore | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- public API -------------------------------------------------------------------------

    def start(self) -> FakeSGLang:
        """Serve from a background thread with its own event loop; return once listening."""
        if self._thread is not None:
            raise RuntimeError("the server is already running")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self._start_async())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._stop_async())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name="fake-sglang", daemon=True)
        self._thread = thread
        thread.start()
        ready.wait()
        if failure:
            self._thread = None
            raise RuntimeError("the fake SGLang server failed to start") from failure[0]
        return self

    def stop(self) -> None:
        """Stop serving; handlers still running (e.g. hung by a "timeout" fault) are cancelled."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._thread = None
        self._loop = None

    def __enter__(self) -> FakeSGLang:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def inject(self, *faults: Fault, times: int = 1) -> None:
        """Queue faults, each `times` times in a row (inject(a, b, times=2) -> a a b b)."""
        if times < 0:
            raise ValueError("times must not be negative")
        with self._lock:
            for fault in faults:
                if not isinstance(fault, Fault):
                    raise TypeError(f"expected a Fault, got {fault!r}")
                self._faults.extend([fault] * times)

    @property
    def pending_faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def clear(self) -> None:
        """Forget received requests, counts, the in-flight/slot maxima and pending faults."""
        with self._lock:
            self.received.clear()
            self.counts.clear()
            self._faults.clear()
            self.max_in_flight = self._in_flight
            self.max_busy_slots = self._busy

    # ---- lifecycle (shared by the thread and the subprocess mode) ---------------------------

    async def _start_async(self) -> None:
        self._slots = asyncio.Semaphore(self.max_running)
        app = web.Application(middlewares=[self._auth_middleware], client_max_size=64 * 2**20)
        app.router.add_get("/health", self._health)
        app.router.add_get("/health_generate", self._health)
        app.router.add_get("/get_model_info", self._model_info)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._post(self._tokenize))
        app.router.add_post("/generate", self._post(self._generate))
        app.router.add_post("/v1/chat/completions", self._post(self._chat))
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await runner.setup()
        site = web.TCPSite(runner, HOST, self.port)
        await site.start()
        self._runner = runner
        address = runner.addresses[0]
        self.url = f"http://{HOST}:{address[1]}"

    async def _stop_async(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()

    async def _serve_until_signal(self) -> None:
        await self._start_async()
        print(f"listening on {self.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await self._stop_async()

    # ---- plumbing ---------------------------------------------------------------------------

    @web.middleware
    async def _auth_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # Like SGLang's API-key middleware: everything under /health stays open.
        if (
            self.api_key is not None
            and not request.path.startswith("/health")
            and request.headers.get("Authorization") != f"Bearer {self.api_key}"
        ):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for index, fault in enumerate(self._faults):
                if fault.path is None or fault.path == path:
                    del self._faults[index]
                    return fault
        return None

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        assert self._slots is not None
        async with self._slots:
            with self._lock:
                self._busy += 1
                self.max_busy_slots = max(self.max_busy_slots, self._busy)
            try:
                if self.service_time > 0:
                    await asyncio.sleep(self.service_time)
                yield
            finally:
                with self._lock:
                    self._busy -= 1

    def _post(self, handler: _Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            return await self._handle_post(request, handler)

        return wrapped

    async def _handle_post(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        raw = await request.read()
        body: Any = None
        parsed = True
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            parsed = False
        record = Received(
            request.path, body if isinstance(body, dict | list) else None, dict(request.headers)
        )
        task = asyncio.current_task()
        with self._lock:
            self.received.append(record)
            self.counts[request.path] += 1
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        if task is not None:
            self._tasks.add(task)
        try:
            fault = self._take_fault(request.path)
            response: web.StreamResponse | None = None
            if fault is not None:
                record.fault = fault.kind
            if fault is not None and fault.kind == "slow":
                await asyncio.sleep(fault.delay)
            elif fault is not None:
                response = await self._apply_fault(request, fault)
                if response is None:
                    # "timeout"/"drop": the connection is gone; make aiohttp write nothing.
                    raise asyncio.CancelledError
            if response is None:
                content_type = request.headers.get("Content-Type", "application/json")
                if not content_type.lower().startswith("application/json"):
                    response = _error_for(
                        request.path,
                        400,
                        f"Content-Type must be application/json, got {content_type!r}",
                    )
                elif not parsed:
                    response = _error_for(request.path, 400, "the request body is not valid JSON")
                else:
                    response = await handler(body)
            assert response is not None
            record.status = response.status
            return response
        finally:
            with self._lock:
                self._in_flight -= 1
            if task is not None:
                self._tasks.discard(task)

    async def _apply_fault(self, request: web.Request, fault: Fault) -> web.StreamResponse | None:
        path = request.path
        if fault.kind in ("500", "503"):
            return _error_for(path, int(fault.kind), f"injected fault: HTTP {fault.kind}")
        if fault.kind == "429":
            response = _error_for(path, 429, "injected fault: too many requests")
            if fault.retry_after is not None:
                response.headers["Retry-After"] = _retry_after_value(fault.retry_after)
            return response
        if fault.kind == "malformed":
            return web.Response(
                status=200, body=b'{"text": "trunc', content_type="application/json"
            )
        if fault.kind == "shape":
            return web.json_response({"unexpected": True})
        if fault.kind == "timeout":
            await asyncio.sleep(fault.delay or DEFAULT_TIMEOUT_HANG)
        # "drop" (and the end of "timeout"): close the TCP connection without any reply.
        if request.transport is not None:
            request.transport.close()
        return None

    # ---- GET endpoints ----------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _model_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_path": self.model_path,
                "tokenizer_path": self.model_path,
                "is_generation": True,
            }
        )

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model_path,
                        "object": "model",
                        "owned_by": "sglang",
                        "root": self.model_path,
                    }
                ],
            }
        )

    # ---- POST endpoints ---------------------------------------------------------------------

    async def _tokenize(self, body: Any) -> web.Response:
        try:
            if not isinstance(body, dict):
                raise _Invalid("the request body must be a JSON object")
            _check_keys(body, frozenset({"prompt", "add_special_tokens", "model"}), "the request")
            prompt = body.get("prompt")
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise _Invalid("add_special_tokens must be a boolean")
            if isinstance(prompt, str):
                tokens: Any = toy_ids(prompt, add_special_tokens=special)
                count: Any = len(tokens)
            elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                tokens = [toy_ids(p, add_special_tokens=special) for p in prompt]
                count = [len(t) for t in tokens]
            else:
                raise _Invalid("prompt must be a string or a non-empty list of strings")
        except _Invalid as exc:
            return _native_error(400, str(exc))
        return web.json_response({"tokens": tokens, "count": count, "max_model_len": MAX_MODEL_LEN})

    def _schema_reply(self, schema: dict[str, Any], rng: random.Random) -> str:
        try:
            instance = instance_for(schema, rng)
        except ValueError as exc:
            raise _Invalid(f"cannot build a grammar for this json_schema: {exc}") from exc
        text = json.dumps(instance, indent=4)
        _validator(schema).validate(json.loads(text))  # internal assertion
        return text

    async def _generate(self, body: Any) -> web.Response:
        started = time.perf_counter()
        try:
            request = _parse_generate(body, self.image_token)
            items = [self._native_item(item, request) for item in request.items]
        except _Invalid as exc:
            return _native_error(400, str(exc))
        async with self._slot():
            pass
        latency = time.perf_counter() - started
        for item in items:
            item["meta_info"]["e2e_latency"] = latency
        return web.json_response(items if request.batch else items[0])

    def _native_item(self, item: _Item, request: _GenerateRequest) -> dict[str, Any]:
        parts = (item.text, item.image or b"")
        rng = _rng(self.seed, "content", *parts)
        verdict = None
        if item.schema is not None:
            full = self._schema_reply(item.schema, rng)
        elif item.text.endswith(VERDICT_TAIL):
            rating, p_safe, p_unsafe = _verdict(self.seed, *parts)
            verdict = (p_safe, p_unsafe)
            full = _verdict_continuation(rating, rng)
        else:
            full = _plain_reply(rng)
        budget = item.params["max_new_tokens"]
        completion = _complete(full, budget, verdict)
        finish: dict[str, Any] = (
            {"type": "length", "length": budget}
            if completion.truncated
            else {"type": "stop", "matched": EOS_ID}
        )
        prompt_tokens = 1 + len(toy_ids(item.text))
        if item.image is not None:
            prompt_tokens += IMAGE_PROMPT_TOKENS - 1
        meta: dict[str, Any] = {
            "id": item.rid or uuid.uuid4().hex,
            "finish_reason": finish,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(completion.ids),
            "cached_tokens": 0,
            "e2e_latency": 0.0,
        }
        if request.return_logprob:
            requested = item.token_ids or []
            positions = _positions(
                self.seed, parts, completion, request.top_logprobs_num, requested
            )
            names = dict(zip(completion.ids, completion.pieces, strict=True))

            def entry(token_id: int, logprob: float) -> list[Any]:
                return [logprob, token_id, _name(token_id, names) if request.return_text else None]

            meta["output_token_logprobs"] = [
                entry(token_id, math.log(probs[token_id]))
                for token_id, probs in zip(completion.ids, positions, strict=True)
            ]
            meta["output_top_logprobs"] = (
                [
                    [entry(t, lp) for t, lp in _top(probs, request.top_logprobs_num)]
                    for probs in positions
                ]
                if request.top_logprobs_num > 0
                else None
            )
            if item.token_ids is not None:
                meta["output_token_ids_logprobs"] = [
                    [entry(t, math.log(probs[t])) for t in item.token_ids] for probs in positions
                ]
        return {"text": completion.text, "output_ids": completion.ids, "meta_info": meta}

    async def _chat(self, body: Any) -> web.Response:
        try:
            request = _parse_chat(body, self.image_token)
            parts = (request.prompt_text, request.image)
            rng = _rng(self.seed, "content", *parts)
            verdict = None
            if request.schema is not None:
                full = self._schema_reply(request.schema, rng)
            elif request.prefill is not None and request.prefill.endswith(VERDICT_TAIL):
                rating, p_safe, p_unsafe = _verdict(self.seed, *parts)
                verdict = (p_safe, p_unsafe)
                full = _verdict_continuation(rating, rng)
            else:
                full = _plain_reply(rng)
        except _Invalid as exc:
            return _openai_error(400, str(exc))
        completion = _complete(full, request.budget, verdict)
        async with self._slot():
            pass
        logprobs: dict[str, Any] | None = None
        if request.logprobs:
            positions = _positions(self.seed, parts, completion, request.top_logprobs, [])
            names = dict(zip(completion.ids, completion.pieces, strict=True))

            def described(
                token_id: int, logprob: float, piece: str | None = None
            ) -> dict[str, Any]:
                token = piece if piece is not None else _name(token_id, names)
                return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

            logprobs = {
                "content": [
                    {
                        **described(token_id, math.log(probs[token_id]), piece),
                        "top_logprobs": [
                            described(t, lp) for t, lp in _top(probs, request.top_logprobs)
                        ],
                    }
                    for piece, token_id, probs in zip(
                        completion.pieces, completion.ids, positions, strict=True
                    )
                ]
            }
        prompt_tokens = 1 + len(toy_ids(request.prompt_text)) + IMAGE_PROMPT_TOKENS
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": completion.text},
                        "logprobs": logprobs,
                        "finish_reason": "length" if completion.truncated else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(completion.ids),
                    "total_tokens": prompt_tokens + len(completion.ids),
                },
            }
        )


@contextlib.contextmanager
def serve(**kwargs: Any) -> Iterator[FakeSGLang]:
    """`with serve(api_key="k") as fake: ...`: a started FakeSGLang, stopped on exit."""
    fake = FakeSGLang(**kwargs)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A fake SGLang server on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--service-time", type=float, default=0.0)
    parser.add_argument("--max-running", type=int, default=64)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model-path", default="AIML-TUDA/LlavaGuard-v1.2-0.5B-OV")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fake = FakeSGLang(
        model_path=args.model_path,
        api_key=args.api_key,
        service_time=args.service_time,
        max_running=args.max_running,
        seed=args.seed,
        port=args.port,
    )
    asyncio.run(fake._serve_until_signal())
    return 0


if __name__ == "__main__":
    sys.exit(main())
