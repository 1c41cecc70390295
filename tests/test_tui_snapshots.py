"""SVG snapshots of the policy editor at fixed terminal sizes.

A failing snapshot writes a side-by-side report (`snapshot_report.html`); after a deliberate
change to the look, accept the new pictures with `pytest tests/test_tui_snapshots.py
--snapshot-update` and review the SVG diff in the commit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("textual")
pytest.importorskip("pytest_textual_snapshot")

from policy_engine.tui.app import PolicyApp, create_app
from textual.pilot import Pilot
from textual.widget import Widget
from textual.widgets import Input, TextArea
from tui_support import SteadyPilot, idle, steady

REPO = Path(__file__).resolve().parent.parent
CHILDREN = REPO / "policies" / "children-platform.yaml"


def kids(tmp_path: Path) -> Path:
    path = tmp_path / "kids.yaml"
    path.write_text(CHILDREN.read_text())
    return path


def draw_settled(app: PolicyApp) -> None:
    """Make the next frame depend on the app's state only, not on when earlier frames ran.

    Text cursors stop blinking, drawn where they are: a blink is a 0.5 s wall-clock timer, and
    which phase a screenshot caught depended on how busy the machine was. Every widget then
    drops what it cached from earlier frames, as on a style reload, and is laid out afresh.
    Seen with Textual 8.2.8, each depending on when a frame was drawn:
    - a DataTable caches a cell's rendering under a key without its column's width, so a frame
      drawn between `add_row` and the table's idle-time measuring kept cells cut to the old
      width ("Saf" for "Safe NA []" in the Tests tab);
    - a TextArea caches lines under one key for "cursor blinked out" and "blink off, shown";
    - a `width: auto` Label updated twice in quick succession (the Tests tab's detail line:
      cleared, then filled by the row-highlight handler) sometimes kept the width of its first
      text, with no layout left pending (about 1 run in 40).
    """
    for screen in app.screen_stack:
        for widget in screen.walk_children(Widget, with_self=True):
            if isinstance(widget, Input | TextArea):
                widget.cursor_blink = False
            widget.notify_style_update()
            widget.refresh(layout=True)


async def settle(pilot: Pilot[Any]) -> None:
    """The screen a user sees once the app has nothing left to do, reached by the app's own
    signals rather than by pauses a loaded machine outlasts: typing the debounce still holds
    is applied now (`flush`), workers are done, notifications cleared, cursors still."""
    app = pilot.app
    assert isinstance(app, PolicyApp)
    await idle(pilot)
    app.flush()
    await app.workers.wait_for_complete()
    await idle(pilot)
    app.clear_notifications()
    draw_settled(app)
    await pilot.wait_for_scheduled_animations()
    await idle(pilot)


def test_categories_in_80x24(snap_compare: Any, tmp_path: Path) -> None:
    assert snap_compare(
        create_app(kids(tmp_path)), terminal_size=(80, 24), run_before=steady(settle)
    )


def test_categories_side_by_side_in_130x36(snap_compare: Any, tmp_path: Path) -> None:
    assert snap_compare(
        create_app(kids(tmp_path)), terminal_size=(130, 36), run_before=steady(settle)
    )


def test_o2_made_non_violating_then_the_prompt(snap_compare: Any, tmp_path: Path) -> None:
    async def edit(pilot: SteadyPilot) -> None:
        await pilot.press("down", "x", *"News reporting")
        await settle(pilot)
        await pilot.press("f4")
        app: Any = pilot.app
        view = app.query_one("#prompt-view")
        view.scroll_to(y=14, animate=False)  # O2's section
        await settle(pilot)

    assert snap_compare(create_app(kids(tmp_path)), terminal_size=(80, 24), run_before=steady(edit))


def test_a_problem_listed_under_the_yaml(snap_compare: Any, tmp_path: Path) -> None:
    async def breaks(pilot: SteadyPilot) -> None:
        await pilot.press("f3", "down", "down", *"oops: 1", "enter")
        await settle(pilot)

    assert snap_compare(
        create_app(kids(tmp_path)), terminal_size=(80, 24), run_before=steady(breaks)
    )


def test_help_screen(snap_compare: Any, tmp_path: Path) -> None:
    async def help(pilot: SteadyPilot) -> None:
        await pilot.press("f1")
        await settle(pilot)

    assert snap_compare(create_app(kids(tmp_path)), terminal_size=(80, 24), run_before=steady(help))


def test_try_tab_with_a_decision(
    snap_compare: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image
    from policy_engine.tui.trying import TryPanel

    monkeypatch.chdir(tmp_path)  # the image path on screen is relative: the same every run
    Image.new("RGB", (16, 16), (0, 90, 200)).save(tmp_path / "photo.png")

    async def run(pilot: SteadyPilot) -> None:
        app: Any = pilot.app
        await pilot.press("f7")
        panel = app.query_one(TryPanel)
        panel.picker.configure("static", "full", "rating=Unsafe category=O7")
        panel.query_one("#image").value = "photo.png"
        await pilot.press("ctrl+r")
        await settle(pilot)  # waits for the run's worker
        assert panel.last_decision is not None, panel.status

    assert snap_compare(create_app(kids(tmp_path)), terminal_size=(80, 24), run_before=steady(run))


def test_tests_tab_with_a_pass_and_a_fail(snap_compare: Any, tmp_path: Path) -> None:
    from PIL import Image
    from policy_engine.tui.trying import TestPanel, TryPanel

    Image.new("RGB", (16, 16), (0, 90, 200)).save(tmp_path / "calm.png")
    path = tmp_path / "kids.yaml"
    shipped = CHILDREN.read_text()
    assert shipped.count("\ntests:\n") == 1, "the shipped cases are the file's last section"
    path.write_text(
        shipped.split("\ntests:\n")[0]  # this picture's two cases replace the shipped ones
        + "\ntests:\n"
        + "  - {name: a calm picture, image: calm.png, rating: Safe, actions: []}\n"
        + "  - {name: self-harm is escalated, image: calm.png, category: O7}\n"
    )

    async def run(pilot: SteadyPilot) -> None:
        app: Any = pilot.app
        app.query_one(TryPanel).picker.configure("static", "full", "")
        await pilot.press("f8")
        panel = app.query_one(TestPanel)
        panel.focus()
        await pilot.press("ctrl+r")
        await settle(pilot)  # waits for the run's worker
        assert panel.results, panel.status

    assert snap_compare(create_app(path), terminal_size=(80, 24), run_before=steady(run))


def test_saving_a_shipped_policy_asks_for_the_copy_s_id_and_file(snap_compare: Any) -> None:
    """The dialog shows the full path; the folder is not written to (nothing is saved), so a
    made-up one keeps the picture the same on every machine."""

    async def save(pilot: SteadyPilot) -> None:
        await pilot.press("ctrl+s")
        await settle(pilot)

    folder = Path("/home/reviewer/policies")
    app = create_app("children-platform", folder=folder)
    assert snap_compare(app, terminal_size=(80, 24), run_before=steady(save))
