"""The TUI's document model: structured edits written into the YAML with comments kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import changed_lines

pytest.importorskip("ruamel.yaml")

from policy_engine.tui.document import (
    EditError,
    PolicyDocument,
)
from policy_engine.tui.roundtrip import dump, layout_for, yaml_for

from policy_engine import load_policy, load_policy_text

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "policies"
GOOD = Path(__file__).resolve().parent / "data" / "good_policies"


def copy_of(name: str, tmp_path: Path) -> PolicyDocument:
    path = tmp_path / f"{name}.yaml"
    path.write_text((SHIPPED / f"{name}.yaml").read_text())
    return PolicyDocument.open(path)


@pytest.mark.parametrize(
    "path", sorted([*SHIPPED.glob("*.yaml"), *GOOD.glob("*.yaml")]), ids=lambda p: p.name
)
def test_every_known_policy_round_trips_byte_for_byte(path: Path) -> None:
    text = path.read_text()
    yaml = yaml_for(*layout_for(text))
    assert dump(yaml, yaml.load(text)) == text


def test_making_o2_non_violating_adds_only_the_exception(tmp_path: Path) -> None:
    document = copy_of("children-platform", tmp_path)
    before = document.text
    document.set_exception("O2", "non-violating", "News reporting shows violence.")
    removed, added = changed_lines(before, document.text)
    assert removed == []
    assert added == [
        "  O2:",
        "    status: non-violating",
        "    reason: News reporting shows violence.",
    ]
    policy = document.analysis.policy
    assert policy is not None
    assert policy.exceptions["O2"].status == "non-violating"
    assert policy.exceptions["O2"].reason == "News reporting shows violence."
    assert "Category O2 is declared as non-violating" in document.analysis.compiled.prompt  # type: ignore[union-attr]
    # the comments at the top, and everything else, are untouched
    assert document.text.startswith(before[: before.index("extends:")])


def test_an_exception_changes_in_place_and_back_out(tmp_path: Path) -> None:
    document = copy_of("children-platform", tmp_path)
    original = document.text
    document.set_exception("O4", "non-violating", "Art platform.")
    removed, added = changed_lines(original, document.text)
    assert removed == [
        "    status: sensitive",
        "    reason: No nudity, including artistic or educational nudity.",
    ]
    assert added == ["    status: non-violating", "    reason: Art platform."]
    document.set_exception(
        "O4", "sensitive", "No nudity, including artistic or educational nudity."
    )
    assert document.text == original


def test_clearing_an_inherited_exception_writes_null(tmp_path: Path) -> None:
    parent = copy_of("children-platform", tmp_path)
    parent.save()
    child = PolicyDocument(
        tmp_path / "child.yaml", "extends: ./children-platform.yaml\nid: child\n"
    )
    child.set_exception("O3", "none")
    assert "exceptions:\n  O3:\n" in child.text or "O3: null" in child.text or "O3:\n" in child.text
    policy = child.analysis.policy
    assert policy is not None and "O3" not in policy.exceptions
    assert set(policy.exceptions) == {"O4", "O6"}


def test_guidelines_in_an_extending_file_are_overrides_that_disappear_when_reverted(
    tmp_path: Path,
) -> None:
    document = copy_of("children-platform", tmp_path)
    original = document.text
    inherited = load_policy("llavaguard").category("O1").can
    document.set_guidelines("O1", "can", ["Discuss history.", "", "  Teach tolerance.  "])
    policy = document.analysis.policy
    assert policy is not None and policy.category("O1").can == [
        "Discuss history.",
        "Teach tolerance.",
    ]
    assert "  - id: O1\n    can:\n      - Discuss history.\n" in document.text
    document.set_guidelines("O1", "can", list(inherited))
    assert document.text == original


def test_severity_back_to_the_parents_drops_the_patch(tmp_path: Path) -> None:
    document = copy_of("children-platform", tmp_path)
    document.set_severity("O3", "high")  # llavaguard's own severity for O3
    assert "  - id: O3\n" not in document.text
    policy = document.analysis.policy
    assert policy is not None and policy.category("O3").severity == "high"


def test_edits_in_a_standalone_file_change_only_their_line(tmp_path: Path) -> None:
    document = copy_of("llavaguard", tmp_path)
    before = document.text
    document.set_severity("O5", "low")
    document.rename("O5", "Crimes")
    removed, added = changed_lines(before, document.text)
    assert removed == ["    name: Criminal Planning", "    severity: high"]
    assert added == ["    name: Crimes", "    severity: low"]


def test_remove_add_and_move_in_a_standalone_file(tmp_path: Path) -> None:
    document = copy_of("llavaguard", tmp_path)
    document.set_exception("O9", "sensitive", "no guns")
    document.remove_category("O9")
    document.add_category("X1", "Gambling", "low")
    document.move_category("X1", -1)
    policy = document.analysis.policy
    assert policy is not None, document.analysis.problems
    assert [c.id for c in policy.categories][-2:] == ["X1", "O8"]
    assert "O9" not in policy.exceptions and "\nexceptions:" not in document.text
    with pytest.raises(EditError, match="already a category 'O1'"):
        document.add_category("O1", "Again")
    with pytest.raises(EditError, match="not a category id"):
        document.add_category("9lives", "Cats")
    with pytest.raises(EditError, match="already at the top"):
        document.move_category("O1", -1)


def test_removing_in_an_extending_file(tmp_path: Path) -> None:
    document = copy_of("children-platform", tmp_path)
    document.remove_category("O4")  # inherited, patched and with an exception here
    assert "  - id: O4\n    remove: true\n" in document.text
    document.add_category("K1", "Gambling")
    document.add_category("K2", "Dares")
    document.move_category("K2", -1)
    policy = document.analysis.policy
    assert policy is not None, document.analysis.problems
    ids = [c.id for c in policy.categories]
    assert "O4" not in ids and ids[-2:] == ["K2", "K1"]
    document.remove_category("K1")  # its own: deleted outright
    assert "K1" not in document.text
    with pytest.raises(EditError, match="inherited and keeps the order"):
        document.move_category("O1", 1)


def test_a_broken_file_refuses_structured_edits_with_its_line(tmp_path: Path) -> None:
    document = PolicyDocument(tmp_path / "x.yaml", "id: x\ncategories: [\n")
    with pytest.raises(EditError, match=r"does not parse \(line \d+\)"):
        document.set_severity("O1", "low")
    assert document.analysis.problems


def test_untouched_lines_keep_a_layout_the_dumper_would_change(tmp_path: Path) -> None:
    text = (
        "# my policy\n"
        "id: mine\n"
        "categories:\n"
        "  -   id: A1     # spaced out on purpose\n"
        "      name: First\n"
        "      should_not: [one,   two]\n"
        "  -   id: A2\n"
        "      name: Second\n"
        "\n\n"
        "output:   {rationale: true}\n"
    )
    document = PolicyDocument(tmp_path / "mine.yaml", text)
    document.set_severity("A2", "high")
    removed, added = changed_lines(text, document.text)
    assert removed == []
    assert added == ["      severity: high"]
    assert load_policy_text(document.text, tmp_path / "mine.yaml").category("A2").severity == "high"


def test_new_documents_from_shipped_policies(tmp_path: Path) -> None:
    copied = PolicyDocument.new_from("children-platform", tmp_path / "kids.yaml", "copy")
    removed, added = changed_lines((SHIPPED / "children-platform.yaml").read_text(), copied.text)
    assert (removed, added) == (["id: children-platform"], ["id: kids"])  # its own id
    assert copied.dirty and not (tmp_path / "kids.yaml").exists()
    with pytest.raises(Exception, match="'llavaguard' is a shipped policy's name"):
        PolicyDocument.new_from("children-platform", tmp_path / "llavaguard.yaml", "copy")
    extending = PolicyDocument.new_from("health-platform", tmp_path / "my clinic.yaml", "extends")
    policy = extending.analysis.policy
    assert policy is not None and policy.id == "my-clinic"
    assert policy.categories == load_policy("health-platform").categories
    with pytest.raises(Exception, match="unknown policy 'nope'"):
        PolicyDocument.new_from("nope", tmp_path / "x.yaml")


def test_save_is_atomic_keeps_the_mode_and_notices_changes_on_disk(tmp_path: Path) -> None:
    document = copy_of("children-platform", tmp_path)
    os.chmod(document.path, 0o600)
    document.set_exception("O2", "non-violating", "news")
    assert document.dirty
    assert "O2 is declared as non-violating" in document.prompt_diff()
    document.save()
    assert not document.dirty and document.prompt_diff() == ""
    assert document.path.read_text() == document.text
    assert document.path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["children-platform.yaml"]  # no temp left
    assert not document.changed_on_disk()
    document.path.write_text(document.text + "# edited elsewhere\n")
    assert document.changed_on_disk()


def test_open_reports_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no such file"):
        PolicyDocument.open(tmp_path / "missing.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(Exception, match="not a UTF-8 text file"):
        PolicyDocument.open(tmp_path / "bin.yaml")


def test_added_keys_come_before_the_comment_that_introduces_the_next_key(tmp_path: Path) -> None:
    text = (
        "id: mine\ncategories:\n  - id: A1\n    name: First\n\n# about metadata\nmetadata: {a: 1}\n"
    )
    document = PolicyDocument(tmp_path / "mine.yaml", text)
    document.set_exception("A1", "sensitive", "why")
    document.add_category("B2", "Second")
    assert document.text == (
        "id: mine\ncategories:\n  - id: A1\n    name: First\n"
        "  - id: B2\n    name: Second\n    severity: medium\n    should_not: []\n    can: []\n"
        "exceptions:\n  A1:\n    status: sensitive\n    reason: why\n\n"
        "# about metadata\nmetadata: {a: 1}\n"
    )


def test_a_shipped_copy_is_clean_until_edited_and_saves_under_its_own_id(tmp_path: Path) -> None:
    shipped = (SHIPPED / "children-platform.yaml").read_text()
    document = PolicyDocument.shipped_copy("children-platform", tmp_path / "offered.yaml")
    assert document.text == shipped and document.origin == "children-platform"
    assert not document.dirty and not document.on_disk
    assert document.prompt_diff() == ""
    document.set_exception("O9", "non-violating", "storms")
    assert document.dirty
    document.set_exception("O9", "none")
    assert not document.dirty  # back to what was opened
    document.set_exception("O9", "sensitive")
    document.save_as(tmp_path / "mine.yaml", "mine")
    assert document.path == tmp_path / "mine.yaml" and document.origin is None
    assert not document.dirty and document.on_disk
    assert not (tmp_path / "offered.yaml").exists()
    removed, added = changed_lines(shipped, (tmp_path / "mine.yaml").read_text())
    assert removed == ["id: children-platform"]
    assert added == ["id: mine", "  O9:", "    status: sensitive"]
    assert load_policy(tmp_path / "mine.yaml").id == "mine"


def test_a_failed_save_as_leaves_the_copy_as_it_was(tmp_path: Path) -> None:
    document = PolicyDocument.shipped_copy("health-platform", tmp_path / "offered.yaml")
    before = document.text
    with pytest.raises(Exception, match="no such folder"):
        document.save_as(tmp_path / "missing" / "mine.yaml", "mine")
    assert document.text == before and document.path == tmp_path / "offered.yaml"
    assert document.origin == "health-platform" and not document.dirty


def test_set_id_writes_the_id_in_place_or_after_extends(tmp_path: Path) -> None:
    document = PolicyDocument(tmp_path / "p.yaml", "# mine\nextends: llavaguard\nversion: '2'\n")
    document.set_id("p")
    assert document.text == "# mine\nextends: llavaguard\nid: p\nversion: '2'\n"
    document.set_id("q")
    assert document.text == "# mine\nextends: llavaguard\nid: q\nversion: '2'\n"
    with pytest.raises(EditError, match="needs an id"):
        document.set_id(" ")
