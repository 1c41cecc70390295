"""Bad policy files: every defect is a PolicyError located at FILE:LINE, never a traceback.

Each fixture in tests/data/bad_policies/ holds one defect and states, on its first line, where
the first problem must point and what its message must say:

    # expect: LINE <n> <substring of the message>      (LINE 0: no line applies)
    # expect-file: <name>                              (optional: the problem is in another file)

Files whose first line is not an expectation are helpers (the other half of an extends cycle).
Defects that cannot be written as a text fixture (bad encodings, NUL bytes, size) are generated.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import run_cli

from policy_engine.cli import cli
from policy_engine.errors import PolicyError
from policy_engine.loader import load_policy
from policy_engine.yamlsource import MAX_FILE_BYTES, MAX_NODES

DATA = Path(__file__).resolve().parent / "data"
BAD = DATA / "bad_policies"
CLI = str(Path(sys.executable).parent / "policy-engine")
EXPECT = re.compile(r"^# expect: LINE (\d+) (.+)$")
EXPECT_FILE = re.compile(r"^# expect-file: (\S+)$")


@dataclass(frozen=True)
class Case:
    path: Path  # the file given to load_policy / the CLI
    line: int  # expected line of the first problem; 0: none
    substring: str  # expected in the first problem's message
    file: Path  # the file the first problem names (usually `path`)

    @property
    def where(self) -> str:
        """How the first problem's str() must start."""
        return f"{self.file}:{self.line}:" if self.line else f"{self.file}: "


def _fixture_cases() -> list[Case]:
    cases = []
    for path in sorted(BAD.rglob("*.yaml")):
        lines = path.read_text(encoding="utf-8").splitlines()
        match = EXPECT.match(lines[0]) if lines else None
        if match is None:
            continue  # a helper file
        file = path
        if len(lines) > 1 and (other := EXPECT_FILE.match(lines[1])):
            file = path.parent / other.group(1)
        cases.append(Case(path, int(match.group(1)), match.group(2).strip(), file))
    return cases


FIXTURES = _fixture_cases()
FIXTURE_IDS = [str(case.path.relative_to(BAD)) for case in FIXTURES]


def _latin1(path: Path) -> None:
    path.write_bytes(
        "extends: llavaguard\nid: caf\u00e9\ndescription: Men\u00fc f\u00fcr G\u00e4ste\n".encode(
            "latin-1"
        )
    )


def _nul_bytes(path: Path) -> None:
    path.write_bytes(b"extends: llavaguard\nid: forum\x00\x00\x01\x02\n")


def _huge(path: Path) -> None:
    filler = "  - Contain content that is long enough to fill a file.\n"
    text = "extends: llavaguard\nid: huge\ncategories:\n  - id: O1\n    should_not:\n"
    path.write_text(text + filler * (MAX_FILE_BYTES // len(filler) + 1), encoding="utf-8")


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _blank(path: Path) -> None:
    path.write_bytes(b"\n\n   \n")


def _utf16(path: Path) -> None:
    path.write_bytes("extends: llavaguard\nid: forum\n".encode("utf-16"))


# name -> (writer, expected line, expected substring)
GENERATED = {
    "latin1.yaml": (_latin1, 2, "not UTF-8 (byte 0xe9)"),
    "nul_bytes.yaml": (_nul_bytes, 0, "binary file (contains NUL bytes)"),
    "huge.yaml": (_huge, 0, f"policy files are limited to {MAX_FILE_BYTES:,}"),
    "zero_bytes.yaml": (_zero_bytes, 0, "the file is empty"),
    "blank.yaml": (_blank, 0, "the file is empty"),
    "utf16.yaml": (_utf16, 0, "binary file"),
}


@pytest.fixture(params=sorted(GENERATED))
def generated(request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    writer, line, substring = GENERATED[request.param]
    path = tmp_path / request.param
    writer(path)
    return Case(path, line, substring, path)


def _first_problem(path: Path) -> tuple[PolicyError, str]:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return info.value, str(info.value.problems[0])


def _check_load(case: Case) -> None:
    err, first = _first_problem(case.path)
    problem = err.problems[0]
    assert problem.line == case.line, first
    assert case.substring in problem.message, first
    assert problem.file == str(case.file), first
    assert first.startswith(case.where), first
    assert str(err).startswith(case.where), str(err)


def _check_cli(case: Case) -> None:
    result = CliRunner().invoke(cli, ["check", str(case.path)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    assert result.stderr.strip()
    assert result.stderr.startswith(case.where), result.stderr
    assert case.substring in result.stderr
    assert "Traceback" not in result.stderr


# -- the fixture files -----------------------------------------------------------------------


def test_fixtures_are_found() -> None:
    assert len(FIXTURES) >= 40
    helpers = {p for p in BAD.rglob("*.yaml")} - {case.path for case in FIXTURES}
    assert helpers == {BAD / "cycle" / "b.yaml"}


@pytest.mark.parametrize("case", FIXTURES, ids=FIXTURE_IDS)
def test_load_policy_locates_the_defect(case: Case) -> None:
    _check_load(case)


@pytest.mark.parametrize("case", FIXTURES, ids=FIXTURE_IDS)
def test_cli_check_reports_the_defect(case: Case) -> None:
    _check_cli(case)


def test_load_policy_generated(generated: Case) -> None:
    _check_load(generated)


def test_cli_check_generated(generated: Case) -> None:
    _check_cli(generated)


# -- the real console script, for a few representative files ---------------------------------

REPRESENTATIVE = [
    "python_tag.yaml",
    "billion_laughs.yaml",
    "cycle/a.yaml",
    "yaml_syntax_error.yaml",
    "unknown_postprocessor.yaml",
    "severity_not_a_level.yaml",
    "recursive_alias.yaml",
    "deep_nesting.yaml",
]


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_console_script(name: str) -> None:
    (case,) = [c for c in FIXTURES if c.path == BAD / name]
    proc = subprocess.run(
        [CLI, "check", str(case.path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith(case.where), proc.stderr
    assert case.substring in proc.stderr
    assert "Traceback" not in proc.stderr


def test_console_script_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    _latin1(path)
    proc = subprocess.run([CLI, "check", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"{path}:2:"), proc.stderr
    assert "Traceback" not in proc.stderr


# -- specific properties ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        '!!python/object/apply:os.system ["touch {marker}"]',
        "!!python/object/apply:subprocess.call [[touch, '{marker}']]",
        "!!python/object/new:subprocess.Popen {{args: [touch, '{marker}']}}",
    ],
)
def test_python_tags_never_execute(tmp_path: Path, value: str) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.yaml"
    path.write_text(
        "extends: llavaguard\nid: evil\n"
        f"categories:\n  - id: O1\n    should_not: {value.format(marker=marker)}\n",
        encoding="utf-8",
    )
    err, first = _first_problem(path)
    assert err.problems[0].line == 5, first
    assert "is not allowed" in first
    assert not marker.exists()


def _python_calls(work: Callable[[], object]) -> int:
    """How many Python functions `work()` calls: a count of work that, unlike a duration, does
    not depend on what else the machine runs."""
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(count)
    try:
        work()
    finally:
        sys.setprofile(None)
    return calls


def test_alias_bomb_rejected_with_little_work_and_memory() -> None:
    """A billion values by aliases are rejected from the document's shape: fewer Python calls
    than visiting the limit's worth of values would take, and little memory (the time it
    takes is measured in bench/loader.py, next to loading a real policy)."""
    load_policy("children-platform")  # one-time imports and plugin loading are not counted
    problems: list[PolicyError] = []

    def load() -> None:
        problems.append(_first_problem(BAD / "billion_laughs.yaml")[0])

    tracemalloc.start()
    try:
        calls = _python_calls(load)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "expands to more than" in problems[0].problems[0].message
    assert calls < MAX_NODES, calls
    assert peak < 20 * 1024 * 1024


def test_aliases_within_limits_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "aliases.yaml"
    path.write_text(
        "extends: llavaguard\nid: forum\nmetadata:\n  a: &a [x, y, {z: [1, 2]}]\n  b: [*a, *a]\n",
        encoding="utf-8",
    )
    policy = load_policy(path)
    assert policy.metadata["b"] == [["x", "y", {"z": [1, 2]}]] * 2


def test_all_problems_are_located_at_their_lines() -> None:
    """A file with several validation errors reports each at its own line."""
    err, _ = _first_problem(BAD / "unknown_category_key.yaml")
    assert [p.line for p in err.problems] == [7]
    err, _ = _first_problem(BAD / "category_without_name.yaml")
    assert [(p.line, p.path) for p in err.problems] == [(8, "categories[C2].name")]


def test_several_problems(tmp_path: Path) -> None:
    path = tmp_path / "several.yaml"
    path.write_text(
        "extends: llavaguard\n"
        "id: forum\n"
        "colour: blue\n"
        "output:\n"
        "  max_new_tokens: 1\n"
        "categories:\n"
        "  - id: O2\n"
        "    severity: [high]\n",
        encoding="utf-8",
    )
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    located = sorted((p.line, p.path) for p in info.value.problems)
    assert located == [
        (3, "colour"),
        (5, "output.max_new_tokens"),
        (8, "categories[O2].severity"),
    ]
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 3


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such file"):
        load_policy(tmp_path / "missing.yaml")
    with pytest.raises(PolicyError, match="is a directory"):
        load_policy(str(tmp_path) + "/")


@pytest.mark.parametrize(
    ("value", "tag"),
    [
        ("!!set {a, b}", "tag:yaml.org,2002:set"),
        ("!!omap [{a: 1}]", "tag:yaml.org,2002:omap"),
        ("!custom {a: 1}", "!custom"),
        ("!custom [a]", "!custom"),
        ("!custom a", "!custom"),
    ],
)
def test_tags_on_any_node_are_rejected(tmp_path: Path, value: str, tag: str) -> None:
    path = tmp_path / "tagged.yaml"
    path.write_text(f"extends: llavaguard\nid: t\nmetadata:\n  x: {value}\n", encoding="utf-8")
    err, first = _first_problem(path)
    assert err.problems[0].line == 4, first
    assert f"YAML tag {tag!r} is not allowed" in first


def test_standard_tags_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "tagged.yaml"
    path.write_text(
        "extends: llavaguard\nid: !!str t\nmetadata: !!map\n  x: !!seq [!!int 1]\n",
        encoding="utf-8",
    )
    policy = load_policy(path)
    assert policy.id == "t"
    assert policy.metadata["x"] == [1]


def test_too_many_values_rejected_while_parsing(tmp_path: Path) -> None:
    """Parsing stops at the value past the limit, in a document holding four times as many: the
    problem points there, not at the end (bench/loader.py measures the time it takes)."""
    path = tmp_path / "many.yaml"
    start = "metadata: {l: ["
    path.write_text(
        "extends: llavaguard\nid: many\n" + start + "a," * (4 * MAX_NODES) + "]}\n",
        encoding="utf-8",
    )
    err, first = _first_problem(path)
    problem = err.problems[0]
    assert problem.line == 3, first
    assert "document has more than 100,000 values" in first
    # two columns a value: the parser went no further than the limit's worth of values
    assert len(start) < problem.column <= len(start) + 2 * MAX_NODES, first


FIVE_STAGES = """\
extends: llavaguard
id: five
descripton: typo key
exceptions:
  O99: {status: non-violating}
categories:
  - {id: O2, severity: hgih}
postprocess:
  - name: rulez
  - name: rules
    params:
      rules:
        - {when: {category: O77}, then: blok}
"""


def test_check_reports_every_kind_of_problem_in_one_run(tmp_path: Path) -> None:
    """A newcomer's five mistakes took six runs of `check`: the file's keys, a category's
    severity, an exception, an unknown step, a step's params and an undeclared action are all
    reported at once, each at its line."""
    path = tmp_path / "five.yaml"
    path.write_text(FIVE_STAGES, encoding="utf-8")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    found = [(p.line, p.path) for p in caught.value.problems]
    assert found == [
        (3, "descripton"),
        (7, "categories[O2].severity"),
        (5, "exceptions.O99"),
        (9, "postprocess[0].name"),
        (13, "postprocess[1].params.rules[0].when.category[0]"),
        (13, "postprocess[1].params.rules[0].then[0].action"),
    ]
    result = run_cli("check", str(path))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 6


def test_a_flood_of_problems_is_capped(tmp_path: Path) -> None:
    rules = "".join(f"        - {{when: {{category: X{i}}}, then: allow}}\n" for i in range(80))
    text = "extends: llavaguard\nid: many\npostprocess:\n  - name: rules\n    params:\n"
    path = tmp_path / "many.yaml"
    path.write_text(text + "      rules:\n" + rules, encoding="utf-8")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    problems = caught.value.problems
    assert len(problems) == 51 and problems[-1].message == "… and 30 more problems"
