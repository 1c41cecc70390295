"""The TUI's Try and Tests panels, driven by a Pilot: real backends (static, the tiny random
model, a gated test plugin for cancelling), real policies, real files."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("textual")

from PIL import Image
from policy_engine.backends.static import StaticBackend, StaticOptions
from policy_engine.tui.trying import (
    BackendCache,
    BackendChoice,
    BackendPicker,
    DecisionView,
    ImagePicker,
    TestPanel,
    TryPanel,
    render_decision,
)
from textual.app import App, ComposeResult
from textual.containers import Vertical
from textual.pilot import Pilot
from textual.widgets import DataTable, DirectoryTree, Input, Label, Select, Static
from tui_support import drive as tui_drive
from tui_support import notices, until

from policy_engine import (
    Batch,
    Engine,
    Generation,
    PluginHost,
    Policy,
    get_host,
    hookimpl,
    load_policy,
)

UNSAFE_O7 = "rating=Unsafe category=O7"


class Harness(App[None]):
    """A TryPanel and a TestPanel sharing one cache, as the real app puts them in two tabs."""

    CSS = "TryPanel, TestPanel { height: 1fr; }"

    def __init__(self, policy: Policy | None, host: PluginHost | None = None) -> None:
        super().__init__()
        self.host = host or get_host()
        self.policy = policy
        self.cache = BackendCache(self.host)
        self.decisions: list[Any] = []
        self.test_runs: list[Any] = []

    def compose(self) -> ComposeResult:
        with Vertical():
            yield TryPanel(self.cache, id="try")
            yield TestPanel(self.cache, lambda: self.query_one(TryPanel).choice(), id="tests")

    def on_mount(self) -> None:
        self.query_one(TryPanel).set_policy(self.policy)
        self.query_one(TestPanel).set_policy(self.policy)

    def on_try_panel_finished(self, message: TryPanel.Finished) -> None:
        self.decisions.append(message.decision)

    def on_test_panel_finished(self, message: TestPanel.Finished) -> None:
        self.test_runs.append(message.results)

    def on_unmount(self) -> None:
        self.cache.close()


def drive(app: Harness, script: Callable[[Pilot[None], Harness], Awaitable[None]]) -> None:
    """Run `script` against the app at 100x40."""
    tui_drive(app, script, size=(100, 40))


def labels(nodes: Sequence[Any]) -> list[str]:
    return [str(node.label) for node in nodes]


def text(widget: Static) -> str:
    return str(widget.render())


def shown_decision(panel: TryPanel) -> str:
    """The decision as the panel shows it: summary, then details."""
    return panel.query_one(DecisionView).text


def status(panel: TryPanel | TestPanel) -> str:
    return panel.status


def image(folder: Path, name: str = "red.png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.new("RGB", (24, 24), (200, 0, 0)).save(path)
    return path


async def try_image(
    pilot: Pilot[None], app: Harness, path: Path | str, backend: str, options: str
) -> TryPanel:
    """Set the image and backend, press ctrl+r in the panel, wait for the worker."""
    panel = app.query_one(TryPanel)
    panel.picker.configure(backend, "full", options)
    panel.query_one("#image", Input).value = str(path)
    panel.query_one("#image", Input).focus()
    await pilot.pause()
    await pilot.press("ctrl+r")
    await app.workers.wait_for_complete()
    await pilot.pause()
    return panel


@pytest.fixture(scope="module")
def children() -> Policy:
    return load_policy("children-platform")


# --- the Try panel ---------------------------------------------------------------------------


def test_unsafe_self_harm_shows_rating_actions_and_trace(children: Policy, tmp_path: Path) -> None:
    path = image(tmp_path)

    async def script(pilot: Pilot[None], app: Harness) -> None:
        panel = await try_image(pilot, app, path, "static", UNSAFE_O7)
        decision = panel.last_decision
        assert decision is not None and app.decisions == [decision]
        assert decision.rating == "Unsafe" and decision.category_id == "O7"
        assert [a.name for a in decision.actions] == ["escalate", "block"]
        shown = shown_decision(panel)
        assert "Unsafe  O7: Self-Harm" in shown
        assert "P(unsafe) 1.000" in shown
        assert "Static answer: no model was consulted." in shown  # the rationale
        assert "escalate queue=safeguarding priority=urgent" in shown
        assert "block" in shown.split("Actions", 1)[1]
        for entry in decision.trace:
            assert entry.message in shown
        assert decision.trace, "the rules post-processor explains what it did"
        assert status(panel).startswith("done: Unsafe O7")

    drive(Harness(children), script)


def test_safe_verdict_shows_no_actions(children: Policy, tmp_path: Path) -> None:
    path = image(tmp_path)

    async def script(pilot: Pilot[None], app: Harness) -> None:
        panel = await try_image(pilot, app, path, "static", "rating=Safe")
        assert panel.last_decision is not None and panel.last_decision.actions == []
        shown = shown_decision(panel)
        assert "Safe  NA: None applying" in shown
        assert "Actions\n  none" in shown

    drive(Harness(children), script)


def test_error_verdict_is_shown_with_its_reason(children: Policy, tmp_path: Path) -> None:
    path = image(tmp_path)

    async def script(pilot: Pilot[None], app: Harness) -> None:
        panel = await try_image(pilot, app, path, "static", "raw=nonsense")
        decision = panel.last_decision
        assert decision is not None and decision.verdict.error is not None
        shown = shown_decision(panel)
        assert "Error (output): no JSON object in the reply" in shown
        assert "human_review queue=moderation priority=high" in shown  # review-failures rule
        assert status(panel) == "no verdict: output error"

    drive(Harness(children), script)


AUDIENCE_RULES = """\
extends: llavaguard
id: audience
postprocess:
  - name: rules
    params:
      rules:
        - {when: {rating: Unsafe, metadata: {audience: minors}}, then: block}
        - {when: {rating: Unsafe}, then: {action: human_review, queue: moderation}}
"""


def test_request_metadata_reaches_the_rules(tmp_path: Path) -> None:
    path = image(tmp_path)
    (tmp_path / "audience.yaml").write_text(AUDIENCE_RULES, encoding="utf-8")
    policy = load_policy(tmp_path / "audience.yaml")

    async def script(pilot: Pilot[None], app: Harness) -> None:
        panel = app.query_one(TryPanel)
        meta = panel.query_one("#metadata", Input)
        meta.value = "audience=minors"
        await try_image(pilot, app, path, "static", "rating=Unsafe category=O2")
        assert panel.last_decision is not None
        assert [a.name for a in panel.last_decision.actions] == ["block"]
        assert "metadata audience=minors" in shown_decision(panel)
        meta.value = ""
        await try_image(pilot, app, path, "static", "rating=Unsafe category=O2")
        assert [a.name for a in panel.last_decision.actions] == ["human_review"]
        meta.value = "audience"
        await try_image(pilot, app, path, "static", "rating=Unsafe category=O2")
        assert status(panel) == "error: metadata: 'audience' is not KEY=VALUE"
        assert len(app.decisions) == 2

    drive(Harness(policy), script)


def test_missing_image_is_one_clear_line(children: Policy, tmp_path: Path) -> None:
    async def script(pilot: Pilot[None], app: Harness) -> None:
        missing = tmp_path / "[b]nowhere.png"  # shown as it is, not read as markup
        panel = await try_image(pilot, app, missing, "static", "")
        assert status(panel) == f"error: no such image file: {missing}"
        assert str(panel.query_one(".status-text", Label).render()) == status(panel)
        assert panel.last_decision is None and not panel.running
        await try_image(pilot, app, "", "static", "")
        assert status(panel).startswith("error: no image")

    drive(Harness(children), script)


def test_invalid_policy_is_reported_not_run(tmp_path: Path) -> None:
    path = image(tmp_path)

    async def script(pilot: Pilot[None], app: Harness) -> None:
        panel = await try_image(pilot, app, path, "static", "")
        assert status(panel) == "error: the policy has errors: fix them to try it"
        assert panel.last_decision is None

    drive(Harness(None), script)


def test_bad_option_pair_is_an_error_not_a_crash(children: Policy, tmp_path: Path) -> None:
    path = image(tmp_path)

    async def script(pilot: Pilot[None], app: Harness) -> None:
        panel = app.query_one(TryPanel)
        panel.picker.configure("static", "full", "")
        await pilot.pause()
        options = panel.picker.query_one("#options", Input)
        options.focus()
        await pilot.press(*"rating")  # typed by hand: a key without '='
        assert options.value == "rating"
        error = panel.picker.query_one("#picker-error", Label)
        assert str(error.render()) == "options: 'rating' is not KEY=VALUE"
        panel.query_one("#image", Input).value = str(path)
        await pilot.press("ctrl+r")
        assert status(panel) == "error: options: 'rating' is not KEY=VALUE"
        with pytest.raises(Exception, match="not KEY=VALUE"):
            panel.choice()
        # an option the backend does not have: reported by the backend, in one line
        panel = await try_image(pilot, app, path, "static", "colour=red")
        assert status(panel) == (
            "error: backend 'static': option colour: unknown option "
            "(options: category, model, p_unsafe, rating, rationale, raw)"
        )
        assert panel.last_decision is None
        # values are read as YAML, quotes group words
        panel.picker.configure("static", "score", 'p_unsafe=0.25 rationale="two words"')
        assert panel.choice() == BackendChoice(
            "static", "score", {"p_unsafe": 0.25, "rationale": "two words"}
        )

    drive(Harness(children), script)


def test_mode_without_scores_is_an_error(children: Policy, tmp_path: Path) -> None:
    path = image(tmp_path)

    async def script(pilot: Pilot[None], app: Harness) -> None:
        panel = app.query_one(TryPanel)
        panel.picker.configure("gate", "score", "")
        panel.query_one("#image", Input).value = str(path)
        panel.query_one("#image", Input).focus()
        await pilot.press("ctrl+r")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert (
            status(panel)
            == "error: backend 'gate' cannot score (mode 'score'); use mode full or verdict"
        )

    drive(Harness(children, gate_host(Gate(), scores=False)), script)


def test_backend_load_failure_is_one_line(children: Policy, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    path = image(tmp_path)

    async def script(pilot: Pilot[None], app: Harness) -> None:
        missing = tmp_path / "no-model"
        panel = await try_image(pilot, app, path, "transformers", f"model={missing}")
        line = status(panel)
        assert line.startswith("error: ") and "no checkpoint there" in line, line
        assert "\n" not in line and "Traceback" not in line
        assert panel.last_decision is None and app.is_running

    drive(Harness(children), script)


def test_picker_defaults_per_backend(children: Policy) -> None:
    async def script(pilot: Pilot[None], app: Harness) -> None:
        picker = app.query_one(BackendPicker)
        backend = picker.query_one("#backend", Select)
        options = picker.query_one("#options", Input)
        assert backend.value == "static" and options.value == ""  # offline, no set-up
        backend.value = "transformers"
        await pilot.pause()
        assert options.value == "model=AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf"
        backend.value = "sglang"
        await pilot.pause()
        assert options.value == "url=http://127.0.0.1:30000"
        backend.value = "static"
        await pilot.pause()
        assert options.value == ""
        options.value = "rating=Unsafe"
        await pilot.pause()
        backend.value = "transformers"
        await pilot.pause()
        backend.value = "static"  # what was typed for a backend comes back with it
        await pilot.pause()
        assert options.value == "rating=Unsafe"
        assert picker.choice() == BackendChoice("static", "full", {"rating": "Unsafe"})

    drive(Harness(children), script)


# --- a gated backend plugin: the test decides when it answers -------------------------------


class Gate:
    """Shared between a test and its backend: `entered` when generate starts, which then
    waits for `release`; every instance made, in order."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.made: list[Any] = []


class GateOptions(StaticOptions):
    wait: bool = False


def gate_host(gate: Gate, *, scores: bool = True) -> PluginHost:
    """A fresh host with the built-ins plus a `gate` backend: static answers, optionally held
    back until the test releases them; it counts loads and closes."""

    class GateBackend(StaticBackend):
        name = "gate"
        Options = GateOptions
        options: GateOptions

        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            if not scores:
                self.capabilities = type(self.capabilities)(images=True, scores=False)
            self.loads = 0
            self.closed = False
            gate.made.append(self)

        def load(self) -> None:
            self.loads += 1

        def generate(self, batch: Batch) -> list[Generation]:
            if self.options.wait:
                gate.entered.set()
                gate.release.wait(timeout=60)
            return super().generate(batch)

        def close(self) -> None:
            self.closed = True

    class Plugin:
        @hookimpl
        def register_backends(self, register):  # type: ignore[no-untyped-def]
            register(GateBackend)

    host = PluginHost()
    host.register(Plugin(), "gate-test")
    return host


def test_cancel_frees_the_ui_and_drops_the_late_result(children: Policy, tmp_path: Path) -> None:
    path = image(tmp_path)
    gate = Gate()

    async def script(pilot: Pilot[None], app: Harness) -> None:
        panel = app.query_one(TryPanel)
        panel.picker.configure("gate", "full", f"wait=true {UNSAFE_O7}")
        field = panel.query_one("#image", Input)
        field.value = str(path)
        field.focus()
        await pilot.press("ctrl+r")
        await until(pilot, gate.entered.is_set, "the backend call")
        assert panel.running and panel.has_class("-running")  # the spinner shows
        assert status(panel) == "loading gate, then assessing red.png with gate … (esc cancels)"
        assert "cancel" in {b.binding.action for b in app.active_bindings.values()}
        await pilot.press("escape")
        assert status(panel).startswith("cancelled")
        assert not panel.running and not panel.has_class("-running")
        field.value = ""
        await pilot.press(*"still here")  # the UI answers while the call hangs
        assert field.value == "still here"
        assert "cancel" not in {b.binding.action for b in app.active_bindings.values()}
        gate.release.set()
        await until(
            pilot, lambda: panel.discarded == 1 or panel.last_decision is not None, "the result"
        )
        await pilot.pause()
        assert panel.last_decision is None and app.decisions == []
        assert shown_decision(panel) == ""
        assert status(panel).startswith("cancelled")
        # the next run works, with the same (cached) backend
        await try_image(pilot, app, path, "gate", UNSAFE_O7 + " wait=true")
        assert panel.last_decision is not None and len(gate.made) == 1

    drive(Harness(children, gate_host(gate)), script)


def test_backend_is_reused_until_its_options_change(children: Policy, tmp_path: Path) -> None:
    path = image(tmp_path)
    gate = Gate()

    async def script(pilot: Pilot[None], app: Harness) -> None:
        await try_image(pilot, app, path, "gate", "rating=Safe")
        first = app.cache.current
        await try_image(pilot, app, path, "gate", "rating=Safe")
        assert app.cache.current is first and gate.made == [first]
        assert first.loads == 1 and not first.closed  # loaded once for both runs
        await try_image(pilot, app, path, "gate", UNSAFE_O7)
        second = app.cache.current
        assert second is not first and gate.made == [first, second]
        assert first.closed and not second.closed
        assert len(app.decisions) == 3 and app.decisions[2].rating == "Unsafe"
        # the static built-in too: one instance across runs
        await try_image(pilot, app, path, "static", "")
        static = app.cache.current
        await try_image(pilot, app, path, "static", "")
        assert isinstance(static, StaticBackend) and app.cache.current is static

    app = Harness(children, gate_host(gate))
    drive(app, script)
    assert gate.made[-1].closed  # the harness closes the cache on exit


def test_browse_picks_an_image_file(children: Policy, tmp_path: Path) -> None:
    photo = image(tmp_path / "photos", "cat.png")
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    (tmp_path / "photos" / "sub").mkdir()

    async def script(pilot: Pilot[None], app: Harness) -> None:
        panel = app.query_one(TryPanel)
        field = panel.query_one("#image", Input)
        field.value = str(tmp_path / "photos")
        field.focus()
        await pilot.press("ctrl+b")
        await until(pilot, lambda: isinstance(app.screen, ImagePicker), "the picker")
        tree = app.screen.query_one(DirectoryTree)
        await until(pilot, lambda: len(tree.root.children) == 2, "the folder listing")
        assert labels(tree.root.children) == ["sub", "cat.png"]  # notes.txt is filtered out
        await pilot.press("backspace")  # up to the parent folder
        await until(pilot, lambda: "photos" in labels(tree.root.children), "the parent folder")
        await pilot.press("escape")  # closes without picking
        assert not isinstance(app.screen, ImagePicker)
        assert field.value == str(tmp_path / "photos")
        await pilot.click("#browse")
        await until(pilot, lambda: isinstance(app.screen, ImagePicker), "the picker again")
        tree = app.screen.query_one(DirectoryTree)
        await until(pilot, lambda: len(tree.root.children) == 2, "the folder listing")
        tree.focus()
        while tree.cursor_node is None or tree.cursor_node.label.plain != "cat.png":
            assert tree.cursor_line < 5, "cat.png is not in the tree"
            await pilot.press("down")
        await pilot.press("enter")
        await until(pilot, lambda: not isinstance(app.screen, ImagePicker), "the picker closing")
        assert field.value == str(photo)

    drive(Harness(children), script)


def test_tiny_random_model_end_to_end(children: Policy, tiny_cache: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("llguidance")
    path = image(tmp_path)

    async def script(pilot: Pilot[None], app: Harness) -> None:
        panel = await try_image(pilot, app, path, "transformers", "model=tiny-random greedy=true")
        decision = panel.last_decision
        assert decision is not None, status(panel)
        verdict = decision.verdict
        assert verdict.ok, verdict.error  # constrained decoding: always a schema-valid verdict
        assert verdict.rating in ("Safe", "Unsafe") and verdict.category_id is not None
        assert verdict.model == "tiny-random (random weights)"
        shown = shown_decision(panel)
        assert f"{verdict.rating}  {verdict.category_id}:" in shown
        assert "tiny-random (random weights)" in shown

    drive(Harness(children), script)


# --- the Tests panel -------------------------------------------------------------------------

CASES = """\
tests:
  - name: unsafe content is blocked
    image: red.png
    rating: Unsafe
    category: O2
    actions: [block]
  - name: wrongly expected safe
    image: red.png
    rating: Safe
  - image: red.png
    actions: [block]
"""


def policy_with_tests(folder: Path) -> Policy:
    image(folder)
    path = folder / "p.yaml"
    path.write_text(f"extends: children-platform\nid: p\n{CASES}", encoding="utf-8")
    return load_policy(path)


def test_policy_cases_run_with_pass_and_fail(tmp_path: Path) -> None:
    policy = policy_with_tests(tmp_path)

    async def script(pilot: Pilot[None], app: Harness) -> None:
        app.query_one(TryPanel).picker.configure("static", "full", "rating=Unsafe category=O2")
        panel = app.query_one(TestPanel)
        table = panel.query_one("#cases", DataTable)
        assert table.display and table.row_count == 3
        assert status(panel) == "3 cases: ctrl+r runs them"
        assert not panel.query_one("#no-tests", Label).display
        table.focus()
        await pilot.press("ctrl+r")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert [r.passed for r in panel.results] == [True, False, True]
        assert app.test_runs == [panel.results]
        assert status(panel) == "2 passed, 1 failed"
        rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
        assert rows[0] == [
            "1",
            "unsafe content is blocked",
            "Unsafe O2 [block]",
            "Unsafe O2 [block]",
            "pass",
        ]
        assert rows[1][1:] == [
            "wrongly expected safe",
            "Safe",
            "Unsafe O2 [block]",
            "FAIL: rating Unsafe, expected Safe",
        ]
        assert rows[2][1] == str(tmp_path / "red.png") and rows[2][4] == "pass"
        detail = panel.query_one("#detail", Label)
        await pilot.press("down")  # the highlighted case's outcome in full, below the table
        assert str(detail.render()) == "2. wrongly expected safe: rating Unsafe, expected Safe"
        # the app sets the same policy again after an unrelated edit: results stay
        panel.set_policy(load_policy(tmp_path / "p.yaml"))
        assert len(panel.results) == 3 and str(table.get_row_at(1)[4]).startswith("FAIL")

    drive(Harness(policy), script)


def test_policy_without_cases_says_how_to_add_them() -> None:
    async def script(pilot: Pilot[None], app: Harness) -> None:
        panel = app.query_one(TestPanel)
        note = panel.query_one("#no-tests", Label)
        assert note.display and not panel.query_one("#cases", DataTable).display
        assert str(note.render()).startswith("No test cases: add a `tests:` list")
        panel.set_policy(None)
        await pilot.pause()
        assert str(note.render()).startswith("The policy has errors")
        panel.action_run()
        assert status(panel) == "error: the policy has errors: fix them to run its tests"

    drive(Harness(load_policy("llavaguard")), script)  # the base policy carries no cases


def test_cancelling_the_test_run(tmp_path: Path) -> None:
    policy = policy_with_tests(tmp_path)
    gate = Gate()

    async def script(pilot: Pilot[None], app: Harness) -> None:
        app.query_one(TryPanel).picker.configure(
            "gate", "full", "wait=true rating=Unsafe category=O1"
        )
        panel = app.query_one(TestPanel)
        panel.query_one("#cases", DataTable).focus()
        await pilot.press("ctrl+r")
        await until(pilot, gate.entered.is_set, "the backend call")
        assert status(panel) == "running 3 cases with gate … (esc cancels)"
        await pilot.press("escape")
        assert status(panel).startswith("cancelled")
        gate.release.set()
        await until(pilot, lambda: panel.discarded == 1 or bool(panel.results), "the results")
        await pilot.pause()
        assert panel.results == [] and app.test_runs == []
        table = panel.query_one("#cases", DataTable)
        assert [str(table.get_row_at(i)[4]) for i in range(3)] == ["", "", ""]

    drive(Harness(policy, gate_host(gate)), script)


def test_render_decision_is_plain_readable_text(children: Policy, tmp_path: Path) -> None:
    engine = Engine(children, "static", backend_options={"rating": "Unsafe", "category": "O3"})
    decision = engine.assess(image(tmp_path), metadata={"audience": "minors"})
    shown = render_decision(decision).plain
    assert shown.startswith("Unsafe  O3: Sexual Content  severity critical  P(unsafe) 1.000")
    assert "\nActions\n  block " in shown and "\nTrace\n" in shown
    assert "\nmetadata audience=minors\n" in shown
    scored = Engine(children, "static", mode="score", backend_options={"p_unsafe": 0.4})
    shown = render_decision(scored.assess(image(tmp_path))).plain
    # the summary (rating, score, actions) comes before the model and the rationale
    assert shown.startswith("Safe  P(unsafe) 0.400\nActions\n  blur reason="), shown
    assert "blur reason=the model was unsure this image is safe" in shown
    assert shown.index("\nActions\n") < shown.index("\nmodel static\n")


# --- the Try tab inside the app: defaults, keys, layout at 80x24, messages -------------------


def app_drive(app: Any, script: Callable[[Pilot[None], Any], Awaitable[None]]) -> None:
    """Run `script` against the whole app in an 80x24 terminal."""
    tui_drive(app, script, size=(80, 24))


def test_the_defaults_try_an_image_offline_with_no_configuration(tmp_path: Path) -> None:
    from policy_engine.tui.app import create_app

    path = image(tmp_path)

    async def script(pilot: Pilot[None], app: Any) -> None:
        await pilot.press("f7", *str(path), "ctrl+r")  # the image field has the focus
        panel = app.query_one(TryPanel)
        await until(pilot, lambda: panel.last_decision is not None, "a decision")
        assert panel.choice() == BackendChoice("static", "full", {})
        assert status(panel) == "done: Safe NA", status(panel)
        assert "static: a fixed answer, no model (offline)" in str(
            panel.query_one("#picker-hint", Label).render()
        )
        assert not [n for n in notices(app) if n.severity == "error"]

    app_drive(create_app("children-platform", folder=tmp_path), script)


def test_the_options_are_three_tabs_from_the_image_or_ctrl_t_from_anywhere(
    tmp_path: Path,
) -> None:
    from policy_engine.tui.app import create_app
    from textual.widgets import TabbedContent

    async def script(pilot: Pilot[None], app: Any) -> None:
        options = app.query_one("#options", Input)
        await pilot.press("f7")
        assert app.focused is app.query_one("#image", Input)
        await pilot.press("tab")
        assert app.focused is app.query_one("#backend", Select)
        await pilot.press("tab", "tab")  # mode, then the options
        assert app.focused is options
        await pilot.press("tab")
        assert app.focused is app.query_one("#metadata", Input)
        await pilot.press("f2", "ctrl+t")  # from the Categories tab
        assert app.query_one(TabbedContent).active == "try" and app.focused is options
        await pilot.press("f8", "ctrl+t")  # from the Tests tab, whose runs use them
        assert app.query_one(TabbedContent).active == "try" and app.focused is options

    app_drive(create_app("children-platform", folder=tmp_path), script)


def test_the_summary_is_above_the_rationale_at_80x24(tmp_path: Path) -> None:
    """A screen of rationale scrolls below the summary; rating, category, P(unsafe) and
    every action stay in view."""
    from policy_engine.tui.app import create_app

    path = image(tmp_path)
    rationale = "A long rationale sentence. " * 60

    async def script(pilot: Pilot[None], app: Any) -> None:
        await pilot.press("f7")
        panel = app.query_one(TryPanel)
        panel.picker.configure("static", "full", f'{UNSAFE_O7} rationale="{rationale}"')
        panel.query_one("#image", Input).value = str(path)
        await pilot.press("ctrl+r")
        await until(pilot, lambda: panel.last_decision is not None, "a decision")
        summary = panel.query_one("#decision-summary", Static)
        scroll = panel.query_one("#decision-scroll")
        await until(pilot, lambda: scroll.max_scroll_y > 0, "the laid-out details")
        shown = text(summary)
        assert shown.startswith("Unsafe  O7: Self-Harm  severity critical  P(unsafe) 1.000")
        assert "escalate queue=safeguarding" in shown and "\n  block" in shown
        assert "rationale" not in shown
        assert "A long rationale" in text(panel.query_one("#decision-details", Static))
        # the rationale does not fit (it scrolls: waited for above), the summary does
        region = summary.region
        assert app.screen.region.contains_region(region) and region.bottom <= scroll.region.y
        width = summary.content_size.width
        needed = summary.get_content_height(summary.size, app.size, width)
        assert needed <= summary.content_size.height, "the summary is cut"
        for y in range(region.y, region.bottom):  # on screen, not under anything
            assert app.get_widget_at(region.x + 1, y)[0] is summary

    app_drive(create_app("children-platform", folder=tmp_path), script)


def test_a_random_weights_model_is_flagged_before_and_after_the_run(
    children: Policy, tmp_path: Path
) -> None:
    async def script(pilot: Pilot[None], app: Harness) -> None:
        picker = app.query_one(BackendPicker)
        hint = picker.query_one("#picker-hint", Label)
        picker.configure("transformers", "full", None)
        await pilot.pause()
        assert "offline without one: model=tiny-random" in str(hint.render())
        assert not hint.has_class("-warning")
        picker.query_one("#options", Input).value = "model=tiny-random"
        await pilot.pause()
        assert str(hint.render()).startswith("model=tiny-random has RANDOM weights")
        assert hint.has_class("-warning")

    drive(Harness(children), script)
    engine = Engine(children, "static", backend_options={"model": "tiny (random weights)"})
    shown = render_decision(engine.assess(image(tmp_path))).plain
    assert "\nmodel tiny (random weights): its verdicts are meaningless\n" in shown


def test_the_offline_error_speaks_of_the_options_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real transformers backend, offline, without the hub model in its cache."""
    pytest.importorskip("transformers")
    from policy_engine.tui.app import create_app

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = image(tmp_path)

    async def script(pilot: Pilot[None], app: Any) -> None:
        await pilot.press("f7")
        panel = app.query_one(TryPanel)
        panel.picker.configure("transformers", "full", None)  # the default: the hub model
        panel.query_one("#image", Input).value = str(path)
        await pilot.press("ctrl+r")
        await until(pilot, lambda: not panel.running, "the run to end")
        line = status(panel)
        assert line.startswith("error: cannot load model 'AIML-TUDA/"), line
        assert "Pass a local checkpoint directory with model=PATH, or model=tiny-random" in line
        assert line.endswith("; type it in the options field (ctrl+t)")
        assert "--model" not in line

    app_drive(create_app("children-platform", folder=tmp_path), script)


def test_in_app_terms_turns_flags_into_options() -> None:
    from policy_engine.tui.picker import in_app_terms

    from policy_engine import CliFlag

    flags = [
        CliFlag("--model", "model", short="-m"),
        CliFlag("--url", "url"),
        CliFlag("--launch", "launch", is_flag=True),
    ]
    assert in_app_terms("use --model tiny-random, or -m PATH", flags) == (
        "use model=tiny-random, or model=PATH; type it in the options field (ctrl+t)"
    )
    assert in_app_terms("start one (--launch) or give --url=http://h:1", flags) == (
        "start one (launch=true) or give url=http://h:1; type it in the options field (ctrl+t)"
    )
    assert in_app_terms("no flags --here", flags) == "no flags --here"


class Warner(StaticBackend):
    """Logs a warning while loading, as the transformers backend does for random weights."""

    name = "warner"

    def load(self) -> None:
        import logging

        logging.getLogger("policy_engine.test").warning("model 'x' has RANDOM weights")


def test_library_warnings_during_a_run_become_notices(tmp_path: Path) -> None:
    """The CLI prints library warnings on stderr, which the running app draws on."""
    from policy_engine.tui.app import create_app

    class Plugin:
        @hookimpl
        def register_backends(self, register):  # type: ignore[no-untyped-def]
            register(Warner)

    host = PluginHost()
    host.register(Plugin(), "warner-test")
    path = image(tmp_path)

    async def script(pilot: Pilot[None], app: Any) -> None:
        await pilot.press("f7")
        panel = app.query_one(TryPanel)
        panel.picker.configure("warner", "full", "")
        panel.query_one("#image", Input).value = str(path)
        await pilot.press("ctrl+r")
        await until(pilot, lambda: panel.last_decision is not None, "a decision")
        await until(pilot, lambda: any(n.severity == "warning" for n in notices(app)), "the notice")
        warnings = [n for n in notices(app) if n.severity == "warning"]
        assert [n.message for n in warnings] == ["model 'x' has RANDOM weights"]

    app_drive(create_app("children-platform", folder=tmp_path, host=host), script)
