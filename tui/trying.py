"""The "Try" and "Tests" tabs: run one image, or the policy's own test cases, through the edited
policy with a chosen backend, in a worker thread, and show what the policy decided.

The app calls `set_policy(policy)` on both panels whenever the edited policy becomes valid (a
Policy) or invalid (None). Both panels share one `BackendCache`, so the model loads once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.content import Content
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Button, DataTable, Input, Label, LoadingIndicator
from textual.worker import get_current_worker

from policy_engine import (
    CaseResult,
    Decision,
    Engine,
    Mode,
    PluginHost,
    Policy,
    PolicyEngineError,
    run_policy_tests,
)

if TYPE_CHECKING:
    from policy_engine import PolicyTest

from .decisionview import DecisionView, render_decision
from .picker import (
    BackendCache,
    BackendChoice,
    BackendPicker,
    ImagePicker,
    app_host,
    in_app_terms,
    one_line,
    parse_options,
)

__all__ = [
    "BackendCache",
    "BackendChoice",
    "BackendPicker",
    "DecisionView",
    "ImagePicker",
    "TestPanel",
    "TryPanel",
    "render_decision",
]

Outcome = Any  # a result, or the PolicyEngineError that replaced it


class RunningPanel(Widget):
    """What both panels share: a policy, a backend cache, a status line with a spinner, and
    one cancellable run at a time (a worker thread)."""

    DEFAULT_CSS = """
    RunningPanel { height: 1fr; }
    RunningPanel .row { height: 1; }
    RunningPanel .status { height: auto; max-height: 5; }
    RunningPanel .status LoadingIndicator { width: 4; height: 1; min-height: 1; display: none; }
    RunningPanel .status Label { width: 1fr; height: auto; }
    RunningPanel.-running .status LoadingIndicator { display: block; }
    RunningPanel .status Label.-error { color: $text-error; }
    """
    WORKER_GROUP = "run"
    running: reactive[bool] = reactive(False, bindings=True)

    def __init__(
        self, cache: BackendCache | None, *, id: str | None = None, classes: str | None = None
    ) -> None:
        super().__init__(id=id, classes=classes)
        self._owns_cache = cache is None
        self.cache = cache if cache is not None else BackendCache()
        self.policy: Policy | None = None
        self._token = 0  # which run the UI waits for: a result of another run is stale
        self._lock = threading.Lock()
        self._backend: str | None = None  # the running (or last) run's backend
        self.discarded = 0
        """Results that came back after their run was cancelled, and were dropped."""

    def compose_status(self) -> ComposeResult:
        with Horizontal(classes="status"):
            yield LoadingIndicator()
            yield Label("", classes="status-text")

    @property
    def host(self) -> PluginHost:
        return app_host(self)

    @property
    def status(self) -> str:
        """The status line's text."""
        return str(self.query_one(".status-text", Label).content)

    def say(self, text: str, *, error: bool = False) -> None:
        label = self.query_one(".status-text", Label)
        label.update(Content(text))  # plain: paths and messages may hold [brackets]
        label.set_class(error, "-error")

    def watch_running(self, running: bool) -> None:
        self.set_class(running, "-running")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel":
            return self.running  # hidden, and escape left to others, when nothing runs
        if action == "run":
            return None if self.running else True
        return True

    def start(self, text: str, backend: str) -> int:
        self._token += 1
        self._backend = backend
        self.running = True
        self.say(text)
        return self._token

    def action_cancel(self) -> None:
        """Cancel the run: the UI forgets it at once. The backend call itself cannot be stopped
        (a Python thread cannot be killed): it finishes in the background and its result is
        dropped (the worker checks `is_cancelled`; the token catches the remaining race)."""
        if not self.running:
            return
        self.workers.cancel_group(self, self.WORKER_GROUP)
        self._token += 1
        self.running = False
        self.say("cancelled (the backend may still finish: its result is dropped)")

    def run_in_worker(self, token: int, job: Callable[[], Outcome]) -> None:
        """Called in the worker thread: do the job, hand the outcome to the UI unless cancelled."""
        try:
            outcome: Outcome = job()
        except PolicyEngineError as err:
            outcome = err
        except Exception as err:  # a plugin's bug: one line, not a crash of the app
            outcome = PolicyEngineError(f"{type(err).__name__}: {err}")
        if get_current_worker().is_cancelled:
            with self._lock:
                self.discarded += 1
            return
        self.app.call_from_thread(self._deliver, token, outcome)

    def _deliver(self, token: int, outcome: Outcome) -> None:
        if token != self._token:  # cancelled between the worker's check and this call
            with self._lock:
                self.discarded += 1
            return
        self.running = False
        if isinstance(outcome, PolicyEngineError):
            self.say(f"error: {self.in_app_terms(one_line(outcome))}", error=True)
        else:
            self.finish(outcome)

    def in_app_terms(self, message: str) -> str:
        """A message of the run's backend, its command-line flags turned into options."""
        try:
            flags = self.host.backend(self._backend).cli_flags if self._backend else ()
        except PolicyEngineError:
            flags = ()
        return in_app_terms(message, flags)

    def finish(self, outcome: Any) -> None:
        raise NotImplementedError

    def on_unmount(self) -> None:
        if self._owns_cache:
            self.cache.close()


class TryPanel(RunningPanel):
    """Try one image: path (typed or browsed), backend settings, the Decision in full."""

    DEFAULT_CSS = """
    TryPanel #image, TryPanel #metadata { width: 1fr; }
    TryPanel Button { min-width: 8; margin: 0 0 0 1; }
    """
    BINDINGS = [
        Binding("ctrl+r", "run", "Run"),
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+b", "browse", "Browse"),
        Binding("ctrl+t", "options", "Options"),
    ]
    WORKER_GROUP = "try"

    class Finished(Message):
        """A run ended with a Decision (not posted for an error or a cancelled run)."""

        def __init__(self, decision: Decision) -> None:
            super().__init__()
            self.decision = decision

    def __init__(
        self,
        cache: BackendCache | None = None,
        *,
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        """`cache`: shared with a TestPanel; without one the panel makes its own and closes
        it when removed. Otherwise the cache's owner closes it."""
        super().__init__(cache, id=id, classes=classes)
        self.picker = BackendPicker()
        self.last_decision: Decision | None = None

    def compose(self) -> ComposeResult:
        # Focus order: image, backend, mode, options, metadata (the buttons have keys:
        # ctrl+b, ctrl+r); ctrl+t jumps to the options.
        with Horizontal(classes="row"):
            yield Label("Image ")
            yield Input(placeholder="path to an image (ctrl+b browses)", compact=True, id="image")
            for button in (
                Button("Browse…", compact=True, id="browse"),
                Button("Run", compact=True, variant="primary", id="run"),
            ):
                button.can_focus = False
                yield button
        yield self.picker
        with Horizontal(classes="row"):
            yield Label("Meta  ")
            yield Input(
                placeholder="request metadata, as rules see it: key=value …",
                compact=True,
                id="metadata",
            )
        yield from self.compose_status()
        yield DecisionView(id="result")

    def on_mount(self) -> None:
        self.set_policy(self.policy)

    def choice(self) -> BackendChoice:
        """The picker's backend settings (for a TestPanel's `choice`)."""
        return self.picker.choice()

    def action_options(self) -> None:
        """Focus the backend's options field."""
        self.picker.query_one("#options", Input).focus()

    def set_policy(self, policy: Policy | None) -> None:
        self.policy = policy
        if self.is_mounted and not self.running:
            if policy is None:
                self.say("the policy has errors: fix them to try it", error=True)
            else:
                self.say(f"policy {policy.id}: ctrl+r runs the image through it")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "browse":
            self.action_browse()
        else:
            self.action_run()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()  # enter in any field runs
        self.action_run()

    def action_browse(self) -> None:
        typed = Path(self.query_one("#image", Input).value.strip()).expanduser()
        start = typed if typed.is_dir() else typed.parent
        if not str(typed).strip() or not start.is_dir():
            start = Path.cwd()

        def picked(path: Path | None) -> None:
            if path is not None:
                self.query_one("#image", Input).value = str(path)

        self.app.push_screen(ImagePicker(start.resolve()), picked)

    def action_run(self) -> None:
        if self.running:
            return
        policy = self.policy
        image = self.query_one("#image", Input).value.strip()
        path = Path(image).expanduser()
        try:
            if policy is None:
                raise PolicyEngineError("the policy has errors: fix them to try it")
            if not image:
                raise PolicyEngineError("no image: type a path or browse (ctrl+b)")
            if not path.is_file():
                raise PolicyEngineError(f"no such image file: {path}")
            metadata = parse_options(self.query_one("#metadata", Input).value, "metadata")
            choice = self.choice()
        except PolicyEngineError as err:
            self.say(f"error: {one_line(err)}", error=True)
            return
        what = f"assessing {path.name} with {choice.backend}"
        if not self.cache.holds(choice.backend, choice.options, self.host):
            what = f"loading {choice.backend}, then {what}"
        token = self.start(f"{what} … (esc cancels)", choice.backend)
        self._assess(token, policy, path, metadata, choice, self.host)

    @work(thread=True, exclusive=True, group="try")
    def _assess(
        self,
        token: int,
        policy: Policy,
        path: Path,
        metadata: dict[str, Any],
        choice: BackendChoice,
        host: PluginHost,
    ) -> None:
        def job() -> Decision:
            with self.cache.lease(choice.backend, choice.options, host) as backend:
                engine = Engine(policy, backend, mode=cast(Mode, choice.mode), host=host)
                return engine.assess(str(path), metadata=metadata)

        self.run_in_worker(token, job)

    def finish(self, outcome: Any) -> None:
        decision = cast(Decision, outcome)
        self.last_decision = decision
        self.query_one(DecisionView).show(decision)
        verdict = decision.verdict
        if verdict.error is not None:
            self.say(f"no verdict: {verdict.error.kind} error", error=True)
        else:
            self.say(f"done: {decision.rating} {decision.category_id}")
        self.post_message(self.Finished(decision))


class TestPanel(RunningPanel):
    """The policy's own test cases (`tests:`) in a table; ctrl+r runs them all."""

    __test__ = False  # a widget, not a pytest test class

    DEFAULT_CSS = """
    TestPanel #cases { height: 1fr; }
    TestPanel #no-tests { padding: 0 1; color: $text-muted; }
    TestPanel #detail { padding: 0 1; height: auto; max-height: 3; }
    """
    BINDINGS = [
        Binding("ctrl+r", "run", "Run tests"),
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+t", "app.backend_options", "Options"),  # in the Try tab
    ]
    WORKER_GROUP = "tests"
    COLUMNS = ("#", "case", "expected", "got", "result")

    class Finished(Message):
        """All cases ran; `results` in the policy's order."""

        def __init__(self, results: list[CaseResult]) -> None:
            super().__init__()
            self.results = results

    def __init__(
        self,
        cache: BackendCache | None,
        choice: Callable[[], BackendChoice],
        *,
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        """`cache`: the TryPanel's, so both tabs share the loaded model (None: a cache of its
        own, closed when the panel is removed); `choice`: the backend settings to run with (a
        TryPanel's `choice`), asked at each run."""
        super().__init__(cache, id=id, classes=classes)
        self.choice = choice
        self.results: list[CaseResult] = []

    def compose(self) -> ComposeResult:
        yield from self.compose_status()
        yield Label("", id="no-tests")
        yield DataTable(cursor_type="row", zebra_stripes=True, id="cases")
        yield Label("", id="detail")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        """Below the table, what the highlighted case got and why it failed, in full."""
        event.stop()
        done = {str(r.index): r for r in self.results}
        result = done.get(str(event.row_key.value))
        detail = ""
        if result is not None:
            detail = f"{result.index + 1}. {result.title}: "
            detail += "passed" if result.passed else "; ".join(result.failures)
        self.query_one("#detail", Label).update(Text(detail))

    def on_mount(self) -> None:
        self.query_one("#cases", DataTable).add_columns(*self.COLUMNS)
        self._show_policy()

    def set_policy(self, policy: Policy | None) -> None:
        if policy == self.policy:
            return  # the same policy again: keep the results
        self.policy = policy
        self.results = []
        if self.is_mounted:
            self._show_policy()

    def _show_policy(self) -> None:
        policy = self.policy
        cases = policy.tests if policy is not None else []
        self._fill(cases, [])
        note = self.query_one("#no-tests", Label)
        note.display = not cases
        if policy is None:
            note.update("The policy has errors: fix them to see and run its test cases.")
        elif not cases:
            note.update(
                "No test cases: add a `tests:` list to the policy, e.g. "
                "`- {image: cat.jpg, rating: Safe}` (docs/policies.md)."
            )
        if not self.running:
            self.say(f"{len(cases)} cases: ctrl+r runs them" if cases else "")

    def _fill(self, cases: list[PolicyTest], results: list[CaseResult]) -> None:
        """One row per case: expectations, and what came when `results` has the case."""
        table = self.query_one("#cases", DataTable)
        table.clear()
        table.display = bool(cases)
        self.query_one("#detail", Label).update("")
        done = {r.index: r for r in results}
        for index, case in enumerate(cases):
            got = result = ""
            if index in done:
                got, result = _outcome(done[index])
            title = case.name or _case_source(case)
            expected = _describe(case.rating, case.category, case.actions)
            cells = (str(index + 1), title, expected, got, result)
            # rich Text: plain (a str cell is markup) and measured for the column widths
            table.add_row(*(Text(cell) for cell in cells), key=str(index))

    def action_run(self) -> None:
        if self.running:
            return
        policy = self.policy
        try:
            if policy is None:
                raise PolicyEngineError("the policy has errors: fix them to run its tests")
            if not policy.tests:
                raise PolicyEngineError("the policy has no test cases")
            choice = self.choice()
        except PolicyEngineError as err:
            self.say(f"error: {one_line(err)}", error=True)
            return
        count = len(policy.tests)
        token = self.start(
            f"running {count} cases with {choice.backend} … (esc cancels)", choice.backend
        )
        self._run_tests(token, policy, choice, self.host)

    @work(thread=True, exclusive=True, group="tests")
    def _run_tests(
        self, token: int, policy: Policy, choice: BackendChoice, host: PluginHost
    ) -> None:
        def job() -> list[CaseResult]:
            with self.cache.lease(choice.backend, choice.options, host) as backend:
                engine = Engine(policy, backend, mode=cast(Mode, choice.mode), host=host)
                return run_policy_tests(engine)

        self.run_in_worker(token, job)

    def finish(self, outcome: Any) -> None:
        results = cast(list[CaseResult], outcome)
        self.results = results
        self._fill([r.case for r in results], results)  # the cases that ran, whatever came since
        failed = sum(not r.passed for r in results)
        self.say(f"{len(results) - failed} passed, {failed} failed", error=bool(failed))
        self.post_message(self.Finished(results))


def _outcome(result: CaseResult) -> tuple[str, str]:
    """A case's (got, result) cells."""
    decision = result.decision
    verdict = decision.verdict
    if verdict.error is not None:
        got = f"{verdict.error.kind} error"
    else:
        got = _describe(decision.rating, decision.category_id, [a.name for a in decision.actions])
    return got, "pass" if result.passed else "FAIL: " + "; ".join(result.failures)


def _describe(rating: str | None, category: str | None, actions: list[str] | None) -> str:
    parts = [p for p in (rating, category) if p]
    if actions is not None:
        parts.append("[" + ", ".join(sorted(actions)) + "]")
    return " ".join(parts) or "-"


def _case_source(case: PolicyTest) -> str:
    """What a case judges: its image, or the verdict it assumes."""
    if case.image is None:
        given = case.given
        return f"given {given.rating} {given.category or ''}".rstrip() if given else "?"
    return case.image if not case.image.startswith("data:") else "data:…"
