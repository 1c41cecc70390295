"""One policy per name, on the TUI's side: the rule for references, where a shipped policy's
copy goes, which ids it may take, and whether a prompt format shows exception reasons."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ruamel.yaml")

from policy_engine.tui.naming import (
    copy_file_problem,
    copy_id_problem,
    default_copy,
    is_file_reference,
    reason_note,
    reason_reaches_model,
    start_for,
)

from policy_engine import PolicyEngineError, get_host, load_policy, shipped_policies


@pytest.mark.parametrize(
    ("ref", "is_file"),
    [
        ("children-platform", False),
        ("llavaguard-v1.0", False),  # a dot inside is still a name
        ("children-platform.yaml", True),
        ("policy.yml", True),
        ("./children-platform", True),
        (".hidden", True),
        ("drafts/p", True),
        ("drafts\\p", True),
    ],
)
def test_the_rule_for_references(ref: str, is_file: bool) -> None:
    assert is_file_reference(ref) is is_file


def test_a_name_starts_an_unsaved_copy_even_beside_a_file_of_that_name(tmp_path: Path) -> None:
    (tmp_path / "health-platform.yaml").write_text("extends: llavaguard\nid: old\n")
    start = start_for("health-platform", tmp_path)
    document = start.document
    assert document is not None and document.origin == "health-platform"
    assert document.path == tmp_path / "health-platform-custom.yaml"  # offered, not written
    assert document.text == Path(shipped_policies()["health-platform"]).read_text()
    assert start.notice is not None and "./health-platform.yaml here is a file" in start.notice
    # by path, the same file is a file
    opened = start_for("./health-platform.yaml", tmp_path).document
    assert opened is not None and opened.origin is None and "id: old" in opened.text
    missing = start_for("drafts.yaml", tmp_path)
    assert missing.document is None and missing.new_path == tmp_path / "drafts.yaml"
    with pytest.raises(PolicyEngineError, match="unknown policy 'drafts'"):
        start_for("drafts", tmp_path)


def test_the_offered_copy_and_what_it_may_be_called(tmp_path: Path) -> None:
    assert default_copy("llavaguard", tmp_path) == (
        "llavaguard-custom",
        tmp_path / "llavaguard-custom.yaml",
    )
    assert copy_id_problem("llavaguard-custom") is None
    for name in shipped_policies():
        assert "shipped policy's name" in (copy_id_problem(name) or "")
    assert "use letters" in (copy_id_problem("my policy") or "")
    assert copy_id_problem("") is not None
    assert copy_file_problem(tmp_path / "mine.yaml") is None
    assert "named like the shipped policy" in (
        copy_file_problem(tmp_path / "llavaguard.yaml") or ""
    )
    assert "No folder" in (copy_file_problem(tmp_path / "nope" / "mine.yaml") or "")
    assert ".yaml or .yml" in (copy_file_problem(tmp_path / "mine.txt") or "")


def test_which_formats_send_an_exception_reason_to_the_model() -> None:
    """Checked against the formats themselves: LlavaGuard prompts declare the exception
    without its reason; the generic prompt prints the reason after the category's name."""
    assert reason_reaches_model("llavaguard-v1.2") is False
    assert reason_reaches_model("llavaguard-v1.0") is False
    assert reason_reaches_model("generic") is True
    assert reason_reaches_model("no-such-format") is None
    assert reason_note("llavaguard-v1.2") == (
        "Documentation only: not in the llavaguard-v1.2 prompt (F4)."
    )
    assert reason_note("generic") == "Prompt text: the generic prompt shows it to the model (F4)."
    assert "depends on the format 'no-such-format'" in reason_note("no-such-format")
    # the probe agrees with a shipped policy's own reason
    policy = load_policy("health-platform")
    [reason] = [e.reason for e in policy.exceptions.values() if e.reason]
    host = get_host()
    assert reason not in host.compile(policy).prompt
    generic = policy.model_copy(update={"prompt_format": "generic"})
    assert reason in host.compile(generic).prompt
