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

from policy_engine.tui.app import create_app
from textual.pilot import Pilot

REPO = Path(__file__).resolve().parent.parent
CHILDREN = REPO / "policies" / "children-platform.yaml"


def kids(tmp_path: Path) -> Path:
    path = tmp_path / "kids.yaml"
    path.write_text(CHILDREN.read_text())
    return path


async def settle(pilot: Pilot[None]) -> None:
    await pilot.pause(0.6)  # past the typing debounce
    app: Any = pilot.app
    app.clear_notifications()
    await pilot.pause()


def test_categories_in_80x24(snap_compare: Any, tmp_path: Path) -> None:
    assert snap_compare(create_app(kids(tmp_path)), terminal_size=(80, 24), run_before=settle)


def test_categories_side_by_side_in_130x36(snap_compare: Any, tmp_path: Path) -> None:
    assert snap_compare(create_app(kids(tmp_path)), terminal_size=(130, 36), run_before=settle)


def test_o2_made_non_violating_then_the_prompt(snap_compare: Any, tmp_path: Path) -> None:
    async def edit(pilot: Pilot[None]) -> None:
        await pilot.press("down", "x", *"News reporting")
        await settle(pilot)
        await pilot.press("f4")
        app: Any = pilot.app
        view = app.query_one("#prompt-view")
        view.scroll_to(y=14, animate=False)  # O2's section
        await pilot.pause()

    assert snap_compare(create_app(kids(tmp_path)), terminal_size=(80, 24), run_before=edit)


def test_a_problem_listed_under_the_yaml(snap_compare: Any, tmp_path: Path) -> None:
    async def breaks(pilot: Pilot[None]) -> None:
        await pilot.press("f3", "down", "down", *"oops: 1", "enter")
        await settle(pilot)

    assert snap_compare(create_app(kids(tmp_path)), terminal_size=(80, 24), run_before=breaks)


def test_help_screen(snap_compare: Any, tmp_path: Path) -> None:
    assert snap_compare(create_app(kids(tmp_path)), terminal_size=(80, 24), press=["f1"])


def test_try_tab_with_a_decision(
    snap_compare: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image
    from policy_engine.tui.trying import TryPanel

    monkeypatch.chdir(tmp_path)  # the image path on screen is relative: the same every run
    Image.new("RGB", (16, 16), (0, 90, 200)).save(tmp_path / "photo.png")

    async def run(pilot: Pilot[None]) -> None:
        app: Any = pilot.app
        await pilot.press("f7")
        panel = app.query_one(TryPanel)
        panel.picker.configure("static", "full", "rating=Unsafe category=O7")
        panel.query_one("#image").value = "photo.png"
        await pilot.press("ctrl+r")
        for _ in range(400):
            if panel.last_decision is not None:
                break
            await pilot.pause(0.05)
        await settle(pilot)

    assert snap_compare(create_app(kids(tmp_path)), terminal_size=(80, 24), run_before=run)


def test_tests_tab_with_a_pass_and_a_fail(snap_compare: Any, tmp_path: Path) -> None:
    from PIL import Image
    from policy_engine.tui.trying import TestPanel, TryPanel

    Image.new("RGB", (16, 16), (0, 90, 200)).save(tmp_path / "calm.png")
    path = tmp_path / "kids.yaml"
    path.write_text(
        CHILDREN.read_text()
        + "tests:\n"
        + "  - {name: a calm picture, image: calm.png, rating: Safe, actions: []}\n"
        + "  - {name: self-harm is escalated, image: calm.png, category: O7}\n"
    )

    async def run(pilot: Pilot[None]) -> None:
        app: Any = pilot.app
        app.query_one(TryPanel).picker.configure("static", "full", "")
        await pilot.press("f8")
        panel = app.query_one(TestPanel)
        panel.focus()
        await pilot.press("ctrl+r")
        for _ in range(400):
            if panel.results:
                break
            await pilot.pause(0.05)
        await settle(pilot)

    assert snap_compare(create_app(path), terminal_size=(80, 24), run_before=run)
