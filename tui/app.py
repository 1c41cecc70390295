"""The policy editor app: one App, its bindings and the flows between the panes.

`create_app()` builds it for the `tui` command and for the tests alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.timer import Timer
from textual.widgets import Footer, Header, Static, TabbedContent, TabPane, TextArea

from policy_engine import PluginHost, PolicyEngineError, at_level, get_host, split_level

from .analysis import Analysis, at_audience
from .categories import CategoriesPane, Edit
from .dialogs import (
    AddCategoryScreen,
    ConfirmScreen,
    HelpScreen,
    NewPolicyScreen,
    OpenScreen,
    SaveCopyScreen,
)
from .document import PolicyDocument
from .naming import default_copy, shipped_id_warning, start_for
from .notices import LibraryMessage, LogToApp
from .picker import BackendCache, BackendChoice
from .previews import DiffView, ProblemsPanel, PromptView, SchemaView
from .trying import TestPanel, TryPanel

ANALYSE_AFTER = 0.3  # seconds of quiet typing in the YAML before the views follow

TABS = {
    "f2": ("categories", "Categories"),
    "f3": ("yaml", "YAML"),
    "f4": ("prompt", "Prompt"),
    "f5": ("schema", "Schema"),
    "f6": ("diff", "Diff"),
    "f7": ("try", "Try"),
    "f8": ("tests", "Tests"),
}


class PolicyApp(App[None]):
    """Edit a policy file and see, as you type, what the model will be asked."""

    CSS_PATH = "app.tcss"
    TITLE = "policy-engine"
    # below 110 columns the category list sits above its editor instead of beside it
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    BINDINGS = [
        Binding("f1", "help", "Help"),
        Binding("ctrl+s", "save", "Save"),
        Binding("ctrl+o", "open", "Open"),
        Binding("ctrl+n", "new", "New"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("f9", "problems", "Problems", show=False),
        Binding("ctrl+t", "backend_options", "Backend options", show=False),
        *[
            # priority: the editors bind some function keys (TextArea: f6, f7)
            Binding(key, f"show_tab('{tab}')", label, show=False, priority=True)
            for key, (tab, label) in TABS.items()
        ],
    ]

    def __init__(
        self,
        document: PolicyDocument | None = None,
        *,
        folder: Path | None = None,
        start_new: tuple[Path | None, str | None] | None = None,
        host: PluginHost | None = None,
        notice: str | None = None,
        audience: str | None = None,
    ) -> None:
        super().__init__()
        self.notice = notice
        self.audience = audience  # `tui NAME@LEVEL`: previews at that audience level
        self.host = host or get_host()
        self.document = document
        self.folder = folder or Path.cwd()
        self.start_new = start_new
        self.cache = BackendCache(self.host)
        self._analyse_timer: Timer | None = None
        self._inherited: set[str] = set()
        self._log_handler = LogToApp(self)

    # -- layout ------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(id="tabs"):
            with TabPane("Categories", id="categories"):
                yield CategoriesPane(id="categories-pane")
            with TabPane("YAML", id="yaml"):
                yield TextArea.code_editor("", id="yaml-editor", soft_wrap=False)
            with TabPane("Prompt", id="prompt"):
                yield PromptView(id="prompt-view")
            with TabPane("Schema", id="schema"):
                yield SchemaView(id="schema-view")
            with TabPane("Diff", id="diff"):
                yield DiffView(id="diff-view")
            with TabPane("Try", id="try"):
                yield TryPanel(self.cache, id="try-panel")
            with TabPane("Tests", id="tests"):
                yield TestPanel(self.cache, self._choice, id="tests-panel")
        yield ProblemsPanel(id="problems")
        yield Static("", id="status")
        yield Footer()

    def _choice(self) -> BackendChoice:
        return self.query_one(TryPanel).choice()

    def on_mount(self) -> None:
        self._log_handler.attach()
        editor = self.query_one("#yaml-editor", TextArea)
        if "yaml" in editor.available_languages:  # tree-sitter-yaml installed
            editor.language = "yaml"
        if self.document is not None:
            self._load(self.document)
            if self.notice:
                self.notify(self.notice, timeout=12, markup=False)
        else:
            path, base = self.start_new or (None, None)
            self.call_after_refresh(self._ask_new, path, base)

    def on_unmount(self) -> None:
        self._log_handler.detach()

    @on(LibraryMessage)
    def _library_said(self, message: LibraryMessage) -> None:
        self.notify(
            message.text,
            severity="error" if message.error else "warning",
            timeout=10,
            markup=False,
        )

    # -- documents ---------------------------------------------------------------------------
    def _load(self, document: PolicyDocument) -> None:
        self.document = document
        editor = self.query_one("#yaml-editor", TextArea)
        with self.prevent(TextArea.Changed):
            editor.load_text(document.text)
        self._refresh()
        self.query_one("#category-table").focus()
        warning = shipped_id_warning(document)
        if warning is not None:
            self.notify(warning, severity="warning", timeout=10, markup=False)

    def _ask_new(self, path: Path | None = None, base: str | None = None) -> None:
        def created(result: tuple[str, str, Path] | None) -> None:
            if result is None:
                if self.document is None:
                    self.exit()
                return
            base, how, path = result
            if how == "open":
                self.action_open()
                return
            try:
                self._load(PolicyDocument.new_from(base, path, how, host=self.host))
            except PolicyEngineError as err:
                self.notify(str(err), severity="error", markup=False)
                return
            self.notify(f"New policy: saves to {path} (ctrl+s).", markup=False)

        self.push_screen(NewPolicyScreen(self.folder, path, base), created)

    def _refresh(self) -> None:
        """Bring every view up to date with the document's text."""
        document = self.document
        if document is None:
            return
        analysis = document.analysis
        parent = document.extends()
        self._inherited = document.inherited_ids()
        self.query_one(CategoriesPane).show(analysis.policy, self._inherited, parent)
        audience = at_audience(analysis, self.audience, self.host)
        self.query_one(PromptView).update_from(audience)
        self.query_one(SchemaView).update_from(audience)
        self.query_one(DiffView).show(document.prompt_diff())
        self.query_one(ProblemsPanel).show(
            analysis.problems or audience.problems, str(document.path)
        )
        self.query_one(TryPanel).set_policy(audience.policy if audience.ok else None)
        self.query_one(TestPanel).set_policy(audience.policy if audience.ok else None)
        self._show_status(audience)

    def _show_status(self, analysis: Analysis) -> None:
        self._show_title()
        status = self.query_one("#status", Static)
        if analysis.ok and analysis.policy is not None and analysis.compiled is not None:
            policy = analysis.policy
            exceptions = len(policy.exceptions)
            status.update(
                f"[green]✓ valid[/] · {policy.id} · {len(policy.categories)} categories · "
                f"{exceptions} exception{'s' if exceptions != 1 else ''} · "
                f"hash {analysis.compiled.hash[:12]}"
            )
        else:
            count = len(analysis.problems)
            status.update(
                f"[red]✗ {count} problem{'s' if count != 1 else ''}[/]: the views show the last "
                "valid version · F9 lists them"
            )

    def _show_title(self) -> None:
        """The file's name in the header (for a shipped policy's copy: that it is one), with
        a dot while there are unsaved changes."""
        document = self.document
        if document is not None:
            dirty = " ●" if document.dirty else ""
            if document.origin is not None:
                self.sub_title = f"{document.origin}: a copy (ctrl+s asks where){dirty}"
            else:
                self.sub_title = f"{document.path.name}{dirty}"

    # -- keeping text and views in sync -----------------------------------------------------
    @on(TextArea.Changed, "#yaml-editor")
    def _typed(self, event: TextArea.Changed) -> None:
        if self.document is None:
            return
        self.document.text = event.text_area.text
        self._show_title()
        if self._analyse_timer is not None:
            self._analyse_timer.stop()
        self._analyse_timer = self.set_timer(ANALYSE_AFTER, self._refresh)

    @on(CategoriesPane.Edit_)
    def _edit(self, message: CategoriesPane.Edit_) -> None:
        self.apply_edit(message.edit)

    def apply_edit(self, edit: Edit) -> bool:
        """Write a structured edit into the text; False (and a notice) when it cannot be."""
        document = self.document
        if document is None:
            return False
        try:
            edit.apply(document)
        except PolicyEngineError as err:
            self.notify(f"Cannot {edit.what}: {err}", severity="error", markup=False)
            self.query_one(CategoriesPane).revert()  # show what the file says, not the attempt
            return False
        self._set_editor_text(document.text)
        self._refresh()
        return True

    def _set_editor_text(self, text: str) -> None:
        """Replace only the part of the YAML editor that changed (keeps undo and the view)."""
        editor = self.query_one("#yaml-editor", TextArea)
        old = editor.text
        if old == text:
            return
        start = 0
        limit = min(len(old), len(text))
        while start < limit and old[start] == text[start]:
            start += 1
        end_old, end_new = len(old), len(text)
        while end_old > start and end_new > start and old[end_old - 1] == text[end_new - 1]:
            end_old, end_new = end_old - 1, end_new - 1

        def location(index: int) -> tuple[int, int]:
            row = old.count("\n", 0, index)
            return row, index - (old.rfind("\n", 0, index) + 1)

        with self.prevent(TextArea.Changed):
            editor.replace(text[start:end_new], location(start), location(end_old))

    def flush(self) -> None:
        """Apply edits still waiting for a pause in typing, and analyse typed YAML now."""
        for edit in self.query_one(CategoriesPane).take_pending():
            self.apply_edit(edit)
        if self._analyse_timer is not None:
            self._analyse_timer.stop()
            self._analyse_timer = None
            self._refresh()

    # -- actions -------------------------------------------------------------------------------
    def action_show_tab(self, tab: str) -> None:
        if len(self.screen_stack) > 1:
            return  # a dialog is open
        self.query_one(TabbedContent).active = tab
        target = {
            "categories": "#category-table",
            "yaml": "#yaml-editor",
            "prompt": "#prompt-view",
            "schema": "#schema-view",
            "diff": "#diff-view",
        }.get(tab)
        if target is not None:
            self.query_one(target).focus()
            return
        panel = self.query_one(f"#{tab}-panel")
        first = next((w for w in panel.query("*") if w.focusable), None)
        if first is not None:
            first.focus()

    def action_problems(self) -> None:
        panel = self.query_one(ProblemsPanel)
        if panel.problems:
            panel.focus()
            if panel.highlighted is None:
                panel.highlighted = 0
        else:
            self.notify("No problems: the policy is valid.", markup=False)

    @on(ProblemsPanel.Jump)
    def _jump(self, message: ProblemsPanel.Jump) -> None:
        self.query_one(TabbedContent).active = "yaml"
        editor = self.query_one("#yaml-editor", TextArea)
        editor.focus()
        editor.move_cursor((message.line - 1, max(message.column - 1, 0)), center=True)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_backend_options(self) -> None:
        """The Try tab's backend options, from anywhere (they serve the Tests tab too)."""
        if len(self.screen_stack) > 1:
            return  # a dialog is open
        self.query_one(TabbedContent).active = "try"
        self.query_one(TryPanel).action_options()

    def action_save(self) -> None:
        self.save_then(None)

    def save_then(self, then: Callable[[], object] | None) -> None:
        """Save, asking first what needs asking (a policy with problems, a file changed on
        disk, where a shipped policy's copy goes); `then()` after a successful save."""
        self.flush()
        document = self.document
        if document is None:
            return
        analysis = document.analysis

        def write() -> None:
            if self._save() and then is not None:
                then()

        def placed() -> None:
            if document.origin is not None:
                self._save_copy(document, then)
            elif document.changed_on_disk():
                self.push_screen(
                    ConfirmScreen(
                        f"{document.path} changed on disk since it was opened. Overwrite it?",
                        {"y": "Overwrite"},
                    ),
                    lambda answer: write() if answer == "y" else None,
                )
            else:
                write()

        if not analysis.ok:
            count = len(analysis.problems)
            self.push_screen(
                ConfirmScreen(
                    f"The policy has {count} problem{'s' if count != 1 else ''} and will not "
                    "load until fixed. Save anyway?",
                    {"y": "Save anyway"},
                ),
                lambda answer: placed() if answer == "y" else None,
            )
        else:
            placed()

    def _save_copy(self, document: PolicyDocument, then: Callable[[], object] | None) -> None:
        """Ask for the copy's own id and file (the full path shown), then write it there."""
        origin = document.origin
        if origin is None:
            return
        new_id, path = default_copy(origin, self.folder)

        def chosen(result: tuple[str, Path] | None) -> None:
            if result is None:
                return
            new_id, path = result
            try:
                document.save_as(path, new_id)
            except PolicyEngineError as err:
                self.notify(f"Not saved: {err}", severity="error", markup=False)
                return
            self._set_editor_text(document.text)  # the id line changed
            self.notify(f"Saved {path} (id {new_id})", markup=False)
            self._refresh()
            if then is not None:
                then()

        self.push_screen(SaveCopyScreen(origin, new_id, path, self.folder), chosen)

    def _save(self) -> bool:
        document = self.document
        if document is None:
            return False
        try:
            document.save()
        except PolicyEngineError as err:
            self.notify(str(err), severity="error", markup=False)
            return False
        self.notify(f"Saved {document.path}", markup=False)
        self._refresh()
        return True

    def _when_clean(self, then: Callable[[], object], doing: str) -> None:
        """Run `then()` now, or after the user decided what happens to unsaved changes."""
        self.flush()
        document = self.document
        if document is None or not document.dirty:
            then()
            return

        def answered(answer: str | None) -> None:
            if answer == "s":
                self.save_then(then)
            elif answer == "d":
                then()

        name = f"Your copy of {document.origin}" if document.origin else document.path.name
        self.push_screen(
            ConfirmScreen(
                f"{name} has unsaved changes. Save them before {doing}?",
                {"s": "Save", "d": "Discard"},
            ),
            answered,
        )

    async def action_quit(self) -> None:
        self._when_clean(self._close_and_exit, "quitting")

    def _close_and_exit(self) -> None:
        self.cache.close()
        self.exit()

    def action_open(self) -> None:
        def opened(path: Path | None) -> None:
            if path is None:
                if self.document is None:
                    self._ask_new()
                return
            try:
                self._load(PolicyDocument.open(path, host=self.host))
            except PolicyEngineError as err:
                self.notify(str(err), severity="error", markup=False)

        self._when_clean(lambda: self.push_screen(OpenScreen(self.folder), opened), "opening")

    def action_new(self) -> None:
        self._when_clean(self._ask_new, "starting a new policy")

    @on(CategoriesPane.AddRequested)
    def _add(self) -> None:
        document = self.document
        analysis = document.analysis if document is not None else None
        if analysis is None or analysis.policy is None:
            self.notify(
                "Fix the problems first: the category list is out of date.",
                severity="error",
                markup=False,
            )
            return
        policy = analysis.policy
        taken = {c.id for c in policy.categories}
        number = len(policy.categories) + 1
        while f"O{number}" in taken:
            number += 1

        def added(result: tuple[str, str, str] | None) -> None:
            if result is None:
                return
            category_id, name, severity = result
            if self.apply_edit(
                Edit(f"add {category_id}", lambda d: d.add_category(category_id, name, severity))
            ):
                pane = self.query_one(CategoriesPane)
                pane.selected = category_id
                self._refresh()
                self.query_one("#cat-should-not").focus()

        self.push_screen(AddCategoryScreen(f"O{number}", list(policy.severity_levels)), added)

    @on(CategoriesPane.RemoveRequested)
    def _remove(self, message: CategoriesPane.RemoveRequested) -> None:
        category_id = message.category_id
        note = " (inherited: written as `remove: true`)" if category_id in self._inherited else ""

        def answered(answer: str | None) -> None:
            if answer == "y":
                self.apply_edit(
                    Edit(f"remove {category_id}", lambda d: d.remove_category(category_id))
                )

        self.push_screen(
            ConfirmScreen(f"Remove category {category_id}{note}?", {"y": "Remove"}), answered
        )


def create_app(
    policy: str | Path | None = None,
    *,
    folder: Path | None = None,
    host: PluginHost | None = None,
) -> PolicyApp:
    """The app for a policy argument, by the naming rule (`naming.py`): a file to edit (a
    missing one: the New dialog for that path), a shipped policy's name (an unsaved copy of
    it, which saving puts under an id and file of your own), or nothing (the New dialog)."""
    folder = folder or Path.cwd()
    if policy is None:
        return PolicyApp(folder=folder, host=host)
    policy, audience = split_level(str(policy))  # NAME@LEVEL: edit NAME, preview at LEVEL
    start = start_for(policy, folder, host)
    if start.document is None:
        return PolicyApp(folder=start.folder, start_new=(start.new_path, None), host=host)
    analysis = start.document.analysis
    if audience is not None and analysis.policy is not None:
        at_level(analysis.policy, audience)  # an unknown level: one line, before the app runs
    return PolicyApp(
        start.document, folder=start.folder, host=host, notice=start.notice, audience=audience
    )
