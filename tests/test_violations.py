"""Multi-label answers in the generic format: `violations`, every violated category with its
severity. The schema, the grammar and the verdict reader agree on exactly the valid answers."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from PIL import Image

from policy_engine import Engine, PolicyError, get_host, load_policy, parse_verdict
from policy_engine.compiler import CompiledPolicy
from policy_engine.grammar import answer_grammar

SMALL = """\
id: small
prompt_format: generic
severity_levels: [low, high]
output:
  extra_fields: [violations]
categories:
  - {id: C1, name: One, severity: high, should_not: [a]}
  - {id: C2, name: 'Two "quoted"', should_not: [b], severity: low}
  - {id: C3, name: Three, should_not: [c], severity: low}
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> CompiledPolicy:
    path = tmp_path_factory.mktemp("violations") / "small.yaml"
    path.write_text(SMALL, encoding="utf-8")
    return get_host().compile(load_policy(path))


def every_answer(compiled: CompiledPolicy) -> list[dict[str, Any]]:
    """Every rating x category x violations map (each category absent or at a level), with
    the violations in policy order (the layout's)."""
    labels = list(compiled.labels)
    unsafe = labels[:-1]
    levels = compiled.policy.severity_levels
    maps = []
    for choice in itertools.product([None, *levels], repeat=len(unsafe)):
        maps.append({label: level for label, level in zip(unsafe, choice, strict=True) if level})
    return [
        {"rating": rating, "category": label, "violations": found, "rationale": "r"}
        for rating in ("Safe", "Unsafe")
        for label in labels
        for found in maps
    ]


def expected_valid(answer: dict[str, Any], compiled: CompiledPolicy) -> bool:
    """The rule in words: Safe lists none; Unsafe names a category and lists it."""
    if answer["rating"] == "Safe":
        return answer["violations"] == {}
    return answer["category"] != compiled.none_label and answer["category"] in answer["violations"]


def test_the_layout_and_the_prompt_ask_for_violations(small: CompiledPolicy) -> None:
    assert list(small.fields) == ["rating", "category", "violations", "rationale"]
    assert '"violations": every policy category the content violates' in small.prompt
    assert "one of low, high" in small.prompt
    text = small.layout.dumps(
        {
            "rating": "Unsafe",
            "category": "C1: One",
            "violations": {"C1: One": "high"},
            "rationale": "r",
        }
    )
    assert text == (
        '{\n    "rating": "Unsafe",\n    "category": "C1: One",\n'
        '    "violations": {\n        "C1: One": "high"\n    },\n    "rationale": "r"\n}'
    )


def test_schema_and_reader_accept_exactly_the_consistent_answers(small: CompiledPolicy) -> None:
    validator = jsonschema.Draft202012Validator(small.schema)
    answers = every_answer(small)
    assert len(answers) == 2 * 4 * 27
    for answer in answers:
        valid = expected_valid(answer, small)
        assert validator.is_valid(answer) is valid, answer
        verdict = parse_verdict(small.layout.dumps(answer), small)
        assert verdict.ok is valid, (answer, verdict.error)
    # other shapes: unknown keys, unknown levels, the none-applying category, a list
    bad = {"rating": "Unsafe", "category": "C1: One", "rationale": "r"}
    for violations in (
        {"C1: One": "medium"},
        {"C1: One": "high", "NA: None applying": "low"},
        {"C1: One": "high", "C4: Four": "low"},
        ["C1: One"],
        {"C1: One": ["high"]},
    ):
        answer = {**bad, "violations": violations}
        assert not validator.is_valid(answer)
        assert not parse_verdict(json.dumps(answer), small).ok


def test_verdict_keeps_every_violation_with_its_severity(small: CompiledPolicy) -> None:
    answer = {
        "rating": "Unsafe",
        "category": "C3: Three",
        "violations": {"C3: Three": "high", "C1: One": "low"},  # any key order is JSON
        "rationale": "r",
    }
    verdict = parse_verdict(json.dumps(answer), small)
    assert verdict.ok, verdict.error
    assert verdict.category_severities == {"C1": "low", "C3": "high"}
    assert verdict.categories == ["C1", "C3"]
    assert verdict.severity == "high"  # the model's, for its category; the policy says low
    safe = parse_verdict(
        json.dumps(
            {"rating": "Safe", "category": 'C2: Two "quoted"', "violations": {}, "rationale": "r"}
        ),
        small,
    )
    assert safe.ok and safe.category_severities == {} and safe.categories == []
    lavaguard = parse_verdict(
        '{"rating": "Safe", "category": "NA: None applying", "rationale": "r"}',
        get_host().compile(load_policy("llavaguard")),
    )
    assert lavaguard.category_severities is None  # not asked: absent


def test_reader_says_what_is_inconsistent(small: CompiledPolicy) -> None:
    base = {"rating": "Unsafe", "category": "C1: One", "rationale": "r"}
    missing = parse_verdict(json.dumps({**base, "violations": {'C2: Two "quoted"': "low"}}), small)
    assert missing.error is not None
    assert "lists its category 'C1: One' with a severity" in missing.error.message
    safe = parse_verdict(
        json.dumps({**base, "rating": "Safe", "violations": {"C1: One": "low"}}), small
    )
    assert safe.error is not None and "a Safe rating lists no violations" in safe.error.message


def test_violations_are_asked_alone_and_only_in_the_generic_format(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(SMALL.replace("[violations]", "[severity, violations]"))
    with pytest.raises(PolicyError, match="ask for it alone"):
        load_policy(path)
    path.write_text(SMALL.replace("prompt_format: generic", "prompt_format: llavaguard-v1.2"))
    with pytest.raises(PolicyError, match="cannot ask for extra fields"):
        load_policy(path)


def test_the_static_backend_answers_with_violations(small: CompiledPolicy, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "red").save(image)
    options = {"rating": "Unsafe", "category": "C2"}
    with Engine(small.policy, "static", backend_options=options) as engine:
        decision = engine.assess(str(image))
    assert decision.verdict.ok, decision.verdict.error
    assert decision.verdict.category_severities == {"C2": "low"}


# -- the grammar (llguidance) ----------------------------------------------------------------
llguidance = pytest.importorskip("llguidance")
pytest.importorskip("tokenizers")

from test_grammar import accepts, ll_tokenizer  # noqa: E402, F401  (the fixture, shared)


@pytest.mark.parametrize("mode", ["full", "verdict"])
def test_grammar_admits_exactly_the_valid_answers_in_layout(
    ll_tokenizer: object,  # noqa: F811
    small: CompiledPolicy,
    mode: str,
) -> None:
    layout = small.layout_for(mode)  # type: ignore[arg-type]
    whole = answer_grammar(small, mode)  # type: ignore[arg-type]
    tail = answer_grammar(small, mode, after_prefix=True)  # type: ignore[arg-type]
    for answer in every_answer(small):
        text = layout.dumps(answer)
        valid = expected_valid(answer, small)
        assert accepts(ll_tokenizer, whole, text) is valid, text
        assert accepts(ll_tokenizer, tail, text[len(layout.prefix()) :]) is valid, text


def test_grammar_rejects_other_orders_and_layouts(
    ll_tokenizer: object,  # noqa: F811
    small: CompiledPolicy,
) -> None:
    grammar = answer_grammar(small)
    good = {
        "rating": "Unsafe",
        "category": "C1: One",
        "violations": {"C1: One": "high", "C3: Three": "low"},
        "rationale": "r",
    }
    assert accepts(ll_tokenizer, grammar, small.layout.dumps(good))
    for text in (
        small.layout.dumps({**good, "violations": {"C3: Three": "low", "C1: One": "high"}}),
        json.dumps(good, indent=2),
        json.dumps(good),
        small.layout.dumps(good).replace('"high"', '"High"'),
    ):
        assert not accepts(ll_tokenizer, grammar, text), text


def test_grammar_scales_to_llavaguard_categories(ll_tokenizer: object) -> None:  # noqa: F811
    policy = load_policy("llavaguard").model_copy(update={"prompt_format": "generic"})
    policy = policy.model_copy(
        update={"output": policy.output.model_copy(update={"extra_fields": ["violations"]})}
    )
    compiled = get_host().compile(policy)
    assert len(compiled.schema["anyOf"]) == 1 + len(policy.categories)
    grammar = answer_grammar(compiled)
    labels = compiled.unsafe_labels
    answer = {
        "rating": "Unsafe",
        "category": labels[3],
        "violations": {labels[2]: "high", labels[3]: "medium", labels[8]: "low"},
        "rationale": "r",
    }
    assert accepts(ll_tokenizer, grammar, compiled.layout.dumps(answer))
    del answer["violations"][labels[3]]  # type: ignore[attr-defined]
    assert not accepts(ll_tokenizer, grammar, compiled.layout.dumps(answer))


def test_a_multi_label_answer_flags_every_violated_category_in_moderation(
    small: CompiledPolicy,
) -> None:
    pytest.importorskip("fastapi")
    from test_serve import RED, image_part, serving

    from policy_engine.serve.pool import EnginePool

    answer = {
        "rating": "Unsafe",
        "category": "C1: One",
        "violations": {"C1: One": "high", "C3: Three": "low"},
        "rationale": "r",
    }
    backend = {"raw": small.layout.dumps(answer), "p_unsafe": 0.9}
    with serving(EnginePool([small.policy], "static", backend_options=backend)) as api:
        result = api.post("/v1/moderations", json={"input": [image_part(RED)]}).json()
        native = api.post("/v1/assess", json={"image": RED}).json()
    assert result["results"][0]["categories"] == {"C1": True, "C2": False, "C3": True}
    verdict = native["decision"]["verdict"]
    assert verdict["category_severities"] == {"C1": "high", "C3": "low"}
