"""The policy editor, driven like a user would: keys and clicks through Textual's Pilot."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

pytest.importorskip("textual")
pytest.importorskip("ruamel.yaml")

from PIL import Image
from policy_engine.tui.app import PolicyApp, create_app
from policy_engine.tui.dialogs import (
    ConfirmScreen,
    HelpScreen,
    NewPolicyScreen,
    OpenScreen,
    SaveCopyScreen,
)
from policy_engine.tui.previews import ProblemsPanel
from policy_engine.tui.trying import TryPanel
from support import changed_lines, run_cli
from textual.pilot import Pilot
from textual.widgets import (
    DataTable,
    Input,
    RadioButton,
    RadioSet,
    Select,
    Static,
    TabbedContent,
    TextArea,
)
from tui_support import drive, notices, until

from policy_engine import load_policy

REPO = Path(__file__).resolve().parent.parent
CHILDREN = REPO / "policies" / "children-platform.yaml"
Script = Callable[[Pilot[None], PolicyApp], Awaitable[None]]


def children_copy(folder: Path) -> Path:
    path = folder / "kids.yaml"
    path.write_text(CHILDREN.read_text())
    return path


def prompt(app: PolicyApp) -> str:
    return app.query_one("#prompt-view", TextArea).text


def status(app: PolicyApp) -> str:
    return str(app.query_one("#status", Static).render())


def row(table: DataTable[object], key: str) -> list[str]:
    return [str(cell) for cell in table.get_row(key)]


async def select_category(pilot: Pilot[None], app: PolicyApp, category_id: str) -> None:
    await pilot.press("f2")
    table = app.query_one("#category-table", DataTable)
    table.focus()
    ids = [key.value for key in table.rows]
    table.move_cursor(row=ids.index(category_id))
    await pilot.pause()
    assert app.query_one("#categories-pane").selected == category_id  # type: ignore[attr-defined]


def test_opening_a_file_shows_its_categories_exceptions_and_prompt(tmp_path: Path) -> None:
    path = children_copy(tmp_path)

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        table = app.query_one("#category-table", DataTable)
        assert [key.value for key in table.rows] == [f"O{n}" for n in range(1, 10)]
        assert row(table, "O4") == ["O4", "Nudity Content", "critical", "sensitive"]
        assert row(table, "O2") == ["O2", "Violence, Harm, or Cruelty", "high", ""]
        assert app.query_one("#yaml-editor", TextArea).text == CHILDREN.read_text()
        assert "Category O4 is declared as sensitive" in prompt(app)
        assert "✓ valid" in status(app)
        assert not app.query_one(ProblemsPanel).display
        assert app.sub_title == "kids.yaml"  # no unsaved-changes dot

    drive(create_app(path), script)


def test_the_newcomers_path_o2_non_violating_prompt_save_comments_kept(tmp_path: Path) -> None:
    """The issue's 'done when': open the children's policy, make O2 non-violating with a
    reason, watch the prompt change, save (a copy, under an id of its own), find the comments
    intact."""

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        assert app.document is not None and app.document.origin == "children-platform"
        assert "Category O2 is declared" not in prompt(app)
        await pilot.press("f2", "down")  # O1 → O2
        await pilot.press("x")  # exception: none → non-violating; the reason field is next
        assert app.focused is app.query_one("#cat-reason", Input)
        await pilot.press(*"News reporting")
        await until(pilot, lambda: "O2 is declared as non-violating" in prompt(app), "prompt")
        await pilot.press("f6")
        diff = str(app.query_one("#diff-text", Static).render())
        assert "+Category O2 is declared as non-violating" in diff
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SaveCopyScreen)
        await pilot.press("enter")  # the offered id and file
        await until(pilot, lambda: not app.document.dirty, "save")  # type: ignore[union-attr]
        assert app.document.origin is None and app.sub_title == "children-platform-custom.yaml"

    drive(create_app("children-platform", folder=tmp_path), script)
    assert [p.name for p in tmp_path.iterdir()] == ["children-platform-custom.yaml"]
    saved = (tmp_path / "children-platform-custom.yaml").read_text()
    minus, plus = changed_lines(CHILDREN.read_text(), saved)
    assert minus == ["id: children-platform"]
    assert plus == [
        "id: children-platform-custom",
        "  O2:",
        "    status: non-violating",
        "    reason: News reporting",
    ]
    comments = [line for line in CHILDREN.read_text().splitlines() if line.startswith("#")]
    assert comments and all(line in saved.splitlines() for line in comments)
    assert load_policy(tmp_path / "children-platform-custom.yaml").id == "children-platform-custom"


def test_editing_a_guideline_reaches_the_yaml_and_the_prompt(tmp_path: Path) -> None:
    path = children_copy(tmp_path)

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await select_category(pilot, app, "O8")
        await pilot.press("enter")  # into the editor: name field
        area = app.query_one("#cat-can", TextArea)
        area.focus()
        area.move_cursor(area.document.end)
        await pilot.press("enter", *"Show rescued animals.")
        await until(pilot, lambda: "- Show rescued animals." in prompt(app), "prompt update")
        yaml_text = app.query_one("#yaml-editor", TextArea).text
        assert "  - id: O8\n    can:\n" in yaml_text
        assert "      - Show rescued animals.\n" in yaml_text, yaml_text[
            yaml_text.index("id: O8") - 10 :
        ][:400]
        assert app.sub_title == "kids.yaml ●"

    drive(create_app(path), script)


def test_typing_in_the_yaml_updates_the_list_and_an_error_is_listed_and_jumped_to(
    tmp_path: Path,
) -> None:
    path = children_copy(tmp_path)
    text = CHILDREN.read_text()
    line = text.splitlines().index("    severity: high") + 1  # O6's severity

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await pilot.press("f3")
        editor = app.query_one("#yaml-editor", TextArea)
        assert app.focused is editor
        editor.move_cursor((line - 1, len("    severity: ")))
        await pilot.press(*"extreme-", "delete", "delete", "delete", "delete")
        problems = app.query_one(ProblemsPanel)
        await until(pilot, lambda: bool(problems.problems), "a problem")
        [problem] = problems.problems
        assert problem.line == line and "is not a severity level" in problem.message
        assert problems.display and "✗ 1 problem" in status(app)
        await pilot.press("f9")  # to the problems list
        assert app.focused is problems
        editor.move_cursor((0, 0))
        await pilot.press("f2", "f9", "enter")  # choose the problem: back in the YAML, on it
        assert app.query_one(TabbedContent).active == "yaml"
        assert app.focused is editor and editor.cursor_location[0] == line - 1
        # fix it in the YAML: the list follows
        editor.move_cursor((line - 1, len("    severity: ")))
        await pilot.press("shift+end", *"low")
        await until(pilot, lambda: not problems.problems, "the problem to go")
        table = app.query_one("#category-table", DataTable)
        await until(pilot, lambda: row(table, "O6")[2] == "low", "the list to follow")

    drive(create_app(path), script)


def test_saving_an_invalid_policy_asks_first(tmp_path: Path) -> None:
    path = children_copy(tmp_path)

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await pilot.press("f3", *"oops: 1", "enter")
        await until(pilot, lambda: bool(app.query_one(ProblemsPanel).problems), "problem")
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, ConfirmScreen)
        assert "1 problem" in app.screen.question
        await pilot.press("escape")
        assert path.read_text() == CHILDREN.read_text()  # not written
        await pilot.press("ctrl+s", "y")
        await until(pilot, lambda: path.read_text().startswith("oops: 1\n"), "forced save")

    drive(create_app(path), script)


def test_quit_with_unsaved_changes_asks_and_can_save(tmp_path: Path) -> None:
    path = children_copy(tmp_path)
    exited: list[bool] = []

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await select_category(pilot, app, "O9")
        await pilot.press("x")  # O9 non-violating, the reason field focused
        await pilot.press(*"storms")  # still waiting for a pause in typing
        await pilot.press("ctrl+q")
        assert isinstance(app.screen, ConfirmScreen) and "unsaved" in app.screen.question
        await pilot.press("escape")  # cancel: still running, still dirty
        assert app.is_running and app.document is not None and app.document.dirty
        await pilot.press("ctrl+q", "s")
        await pilot.pause()
        exited.append(not app.is_running)

    drive(create_app(path), script)
    assert exited == [True]
    saved = path.read_text()
    assert "  O9:\n    status: non-violating\n    reason: storms\n" in saved  # nothing lost


def test_quit_can_discard(tmp_path: Path) -> None:
    path = children_copy(tmp_path)

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await select_category(pilot, app, "O9")
        await pilot.press("x", "ctrl+q", "d")
        await pilot.pause()
        assert not app.is_running

    drive(create_app(path), script)
    assert path.read_text() == CHILDREN.read_text()


def test_saving_over_a_file_changed_elsewhere_asks(tmp_path: Path) -> None:
    path = children_copy(tmp_path)

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await select_category(pilot, app, "O5")
        await pilot.press("x")
        path.write_text(CHILDREN.read_text() + "# someone else\n")
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, ConfirmScreen) and "changed on disk" in app.screen.question
        await pilot.press("escape")
        assert path.read_text().endswith("# someone else\n")
        await pilot.press("ctrl+s", "y")
        await until(pilot, lambda: "O5:" in path.read_text(), "overwrite")

    drive(create_app(path), script)


def test_add_move_and_remove_categories_with_keys(tmp_path: Path) -> None:
    path = tmp_path / "standalone.yaml"
    path.write_text((REPO / "policies" / "llavaguard.yaml").read_text())

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        table = app.query_one("#category-table", DataTable)
        table.focus()
        await pilot.press("a")
        assert app.screen.query_one("#add-id", Input).value == "O10"
        await pilot.press(*"Gambling", "enter")
        await until(pilot, lambda: "O10" in [k.value for k in table.rows], "new row")
        assert "O10: Gambling" in prompt(app)
        await select_category(pilot, app, "O10")
        await pilot.press("ctrl+up")
        await until(pilot, lambda: [k.value for k in table.rows][-2] == "O10", "moved up")
        await select_category(pilot, app, "O3")
        await pilot.press("delete")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await until(pilot, lambda: "O3" not in [k.value for k in table.rows], "removed")
        assert "O3: Sexual Content" not in prompt(app)

    drive(create_app(path), script)


def test_an_edit_the_file_cannot_take_is_explained(tmp_path: Path) -> None:
    path = children_copy(tmp_path)

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await select_category(pilot, app, "O1")
        before = app.query_one("#yaml-editor", TextArea).text
        await pilot.press("ctrl+down")  # inherited categories keep the parent's order
        await pilot.pause()
        messages = [n.message for n in notices(app)]
        assert any("keeps the order of 'llavaguard'" in m for m in messages), messages
        assert app.query_one("#yaml-editor", TextArea).text == before

    drive(create_app(path), script)


def test_no_argument_asks_for_a_new_policy_and_creates_it(tmp_path: Path) -> None:
    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await until(pilot, lambda: isinstance(app.screen, NewPolicyScreen), "the New dialog")
        await pilot.press("down")  # the second shipped policy
        field = app.screen.query_one("#new-path", Input)
        field.value = "clinic.yaml"
        field.focus()
        await pilot.press("enter")
        await until(pilot, lambda: app.document is not None, "a document")
        assert app.document is not None
        assert app.document.path == tmp_path / "clinic.yaml"
        assert app.document.text.startswith("# clinic: based on the shipped policy")
        assert "extends: health-platform" in app.document.text
        assert "✓ valid" in status(app)
        await pilot.press("ctrl+s")
        await until(pilot, lambda: (tmp_path / "clinic.yaml").exists(), "saved")

    drive(PolicyApp(folder=tmp_path), script)


def test_open_dialog_opens_another_file(tmp_path: Path) -> None:
    first = children_copy(tmp_path)
    other = tmp_path / "other.yaml"
    other.write_text("extends: llavaguard\nid: other\n")

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await pilot.press("ctrl+o")
        assert isinstance(app.screen, OpenScreen)
        await pilot.press(*"nothing.yaml", "enter")
        assert "No file" in str(app.screen.query_one("#open-error", Static).render())
        app.screen.query_one("#open-path", Input).value = "other.yaml"
        await pilot.press("enter")
        await until(pilot, lambda: app.document is not None and app.document.path == other, "open")
        assert app.query_one("#yaml-editor", TextArea).text == other.read_text()

    drive(create_app(first), script)


def test_help_screen_opens_and_closes(tmp_path: Path) -> None:
    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)

    drive(create_app(children_copy(tmp_path)), script)


def test_try_an_image_from_the_app_with_the_edited_policy(tmp_path: Path) -> None:
    """The Try tab judges with what is on screen, saved or not: an O2 answer is acted on by
    the children's rules, and no longer once O2 is removed from the list."""
    path = children_copy(tmp_path)
    picture = tmp_path / "photo.png"
    Image.new("RGB", (16, 16), (0, 90, 200)).save(picture)

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await pilot.press("f7")
        panel = app.query_one(TryPanel)
        panel.picker.configure("static", "full", "rating=Unsafe category=O7")
        panel.query_one("#image", Input).value = str(picture)
        await pilot.press("ctrl+r")
        await until(pilot, lambda: panel.last_decision is not None, "a decision")
        decision = panel.last_decision
        assert decision is not None and decision.category_id == "O7"
        assert sorted(a.name for a in decision.actions) == ["block", "escalate"]

    drive(create_app(path), script, size=(100, 40))


def test_a_shipped_policy_opens_clean_and_quitting_asks_nothing(tmp_path: Path) -> None:
    """The issue's 'done when': open children-platform, quit: no question, nothing written."""
    exited: list[bool] = []

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        assert app.document is not None and not app.document.dirty
        assert app.sub_title == "children-platform: a copy (ctrl+s asks where)"  # no dot
        assert app.query_one("#yaml-editor", TextArea).text == CHILDREN.read_text()
        messages = [n.message for n in notices(app)]
        assert any("'children-platform' is a shipped policy" in m for m in messages), messages
        await pilot.press("f2", "down", "f3", "f7", "f2")  # looking around is not editing
        await pilot.press("ctrl+q")
        await pilot.pause()
        exited.append(not app.is_running)

    drive(create_app("children-platform", folder=tmp_path), script)
    assert exited == [True]
    assert list(tmp_path.iterdir()) == []  # nothing written unasked


def test_an_edited_shipped_copy_asks_on_quit_and_saves_through_the_copy_dialog(
    tmp_path: Path,
) -> None:
    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await select_category(pilot, app, "O9")
        await pilot.press("x", "escape")  # a real edit
        assert app.document is not None and app.document.dirty
        assert app.sub_title.endswith(" ●")
        await pilot.press("ctrl+q")
        assert isinstance(app.screen, ConfirmScreen)
        assert app.screen.question.startswith("Your copy of children-platform has unsaved")
        await pilot.press("s")
        assert isinstance(app.screen, SaveCopyScreen)  # saving a copy asks where, even now
        await pilot.press("enter")
        await until(pilot, lambda: not app.is_running, "the app to quit after saving")

    drive(create_app("children-platform", folder=tmp_path), script)
    saved = (tmp_path / "children-platform-custom.yaml").read_text()
    assert "id: children-platform-custom\n" in saved and "  O9:\n    status: non-violating" in saved


def test_the_copy_dialog_is_prefilled_refuses_a_shipped_id_and_writes_the_new_one(
    tmp_path: Path,
) -> None:
    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await pilot.press("ctrl+s")  # an unedited copy can be saved too
        dialog = app.screen
        assert isinstance(dialog, SaveCopyScreen)
        id_field = dialog.query_one("#copy-id", Input)
        path_field = dialog.query_one("#copy-path", Input)
        assert id_field.value == "children-platform-custom"
        assert path_field.value == "./children-platform-custom.yaml"
        where = str(dialog.query_one("#copy-where", Static).render())
        assert where == f"Saves to {tmp_path / 'children-platform-custom.yaml'}"  # in full
        error = dialog.query_one("#copy-error", Static)
        id_field.value = "llavaguard"  # a shipped policy's name
        await pilot.press("enter")
        assert "'llavaguard' is a shipped policy's name" in str(error.render())
        assert isinstance(app.screen, SaveCopyScreen) and list(tmp_path.iterdir()) == []
        id_field.value = "news-platform"  # the file name follows the id until edited
        await pilot.pause()
        assert path_field.value == "./news-platform.yaml"
        path_field.value = "children-platform.yaml"  # named like the shipped policy
        await pilot.press("enter")
        assert "named like the shipped policy 'children-platform'" in str(error.render())
        path_field.value = "policies/news"  # a folder that is not there
        await pilot.press("enter")
        assert f"No folder {tmp_path / 'policies'}" in str(error.render())
        path_field.value = "news"  # .yaml is added
        await pilot.pause()
        assert str(dialog.query_one("#copy-where", Static).render()).endswith(
            str(tmp_path / "news.yaml")
        )
        await pilot.press("enter")
        await until(pilot, lambda: (tmp_path / "news.yaml").exists(), "the copy")

    drive(create_app("children-platform", folder=tmp_path), script)
    saved = (tmp_path / "news.yaml").read_text()
    minus, plus = changed_lines(CHILDREN.read_text(), saved)
    assert (minus, plus) == (["id: children-platform"], ["id: news-platform"])
    assert load_policy(tmp_path / "news.yaml").id == "news-platform"


def test_the_copy_dialog_replaces_an_existing_file_only_when_confirmed(tmp_path: Path) -> None:
    earlier = tmp_path / "children-platform-custom.yaml"
    earlier.write_text("extends: children-platform\nid: children-platform-custom\n")

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await pilot.press("ctrl+s")
        dialog = app.screen
        assert isinstance(dialog, SaveCopyScreen)
        where = str(dialog.query_one("#copy-where", Static).render())
        assert "exists: saving asks before replacing it" in where
        await pilot.press("enter")
        assert isinstance(app.screen, ConfirmScreen) and "exists" in app.screen.question
        await pilot.press("escape")  # not replaced: back in the dialog
        assert app.screen is dialog
        assert earlier.read_text().startswith("extends: children-platform\n")
        await pilot.press("enter", "y")
        await until(pilot, lambda: "# A platform for children" in earlier.read_text(), "replaced")

    drive(create_app("children-platform", folder=tmp_path), script)


def test_a_shipped_name_means_the_shipped_policy_whatever_files_are_here(tmp_path: Path) -> None:
    """A copy made earlier, and a file named like the policy, are pointed to, never opened."""
    (tmp_path / "children-platform-custom.yaml").write_text("extends: llavaguard\nid: mine\n")
    (tmp_path / "children-platform.yaml").write_text("extends: llavaguard\nid: old\n")

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        assert app.document is not None and app.document.origin == "children-platform"
        assert app.document.text == CHILDREN.read_text() and not app.document.dirty
        [notice] = [n.message for n in notices(app)]
        assert "A copy made earlier is at ./children-platform-custom.yaml" in notice
        assert "`policy-engine tui ./children-platform-custom.yaml`" in notice
        assert "./children-platform.yaml here is a file, not this policy" in notice

    drive(create_app("children-platform", folder=tmp_path), script)


def test_an_unknown_name_is_an_error_and_a_path_is_a_file(tmp_path: Path) -> None:
    result = run_cli("tui", "no-such-policy")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown policy 'no-such-policy'; shipped: ")
    assert "policy-engine tui ./no-such-policy.yaml" in result.stderr
    mine = tmp_path / "children-platform.yaml"  # by its path, a file is a file
    mine.write_text("extends: llavaguard\nid: mine\n")

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        assert app.document is not None and app.document.path == mine
        assert app.document.origin is None

    drive(create_app(f"{tmp_path}/children-platform.yaml"), script)


def test_a_file_with_a_shipped_id_is_flagged(tmp_path: Path) -> None:
    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        messages = [n.message for n in notices(app)]
        assert any(
            "This file's id 'children-platform' is a shipped policy's name" in m for m in messages
        ), messages

    drive(create_app(children_copy(tmp_path)), script)


def test_the_new_dialog_gives_a_copy_the_id_of_its_file(tmp_path: Path) -> None:
    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await until(pilot, lambda: isinstance(app.screen, NewPolicyScreen), "the New dialog")
        field = app.screen.query_one("#new-path", Input)
        app.screen.query_one("#new-how", RadioSet).query(RadioButton)[1].value = True  # copy
        field.value = "llavaguard.yaml"
        field.focus()
        await pilot.press("enter")
        error = str(app.screen.query_one("#new-error", Static).render())
        assert "named like the shipped policy 'llavaguard'" in error
        field.value = "school.yaml"
        await pilot.press("enter")
        await until(pilot, lambda: app.document is not None, "a document")
        assert app.document is not None and app.document.origin is None
        minus, plus = changed_lines(CHILDREN.read_text(), app.document.text)
        assert (minus, plus) == (["id: children-platform"], ["id: school"])

    drive(PolicyApp(folder=tmp_path), script)


def test_the_command_reports_an_unreadable_file_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_bytes(b"\xff\xfe\x00junk")
    result = run_cli("tui", str(tmp_path / "bad.yaml"))
    assert result.returncode == 2
    expected = f"error: {tmp_path / 'bad.yaml'}: not a UTF-8 text file"
    assert result.stderr.strip().splitlines() == [expected]


def test_names_and_paths_with_brackets_are_shown_as_written(tmp_path: Path) -> None:
    folder = tmp_path / "drafts [old]"
    folder.mkdir()
    path = folder / "p.yaml"
    path.write_text("extends: llavaguard\nid: p\ncategories:\n  - {id: O1, name: '[draft] Hate'}\n")

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        table = app.query_one("#category-table", DataTable)
        assert row(table, "O1")[1] == "[draft] Hate"
        assert "[draft] Hate" in str(app.query_one("#cat-title", Static).render())
        await pilot.press("f3", *"x: [", "enter")
        await until(pilot, lambda: bool(app.query_one(ProblemsPanel).problems), "a problem")
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, ConfirmScreen)
        assert "[y]" in str(app.screen.query_one("#choice-y").label)

    drive(create_app(path), script)


def test_a_structured_edit_on_unparsable_yaml_says_why(tmp_path: Path) -> None:
    path = children_copy(tmp_path)

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await pilot.press("f3", *"x: [", "enter")
        await until(pilot, lambda: bool(app.query_one(ProblemsPanel).problems), "a problem")
        await select_category(pilot, app, "O5")
        await pilot.press("x")
        await pilot.pause()
        messages = [n.message for n in notices(app)]
        assert any(
            re.match(r"Cannot set the exception of O5: the YAML does not parse \(line \d+\)", m)
            for m in messages
        ), messages
        assert app.query_one("#cat-exception", Select).value == "none"  # not the refused state

    drive(create_app(path), script)


def test_every_tab_key_shows_its_tab_and_focuses_inside_it(tmp_path: Path) -> None:
    from policy_engine.tui.app import TABS

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        tabs = app.query_one(TabbedContent)
        for key, (tab, _label) in TABS.items():
            await pilot.press(key)
            assert tabs.active == tab, key
            pane = app.query_one(f"TabPane#{tab}")
            focused = app.focused
            assert focused is not None and pane in focused.ancestors, (key, focused)

    drive(create_app(children_copy(tmp_path)), script)


def test_a_missing_file_starts_a_new_policy_at_that_path(tmp_path: Path) -> None:
    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await until(pilot, lambda: isinstance(app.screen, NewPolicyScreen), "the New dialog")
        field = app.screen.query_one("#new-path", Input)
        assert field.value == str(tmp_path / "fresh.yaml")
        field.focus()
        await pilot.press("enter")
        await until(pilot, lambda: app.document is not None, "a document")
        assert app.document is not None and app.document.path == tmp_path / "fresh.yaml"
        assert "extends: children-platform" in app.document.text  # the first shipped policy

    drive(create_app(tmp_path / "fresh.yaml"), script)


def test_cancelling_the_new_dialog_with_nothing_open_quits(tmp_path: Path) -> None:
    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        await until(pilot, lambda: isinstance(app.screen, NewPolicyScreen), "the New dialog")
        await pilot.press("escape")
        await pilot.pause()
        assert not app.is_running

    drive(PolicyApp(folder=tmp_path), script)


def test_the_editor_says_whether_the_model_reads_an_exception_reason(tmp_path: Path) -> None:
    """LlavaGuard prompts leave reasons out (they are documentation); the generic format
    prints them: the note under Reason follows the policy's prompt_format."""
    path = children_copy(tmp_path)

    async def script(pilot: Pilot[None], app: PolicyApp) -> None:
        note = app.query_one("#cat-reason-note", Static)
        assert str(note.render()) == "Documentation only: not in the llavaguard-v1.2 prompt (F4)."
        await select_category(pilot, app, "O3")  # sensitive, with no reason in the prompt
        assert "Category O3 is declared as sensitive" in prompt(app)
        await pilot.press("f3")
        editor = app.query_one("#yaml-editor", TextArea)
        line = editor.text.splitlines().index('version: "1"')
        editor.move_cursor((line, 0))
        await pilot.press(*"prompt_format: generic", "enter")
        await until(pilot, lambda: "Prompt text" in str(note.render()), "the note to follow")
        assert str(note.render()) == "Prompt text: the generic prompt shows it to the model (F4)."

    drive(create_app(path), script)
