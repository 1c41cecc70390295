"""The answer grammar: a Lark grammar that admits exactly the answers a checkpoint was trained on.

A JSON Schema says which *values* are valid; a model trained on LlavaGuard answers also expects
one *layout*: `json.dumps(answer, indent=4)` with the keys in trained order. Grammar libraries
compiling a schema either allow flexible whitespace (a weak model then emits blanks until its
token budget runs out) or a compact layout the model never saw. So we write the grammar from the
compiled policy's layout and schema ourselves: every fixed byte of the layout is a literal, every
value a sub-grammar, and the text it admits is precisely `layout.dumps(answer)` for the answers
the schema accepts.

The grammar is in the Lark dialect that llguidance reads (`%json` embeds a JSON Schema for a
single value). It is pure text: no grammar library is imported here.

Two variants: the whole answer, or the answer *after* the layout's forced prefix
(`'{\\n    "rating": "'`): backends put that prefix at the end of the prompt, so the first
generated token is the rating, where P(Unsafe) is read.
"""

from __future__ import annotations

import json
from typing import Any

from .compiler import AnswerLayout, CompiledPolicy
from .types import Mode


def _literal(text: str) -> str:
    """A Lark string literal for `text` (JSON escapes are valid Lark escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


class _Builder:
    def __init__(self) -> None:
        self.rules: list[str] = []

    def rule(self, name: str, body: str) -> str:
        self.rules.append(f"{name}: {body}")
        return name

    def value(self, name: str, schema: dict[str, Any], level: int, indent: int | None) -> str:
        """A rule for one value at nesting `level`, laid out as json.dumps would."""
        if "enum" in schema:
            alternatives = " | ".join(_literal(_json_text(v)) for v in schema["enum"])
            return self.rule(name, alternatives)
        kind = schema.get("type")
        if kind == "string":
            bounds = {k: schema[k] for k in ("minLength", "maxLength", "pattern") if k in schema}
            return self.rule(name, "%json " + json.dumps({"type": "string", **bounds}))
        if kind == "array" and "enum" in schema.get("items", {}):
            return self._enum_array(name, schema, level, indent)
        if kind == "object" and all("enum" in v for v in schema.get("properties", {}).values()):
            return self._enum_object(name, schema, level, indent)
        raise ValueError(f"no answer grammar for schema {schema!r}")

    def _enum_object(
        self, name: str, schema: dict[str, Any], level: int, indent: int | None
    ) -> str:
        """An object of enum-valued keys (the `violations` answer), keys in the schema's
        order, each at most once, the `required` ones always there."""
        properties: dict[str, Any] = schema["properties"]
        keys = list(properties)
        required = set(schema.get("required", ()))
        if schema.get("maxProperties") == 0 or not keys:
            return self.rule(name, _literal("{}"))
        if indent is None:
            open_, sep, close = "{", ", ", "}"
        else:
            inner = "\n" + " " * (indent * (level + 1))
            open_, sep, close = "{" + inner, "," + inner, "\n" + " " * (indent * level) + "}"
        items = []
        for i, key in enumerate(keys):
            values = " | ".join(_literal(_json_text(v)) for v in properties[key]["enum"])
            items.append(
                self.rule(f"{name}_item_{i}", f"{_literal(_json_text(key) + ': ')} ({values})")
            )
        # tail_i: an ordered subset of keys[i:], non-empty, holding every required key there
        count = len(keys)
        for i in reversed(range(count)):
            alternatives = []
            if i == count - 1:
                alternatives.append(items[i])
            else:
                rest = f"{_literal(sep)} {name}_tail_{i + 1}"
                needed_later = any(k in required for k in keys[i + 1 :])
                alternatives.append(
                    f"{items[i]} {rest}" if needed_later else f"{items[i]} ({rest})?"
                )
                if keys[i] not in required:
                    alternatives.append(f"{name}_tail_{i + 1}")
            self.rule(f"{name}_tail_{i}", " | ".join(alternatives))
        non_empty = f"{_literal(open_)} {name}_tail_0 {_literal(close)}"
        body = non_empty if required else f"{_literal('{}')} | {non_empty}"
        return self.rule(name, body)

    def _enum_array(self, name: str, schema: dict[str, Any], level: int, indent: int | None) -> str:
        """An array of distinct enum values, in the enum's order (so never a duplicate)."""
        items = [_literal(_json_text(v)) for v in schema["items"]["enum"]]
        if indent is None:
            open_, sep, close = "[", ", ", "]"
        else:
            inner = "\n" + " " * (indent * (level + 1))
            open_, sep, close = "[" + inner, "," + inner, "\n" + " " * (indent * level) + "]"
        if not items:
            return self.rule(name, _literal("[]"))
        # tail_i: a non-empty ordered subset of items[i:]
        count = len(items)
        for i in reversed(range(count)):
            tail = f"{name}_tail_{i}"
            if i == count - 1:
                self.rule(tail, items[i])
            else:
                nxt = f"{name}_tail_{i + 1}"
                self.rule(tail, f"{items[i]} ({_literal(sep)} {nxt})? | {nxt}")
        min_items = schema.get("minItems", 0)
        non_empty = f"{_literal(open_)} {name}_tail_0 {_literal(close)}"
        body = non_empty if min_items else f"{_literal('[]')} | {non_empty}"
        return self.rule(name, body)


def answer_grammar(
    compiled: CompiledPolicy, mode: Mode = "full", *, after_prefix: bool = False
) -> str:
    """The Lark grammar of every valid answer for `mode`, in the trained layout.

    With `after_prefix`, the grammar starts right after `layout.prefix()` (which the backend
    puts in the prompt): its first symbol is the rating value without its opening quote.
    """
    return layout_grammar(
        compiled.layout_for(mode), compiled.schema_for(mode), after_prefix=after_prefix
    )


def layout_grammar(
    layout: AnswerLayout, schema: dict[str, Any], *, after_prefix: bool = False
) -> str:
    """The grammar for an object schema laid out as `layout` says (see `answer_grammar`).

    A root `anyOf` of object schemas (the compiler's one branch per rating) becomes one
    alternative per branch, so the grammar keeps the schema's ties between keys (an Unsafe
    rating is followed only by a violated category)."""
    builder = _Builder()
    branches = schema.get("anyOf", [schema])
    alternatives = [
        _object_rule(builder, f"b{number}", layout, branch, after_prefix)
        for number, branch in enumerate(branches)
    ]
    return "\n".join([f"start: {' | '.join(alternatives)}", *builder.rules]) + "\n"


def _object_rule(
    builder: _Builder, name: str, layout: AnswerLayout, schema: dict[str, Any], after_prefix: bool
) -> str:
    properties: dict[str, Any] = schema["properties"]
    keys = [k for k in layout.keys if k in properties]
    if set(keys) != set(schema.get("required", keys)) or not keys:
        raise ValueError("the answer grammar needs every layout key to be required")
    indent = layout.indent
    if indent is None:
        open_, sep, close = "{", ", ", "}"
    else:
        pad = "\n" + " " * indent
        open_, sep, close = "{" + pad, "," + pad, "\n}"
    parts: list[str] = []
    for index, key in enumerate(keys):
        head = (open_ if index == 0 else sep) + _json_text(key) + ": "
        value_schema = properties[key]
        if index == 0 and after_prefix:
            if "enum" not in value_schema or not all(
                isinstance(v, str) for v in value_schema["enum"]
            ):
                raise ValueError("after_prefix needs a first key with string enum values")
            if head + '"' != layout.prefix():
                raise ValueError("the layout's prefix does not match its first key")
            rest = " | ".join(_literal(v + '"') for v in value_schema["enum"])
            parts.append(builder.rule(f"{name}_v{index}", rest))
            continue
        parts.append(_literal(head))
        parts.append(builder.value(f"{name}_v{index}", value_schema, 1, indent))
    parts.append(_literal(close))
    return builder.rule(name, " ".join(parts))
