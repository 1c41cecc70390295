"""The `rules` post-processor: conditions, actions, ordering, trace, validation, failure policy."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from policy_engine import Backend, Batch, Capabilities, Engine, Generation, StepContext
from policy_engine.errors import PolicyError
from policy_engine.host import PluginHost
from policy_engine.loader import load_policy
from policy_engine.verdict import Decision


class Scripted(Backend):
    """Answers with the Generation it was given (scores included), for every request."""

    name = "scripted"
    capabilities = Capabilities(images=True, json_schema=True, scores=True, batching=True)

    def __init__(self, **answer: Any) -> None:
        super().__init__()
        self.answer = answer

    def generate(self, batch: Batch) -> list[Generation]:
        from policy_engine.compiler import AnswerLayout

        out = []
        for _ in batch:
            answer = dict(self.answer)
            scores = answer.pop("category_scores", None)
            p_unsafe = answer.pop("p_unsafe", None)
            if "error" in answer:
                out.append(Generation(error=answer["error"]))
                continue
            labels = {v: k for k, v in batch.compiled.labels.items()}
            answer["category"] = labels[answer.get("category", "NA")]
            answer.setdefault("rationale", "scripted")
            layout: AnswerLayout = batch.compiled.layout_for(batch.mode)
            out.append(
                Generation(text=layout.dumps(answer), p_unsafe=p_unsafe, category_scores=scores)
            )
        return out


def policy_file(tmp_path: Path, params: dict[str, Any], **extra: Any) -> Path:
    document = {
        "extends": "llavaguard",
        "id": "rules-test",
        "postprocess": [{"name": "rules", "id": "moderation", "params": params}],
        **extra,
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def decide(
    tmp_path: Path,
    params: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    mode: str = "full",
    declared: list[str] | None = None,
    **answer: Any,
) -> Decision:
    answer.setdefault("rating", "Unsafe")
    extra = {"actions": declared} if declared else {}
    policy = policy_file(tmp_path, params, **extra)
    engine = Engine(policy, Scripted(**answer), mode=mode)  # type: ignore[arg-type]
    return engine.assess(tiny_png(), metadata=metadata)


def tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    return buffer.getvalue()


def actions(decision: Decision) -> list[tuple[str, dict[str, Any]]]:
    return [(a.name, a.params) for a in decision.actions]


def trace(decision: Decision) -> list[str]:
    return [t.message for t in decision.trace]


# -- conditions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "answer", "matches"),
    [
        ({"rating": "Unsafe"}, {"rating": "Unsafe", "category": "O2"}, True),
        ({"rating": ["Safe"]}, {"rating": "Unsafe", "category": "O2"}, False),
        ({"category": "O7"}, {"category": "O7"}, True),
        ({"category": ["O3", "O4"]}, {"category": "O7"}, False),
        ({"severity": {"at_least": "high"}}, {"category": "O2"}, True),  # O2 is high
        ({"severity": {"at_least": "critical"}}, {"category": "O2"}, False),
        ({"severity": {"at_least": "critical"}}, {"category": "O7"}, True),  # O7 is critical
        ({"severity": {"at_most": "medium"}}, {"category": "O2"}, False),
        ({"severity": {"at_most": "medium"}}, {"category": "O4"}, True),  # O4 is medium
        ({"p_unsafe": {"min": 0.3, "max": 0.7}}, {"category": "O2", "p_unsafe": 0.5}, True),
        ({"p_unsafe": {"min": 0.3, "max": 0.7}}, {"category": "O2", "p_unsafe": 0.71}, False),
        ({"p_unsafe": {"min": 0.3}}, {"category": "O2"}, False),  # no score at all
        ({"score": {"O4": {"min": 0.5}}}, {"category": "O4", "category_scores": {"O4": 0.6}}, True),
        (
            {"score": {"O4": {"min": 0.5}}},
            {"category": "O2", "category_scores": {"O4": 0.2}},
            False,
        ),
        ({"error": True}, {"error": "server down"}, True),
        ({"error": True}, {"category": "O2"}, False),
        ({"rating": "Unsafe"}, {"error": "server down"}, False),
        ({}, {"error": "server down"}, True),
        ({"all": [{"rating": "Unsafe"}, {"category": "O2"}]}, {"category": "O2"}, True),
        ({"all": [{"rating": "Unsafe"}, {"category": "O3"}]}, {"category": "O2"}, False),
        ({"any": [{"category": "O3"}, {"category": "O2"}]}, {"category": "O2"}, True),
        ({"any": [{"category": "O3"}, {"category": "O4"}]}, {"category": "O2"}, False),
        ({"not": {"category": "O2"}}, {"category": "O2"}, False),
        ({"not": {"category": "O3"}}, {"category": "O2"}, True),
    ],
)
def test_each_condition(
    tmp_path: Path, when: dict[str, Any], answer: dict[str, Any], matches: bool
) -> None:
    params = {"rules": [{"id": "r", "when": when, "then": "block"}]}
    decision = decide(tmp_path, params, **answer)
    assert (actions(decision) == [("block", {})]) is matches, trace(decision)


def test_mode_condition(tmp_path: Path) -> None:
    params = {"rules": [{"when": {"mode": "score"}, "then": "blur"}]}
    assert actions(decide(tmp_path, params, mode="score", p_unsafe=0.9)) == [("blur", {})]
    assert actions(decide(tmp_path, params, mode="full", category="O2")) == []


@pytest.mark.parametrize(
    ("metadata", "matches"),
    [
        ({"audience": "minors"}, True),
        ({"audience": "adults"}, False),
        ({"audience": "teens"}, True),
        ({}, False),
        ({"audience": "minors", "source": "api"}, True),
    ],
)
def test_metadata_matching(tmp_path: Path, metadata: dict[str, Any], matches: bool) -> None:
    params = {"rules": [{"when": {"metadata": {"audience": ["minors", "teens"]}}, "then": "block"}]}
    decision = decide(tmp_path, params, metadata=metadata, category="O2")
    assert bool(decision.actions) is matches


# -- actions, ordering, trace ----------------------------------------------------------------


def test_actions_known_and_custom_with_parameters(tmp_path: Path) -> None:
    params = {
        "match": "all",
        "rules": [
            {
                "when": {"category": "O7"},
                "then": {"action": "escalate", "queue": "crisis", "priority": "urgent"},
            },
            {
                "when": {},
                "then": [{"action": "human_review", "queue": "q"}, "allow", "blur", "block"],
            },
            {"when": {}, "then": {"action": "notify.slack", "params": {"channel": "#trust"}}},
        ],
    }
    decision = decide(tmp_path, params, category="O7", declared=["notify.slack"])
    assert actions(decision) == [
        ("escalate", {"queue": "crisis", "priority": "urgent"}),
        ("human_review", {"queue": "q"}),
        ("allow", {}),
        ("blur", {}),
        ("block", {}),
        ("notify.slack", {"channel": "#trust"}),
    ]
    assert decision.actions[0].by == "moderation:0"


def test_first_match_stops_and_all_matches_continue(tmp_path: Path) -> None:
    rules = [
        {"id": "urgent", "when": {"category": "O7"}, "then": "escalate"},
        {"id": "unsafe", "when": {"rating": "Unsafe"}, "then": "block"},
        {"id": "never", "when": {"rating": "Safe"}, "then": "allow"},
    ]
    first = decide(tmp_path, {"rules": rules}, category="O7")
    assert actions(first) == [("escalate", {})]
    assert trace(first) == [
        "rule 'urgent': matched (category O7) -> escalate",
        "first match wins: 2 later rule(s) not evaluated",
    ]
    every = decide(tmp_path, {"match": "all", "rules": rules}, category="O7")
    assert actions(every) == [("escalate", {}), ("block", {})]
    assert trace(every) == [
        "rule 'urgent': matched (category O7) -> escalate",
        "rule 'unsafe': matched (rating Unsafe) -> block",
        "rule 'never': no match (rating Unsafe not Safe)",
    ]
    assert {t.step for t in every.trace} == {"moderation"}


def test_default_applies_when_nothing_matched(tmp_path: Path) -> None:
    params = {"rules": [{"when": {"category": "O7"}, "then": "escalate"}], "default": "allow"}
    decision = decide(tmp_path, params, rating="Safe")
    assert actions(decision) == [("allow", {})]
    assert trace(decision)[-1] == "no rule matched -> default allow"
    matched = decide(tmp_path, params, category="O7")
    assert actions(matched) == [("escalate", {})]


def test_trace_names_the_deciding_facts(tmp_path: Path) -> None:
    params = {
        "rules": [
            {
                "id": "minors",
                "when": {
                    "rating": "Unsafe",
                    "severity": {"at_least": "medium"},
                    "metadata": {"audience": "minors"},
                    "p_unsafe": {"min": 0.5},
                },
                "then": {"action": "block", "reason": "minors"},
            }
        ]
    }
    decision = decide(
        tmp_path, params, metadata={"audience": "minors"}, category="O2", p_unsafe=0.9
    )
    assert trace(decision) == [
        "rule 'minors': matched (rating Unsafe; severity high; p_unsafe 0.900 in [0.5, 1]; "
        "audience='minors') -> block reason=minors"
    ]
    missed = decide(tmp_path, params, metadata={"audience": "adults"}, category="O2", p_unsafe=0.9)
    assert trace(missed) == [
        "rule 'minors': no match (metadata audience='adults' not minors)",
        "no rule matched; no default",
    ]


# -- validation at load time -------------------------------------------------------------------


def problems(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    return str(caught.value)


BAD = [
    (
        """\
        extends: llavaguard
        id: bad
        postprocess:
          - name: rules
            params:
              rules:
                - when: {category: O42}
                  then: block
        """,
        7,
        "unknown category 'O42'",
    ),
    (
        """\
        extends: llavaguard
        id: bad
        postprocess:
          - name: rules
            params:
              rules:
                - when:
                    p_unsafe: {min: 0.8, max: 0.2}
                  then: block
        """,
        8,
        "impossible range: min 0.8 > max 0.2",
    ),
    (
        """\
        extends: llavaguard
        id: bad
        postprocess:
          - name: rules
            params:
              rules:
                - when: {severity: {at_least: severe}}
                  then: block
        """,
        7,
        "'severe' is not a severity level",
    ),
    (
        """\
        extends: llavaguard
        id: bad
        postprocess:
          - name: rules
            params:
              rules:
                - when: {severity: {at_least: critical, at_most: low}}
                  then: block
        """,
        7,
        "impossible range: critical is above low",
    ),
    (
        """\
        extends: llavaguard
        id: bad
        postprocess:
          - name: rules
            params:
              rules:
                - when: {categroy: O7}
                  then: block
        """,
        7,
        "categroy",
    ),
    (
        """\
        extends: llavaguard
        id: bad
        postprocess:
          - name: rules
            params:
              rules:
                - when:
                    any:
                      - {rating: Unsafe}
                      - {score: {O99: {min: 0.1}}}
                  then: block
        """,
        10,
        "unknown category 'O99'",
    ),
    (
        """\
        extends: llavaguard
        id: bad
        postprocess:
          - name: rules
            params:
              rules:
                - id: a
                  then: block
                - id: a
                  then: allow
        """,
        9,
        "duplicate rule id 'a'",
    ),
    (
        """\
        extends: llavaguard
        id: bad
        postprocess:
          - name: rules
            params:
              rules:
                - when: {rating: Unsafe}
                  then: "block the image"
        """,
        8,
        "then",
    ),
]


@pytest.mark.parametrize(("text", "line", "message"), BAD)
def test_rule_errors_point_at_their_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    report = problems(tmp_path, text)
    assert f"bad.yaml:{line}:" in report, report
    assert message in report, report


# -- failure policy ---------------------------------------------------------------------------


class Broken:
    from policy_engine import PostProcessor

    class Raises(PostProcessor):
        name = "raises"

        def __call__(self, decision: Decision, context: StepContext) -> None:
            raise RuntimeError("boom")

    from policy_engine import hookimpl

    @hookimpl
    def register_postprocessors(self, register: Any) -> None:
        register(Broken.Raises)


@pytest.mark.parametrize("mode", ["fail-closed", "fail-open", None])
def test_a_raising_postprocessor_never_loses_the_verdict(tmp_path: Path, mode: str | None) -> None:
    host = PluginHost()
    host.register(Broken(), name="broken-test")
    failure = {"postprocess_failure": {"mode": mode}} if mode else {}
    document = {
        "extends": "llavaguard",
        "id": "failing",
        "postprocess": [
            {"name": "rules", "params": {"rules": [{"when": {"category": "O2"}, "then": "blur"}]}},
            {"name": "raises", "id": "flaky"},
        ],
        **failure,
    }
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    engine = Engine(path, Scripted(rating="Unsafe", category="O2"), host=host)
    decision = engine.assess(tiny_png())
    assert decision.rating == "Unsafe" and decision.category_id == "O2"
    errors = [t for t in decision.trace if t.error]
    assert [(t.step, t.message) for t in errors] == [
        ("flaky", "post-processor failed: RuntimeError: boom")
    ]
    names = [a.name for a in decision.actions]
    if mode == "fail-open":
        assert names == ["blur"]
    else:  # fail-closed is the default
        assert names == ["blur", "human_review"]
        assert decision.actions[1].params == {
            "reason": "post-processor failed: flaky",
            "queue": "postprocess-failures",
        }


def test_the_documented_example_loads_and_acts_as_described(tmp_path: Path) -> None:
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "rules.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(extends: llavaguard.*?)```", doc, re.S)
    assert block is not None
    path = tmp_path / "kids-app.yaml"
    path.write_text(block.group(1), encoding="utf-8")

    def run(metadata: dict[str, Any] | None = None, **answer: Any) -> list[str]:
        engine = Engine(path, Scripted(**answer))
        return [a.name for a in engine.assess(tiny_png(), metadata=metadata).actions]

    assert run(rating="Unsafe", category="O7") == ["escalate", "block"]
    assert run(rating="Safe", p_unsafe=0.4) == ["blur"]
    assert run({"audience": "teens"}, rating="Unsafe", category="O4") == [
        "block",
        "block",
        "human_review",
    ]
    assert run(error="backend down") == ["human_review"]
    assert run(rating="Safe", p_unsafe=0.1) == ["allow"]


def test_an_undeclared_action_is_a_load_time_error_with_a_suggestion(tmp_path: Path) -> None:
    """`then: blok` was accepted as a custom action; custom actions are now declared."""
    params = {"rules": [{"when": {"rating": "Unsafe"}, "then": "blok"}], "default": "alow"}
    with pytest.raises(PolicyError) as caught:
        Engine(policy_file(tmp_path, params), Scripted())
    messages = [p.message for p in caught.value.problems]
    assert any("unknown action 'blok' (did you mean 'block'?)" in m for m in messages)
    assert any("unknown action 'alow' (did you mean 'allow'?)" in m for m in messages)
    assert len(messages) == 2  # both in one run
    declared = policy_file(
        tmp_path, {"rules": [{"when": {}, "then": "quarantine"}]}, actions=["quarantine"]
    )
    assert Engine(declared, Scripted()).policy.actions == ["quarantine"]


def test_rules_can_act_on_actions_earlier_steps_added(tmp_path: Path) -> None:
    """A `flag` from thresholds means what a later rule says: here, human review instead of
    allow."""
    document = {
        "extends": "llavaguard",
        "id": "flags",
        "postprocess": [
            {"name": "thresholds", "params": {"p_unsafe": {"default": 0.3}}},
            {
                "name": "rules",
                "id": "moderation",
                "params": {
                    "rules": [
                        {"when": {"action": "flag"}, "then": "human_review"},
                        {"when": {"rating": "Unsafe"}, "then": "block"},
                    ],
                    "default": "allow",
                },
            },
        ],
    }
    path = tmp_path / "flags.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    unsure = Engine(path, Scripted(rating="Safe", p_unsafe=0.4)).assess(tiny_png())
    assert [a.name for a in unsure.actions] == ["flag", "human_review"]
    assert "action flag (by 0:thresholds)" in unsure.trace[-2].message
    sure = Engine(path, Scripted(rating="Safe", p_unsafe=0.1)).assess(tiny_png())
    assert [a.name for a in sure.actions] == ["allow"]
