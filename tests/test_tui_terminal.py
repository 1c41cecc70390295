"""The policy editor in a real terminal: tmux runs `policy-engine tui`, we read the screen.

Pilot tests drive the app inside the test process; this one proves the installed command
starts, draws the policy in an 80x24 terminal, takes keys and quits cleanly.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("textual")

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
REPO = Path(__file__).resolve().parent.parent


class Terminal:
    def __init__(self, session: str, socket: Path) -> None:
        self.session, self.socket = session, socket

    def tmux(self, *args: str) -> str:
        result = subprocess.run(
            [TMUX or "tmux", "-S", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return result.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.session, *keys)

    def wait_for(self, condition: Callable[[str], bool], what: str) -> str:
        """Poll the screen, bounded generously (this is not a speed test)."""
        screen = ""
        for _ in range(300):
            screen = self.screen()
            if condition(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"gave up waiting for {what}; the screen shows:\n{screen}")

    def alive(self) -> bool:
        return self.session in self.tmux("list-sessions", "-F", "#{session_name}")


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Callable[[str], Terminal]]:
    socket = tmp_path / "tmux.sock"  # a server of our own: never the developer's sessions
    started: list[Terminal] = []

    def start(command: str) -> Terminal:
        session = f"pe-{uuid.uuid4().hex[:8]}"
        subprocess.run(
            [
                *(TMUX or "tmux", "-S", str(socket), "new-session", "-d", "-s", session),
                *("-x", "80", "-y", "24", "-c", str(tmp_path), command),
            ],
            check=True,
            timeout=30,
        )
        term = Terminal(session, socket)
        started.append(term)
        return term

    yield start
    for term in started:
        term.tmux("kill-server")


def test_the_tui_command_shows_the_policy_and_saves_an_edit(
    terminal: Callable[[str], Terminal], tmp_path: Path
) -> None:
    path = tmp_path / "kids.yaml"
    original = (REPO / "policies" / "children-platform.yaml").read_text()
    path.write_text(original)
    command = f"{sys.executable} -m policy_engine tui kids.yaml; sleep 5"
    term = terminal(f"env TERM=xterm-256color POLICY_ENGINE_PLUGINS= {command}")
    # a loaded machine paints the screen in pieces: wait for the whole first view
    painted = ("Violence, Harm, or Cruelty", "Nudity Content", "sensitive", "✓ valid")
    screen = term.wait_for(lambda s: all(m in s for m in painted), "the category list")
    assert "kids.yaml" in screen and "Nudity Content" in screen and "sensitive" in screen
    assert "✓ valid" in screen
    term.keys("Down", "x")
    term.wait_for(lambda s: "non-violating" in s, "O2's exception")
    term.keys("-l", "News reporting")
    term.keys("C-s")
    term.wait_for(lambda s: "Saved" in s, "the save notice")
    term.keys("C-q")
    term.wait_for(lambda s: "policy-engine" not in s, "the app to quit")
    saved = path.read_text()
    assert "  O2:\n    status: non-violating\n    reason: News reporting\n" in saved
    assert (
        saved.replace("  O2:\n    status: non-violating\n    reason: News reporting\n", "")
        == original
    )


def test_open_a_shipped_policy_and_quit_asks_nothing(
    terminal: Callable[[str], Terminal], tmp_path: Path
) -> None:
    """The issue's 'done when', in a real terminal: `tui children-platform`, ctrl+q."""
    command = f"{sys.executable} -m policy_engine tui children-platform; echo exit=$?; sleep 5"
    term = terminal(f"env TERM=xterm-256color POLICY_ENGINE_PLUGINS= {command}")
    screen = term.wait_for(lambda s: "Violence, Harm, or Cruelty" in s, "the category list")
    assert "children-platform: a copy" in screen and "●" not in screen
    term.keys("C-q")
    screen = term.wait_for(lambda s: "exit=" in s, "the app to quit")
    assert "exit=0" in screen and "unsaved" not in screen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmux.sock"]  # nothing written
