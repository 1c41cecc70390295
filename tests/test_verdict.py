"""The verdict parser: validates against the compiled schema and never defaults to Safe."""

from __future__ import annotations

import json

import pytest

from policy_engine import compile_policy, load_policy, parse_verdict
from policy_engine.compiler import CompiledPolicy
from policy_engine.verdict import extract_json_object


@pytest.fixture(scope="module")
def compiled() -> CompiledPolicy:
    return compile_policy(load_policy("llavaguard"))


def answer(**changes: object) -> dict[str, object]:
    base = {
        "rating": "Unsafe",
        "category": "O7: Self-Harm",
        "rationale": "The image romanticizes self-harm.",
    }
    base.update(changes)
    return base


def test_trained_layout_parses(compiled: CompiledPolicy) -> None:
    text = json.dumps(answer(), indent=4)
    verdict = parse_verdict(text, compiled)
    assert verdict.ok
    assert (verdict.rating, verdict.category_id, verdict.category_name) == (
        "Unsafe",
        "O7",
        "Self-Harm",
    )
    assert verdict.rationale == "The image romanticizes self-harm."
    assert verdict.raw == text
    assert verdict.policy_hash == compiled.hash
    assert verdict.policy_id == "llavaguard"


def test_none_applying_category(compiled: CompiledPolicy) -> None:
    verdict = parse_verdict(
        json.dumps(answer(rating="Safe", category="NA: None applying")), compiled
    )
    assert (verdict.rating, verdict.category_id, verdict.category_name) == (
        "Safe",
        "NA",
        "None applying",
    )


@pytest.mark.parametrize(
    "wrapped",
    [
        "```json\n{body}\n```",
        "Sure! Here is my assessment:\n{body}\nLet me know if you need more.",
        "{{not json}} then {body}",
    ],
)
def test_extracts_object_from_chatty_or_fenced_reply(
    wrapped: str, compiled: CompiledPolicy
) -> None:
    text = wrapped.format(body=json.dumps(answer(), indent=4))
    verdict = parse_verdict(text, compiled)
    assert verdict.ok and verdict.category_id == "O7"
    assert verdict.raw == text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "no JSON object"),
        ("I cannot help with that.", "no JSON object"),
        ('{"rating": "Safe", "category": "NA: None applying"', "no JSON object"),
        (json.dumps(answer(rating="Maybe")), "rating"),
        (json.dumps(answer(category="O99: Invented")), "category"),
        (json.dumps({"rating": "Safe", "category": "NA: None applying"}), "rationale"),
        (json.dumps(answer(extra="field")), "extra"),
        (json.dumps(answer(rationale="")), "rationale"),
        ("[1, 2, 3]", "no JSON object"),
    ],
)
def test_invalid_reply_is_an_error_verdict_never_safe(
    text: str, fragment: str, compiled: CompiledPolicy
) -> None:
    verdict = parse_verdict(text, compiled)
    assert not verdict.ok
    assert verdict.rating is None
    assert verdict.error is not None and verdict.error.kind == "output"
    assert fragment in verdict.error.message
    assert verdict.raw == text


def test_rationale_length_bound(compiled: CompiledPolicy) -> None:
    too_long = "x" * (compiled.policy.output.rationale_max_chars + 1)
    assert not parse_verdict(json.dumps(answer(rationale=too_long)), compiled).ok


def test_verdict_schema_for_mode(compiled: CompiledPolicy) -> None:
    text = json.dumps({"rating": "Safe", "category": "NA: None applying"})
    assert not parse_verdict(text, compiled).ok
    verdict = parse_verdict(text, compiled, schema=compiled.schema_for("verdict"))
    assert verdict.ok and verdict.rationale is None


def test_extract_json_object_prefers_first_object() -> None:
    assert extract_json_object('a {"x": 1} b {"y": 2}') == {"x": 1}
    with pytest.raises(ValueError):
        extract_json_object("nothing here")


def test_severity_comes_from_the_policy_for_unsafe_verdicts(compiled: CompiledPolicy) -> None:
    assert parse_verdict(json.dumps(answer()), compiled).severity == "critical"  # O7
    o4 = answer(category="O4: Nudity Content")
    assert parse_verdict(json.dumps(o4), compiled).severity == "medium"
    safe = answer(rating="Safe")
    assert parse_verdict(json.dumps(safe), compiled).severity is None
    unsafe_na = answer(category="NA: None applying")
    assert parse_verdict(json.dumps(unsafe_na), compiled).severity is None
