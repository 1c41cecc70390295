"""The Categories tab: the list of categories and an editor for the selected one.

The pane never writes YAML itself: every change is an `Edit` message carrying a function of
the document, which the app applies (and reports when the file cannot take it). Typing is
debounced; `flush()` applies what is pending, so a save or a quit never loses a keystroke.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.timer import Timer
from textual.widgets import DataTable, Input, Label, Select, Static, TextArea

from policy_engine import Policy

from .document import EXCEPTION_STATES, PolicyDocument
from .naming import reason_note
from .picker import app_host

DEBOUNCE = 0.4  # seconds of quiet typing before an edit is written
DEFAULT_SEVERITIES = ("low", "medium", "high", "critical")


@dataclass(frozen=True)
class Edit:
    """One structured change: `apply(document)` writes it; `what` names it for the user."""

    what: str
    apply: Callable[[PolicyDocument], str]
    category: str | None = None


class CategoryTable(DataTable[Text]):
    """The category list, with the keys that act on the highlighted category."""

    BINDINGS = [
        Binding("enter", "edit", "Edit"),
        Binding("x", "cycle_exception", "Exception"),
        Binding("a", "add", "Add"),
        Binding("delete", "remove", "Remove"),
        Binding("ctrl+up,alt+up", "move(-1)", "Up", show=False),
        Binding("ctrl+down,alt+down", "move(1)", "Down", show=False),
    ]

    def _pane(self) -> CategoriesPane:
        """The pane, its selection brought up to the cursor (a key may arrive before the
        highlight message that the cursor move posted)."""
        pane = self.query_ancestor(CategoriesPane)
        if self.row_count:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
            pane.select(key)
        return pane

    def action_edit(self) -> None:
        self._pane()
        self.screen.query_one("#cat-name", Input).focus()

    def action_cycle_exception(self) -> None:
        self._pane().cycle_exception()

    def action_add(self) -> None:
        self._pane().post_message(CategoriesPane.AddRequested())

    def action_remove(self) -> None:
        pane = self._pane()
        if pane.selected is not None:
            pane.post_message(CategoriesPane.RemoveRequested(pane.selected))

    def action_move(self, offset: int) -> None:
        pane = self._pane()
        if pane.selected is not None:
            category_id = pane.selected
            pane.post_message(
                CategoriesPane.Edit_(
                    Edit(
                        f"move {category_id}",
                        lambda doc: doc.move_category(category_id, offset),
                        category_id,
                    )
                )
            )


class CategoriesPane(Horizontal):
    """Category list (left) and the selected category's editor (right)."""

    BINDINGS = [Binding("escape", "back_to_list", "List", show=False)]

    class Edit_(Message):
        """Apply an Edit to the document."""

        def __init__(self, edit: Edit) -> None:
            super().__init__()
            self.edit = edit

    class AddRequested(Message):
        """The user asked to add a category."""

    class RemoveRequested(Message):
        """The user asked to remove a category."""

        def __init__(self, category_id: str) -> None:
            super().__init__()
            self.category_id = category_id

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.policy: Policy | None = None
        self.inherited: set[str] = set()
        self.parent_name: str | None = None
        self.selected: str | None = None
        self._pending: dict[str, tuple[Timer, Edit]] = {}

    def compose(self) -> ComposeResult:
        table = CategoryTable(id="category-table", cursor_type="row", zebra_stripes=True)
        yield table
        with VerticalScroll(id="category-editor"):
            yield Static("", id="cat-title")
            with Horizontal(classes="row"):
                yield Label("Name", classes="field-label")
                yield Input(id="cat-name", compact=True)
            with Horizontal(classes="row"):
                yield Label("Severity", classes="field-label")
                yield Select[str](
                    [(s, s) for s in DEFAULT_SEVERITIES],
                    id="cat-severity",
                    allow_blank=False,
                    compact=True,
                )
            with Horizontal(classes="row"):
                yield Label("Exception", classes="field-label")
                yield Select[str](
                    [(s, s) for s in EXCEPTION_STATES],
                    value="none",
                    allow_blank=False,
                    id="cat-exception",
                    compact=True,
                )
            with Horizontal(classes="row"):
                yield Label("Reason", classes="field-label")
                yield Input(
                    placeholder="why this context makes the exception",
                    id="cat-reason",
                    compact=True,
                )
            yield Static("", id="cat-reason-note")
            yield Label("Should not (one guideline per line)", classes="section")
            yield TextArea(id="cat-should-not", soft_wrap=True, tab_behavior="focus", compact=True)
            yield Label("Can (one guideline per line)", classes="section")
            yield TextArea(id="cat-can", soft_wrap=True, tab_behavior="focus", compact=True)

    def on_mount(self) -> None:
        table = self.query_one(CategoryTable)
        table.add_column("ID", key="id")
        table.add_column("Name", key="name")
        table.add_column("Severity", key="severity")
        table.add_column("Exception", key="exception")

    # -- showing a policy -------------------------------------------------------------------
    def show(self, policy: Policy | None, inherited: set[str], parent_name: str | None) -> None:
        """Show a (valid) policy; None keeps the last one on screen, marked as stale."""
        self.set_class(policy is None, "stale")
        if policy is None:
            return
        self.policy, self.inherited, self.parent_name = policy, inherited, parent_name
        table = self.query_one(CategoryTable)
        ids = [c.id for c in policy.categories]
        if self.selected not in ids:
            self.selected = ids[0] if ids else None
        with self.prevent(DataTable.RowHighlighted):
            table.clear()
            for category in policy.categories:
                exception = policy.exceptions.get(category.id)
                cells = (
                    category.id,
                    category.name,
                    category.severity,
                    exception.status.value if exception else "",
                )
                # Text, not str: a DataTable reads a str cell as markup ("[draft]" would vanish)
                table.add_row(*(Text(cell) for cell in cells), key=category.id)
            if self.selected is not None:
                table.move_cursor(row=ids.index(self.selected), animate=False)
        self._fill_editor()

    def _fill_editor(self) -> None:
        policy, category_id = self.policy, self.selected
        if policy is None or category_id is None:
            return
        category = policy.category(category_id)
        exception = policy.exceptions.get(category_id)
        title = Content.styled(category.label, "bold")
        if category_id in self.inherited:
            note = f"  (from {self.parent_name}; edits become overrides)"
            title = Content.assemble(title, (note, "$text-muted"))
        self.query_one("#cat-title", Static).update(title)
        focused = self.screen.focused
        with self.prevent(Input.Changed, Select.Changed, TextArea.Changed):
            self._set_input("#cat-name", category.name, focused)
            severity = self.query_one("#cat-severity", Select)
            severity.set_options([(s, s) for s in policy.severity_levels])
            severity.value = category.severity
            self.query_one("#cat-exception", Select).value = (
                exception.status.value if exception else "none"
            )
            self._set_input("#cat-reason", (exception.reason or "") if exception else "", focused)
            self.query_one("#cat-reason", Input).disabled = exception is None
            note = reason_note(policy.prompt_format, app_host(self))
            self.query_one("#cat-reason-note", Static).update(Content(note))
            for widget_id, lines in (
                ("#cat-should-not", category.should_not),
                ("#cat-can", category.can),
            ):
                area = self.query_one(widget_id, TextArea)
                text = "\n".join(lines)
                if area is not focused and area.text != text:
                    area.load_text(text)

    def revert(self) -> None:
        """Show the last valid policy's values again, after an edit the file refused."""
        self._fill_editor()

    def _set_input(self, selector: str, value: str, focused: object) -> None:
        field = self.query_one(selector, Input)
        if field is not focused and field.value != value:
            field.value = value

    # -- reacting to the user ------------------------------------------------------------------
    @on(DataTable.RowHighlighted, "#category-table")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.select(event.row_key.value)

    def select(self, category_id: str | None) -> None:
        """Edit another category (what was typed for the last one is written first)."""
        if category_id is not None and category_id != self.selected:
            self.flush()
            self.selected = category_id
            self._fill_editor()

    def action_back_to_list(self) -> None:
        self.flush()
        self.query_one(CategoryTable).focus()

    def _later(self, field: str, edit: Edit) -> None:
        """Apply `edit` after a pause in typing; a newer edit of the same field replaces it."""
        old = self._pending.pop(field, None)
        if old is not None:
            old[0].stop()
        timer = self.set_timer(DEBOUNCE, lambda: self._apply_pending(field))
        self._pending[field] = (timer, edit)

    def _apply_pending(self, field: str) -> None:
        entry = self._pending.pop(field, None)
        if entry is not None:
            entry[0].stop()
            self.post_message(self.Edit_(entry[1]))

    def take_pending(self) -> list[Edit]:
        """Stop the debounce timers and hand over the edits still waiting, in order, for the
        caller to apply now (a save or a quit never loses a keystroke)."""
        edits = []
        for field in list(self._pending):
            timer, edit = self._pending.pop(field)
            timer.stop()
            edits.append(edit)
        return edits

    def flush(self) -> None:
        """Write the edits still waiting (before another category is shown)."""
        for edit in self.take_pending():
            self.post_message(self.Edit_(edit))

    @on(Input.Changed, "#cat-name")
    def _name_typed(self, event: Input.Changed) -> None:
        category_id, name = self.selected, event.value
        if category_id is None or not name.strip():
            return
        self._later(
            "name",
            Edit(f"rename {category_id}", lambda d: d.rename(category_id, name), category_id),
        )

    @on(Select.Changed, "#cat-severity")
    def _severity_chosen(self, event: Select.Changed) -> None:
        category_id, value = self.selected, event.value
        if category_id is None or not isinstance(value, str):
            return
        self.post_message(
            self.Edit_(
                Edit(
                    f"set the severity of {category_id}",
                    lambda d: d.set_severity(category_id, value),
                    category_id,
                )
            )
        )

    def _exception_edit(self, status: str, reason: str) -> Edit | None:
        category_id = self.selected
        if category_id is None:
            return None
        return Edit(
            f"set the exception of {category_id}",
            lambda d: d.set_exception(category_id, status, reason),
            category_id,
        )

    @on(Select.Changed, "#cat-exception")
    def _exception_chosen(self, event: Select.Changed) -> None:
        status = str(event.value)
        reason_field = self.query_one("#cat-reason", Input)
        reason_field.disabled = status == "none"  # a reason explains an exception
        edit = self._exception_edit(status, reason_field.value)
        if edit is None:
            return
        self._pending.pop("reason", None)
        self.post_message(self.Edit_(edit))
        if status != "none" and not reason_field.value.strip() and event.select.has_focus:
            reason_field.focus()

    def cycle_exception(self) -> None:
        """none → non-violating → sensitive → none, for the selected category."""
        select = self.query_one("#cat-exception", Select)
        current = str(select.value)
        following = EXCEPTION_STATES[(EXCEPTION_STATES.index(current) + 1) % 3]
        select.value = following  # posts Select.Changed, which writes the edit
        if following != "none":
            # the reason comes next: type it, escape returns to the list (x again cycles on)
            reason = self.query_one("#cat-reason", Input)
            reason.disabled = False
            reason.focus()
            self.app.notify(
                f"{self.selected} is now {following}: type the reason, escape returns to the list.",
                timeout=4,
                markup=False,
            )

    @on(Input.Changed, "#cat-reason")
    def _reason_typed(self, event: Input.Changed) -> None:
        status = str(self.query_one("#cat-exception", Select).value)
        if status == "none":
            return
        edit = self._exception_edit(status, event.value)
        if edit is not None:
            self._later("reason", edit)

    @on(TextArea.Changed, "#cat-should-not")
    @on(TextArea.Changed, "#cat-can")
    def _guidelines_typed(self, event: TextArea.Changed) -> None:
        category_id = self.selected
        if category_id is None:
            return
        which = "should_not" if event.text_area.id == "cat-should-not" else "can"
        lines = event.text_area.text.splitlines()
        self._later(
            which,
            Edit(
                f"change the {which.replace('_', ' ')} guidelines of {category_id}",
                lambda d: d.set_guidelines(category_id, which, lines),
                category_id,
            ),
        )
