"""Policies carry test cases (`tests:`) and `policy-engine test POLICY` runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from support import run_cli

from policy_engine import get_host, load_policy
from policy_engine.errors import PolicyError

UNSAFE = ["-b", "static", "-o", "rating=Unsafe", "-o", "category=O2"]


def write_policy(folder: Path, tests: str, extends: str = "children-platform") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (200, 0, 0)).save(folder / "red.png")
    path = folder / "p.yaml"
    path.write_text(f"extends: {extends}\nid: p\ntests:\n{tests}", encoding="utf-8")
    return path


PASSING = """\
  - name: unsafe content is blocked
    image: red.png
    rating: Unsafe
    category: O2
    actions: [block]
  - image: red.png
    metadata: {audience: minors}
    rating: Unsafe
"""


def test_passing_cases_exit_zero_and_say_so(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, PASSING)
    result = run_cli("test", str(policy), *UNSAFE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "PASS  1. unsafe content is blocked",
        f"PASS  2. {tmp_path / 'red.png'}",
    ]
    assert result.stderr == "2 of 2 cases passed\n"


def test_a_failing_case_says_what_differs_and_exits_one(tmp_path: Path) -> None:
    policy = write_policy(
        tmp_path,
        PASSING + "  - {name: wrong, image: red.png, rating: Safe, actions: []}\n"
        "  - {name: missing image, image: nowhere.png, rating: Safe}\n",
    )
    result = run_cli("test", str(policy), *UNSAFE)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[2:4] == ["FAIL  3. wrong", "      rating Unsafe, expected Safe"]
    assert lines[4] == "      actions ['block'], expected none"
    assert lines[5] == "FAIL  4. missing image"
    assert lines[6].startswith("      image error: cannot load image") and "nowhere.png" in lines[6]
    assert result.stderr == "error: 2 of 4 cases passed\n"
    as_json = run_cli("test", str(policy), *UNSAFE, "--json")
    cases = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [c["passed"] for c in cases] == [True, True, False, False]
    assert cases[2]["failures"] == [
        "rating Unsafe, expected Safe",
        "actions ['block'], expected none",
    ]
    assert cases[0]["actions"] == ["block"] and cases[0]["category"] == "O2"


def test_inherited_cases_find_their_images_beside_the_file_that_declares_them(
    tmp_path: Path,
) -> None:
    parent = write_policy(tmp_path / "base", PASSING)
    child_dir = tmp_path / "elsewhere"
    child_dir.mkdir()
    child = child_dir / "child.yaml"
    child.write_text(f"extends: {parent}\nid: child\n", encoding="utf-8")
    loaded = load_policy(child)
    assert [Path(t.image) for t in loaded.tests] == [tmp_path / "base" / "red.png"] * 2
    result = run_cli("test", str(child), *UNSAFE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cases_do_not_change_the_policy_hash(tmp_path: Path) -> None:
    with_tests = load_policy(write_policy(tmp_path, PASSING))
    without = with_tests.model_copy(update={"tests": []})
    assert get_host().compile(with_tests).hash == get_host().compile(without).hash


def test_bad_cases_are_located_errors(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "  - {image: red.png}\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(policy)
    problem = caught.value.problems[0]
    assert (problem.line, problem.path) == (4, "tests[0]")
    assert "a test needs an expectation" in problem.message
    result = run_cli("check", str(policy))
    assert result.returncode == 2 and "p.yaml:4:" in result.stderr


def test_cases_naming_a_category_the_policy_lacks_fail_when_they_run(tmp_path: Path) -> None:
    """Not when the policy loads: a policy that extends another inherits its cases and may
    remove a category one of them names; the policy must still load, and the case fail."""
    child = tmp_path / "no-o2.yaml"
    child.write_text(
        "extends: children-platform\nid: no-o2\ncategories:\n  - {id: O2, remove: true}\n",
        encoding="utf-8",
    )
    policy = load_policy(child)
    assert policy.tests  # inherited from the shipped policy
    result = run_cli("test", str(child), "--json")
    assert result.returncode == 1
    cases = [json.loads(line) for line in result.stdout.splitlines()]
    assert [c["passed"] for c in cases] == [True, False, True, True, True]
    assert cases[1]["failures"] == [
        "given category 'O2' is not in the policy; categories: O1, O3, O4, O5, O6, O7, O8, O9"
    ]
    expects = write_policy(tmp_path, "  - {image: red.png, category: O99}\n")
    assert load_policy(expects).tests[0].category == "O99"


def test_a_policy_without_cases_is_an_error() -> None:
    result = run_cli("test", "llavaguard", *UNSAFE)
    assert result.returncode == 2
    assert result.stderr == "error: llavaguard: the policy has no tests (add a `tests:` list)\n"
