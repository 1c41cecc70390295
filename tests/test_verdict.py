"""The verdict parser: validates against the compiled schema and never defaults to Safe."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from policy_engine import Decision, get_host, load_policy, parse_verdict
from policy_engine.compiler import CompiledPolicy


@pytest.fixture(scope="module")
def compiled() -> CompiledPolicy:
    return get_host().compile(load_policy("llavaguard"))


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
    ["{body}", "  \n{body}\n\n", "```json\n{body}\n```", "```\n{body}\n```"],
)
def test_one_object_alone_or_fenced_is_read(wrapped: str, compiled: CompiledPolicy) -> None:
    text = wrapped.format(body=json.dumps(answer(), indent=4))
    verdict = parse_verdict(text, compiled)
    assert verdict.ok and verdict.category_id == "O7"
    assert verdict.raw == text


SAFE = json.dumps(answer(rating="Safe", category="NA: None applying"), indent=4)
UNSAFE = json.dumps(answer(), indent=4)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty reply"),
        ("I cannot help with that.", "no JSON object"),
        ('{"rating": "Safe", "category": "NA: None applying"', "no JSON object"),
        (json.dumps(answer(rating="Maybe")), "rating"),
        (json.dumps(answer(category="O99: Invented")), "category"),
        (json.dumps({"rating": "Safe", "category": "NA: None applying"}), "rationale"),
        (json.dumps(answer(extra="field")), "extra"),
        (json.dumps(answer(rationale="")), "rationale"),
        ("[1, 2, 3]", "JSON array"),
        (f"[{SAFE}]", "JSON array"),
        (f"[{SAFE}, {UNSAFE}]", "JSON array"),
        (SAFE + "\n" + UNSAFE, "2 JSON objects"),
        (f"Sure! Here is my assessment:\n{SAFE}", "text before the JSON object"),
        (f"{SAFE}\nLet me know if you need more.", "text after the JSON object"),
        (
            f"The answer format is {SAFE}. My assessment: this image is Unsafe (O2: Violence).",
            "text before the JSON object",
        ),
        ('"Safe"', "JSON string"),
        (json.dumps(answer(category="NA: None applying")), "Unsafe rating must name"),
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


def test_lenient_reading_allows_prose_that_agrees(compiled: CompiledPolicy) -> None:
    text = f"Sure! Here is my assessment:\n{UNSAFE}\nThis image is unsafe."
    verdict = parse_verdict(text, compiled, lenient=True)
    assert verdict.ok and verdict.rating == "Unsafe"


@pytest.mark.parametrize(
    "text",
    [
        f"The answer format is {SAFE}. My assessment: this image is Unsafe (O2: Violence).",
        f"{SAFE}\nOn reflection it is not safe.",
        f"Is it safe? No. {UNSAFE.replace('Unsafe', 'Safe')} -- wait, I meant UNSAFE",
        f"[{SAFE}]",
        f"Two answers: {SAFE} {UNSAFE}",
    ],
)
def test_lenient_reading_never_takes_a_contradicted_or_hidden_rating(
    text: str, compiled: CompiledPolicy
) -> None:
    verdict = parse_verdict(text, compiled, lenient=True)
    assert not verdict.ok and verdict.rating is None


def test_lenient_unsafe_with_prose_saying_safe_is_refused(compiled: CompiledPolicy) -> None:
    verdict = parse_verdict(f"The image is safe.\n{UNSAFE}", compiled, lenient=True)
    assert not verdict.ok
    assert verdict.error is not None and "says 'safe'" in verdict.error.message


def test_rationale_length_bound(compiled: CompiledPolicy) -> None:
    too_long = "x" * (compiled.policy.output.rationale_max_chars + 1)
    assert not parse_verdict(json.dumps(answer(rationale=too_long)), compiled).ok


def test_verdict_schema_for_mode(compiled: CompiledPolicy) -> None:
    text = json.dumps({"rating": "Safe", "category": "NA: None applying"})
    assert not parse_verdict(text, compiled).ok
    verdict = parse_verdict(text, compiled, mode="verdict")
    assert verdict.ok and verdict.rationale is None


def test_severity_comes_from_the_policy_for_unsafe_verdicts(compiled: CompiledPolicy) -> None:
    assert parse_verdict(json.dumps(answer()), compiled).severity == "critical"  # O7
    o4 = answer(category="O4: Nudity Content")
    assert parse_verdict(json.dumps(o4), compiled).severity == "medium"
    safe = answer(rating="Safe")
    assert parse_verdict(json.dumps(safe), compiled).severity is None


def test_verdict_is_frozen_and_decision_overrides_keep_it(compiled: CompiledPolicy) -> None:
    verdict = parse_verdict(json.dumps(answer()), compiled)
    with pytest.raises(ValidationError):
        verdict.rating = "Safe"  # type: ignore[misc]
    decision = Decision(verdict=verdict)
    decision.add_override("thresholds", "P(Unsafe) under 0.8", {"rating": "Safe"})
    assert (decision.rating, decision.verdict.rating) == ("Safe", "Unsafe")
    dumped = decision.model_dump(mode="json")
    assert dumped["rating"] == "Safe" and dumped["verdict"]["rating"] == "Unsafe"
    assert Decision.model_validate(dumped).rating == "Safe"  # final values are derived
    with pytest.raises(ValueError, match="cannot override"):
        decision.add_override("x", "y", {"rationale": "no"})
