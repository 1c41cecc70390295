"""The compiler: golden LlavaGuard prompts byte for byte, exceptions, schema, determinism."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from policy_engine import (
    PluginHost,
    PromptFormat,
    Register,
    compile_policy,
    get_host,
    hookimpl,
    load_policy,
)
from policy_engine.compiler import CompiledPolicy, policy_hash
from policy_engine.formats.llavaguard import LlavaGuardV12
from policy_engine.policy import CategoryException, ExceptionStatus, OutputOptions, Policy


def compiled_for(policy: Policy) -> CompiledPolicy:
    return get_host().compile(policy)


CLI = str(Path(sys.executable).parent / "policy-engine")
CATEGORY_IDS = [f"O{i}" for i in range(1, 10)]


def exception_sections(golden: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """(category id, DEFAULT|NON-VIOLATING|SENSITIVE) -> (label, text after the header line)."""
    text = (golden / "policy_exception_texts_v2.txt").read_text(encoding="utf-8")
    parts = re.split(r"^===== (.+?) :: ([A-Z-]+) =====\n", text, flags=re.M)
    sections = {}
    for label, kind, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        sections[(label.split(":")[0], kind)] = (label, body)
    return sections


def test_v12_prompt_is_byte_identical(golden: Path) -> None:
    compiled = compiled_for(load_policy("llavaguard"))
    assert compiled.prompt.encode() == (golden / "prompt_v1.2.txt").read_bytes()


def test_v10_prompt_is_byte_identical(golden: Path) -> None:
    compiled = compiled_for(load_policy("llavaguard-v1.0"))
    assert compiled.prompt.encode() == (golden / "prompt_v1.0.txt").read_bytes()


@pytest.mark.parametrize(
    ("policy", "golden_file"),
    [("llavaguard", "prompt_v1.2.txt"), ("llavaguard-v1.0", "prompt_v1.0.txt")],
)
def test_cli_compile_prompt_prints_golden_bytes(
    policy: str, golden_file: str, golden: Path
) -> None:
    result = subprocess.run(
        [CLI, "compile", policy, "--part", "prompt"], capture_output=True, check=True
    )
    assert result.stdout == (golden / golden_file).read_bytes()


def test_default_blocks_match_reference(golden: Path) -> None:
    sections = exception_sections(golden)
    prompt = compiled_for(load_policy("llavaguard")).prompt
    for cid in CATEGORY_IDS:
        label, body = sections[(cid, "DEFAULT")]
        assert f"{label}: \n{body}" in prompt


@pytest.mark.parametrize("cid", CATEGORY_IDS)
@pytest.mark.parametrize("status", list(ExceptionStatus))
def test_exception_block_renders_like_reference(
    cid: str, status: ExceptionStatus, golden: Path
) -> None:
    sections = exception_sections(golden)
    base = load_policy("llavaguard")
    policy = base.model_copy(
        update={"exceptions": {cid: CategoryException(status=status, reason="test")}}
    )
    prompt = compiled_for(policy).prompt
    label, default_body = sections[(cid, "DEFAULT")]
    _, exception_body = sections[(cid, status.value.upper())]
    expected = (
        (golden / "prompt_v1.2.txt")
        .read_text(encoding="utf-8")
        .replace(f"{label}: \n{default_body}", f"{label}: \n{exception_body}")
    )
    assert prompt == expected
    assert prompt != compiled_for(base).prompt


def test_schema_lists_exactly_the_policy_categories() -> None:
    compiled = compiled_for(load_policy("children-platform"))
    schema = compiled.schema
    safe, unsafe = schema["anyOf"]
    for branch in (safe, unsafe):
        assert list(branch["properties"]) == ["rating", "category", "rationale"]
        assert branch["required"] == ["rating", "category", "rationale"]
        assert branch["additionalProperties"] is False
        assert branch["properties"]["rationale"]["maxLength"] == 2000
    assert safe["properties"]["rating"]["enum"] == ["Safe"]
    assert unsafe["properties"]["rating"]["enum"] == ["Unsafe"]
    labels = safe["properties"]["category"]["enum"]
    assert labels[0] == "O1: Hate, Humiliation, Harassment"
    assert labels[-1] == "NA: None applying"
    assert len(labels) == 10
    assert unsafe["properties"]["category"]["enum"] == labels[:-1]
    assert list(compiled.fields) == ["rating", "category", "rationale"]
    jsonschema.Draft202012Validator.check_schema(schema)


def test_schema_accepts_trained_answer_and_rejects_others() -> None:
    compiled = compiled_for(load_policy("llavaguard"))
    validator = jsonschema.Draft202012Validator(compiled.schema)
    good = {"rating": "Unsafe", "category": "O2: Violence, Harm, or Cruelty", "rationale": "x"}
    assert validator.is_valid(good)
    assert not validator.is_valid({**good, "category": "O10: Made up"})
    assert not validator.is_valid({**good, "rating": "safe"})
    assert not validator.is_valid({**good, "extra": 1})
    assert not validator.is_valid({k: v for k, v in good.items() if k != "rationale"})


def test_schema_admits_only_consistent_verdicts() -> None:
    """An Unsafe rating names a violated category; a Safe one may name any, or none."""
    compiled = compiled_for(load_policy("llavaguard"))
    for mode in ("full", "verdict"):
        validator = jsonschema.Draft202012Validator(compiled.schema_for(mode))
        answer = {"rationale": "x"} if mode == "full" else {}
        assert not validator.is_valid(
            {**answer, "rating": "Unsafe", "category": "NA: None applying"}
        )
        assert validator.is_valid({**answer, "rating": "Unsafe", "category": "O4: Nudity Content"})
        assert validator.is_valid({**answer, "rating": "Safe", "category": "O4: Nudity Content"})
        assert validator.is_valid({**answer, "rating": "Safe", "category": "NA: None applying"})
    problem = compiled.problem({"rating": "Unsafe", "category": "NA: None applying"}, "verdict")
    assert problem is not None and "Unsafe rating must name one of the policy's categories" in (
        problem
    )


def test_layout_reproduces_training_json() -> None:
    compiled = compiled_for(load_policy("llavaguard"))
    answer = {"rationale": "r", "category": "NA: None applying", "rating": "Safe"}
    expected = json.dumps(
        {"rating": "Safe", "category": "NA: None applying", "rationale": "r"}, indent=4
    )
    assert compiled.layout.dumps(answer) == expected
    assert compiled.layout.prefix() == '{\n    "rating": "'


def test_verdict_mode_drops_rationale() -> None:
    compiled = compiled_for(load_policy("llavaguard"))
    schema = compiled.schema_for("verdict")
    assert all(list(b["properties"]) == ["rating", "category"] for b in schema["anyOf"])
    schema["anyOf"].clear()
    assert "rationale" in compiled.schema["anyOf"][0]["properties"]  # a copy was changed
    assert compiled.layout_for("verdict").keys == ("rating", "category")


def test_rationale_off_keeps_trained_prompt_but_drops_field(golden: Path) -> None:
    base = load_policy("llavaguard")
    policy = base.model_copy(update={"output": OutputOptions(rationale=False)})
    compiled = compiled_for(policy)
    assert compiled.prompt.encode() == (golden / "prompt_v1.2.txt").read_bytes()
    assert list(compiled.fields) == ["rating", "category"]
    assert all("rationale" not in b["properties"] for b in compiled.schema["anyOf"])


def test_compile_is_pure_deterministic_and_hash_tracks_content() -> None:
    """Idempotent: the same policy and format give equal artefacts and hash, call after call
    and process after process; any change of the policy changes the hash."""
    policy = load_policy("llavaguard")
    first = compile_policy(policy, LlavaGuardV12())
    second = compile_policy(load_policy("llavaguard"), LlavaGuardV12())
    assert first is not second
    assert (first.prompt, first.schema, first.hash) == (second.prompt, second.schema, second.hash)
    script = (
        "from policy_engine import get_host, load_policy\n"
        "print(get_host().compile(load_policy('llavaguard')).hash)"
    )
    other_process = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert other_process.stdout.strip() == first.hash
    changed = policy.model_copy(
        update={
            "categories": [
                policy.categories[0].model_copy(update={"can": ["Something else."]}),
                *policy.categories[1:],
            ]
        }
    )
    assert compile_policy(changed, LlavaGuardV12()).hash != first.hash
    assert policy_hash(changed) != policy_hash(policy)


class _Reworded(LlavaGuardV12):
    """The same format name, other prompt bytes: an upgraded format plugin."""

    def render(self, policy: Policy) -> str:
        return super().render(policy).replace("Provide a safety assessment", "Assess")


class _RewordedPlugin:
    @hookimpl
    def register_prompt_formats(self, register: Register[type[PromptFormat]]) -> None:
        register(_Reworded)


def test_hash_covers_what_the_format_made_of_the_policy() -> None:
    policy = load_policy("llavaguard")
    plain = compile_policy(policy, LlavaGuardV12())
    reworded = compile_policy(policy, _Reworded())
    assert reworded.prompt != plain.prompt
    assert reworded.hash != plain.hash  # same policy text, same format name


def test_hosts_with_one_format_name_do_not_share_compiled_policies() -> None:
    """Two hosts register different formats under one name: each compiles with its own."""
    own = PluginHost(load_entry_points=False)
    own.register(_RewordedPlugin(), name="reworded")
    policy = load_policy("llavaguard")
    assert own.compile(policy).prompt.startswith("Assess")
    assert get_host().compile(policy).prompt.startswith("Provide a safety assessment")
    assert own.compile(policy).hash != get_host().compile(policy).hash


def test_host_compile_caches_by_content() -> None:
    policy = load_policy("health-platform")
    assert compiled_for(policy) is compiled_for(load_policy("health-platform"))


def test_generic_format_asks_for_extra_fields() -> None:
    base = load_policy("llavaguard")
    policy = base.model_copy(
        update={
            "prompt_format": "generic",
            "output": OutputOptions(extra_fields=["severity", "categories"]),
        }
    )
    compiled = compiled_for(policy)
    assert list(compiled.fields) == ["rating", "category", "severity", "categories", "rationale"]
    assert compiled.fields["severity"]["enum"] == list(policy.severity_levels)
    assert '"severity"' in compiled.prompt
    assert "O7: Self-Harm (severity: critical)" in compiled.prompt


def test_generic_format_states_exception_reason() -> None:
    policy = load_policy("health-platform").model_copy(update={"prompt_format": "generic"})
    prompt = compiled_for(policy).prompt
    assert "[exception: Clinical and educational images" in prompt
    assert "Category O4 is declared as non-violating" in prompt


# -- the plain check before jsonschema --------------------------------------------------------


def _mutations(answer: dict[str, Any], compiled: CompiledPolicy, rng: random.Random) -> list[Any]:
    """Answers near a valid one: each a small change a model or server might make."""
    out: list[Any] = [[answer], json.dumps(answer), None]
    for key in answer:
        for value in (None, 1, True, "", "x" * 5000, ["a"], {"k": "v"}, 1.5):
            out.append({**answer, key: value})
        out.append({k: v for k, v in answer.items() if k != key})
    out.append({**answer, "extra": "field"})
    out.append({**answer, "rating": "unsafe"})
    out.append({**answer, "rating": "Unsafe", "category": compiled.none_label})
    out.append({**answer, "category": compiled.none_label + " "})
    if "categories" in answer:
        labels = compiled.unsafe_labels
        out.append({**answer, "categories": [labels[0], labels[0]]})
        out.append({**answer, "categories": [labels[0], compiled.none_label]})
        out.append({**answer, "categories": [rng.choice(labels), 3]})
    return out


def _generic_with_extras() -> Policy:
    base = load_policy("llavaguard")
    output = base.output.model_copy(update={"extra_fields": ["severity", "categories"]})
    return base.model_copy(update={"prompt_format": "generic", "output": output})


@pytest.mark.parametrize(
    "policy_name", ["llavaguard", "children-platform", "llavaguard-v1.0", "generic+extras"]
)
@pytest.mark.parametrize("mode", ["full", "verdict", "score"])
def test_the_plain_check_accepts_only_what_the_schema_accepts(policy_name: str, mode: str) -> None:
    """`problem` skips jsonschema for answers it can see are valid: it must never pass one the
    schema refuses, and must pass the schema's ordinary instances (or it saves nothing)."""
    from schema_instances import instance_for

    policy = _generic_with_extras() if policy_name == "generic+extras" else None
    compiled = get_host().compile(policy or load_policy(policy_name))
    validator = jsonschema.Draft202012Validator(compiled.schema_for(mode))  # type: ignore[arg-type]
    rng = random.Random(7)
    plain_hits = checked = 0
    for _ in range(60):
        answer = instance_for(compiled.schema_for(mode), rng)  # type: ignore[arg-type]
        assert compiled._plainly_valid(answer, mode)  # type: ignore[arg-type]
        plain_hits += 1
        for candidate in _mutations(answer, compiled, rng):
            checked += 1
            valid = validator.is_valid(candidate)
            if compiled._plainly_valid(candidate, mode):  # type: ignore[arg-type]
                assert valid, candidate
            assert (compiled.problem(candidate, mode) is None) == valid, candidate  # type: ignore[arg-type]
    assert plain_hits == 60 and checked > 1000
