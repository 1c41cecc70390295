"""The compiler: golden LlavaGuard prompts byte for byte, exceptions, schema, determinism."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from policy_engine import compile_policy, load_policy
from policy_engine.compiler import _cache, policy_hash
from policy_engine.policy import CategoryException, ExceptionStatus, OutputOptions

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
    compiled = compile_policy(load_policy("llavaguard"))
    assert compiled.prompt.encode() == (golden / "prompt_v1.2.txt").read_bytes()


def test_v10_prompt_is_byte_identical(golden: Path) -> None:
    compiled = compile_policy(load_policy("llavaguard-v1.0"))
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
    prompt = compile_policy(load_policy("llavaguard")).prompt
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
    prompt = compile_policy(policy).prompt
    label, default_body = sections[(cid, "DEFAULT")]
    _, exception_body = sections[(cid, status.value.upper())]
    expected = (
        (golden / "prompt_v1.2.txt")
        .read_text(encoding="utf-8")
        .replace(f"{label}: \n{default_body}", f"{label}: \n{exception_body}")
    )
    assert prompt == expected
    assert prompt != compile_policy(base).prompt


def test_schema_lists_exactly_the_policy_categories() -> None:
    compiled = compile_policy(load_policy("children-platform"))
    schema = compiled.schema
    assert list(schema["properties"]) == ["rating", "category", "rationale"]
    assert schema["required"] == ["rating", "category", "rationale"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["rating"]["enum"] == ["Safe", "Unsafe"]
    labels = schema["properties"]["category"]["enum"]
    assert labels[0] == "O1: Hate, Humiliation, Harassment"
    assert labels[-1] == "NA: None applying"
    assert len(labels) == 10
    assert schema["properties"]["rationale"]["maxLength"] == 2000
    jsonschema.Draft202012Validator.check_schema(schema)


def test_schema_accepts_trained_answer_and_rejects_others() -> None:
    compiled = compile_policy(load_policy("llavaguard"))
    validator = jsonschema.Draft202012Validator(compiled.schema)
    good = {"rating": "Unsafe", "category": "O2: Violence, Harm, or Cruelty", "rationale": "x"}
    assert validator.is_valid(good)
    assert not validator.is_valid({**good, "category": "O10: Made up"})
    assert not validator.is_valid({**good, "rating": "safe"})
    assert not validator.is_valid({**good, "extra": 1})
    assert not validator.is_valid({k: v for k, v in good.items() if k != "rationale"})


def test_layout_reproduces_training_json() -> None:
    compiled = compile_policy(load_policy("llavaguard"))
    answer = {"rationale": "r", "category": "NA: None applying", "rating": "Safe"}
    expected = json.dumps(
        {"rating": "Safe", "category": "NA: None applying", "rationale": "r"}, indent=4
    )
    assert compiled.layout.dumps(answer) == expected
    assert compiled.layout.prefix() == '{\n    "rating": "'


def test_verdict_mode_drops_rationale() -> None:
    compiled = compile_policy(load_policy("llavaguard"))
    schema = compiled.schema_for("verdict")
    assert list(schema["properties"]) == ["rating", "category"]
    assert "rationale" in compiled.schema["properties"]  # the original is untouched
    assert compiled.layout_for("verdict").keys == ("rating", "category")


def test_rationale_off_keeps_trained_prompt_but_drops_field(golden: Path) -> None:
    base = load_policy("llavaguard")
    policy = base.model_copy(update={"output": OutputOptions(rationale=False)})
    compiled = compile_policy(policy)
    assert compiled.prompt.encode() == (golden / "prompt_v1.2.txt").read_bytes()
    assert "rationale" not in compiled.schema["properties"]


def test_compile_is_deterministic_and_hash_tracks_content() -> None:
    policy = load_policy("llavaguard")
    first = compile_policy(policy)
    _cache.clear()
    second = compile_policy(load_policy("llavaguard"))
    assert first is not second
    assert (first.prompt, first.schema, first.hash) == (second.prompt, second.schema, second.hash)
    changed = policy.model_copy(
        update={
            "categories": [
                policy.categories[0].model_copy(update={"can": ["Something else."]}),
                *policy.categories[1:],
            ]
        }
    )
    assert policy_hash(changed) != first.hash
    assert compile_policy(changed).hash == policy_hash(changed)


def test_compile_cache_returns_same_object() -> None:
    policy = load_policy("health-platform")
    assert compile_policy(policy) is compile_policy(load_policy("health-platform"))


def test_generic_format_asks_for_extra_fields() -> None:
    base = load_policy("llavaguard")
    policy = base.model_copy(
        update={
            "prompt_format": "generic",
            "output": OutputOptions(extra_fields=["severity", "categories"]),
        }
    )
    compiled = compile_policy(policy)
    assert list(compiled.schema["properties"]) == [
        "rating",
        "category",
        "severity",
        "categories",
        "rationale",
    ]
    assert compiled.schema["properties"]["severity"]["enum"] == list(policy.severity_levels)
    assert '"severity"' in compiled.prompt
    assert "O7: Self-Harm (severity: critical)" in compiled.prompt


def test_generic_format_states_exception_reason() -> None:
    policy = load_policy("health-platform").model_copy(update={"prompt_format": "generic"})
    prompt = compile_policy(policy).prompt
    assert "[exception: Clinical and educational images" in prompt
    assert "Category O4 is declared as non-violating" in prompt
