"""The `thresholds` post-processor: per-category thresholds on p_unsafe and on category scores,
flag and flip, trace lines, validation errors located in the policy file, runs through the engine
(static backend, and a scoring backend with category scores), and docs/scores.md in step."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from policy_engine.plugins.severity import SeverityBound, SeverityParams
from policy_engine.plugins.thresholds import Thresholds, ThresholdsParams

from policy_engine import (
    Backend,
    Batch,
    Capabilities,
    Decision,
    Generation,
    Policy,
    PolicyError,
    StepContext,
    Verdict,
    get_host,
    load_policy,
)
from policy_engine.engine import Engine
from policy_engine.verdict import VerdictError

LLAVAGUARD = load_policy("llavaguard")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "scores.md"


def verdict(
    rating: str | None = "Unsafe",
    category: str | None = "O4",
    p_unsafe: float | None = 0.7,
    scores: dict[str, float] | None = None,
    **extra: Any,
) -> Verdict:
    known = category is not None and category != "NA"
    return Verdict(
        rating=rating,  # type: ignore[arg-type]
        category_id=category,
        category_name=LLAVAGUARD.category(category).name if known else None,
        p_unsafe=p_unsafe,
        category_scores=scores,
        severity=LLAVAGUARD.category(category).severity if known and rating == "Unsafe" else None,
        policy_id=LLAVAGUARD.id,
        policy_version=LLAVAGUARD.version,
        policy_hash="sha256:test",
        **extra,
    )


def run(params: dict[str, Any], v: Verdict, policy: Policy = LLAVAGUARD) -> Decision:
    """Validate and check the params like the loader does, then post-process one verdict."""
    parsed = ThresholdsParams.model_validate(params)
    assert Thresholds.check(parsed, policy) == []
    decision = Decision(verdict=v)
    context = StepContext("thresholds", "score", get_host().compile(policy), {}, decision)
    Thresholds(parsed, policy)(decision, context)
    return decision


def only_note(decision: Decision) -> str:
    assert [t.step for t in decision.trace] == ["thresholds"]
    assert not decision.trace[0].error
    return decision.trace[0].message


def flags(decision: Decision) -> list[tuple[str, dict[str, Any]]]:
    """(step:basis, params) of each flag; the step's id stamps it, the basis is a param."""
    assert all(a.name == "flag" for a in decision.actions)
    return [
        (f"{a.by}:{a.params['basis']}", {k: v for k, v in a.params.items() if k != "basis"})
        for a in decision.actions
    ]


# -- p_unsafe thresholds, action flag ----------------------------------------------------------


def test_default_threshold_flags_and_keeps_the_rating() -> None:
    decision = run({}, verdict(category="O2", p_unsafe=0.7))
    assert flags(decision) == [
        ("thresholds:p_unsafe", {"category": "O2", "score": 0.7, "threshold": 0.5})
    ]
    assert only_note(decision) == "flag O2: p_unsafe 0.7 >= 0.5 (default, O2 by verdict)"
    assert decision.rating == "Unsafe"


def test_under_the_category_threshold_nothing_is_flagged_and_rating_stays() -> None:
    decision = run({"p_unsafe": {"O4": 0.8}}, verdict(category="O4", p_unsafe=0.7))
    assert decision.actions == []
    assert only_note(decision) == "no flag: p_unsafe 0.7 < 0.8 (O4 threshold)"
    assert (decision.rating, decision.category_id) == ("Unsafe", "O4")


def test_default_applies_to_categories_without_their_own_threshold() -> None:
    params = {"p_unsafe": {"default": 0.9, "O4": 0.2}}
    assert run(params, verdict(category="O4", p_unsafe=0.3)).actions != []
    decision = run(params, verdict(category="O2", p_unsafe=0.8))
    assert decision.actions == []
    assert only_note(decision) == "no flag: p_unsafe 0.8 < 0.9 (default, O2 by verdict)"


def test_a_safe_verdict_is_flagged_with_the_top_category_score() -> None:
    scores = {"O4": 0.2, "O7": 0.7, "NA": 0.9, "O1": 0.1}  # NA never counts as a category
    v = verdict(rating="Safe", category="NA", p_unsafe=0.35, scores=scores)
    decision = run({"p_unsafe": {"O7": 0.3}}, v)
    assert flags(decision) == [
        ("thresholds:p_unsafe", {"category": "O7", "score": 0.35, "threshold": 0.3})
    ]
    assert only_note(decision) == "flag O7: p_unsafe 0.35 >= 0.3 (O7 threshold)"
    assert decision.rating == "Safe"


def test_ties_in_category_scores_go_to_the_first_category_in_policy_order() -> None:
    v = verdict(rating="Safe", category="NA", p_unsafe=0.6, scores={"O7": 0.5, "O2": 0.5})
    assert (
        only_note(run({}, v)) == "flag O2: p_unsafe 0.6 >= 0.5 (default, O2 by top category score)"
    )


def test_without_a_category_the_default_threshold_applies() -> None:
    decision = run({}, verdict(rating="Safe", category="NA", p_unsafe=0.55))
    assert flags(decision) == [
        ("thresholds:p_unsafe", {"category": None, "score": 0.55, "threshold": 0.5})
    ]
    assert only_note(decision) == "flag no category: p_unsafe 0.55 >= 0.5 (default, no category)"
    assert only_note(run({}, verdict(rating="Safe", category=None, p_unsafe=0.1))) == (
        "no flag: p_unsafe 0.1 < 0.5 (default, no category)"
    )


def test_a_score_equal_to_the_threshold_reaches_it() -> None:
    assert run({"p_unsafe": {"O4": 0.8}}, verdict(p_unsafe=0.8)).actions != []


# -- category score thresholds -----------------------------------------------------------------


def test_category_score_threshold_on_the_joint_probability() -> None:
    scores = {"O4": 0.4, "O7": 0.6, "NA": 0.0}
    v = verdict(rating="Safe", category="NA", p_unsafe=0.3, scores=scores)
    decision = run({"category_scores": {"O7": 0.15, "O4": 0.15}}, v)
    assert flags(decision) == [
        ("thresholds:category_scores", {"category": "O7", "score": 0.18, "threshold": 0.15})
    ]
    assert only_note(decision) == (
        "flag O7: p_unsafe 0.3 < 0.5 (default, O7 by top category score); "
        "O7: 0.3 x 0.6 = 0.18 >= 0.15; O4: 0.3 x 0.4 = 0.12 < 0.15"
    )
    assert decision.rating == "Safe"


def test_every_reached_threshold_is_a_flag_highest_score_first() -> None:
    scores = {"O4": 0.3, "O7": 0.7}
    v = verdict(category="O4", p_unsafe=0.9, scores=scores)
    decision = run({"category_scores": {"O4": 0.2, "O7": 0.2}}, v)
    assert [(a.by, a.params["basis"], a.params["category"]) for a in decision.actions] == [
        ("thresholds", "p_unsafe", "O4"),
        ("thresholds", "category_scores", "O7"),
        ("thresholds", "category_scores", "O4"),
    ]
    assert only_note(decision).startswith("flag O4, O7: ")


def test_float_rounding_does_not_miss_a_threshold() -> None:
    v = verdict(rating="Safe", category="NA", p_unsafe=0.7, scores={"O7": 0.1})
    decision = run({"p_unsafe": {"O7": 0.9}, "category_scores": {"O7": 0.07}}, v)
    assert 0.7 * 0.1 < 0.07  # the product as a float is just under
    assert [a.params["category"] for a in decision.actions] == ["O7"]


def test_category_thresholds_without_category_scores() -> None:
    decision = run({"category_scores": {"O7": 0.1}}, verdict(p_unsafe=0.2))
    assert decision.actions == []
    assert only_note(decision) == (
        "no flag: p_unsafe 0.2 < 0.5 (default, O4 by verdict); no category scores"
    )
    partial = run({"category_scores": {"O7": 0.1}}, verdict(p_unsafe=0.2, scores={"O4": 1.0}))
    assert only_note(partial).endswith("; O7: no category score")


# -- action flip -------------------------------------------------------------------------------


def test_flip_safe_to_unsafe_with_the_flagged_category() -> None:
    scores = {"O4": 0.4, "O7": 0.6}
    v = verdict(rating="Safe", category="NA", p_unsafe=0.3, scores=scores)
    decision = run({"category_scores": {"O7": 0.15}, "action": "flip"}, v)
    got = decision
    assert (got.rating, got.category_id, got.category_name, got.severity) == (
        "Unsafe",
        "O7",
        "Self-Harm",
        "critical",
    )
    assert decision.actions == []
    assert only_note(decision) == (
        "rating Safe (NA) -> Unsafe (O7): p_unsafe 0.3 < 0.5 (default, O7 by top category score); "
        "O7: 0.3 x 0.6 = 0.18 >= 0.15"
    )


def test_flip_unsafe_to_safe_under_its_category_threshold() -> None:
    decision = run({"p_unsafe": {"O4": 0.8}, "action": "flip"}, verdict(p_unsafe=0.7))
    got = decision
    assert (got.rating, got.category_id, got.category_name, got.severity) == (
        "Safe",
        "NA",
        "None applying",
        None,
    )
    assert (
        only_note(decision) == "rating Unsafe (O4) -> Safe (NA): p_unsafe 0.7 < 0.8 (O4 threshold)"
    )
    # what the model said stays; the change is an override with the step and the reason
    assert (decision.verdict.rating, decision.verdict.category_id) == ("Unsafe", "O4")
    [override] = decision.overrides
    assert override.step == "thresholds"
    assert override.reason == "P(Unsafe) under the threshold: p_unsafe 0.7 < 0.8 (O4 threshold)"
    assert override.changes == {
        "rating": "Safe",
        "category_id": "NA",
        "category_name": "None applying",
        "severity": None,
    }


def test_flip_keeps_a_verdict_on_the_right_side() -> None:
    params = {"p_unsafe": {"O4": 0.6}, "action": "flip"}
    unsafe = run(params, verdict(p_unsafe=0.7))
    assert (unsafe.rating, unsafe.category_id) == ("Unsafe", "O4")
    assert only_note(unsafe) == "rating Unsafe (O4) kept: p_unsafe 0.7 >= 0.6 (O4 threshold)"
    safe = run(params, verdict(rating="Safe", category="NA", p_unsafe=0.4))
    assert safe.rating == "Safe"
    assert only_note(safe) == "rating Safe (NA) kept: p_unsafe 0.4 < 0.5 (default, no category)"


def test_flip_safe_to_unsafe_by_the_top_category_score() -> None:
    v = verdict(rating="Safe", category="NA", p_unsafe=0.4, scores={"O2": 0.9, "O4": 0.1})
    decision = run({"p_unsafe": {"O2": 0.3}, "action": "flip"}, v)
    assert (decision.rating, decision.category_id) == ("Unsafe", "O2")
    assert decision.severity == "high"


def test_flip_without_any_category_leaves_the_category_unknown() -> None:
    decision = run({"action": "flip"}, verdict(rating="Safe", category="NA", p_unsafe=0.6))
    got = decision
    assert (got.rating, got.category_id, got.category_name, got.severity) == (
        "Unsafe",
        None,
        None,
        None,
    )
    assert only_note(decision) == (
        "rating Safe (NA) -> Unsafe (None): p_unsafe 0.6 >= 0.5 (default, no category)"
    )
    # An Unsafe verdict without a category keeps what it has.
    kept = run({"action": "flip"}, verdict(category="NA", p_unsafe=0.6))
    assert (kept.verdict.rating, kept.verdict.category_id) == ("Unsafe", "NA")


def test_flip_recategorises_when_only_another_category_holds() -> None:
    v = verdict(category="O4", p_unsafe=0.7, scores={"O4": 0.5, "O7": 0.5})
    decision = run({"p_unsafe": {"O4": 0.8}, "category_scores": {"O7": 0.3}, "action": "flip"}, v)
    assert (decision.rating, decision.category_id) == ("Unsafe", "O7")
    assert only_note(decision).startswith("rating Unsafe (O4) -> Unsafe (O7): ")


# -- left alone --------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["flag", "flip"])
def test_verdicts_without_a_score_are_left_alone(action: str) -> None:
    decision = run({"action": action}, verdict(p_unsafe=None))
    assert decision.actions == []
    assert decision.rating == "Unsafe"
    assert only_note(decision) == "no score: left alone"


def test_error_verdicts_are_left_alone() -> None:
    broken = verdict(
        rating=None,
        category=None,
        p_unsafe=None,
        error=VerdictError(kind="backend", message="timeout"),
    )
    decision = run({"action": "flip"}, broken)
    assert decision.rating is None
    assert only_note(decision) == "error verdict: left alone"


# -- validation through load_policy ------------------------------------------------------------


def load_problems(tmp_path: Path, text: str) -> tuple[list[tuple[int, str, str]], str]:
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return [(p.line, p.path, p.message) for p in info.value.problems], str(info.value)


HEADER = "extends: llavaguard\nid: th\npostprocess:\n  - name: escalate\n  - name: thresholds\n"
CATEGORIES = "O1, O2, O3, O4, O5, O6, O7, O8, O9"


def test_unknown_category_is_located_at_its_line(tmp_path: Path) -> None:
    problems, text = load_problems(
        tmp_path, HEADER + "    params:\n      p_unsafe:\n        default: 0.4\n        O99: 0.5\n"
    )
    message = f"unknown category 'O99'; categories: {CATEGORIES}, default"
    assert problems == [(9, "postprocess[1].params.p_unsafe.O99", message)]
    assert f"policy.yaml:9:14: postprocess[1].params.p_unsafe.O99: {message}" in text


def test_unknown_and_none_categories_in_both_maps(tmp_path: Path) -> None:
    problems, _ = load_problems(
        tmp_path,
        HEADER
        + "    params:\n      p_unsafe: {NA: 0.2}\n      category_scores:\n"
        + "        O7: 0.1\n        default: 0.3\n        NA: 0.1\n",
    )
    assert problems == [
        (
            7,
            "postprocess[1].params.p_unsafe.NA",
            "'NA' is the none-applying category and never thresholded; use default",
        ),
        (
            10,
            "postprocess[1].params.category_scores.default",
            f"unknown category 'default'; categories: {CATEGORIES}",
        ),
        (
            11,
            "postprocess[1].params.category_scores.NA",
            "'NA' is the none-applying category and never thresholded; it is not a violation",
        ),
    ]


def test_thresholds_must_be_numbers_in_the_unit_interval(tmp_path: Path) -> None:
    problems, _ = load_problems(
        tmp_path,
        HEADER
        + "    params:\n      p_unsafe: {default: 1.5, O4: -0.1, O7: high, O8: true}\n"
        + "      category_scores: {O7: '0.2'}\n      action: block\n",
    )
    assert problems == [
        (7, "postprocess[1].params.p_unsafe.default", "must be less than or equal to 1"),
        (7, "postprocess[1].params.p_unsafe.O4", "must be greater than or equal to 0"),
        (7, "postprocess[1].params.p_unsafe.O7", "must be a number"),
        (7, "postprocess[1].params.p_unsafe.O8", "must be a number"),
        (8, "postprocess[1].params.category_scores.O7", "must be a number"),
        (9, "postprocess[1].params.action", "must be 'flag' or 'flip'"),
    ]


def test_flip_with_a_zero_threshold_is_impossible_to_use(tmp_path: Path) -> None:
    problems, _ = load_problems(
        tmp_path,
        HEADER
        + "    params:\n      action: flip\n      p_unsafe: {default: 0, O4: 0}\n"
        + "      category_scores: {O7: 0}\n",
    )
    assert problems == [
        (
            8,
            "postprocess[1].params.p_unsafe.default",
            "threshold 0 with action flip rates every scored verdict without a category "
            "threshold Unsafe; use a threshold above 0",
        ),
        (
            8,
            "postprocess[1].params.p_unsafe.O4",
            "threshold 0 with action flip rates every scored O4 verdict Unsafe; "
            "use a threshold above 0",
        ),
        (
            9,
            "postprocess[1].params.category_scores.O7",
            "threshold 0 with action flip rates every verdict with category scores Unsafe; "
            "use a threshold above 0",
        ),
    ]
    # With flag, 0 is allowed: flag everything (an audit of every scored verdict).
    path = tmp_path / "flag.yaml"
    path.write_text(HEADER + "    params: {p_unsafe: {default: 0}}\n", encoding="utf-8")
    assert load_policy(path).postprocess[1].params == {"p_unsafe": {"default": 0}}


def test_default_key_clashing_with_a_category_id(tmp_path: Path) -> None:
    problems, _ = load_problems(
        tmp_path,
        "extends: llavaguard\nid: th\ncategories:\n  - {id: default, name: Default}\n"
        "postprocess:\n  - name: thresholds\n    params: {p_unsafe: {default: 0.4}}\n",
    )
    assert problems == [
        (
            7,
            "postprocess[0].params.p_unsafe.default",
            "'default' is both the default threshold and a category id of this policy",
        )
    ]


def test_unknown_param(tmp_path: Path) -> None:
    problems, _ = load_problems(tmp_path, HEADER + "    params: {threshold: 0.5}\n")
    assert problems == [
        (
            6,
            "postprocess[1].params.threshold",
            "unknown key; allowed: action, category_scores, p_unsafe",
        )
    ]


# -- end to end --------------------------------------------------------------------------------


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buffer, "PNG")
    return buffer.getvalue()


def write(tmp_path: Path, steps: str) -> Path:
    path = tmp_path / "scored.yaml"
    path.write_text(f"extends: llavaguard\nid: scored\npostprocess:\n{steps}", encoding="utf-8")
    return path


def test_engine_with_the_static_backend_flags_and_flips(tmp_path: Path) -> None:
    flag = write(tmp_path, "  - name: thresholds\n    params: {p_unsafe: {O4: 0.6}}\n")
    options = {"rating": "Unsafe", "category": "O4", "p_unsafe": 0.7}
    decision = Engine(flag, "static", backend_options=options).assess(png())
    assert [(a.name, a.by, a.params) for a in decision.actions] == [
        (
            "flag",
            "0:thresholds",
            {"category": "O4", "score": 0.7, "threshold": 0.6, "basis": "p_unsafe"},
        )
    ]
    assert decision.rating == "Unsafe"
    flip = write(
        tmp_path,
        "  - name: thresholds\n    params: {p_unsafe: {O4: 0.8}, action: flip}\n"
        "  - name: escalate\n    params: {action: block}\n",
    )
    decision = Engine(flip, "static", backend_options=options).assess(png())
    assert (decision.rating, decision.category_id) == ("Safe", "NA")
    assert decision.actions == []
    assert [t.message for t in decision.trace] == [
        "rating Unsafe (O4) -> Safe (NA): p_unsafe 0.7 < 0.8 (O4 threshold)",
        "no match (rating Safe not in ['Unsafe'])",
    ]


def test_engine_in_score_mode_with_the_static_backend(tmp_path: Path) -> None:
    path = write(tmp_path, "  - name: thresholds\n    params: {category_scores: {O7: 0.1}}\n")
    engine = Engine(path, "static", mode="score", backend_options={"p_unsafe": 0.7})
    decision = engine.assess(png())
    assert decision.rating == "Unsafe"  # the engine's own 0.5 cut
    assert decision.trace[0].message == (
        "flag no category: p_unsafe 0.7 >= 0.5 (default, no category); no category scores"
    )


class ScoringBackend(Backend):
    """Scores like the transformers backend in score mode: p_unsafe and category scores."""

    name = "test-scoring"
    capabilities = Capabilities(scores=True)
    answers: list[tuple[float, dict[str, float]]] = []

    def generate(self, batch: Batch) -> list[Generation]:
        p_unsafe, scores = self.answers.pop(0)
        return [Generation(p_unsafe=p_unsafe, category_scores=scores, model="scoring")]


def test_engine_score_mode_with_category_scores_then_severity(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "  - name: thresholds\n"
        "    params: {p_unsafe: {default: 0.5, O4: 0.9}, category_scores: {O7: 0.1}, "
        "action: flip}\n"
        "  - name: severity\n"
        "    params: {floor: [{level: critical, metadata: {audience: minors}}]}\n",
    )
    backend = ScoringBackend()
    engine = Engine(path, backend, mode="score")
    # Self-harm ranks second, but P(Unsafe and O7) = 0.4 x 0.3 = 0.12 reaches 0.1.
    backend.answers = [(0.4, {"O4": 0.6, "O7": 0.3, "NA": 0.1})]
    decision = engine.assess(png(), {"audience": "minors"})
    got = decision
    assert (got.rating, got.category_id, got.severity) == ("Unsafe", "O7", "critical")
    assert [t.message for t in decision.trace] == [
        "rating Safe (NA) -> Unsafe (O7): p_unsafe 0.4 < 0.9 (O4 threshold); "
        "O7: 0.4 x 0.3 = 0.12 >= 0.1",
        "severity critical kept: policy level of O7",
    ]
    # Nudity at 0.7 is over the engine's 0.5 but under its own 0.9: Safe.
    backend.answers = [(0.7, {"O4": 0.9, "O7": 0.05, "NA": 0.05})]
    decision = engine.assess(png())
    assert (decision.rating, decision.category_id) == ("Safe", "NA")
    assert decision.trace[0].message.startswith("rating Unsafe (O4) -> Safe (NA): ")
    assert decision.trace[1].message == "rating Safe: severity left alone"


# -- docs --------------------------------------------------------------------------------------


def documented(section: str) -> set[str]:
    text = DOCS.read_text(encoding="utf-8")
    start = text.index(f"<!-- params: {section} -->")
    end = text.index("<!-- /params -->", start)
    return set(re.findall(r"^\| `([a-z_]+)` \|", text[start:end], re.M))


def test_docs_list_every_param_and_no_other() -> None:
    assert documented("thresholds") == set(ThresholdsParams.model_fields)
    assert documented("severity") == set(SeverityParams.model_fields)
    assert documented("severity bound") == set(SeverityBound.model_fields)
