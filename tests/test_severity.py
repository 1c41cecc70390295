"""The `severity` post-processor: policy or model level, floors and ceilings along the policy's
scale, trace lines, validation errors located in the policy file, and a run through the engine."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from policy_engine.plugins.severity import Severity, SeverityParams

from policy_engine import (
    Decision,
    Mode,
    Policy,
    PolicyError,
    StepContext,
    Verdict,
    get_host,
    load_policy,
)
from policy_engine.engine import Engine

LLAVAGUARD = load_policy("llavaguard")
STANDALONE = Path(__file__).resolve().parent / "data" / "good_policies" / "standalone.yaml"


def verdict(
    rating: str | None = "Unsafe",
    category: str | None = "O2",
    severity: str | None = "high",
    policy: Policy = LLAVAGUARD,
    **extra: Any,
) -> Verdict:
    return Verdict(
        rating=rating,  # type: ignore[arg-type]
        category_id=category,
        severity=severity,
        policy_id=policy.id,
        policy_version=policy.version,
        policy_hash="sha256:test",
        **extra,
    )


def run(
    params: dict[str, Any],
    v: Verdict | None = None,
    *,
    metadata: dict[str, Any] | None = None,
    policy: Policy = LLAVAGUARD,
    mode: Mode = "full",
) -> Decision:
    """Validate and check the params like the loader does, then post-process one verdict."""
    parsed = SeverityParams.model_validate(params)
    assert Severity.check(parsed, policy) == []
    decision = Decision(verdict=v or verdict(policy=policy), metadata=metadata or {})
    compiled = get_host().compile(policy)
    context = StepContext("severity", mode, compiled, metadata or {}, decision)
    Severity(parsed, policy)(decision, context)
    return decision


def only_note(decision: Decision) -> str:
    assert [t.step for t in decision.trace] == ["severity"]
    assert not decision.trace[0].error
    return decision.trace[0].message


# -- source ------------------------------------------------------------------------------------


def test_default_keeps_the_policy_level() -> None:
    decision = run({})
    assert decision.severity == "high"
    assert only_note(decision) == "severity high kept: policy level of O2"
    assert decision.actions == []


def test_source_policy_replaces_another_level() -> None:
    decision = run({"source": "policy"}, verdict(severity="low"))
    assert decision.severity == "high"
    assert only_note(decision) == "severity low -> high: policy level of O2"


def test_source_policy_uses_the_policys_own_scale() -> None:
    policy = load_policy(STANDALONE)
    v = verdict(category="M3", severity=None, policy=policy)
    decision = run({}, v, policy=policy)
    assert decision.severity == "minor"
    assert only_note(decision) == "severity none -> minor: policy level of M3"


def _generic(extra_fields: list[str]) -> Policy:
    output = LLAVAGUARD.output.model_copy(update={"extra_fields": extra_fields})
    return LLAVAGUARD.model_copy(update={"prompt_format": "generic", "output": output})


def test_source_model_keeps_the_models_level_when_asked() -> None:
    policy = _generic(["severity"])
    decision = run({"source": "model"}, verdict(severity="low", policy=policy), policy=policy)
    assert decision.severity == "low"
    assert only_note(decision) == "severity low kept: the model's severity"


def test_source_model_falls_back_when_the_format_did_not_ask() -> None:
    # The LlavaGuard format never asks for a severity: the verdict's level is the policy's.
    decision = run({"source": "model"}, verdict(severity="low"))
    assert decision.severity == "high"
    assert only_note(decision) == (
        "severity low -> high: the model was not asked for a severity; policy level of O2"
    )


def test_source_model_falls_back_in_score_mode() -> None:
    policy = _generic(["severity"])
    v = verdict(severity="low", policy=policy, p_unsafe=0.9)
    decision = run({"source": "model"}, v, policy=policy, mode="score")
    assert decision.severity == "high"
    assert "the model was not asked for a severity" in only_note(decision)


def test_source_model_falls_back_when_the_answer_has_no_level() -> None:
    policy = _generic(["severity"])
    decision = run({"source": "model"}, verdict(severity=None, policy=policy), policy=policy)
    assert decision.severity == "high"
    assert only_note(decision) == (
        "severity none -> high: the model gave no usable severity (None); policy level of O2"
    )


# -- floors and ceilings -----------------------------------------------------------------------


MINORS = {"floor": [{"level": "critical", "metadata": {"audience": "minors"}}]}


def test_floor_raises_when_metadata_matches() -> None:
    decision = run(MINORS, metadata={"audience": "minors"})
    assert decision.severity == "critical"
    assert only_note(decision) == "severity high -> critical: floor critical for audience=minors"


def test_floor_does_nothing_when_metadata_differs_or_is_missing() -> None:
    for metadata in ({"audience": "adults"}, {}):
        decision = run(MINORS, metadata=metadata)
        assert decision.severity == "high"
        assert only_note(decision) == "severity high kept: policy level of O2"


def test_floor_metadata_list_accepts_any_of_its_values() -> None:
    params = {"floor": [{"level": "critical", "metadata": {"audience": ["minors", "teens"]}}]}
    assert run(params, metadata={"audience": "teens"}).severity == "critical"
    assert run(params, metadata={"audience": "adults"}).severity == "high"
    message = only_note(run(params, metadata={"audience": "minors"}))
    assert message == "severity high -> critical: floor critical for audience in [minors, teens]"


def test_floor_needs_every_metadata_key_and_the_category() -> None:
    params = {
        "floor": [
            {"level": "critical", "metadata": {"audience": "minors", "surface": "chat"}},
            {"level": "critical", "categories": ["O1"]},
        ]
    }
    assert run(params, metadata={"audience": "minors"}).severity == "high"
    both = run(params, metadata={"audience": "minors", "surface": "chat"})
    assert only_note(both) == (
        "severity high -> critical: floor critical for audience=minors, surface=chat"
    )
    o1 = run(params, verdict(category="O1", severity="high"))
    assert only_note(o1) == "severity high -> critical: floor critical for category O1"


def test_floor_never_lowers() -> None:
    decision = run({"floor": [{"level": "medium"}]})
    assert decision.severity == "high"
    assert only_note(decision) == "severity high kept: policy level of O2"


def test_highest_matching_floor_wins() -> None:
    params = {"floor": [{"level": "high"}, {"level": "critical", "categories": ["O2", "O3"]}]}
    decision = run(params, verdict(category="O4", severity="medium"))
    assert only_note(decision) == "severity medium -> high: floor high for every verdict"
    decision = run(params, verdict(category="O3", severity="high"))
    assert only_note(decision) == (
        "severity high -> critical: floor critical for categories O2, O3"
    )


def test_ceiling_caps_and_never_raises() -> None:
    params = {"ceiling": [{"level": "medium", "metadata": {"surface": "research"}}]}
    decision = run(
        params, verdict(category="O7", severity="critical"), metadata={"surface": "research"}
    )
    assert decision.severity == "medium"
    assert only_note(decision) == "severity critical -> medium: ceiling medium for surface=research"
    high = {"ceiling": [{"level": "high"}]}
    medium = run(high, verdict(category="O4", severity="medium"))
    assert only_note(medium) == "severity medium kept: policy level of O4"
    assert run(params, verdict(category="O7", severity="critical")).severity == "critical"


def test_lowest_matching_ceiling_wins() -> None:
    params = {"ceiling": [{"level": "high"}, {"level": "low", "categories": ["O7"]}]}
    decision = run(params, verdict(category="O7", severity="critical"))
    assert only_note(decision) == "severity critical -> low: ceiling low for category O7"


def test_floor_wins_over_a_ceiling_that_also_matches() -> None:
    params = {
        "floor": [{"level": "critical", "metadata": {"audience": "minors"}}],
        "ceiling": [{"level": "medium", "categories": ["O2"]}],
    }
    decision = run(params, metadata={"audience": "minors"})
    assert decision.severity == "critical"
    assert only_note(decision) == (
        "severity high -> critical: ceiling medium for category O2; "
        "floor critical for audience=minors"
    )
    assert run(params).severity == "medium"


def test_start_level_is_named_when_a_bound_also_applies() -> None:
    decision = run(MINORS, verdict(severity="low"), metadata={"audience": "minors"})
    assert only_note(decision) == (
        "severity low -> critical: policy level of O2 is high; floor critical for audience=minors"
    )
    kept = run(
        {"floor": [{"level": "low"}], "ceiling": [{"level": "low"}]}, verdict(severity="low")
    )
    assert only_note(kept) == (
        "severity low kept: policy level of O2 is high; ceiling low for every verdict"
    )


def test_unsafe_without_a_policy_category_is_raised_by_a_floor() -> None:
    unsafe_na = verdict(category="NA", severity=None)
    assert only_note(run({}, unsafe_na)) == "severity none kept: no policy level for category NA"
    decision = run(
        {"floor": [{"level": "high"}], "ceiling": [{"level": "low", "categories": ["O1"]}]},
        unsafe_na,
    )
    assert decision.severity == "high"
    assert only_note(decision) == "severity none -> high: floor high for every verdict"
    no_category = run({}, verdict(category=None, severity=None))
    assert only_note(no_category) == "severity none kept: no category, so no policy level"


def test_na_is_a_category_a_bound_may_name() -> None:
    params = {"floor": [{"level": "medium", "categories": ["NA"]}]}
    decision = run(params, verdict(category="NA", severity=None))
    assert only_note(decision) == "severity none -> medium: floor medium for category NA"


# -- left alone --------------------------------------------------------------------------------


def test_safe_verdicts_are_left_alone() -> None:
    decision = run(
        MINORS,
        verdict(rating="Safe", category="NA", severity=None),
        metadata={"audience": "minors"},
    )
    assert decision.severity is None
    assert only_note(decision) == "rating Safe: severity left alone"


def test_error_verdicts_are_left_alone() -> None:
    from policy_engine.verdict import VerdictError

    broken = verdict(
        rating=None,
        category=None,
        severity=None,
        error=VerdictError(kind="image", message="cannot decode"),
    )
    decision = run({"floor": [{"level": "critical"}]}, broken)
    assert decision.severity is None
    assert only_note(decision) == "error verdict: severity left alone"


# -- validation through load_policy ------------------------------------------------------------


def load_error(tmp_path: Path, text: str) -> tuple[list[tuple[int, str, str]], str]:
    """Write a policy, load it, and return its problems as (line, path, message)."""
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    problems = info.value.problems
    assert all(p.file == str(path) for p in problems)
    return [(p.line, p.path, p.message) for p in problems], str(info.value)


HEADER = "extends: llavaguard\nid: sev\npostprocess:\n  - name: severity\n    params:\n"


def test_floor_level_not_on_the_scale(tmp_path: Path) -> None:
    problems, text = load_error(
        tmp_path,
        HEADER + "      floor:\n        - {level: extreme, metadata: {audience: minors}}\n",
    )
    message = "'extreme' is not a severity level; levels: low, medium, high, critical"
    assert problems == [(7, "postprocess[0].params.floor[0].level", message)]
    assert f"policy.yaml:7:19: postprocess[0].params.floor[0].level: {message}" in text


def test_ceiling_level_checked_against_a_custom_scale(tmp_path: Path) -> None:
    problems, _ = load_error(
        tmp_path,
        f"extends: {STANDALONE}\nid: shop\npostprocess:\n  - name: severity\n    params:\n"
        "      ceiling:\n        - level: minor\n        - level: high\n",
    )
    assert problems == [
        (
            8,
            "postprocess[0].params.ceiling[1].level",
            "'high' is not a severity level; levels: minor, major",
        )
    ]


def test_unknown_category_in_a_bound(tmp_path: Path) -> None:
    problems, _ = load_error(
        tmp_path,
        HEADER + "      ceiling:\n        - level: low\n          categories: [O7, O10]\n",
    )
    assert problems == [
        (
            8,
            "postprocess[0].params.ceiling[0].categories[1]",
            "unknown category 'O10'; categories: NA, O1, O2, O3, O4, O5, O6, O7, O8, O9",
        )
    ]


def test_bad_metadata_values(tmp_path: Path) -> None:
    problems, _ = load_error(
        tmp_path,
        HEADER
        + "      floor:\n        - level: high\n          metadata:\n"
        + "            audience: []\n            surface: {web: true}\n",
    )
    assert problems == [
        (9, "postprocess[0].params.floor[0].metadata.audience", "must not be an empty list"),
        (
            10,
            "postprocess[0].params.floor[0].metadata.surface",
            "must be a value or a list of values",
        ),
    ]


def test_ceiling_below_a_floor_with_the_same_conditions(tmp_path: Path) -> None:
    problems, _ = load_error(
        tmp_path,
        HEADER
        + "      floor:\n        - {level: critical, metadata: {audience: [minors, teens]}}\n"
        + "      ceiling:\n        - {level: high}\n"
        + "        - {level: high, metadata: {audience: [teens, minors]}}\n",
    )
    assert problems == [
        (
            10,
            "postprocess[0].params.ceiling[1].level",
            "ceiling high is below floor.0 (critical) for the same verdicts: "
            "the floor wins, this ceiling never applies",
        )
    ]


def test_param_types_and_unknown_keys(tmp_path: Path) -> None:
    problems, _ = load_error(
        tmp_path,
        HEADER + "      source: llm\n      floor:\n        - {level: high, audiences: minors}\n",
    )
    assert problems == [
        (6, "postprocess[0].params.source", "must be 'policy' or 'model'"),
        (
            8,
            "postprocess[0].params.floor[0].audiences",
            "unknown key; allowed: categories, level, metadata",
        ),
    ]
    problems, _ = load_error(
        tmp_path, HEADER + "      floor: [{metadata: {a: b}}]\n      scale: [a, b]\n"
    )
    assert problems == [
        (6, "postprocess[0].params.floor[0].level", "required field is missing"),
        (7, "postprocess[0].params.scale", "unknown key; allowed: ceiling, floor, source"),
    ]


def test_a_sound_policy_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        HEADER
        + "      source: model\n"
        + "      floor:\n        - {level: critical, metadata: {audience: minors}}\n"
        + "      ceiling:\n"
        + "        - {level: medium, categories: [O4], metadata: {surface: [a, b]}}\n",
        encoding="utf-8",
    )
    policy = load_policy(path)
    assert policy.postprocess[0].name == "severity"


# -- end to end --------------------------------------------------------------------------------


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG")
    return buffer.getvalue()


def test_engine_runs_severity_after_the_static_backend(tmp_path: Path) -> None:
    path = tmp_path / "minors.yaml"
    path.write_text(
        "extends: llavaguard\nid: minors\npostprocess:\n"
        "  - name: severity\n"
        "    params: {floor: [{level: critical, metadata: {audience: minors}}]}\n"
        "  - name: escalate\n"
        "    params: {action: block}\n",
        encoding="utf-8",
    )
    engine = Engine(path, "static", backend_options={"rating": "Unsafe", "category": "O4"})
    minors = engine.assess(png(), {"audience": "minors"})
    assert minors.severity == "critical"
    assert [(t.step, t.message) for t in minors.trace] == [
        ("0:severity", "severity medium -> critical: floor critical for audience=minors"),
        ("1:escalate", "matched (rating Unsafe, category O4) -> block"),
    ]
    adults = engine.assess(png(), {"audience": "adults"})
    assert adults.severity == "medium"
    safe = Engine(path, "static").assess(png(), {"audience": "minors"})
    assert safe.severity is None
    assert safe.trace[0].message == "rating Safe: severity left alone"


def test_engine_keeps_the_models_severity_from_a_generic_answer(tmp_path: Path) -> None:
    path = tmp_path / "generic.yaml"
    path.write_text(
        "extends: llavaguard\nid: generic\nprompt_format: generic\n"
        "output: {extra_fields: [severity]}\n"
        "postprocess:\n  - name: severity\n    params: {source: model, ceiling: [{level: high}]}\n",
        encoding="utf-8",
    )
    raw = json.dumps(
        {"rating": "Unsafe", "category": "O4: Nudity Content", "severity": "low", "rationale": "x"}
    )
    low = Engine(path, "static", backend_options={"raw": raw}).assess(png())
    assert low.severity == "low"
    assert low.trace[0].message == "severity low kept: the model's severity"
    raw = raw.replace('"low"', '"critical"')
    capped = Engine(path, "static", backend_options={"raw": raw}).assess(png())
    assert capped.severity == "high"
    assert capped.trace[0].message == "severity critical -> high: ceiling high for every verdict"
