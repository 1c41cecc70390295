"""Modal screens: confirm, help, new policy, save a shipped policy's copy, open file, add
category."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import (
    Button,
    DirectoryTree,
    Input,
    Label,
    Markdown,
    OptionList,
    RadioButton,
    RadioSet,
    Select,
    Static,
)
from textual.widgets.option_list import Option

from policy_engine import shipped_policies

from .naming import (
    copy_file_problem,
    copy_id_problem,
    display_path,
    resolve_path,
)

HELP = """\
# Policy editor: help

**Escape** closes this help. Everything works from the keyboard; the mouse works too.

## Getting started
1. **F2** shows the categories. Move with the arrows.
2. **x** cycles the selected category's exception: none, *non-violating* (anything of it is
   allowed), *sensitive* (nothing related is allowed, educational included). The cursor then
   jumps to **Reason**: type why. **Escape** returns to the list.
3. **F4** shows the prompt the model will see, **F6** how it changed since the last save.
4. **ctrl+s** saves. Your comments and layout are kept; only what you changed is written.
   A shipped policy is never changed: its copy is saved under an id and file of your own.
5. **F7** tries an image: type its path or **ctrl+b** to browse, **ctrl+r**. The `static`
   backend answers without a model; **ctrl+t** goes to the backend's options.

## Keys everywhere
- **F2** Categories · **F3** YAML · **F4** Prompt · **F5** Schema · **F6** Diff ·
  **F7** Try · **F8** Tests · **F9** problems list
- **ctrl+s** save (asks first when the policy has problems) · **ctrl+o** open a file ·
  **ctrl+n** new policy from a shipped one · **ctrl+q** quit (asks about unsaved changes) ·
  **ctrl+t** backend options (Try) · **F1** this help

## In the category list
- **enter** edit the selected category: name, severity, exception and reason, guidelines
  (one per line); **tab** moves between fields, **escape** goes back to the list
- **x** cycle the exception · **a** add a category · **delete** remove it ·
  **ctrl+up** / **ctrl+down** move it

An exception's **reason** is documentation for people: the LlavaGuard prompt formats leave it
out (the model reads only that the category is declared non-violating or sensitive); the
`generic` format shows it to the model. The note under the field says which applies.

In a policy that *extends* another, inherited categories say so; a change to one is written
as a small override in your file and the parent file is never touched.

## The other tabs
- **YAML**: the file itself, for everything else (post-processor rules, output options,
  tests). The other views follow what you type after a short pause.
- **Prompt**, **Schema**, **Diff**: what the model is asked, the JSON Schema its answer must
  satisfy, and the prompt's changes since the last save.
- **Problems** (under the tabs when there are any): **enter** on one jumps to its line.
- **Try**: an image, a backend, its options (`key=value`; **ctrl+t** jumps there) and a mode;
  **ctrl+r** runs, **escape** cancels. `static` (the default) gives a fixed answer without a
  model, e.g. `rating=Unsafe category=O2`; `transformers` takes `model=` a hub id or a
  checkpoint folder, and offline `model=tiny-random` (random weights: meaningless verdicts).
  **Tests** runs the policy's `tests:` cases with the same backend.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("f1", "dismiss", "Close", show=False),
        Binding("q", "dismiss", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body", classes="dialog"):
            yield Markdown(HELP)

    def action_dismiss(self, result: None = None) -> None:  # type: ignore[override]
        self.dismiss(None)


class ConfirmScreen(ModalScreen[str]):
    """A question with one-key answers: `choices` maps a key to its label; escape cancels
    (the result is "escape")."""

    def __init__(self, question: str, choices: dict[str, str]) -> None:
        super().__init__()
        self.question = question
        self.choices = choices

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog confirm"):
            yield Static(Content(self.question), classes="question")
            with Horizontal(classes="buttons"):
                for key, label in self.choices.items():
                    yield Button(Content(f"{label} [{key}]"), id=f"choice-{key}")
                yield Button(Content("Cancel [esc]"), id="choice-escape")

    def on_mount(self) -> None:
        self.query(Button).first().focus()

    def on_key(self, event: events.Key) -> None:
        if event.key in self.choices or event.key == "escape":
            event.stop()
            self.dismiss(event.key)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss((event.button.id or "choice-escape").removeprefix("choice-"))


class NewPolicyScreen(ModalScreen["tuple[str, str, Path] | None"]):
    """Start a policy from a shipped one: a copy (comments and all) or a file that extends it."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+o", "open_instead", "Open a file"),
    ]

    def __init__(self, folder: Path, path: Path | None = None, base: str | None = None) -> None:
        super().__init__()
        self.folder = folder
        self.path = path
        self.base = base

    def compose(self) -> ComposeResult:
        shipped = list(shipped_policies())
        with Vertical(classes="dialog", id="new-dialog"):
            yield Label("New policy: start from a shipped policy", classes="title")
            yield OptionList(*[Option(name, id=name) for name in shipped], id="new-base")
            with RadioSet(id="new-how"):
                yield RadioButton("extend it (small file, inherits updates)", value=True)
                yield RadioButton("copy it (whole file, comments included)")
            yield Label("Save as:")
            yield Input(str(self.path or ""), placeholder="my-policy.yaml", id="new-path")
            yield Static("", id="new-error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button(Content("Create [enter]"), variant="primary", id="new-create")
                yield Button(Content("Open a file… [ctrl+o]"), id="new-open")
                yield Button(Content("Cancel [esc]"), id="new-cancel")

    def on_mount(self) -> None:
        options = self.query_one("#new-base", OptionList)
        names = list(shipped_policies())
        options.highlighted = names.index(self.base) if self.base in names else 0
        options.focus()

    def _base(self) -> str | None:
        options = self.query_one("#new-base", OptionList)
        if options.highlighted is None:
            return None
        return options.get_option_at_index(options.highlighted).id

    @on(OptionList.OptionHighlighted, "#new-base")
    def _suggest_name(self, event: OptionList.OptionHighlighted) -> None:
        field = self.query_one("#new-path", Input)
        if self.path is None and (not field.value or field.value.startswith("my-")):
            field.value = f"my-{event.option.id}.yaml"

    @on(OptionList.OptionSelected, "#new-base")
    def _chosen(self) -> None:
        self.query_one("#new-how", RadioSet).focus()

    @on(Input.Submitted, "#new-path")
    @on(Button.Pressed, "#new-create")
    def action_create(self) -> None:
        base = self._base()
        raw = self.query_one("#new-path", Input).value.strip()
        error = self.query_one("#new-error", Static)
        if base is None:
            error.update("Pick a shipped policy to start from.")
            return
        if not raw:
            error.update("Give the new file a name, e.g. my-policy.yaml.")
            return
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = self.folder / path
        if path.suffix not in (".yaml", ".yml"):
            path = path.with_name(path.name + ".yaml")
        if path.exists():
            error.update(f"{raw} exists: open it with ctrl+o, or pick another name.")
            return
        if path.stem in shipped_policies():
            error.update(
                f"{path.name} is named like the shipped policy {path.stem!r}, and the new "
                "policy's id comes from the file name: pick another name."
            )
            return
        if not path.parent.is_dir():
            error.update(f"No folder {path.parent}.")
            return
        how = "extends" if self.query_one("#new-how", RadioSet).pressed_index == 0 else "copy"
        self.dismiss((base, how, path))

    @on(Button.Pressed, "#new-open")
    def action_open_instead(self) -> None:
        self.dismiss(("", "open", self.folder))

    @on(Button.Pressed, "#new-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class SaveCopyScreen(ModalScreen["tuple[str, Path] | None"]):
    """Where the copy of a shipped policy goes: an id of its own (never a shipped policy's
    name) and a file, whose full path is shown before anything is written; an existing file
    is replaced only after a second question. Dismisses with (id, path), or None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, origin: str, new_id: str, path: Path, folder: Path) -> None:
        super().__init__()
        self.origin = origin
        self.new_id = new_id
        self.path = path
        self.folder = folder
        self._following = display_path(path, folder)  # the file name follows the id until edited

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="copy-dialog"):
            yield Label(
                Content(f"Save your copy of the shipped policy {self.origin!r}"), classes="title"
            )
            yield Static(
                Content(
                    f"The shipped policy stays as it is, and `{self.origin}` keeps naming it. "
                    "Your copy gets an id of its own (decisions are stamped with it) and a file."
                ),
                classes="note",
            )
            yield Label("Id:")
            yield Input(self.new_id, id="copy-id")
            yield Label("File:")
            yield Input(self._following, id="copy-path")
            yield Static("", id="copy-where")
            yield Static("", id="copy-error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button(Content("Save [enter]"), variant="primary", id="copy-save")
                yield Button(Content("Cancel [esc]"), id="copy-cancel")

    def on_mount(self) -> None:
        self._show_where()
        self.query_one("#copy-id", Input).focus()

    def _target(self) -> Path:
        """The file the copy would be written to, in full (`.yaml` added when missing)."""
        raw = self.query_one("#copy-path", Input).value.strip()
        path = resolve_path(raw, self.folder)
        if raw and path.suffix not in (".yaml", ".yml"):
            path = path.with_name(path.name + ".yaml")
        return path

    def _show_where(self) -> None:
        where = self.query_one("#copy-where", Static)
        if not self.query_one("#copy-path", Input).value.strip():
            where.update("")
            return
        path = self._target()
        note = "  (exists: saving asks before replacing it)" if path.exists() else ""
        where.update(Content.assemble(("Saves to ", "$text-muted"), str(path), (note, "bold")))

    @on(Input.Changed, "#copy-id")
    def _id_typed(self, event: Input.Changed) -> None:
        field = self.query_one("#copy-path", Input)
        if field.value == self._following and event.value.strip():
            self._following = f"./{event.value.strip()}.yaml"
            field.value = self._following

    @on(Input.Changed, "#copy-path")
    def _path_typed(self) -> None:
        self._show_where()
        self.query_one("#copy-error", Static).update("")

    @on(Input.Submitted)
    @on(Button.Pressed, "#copy-save")
    def action_save(self) -> None:
        new_id = self.query_one("#copy-id", Input).value.strip()
        error = self.query_one("#copy-error", Static)
        if not self.query_one("#copy-path", Input).value.strip():
            error.update("Give the copy a file, e.g. ./my-platform.yaml.")
            return
        path = self._target()
        problem = copy_id_problem(new_id) or copy_file_problem(path)
        if problem is not None:
            error.update(Content(problem))
            return
        if not path.exists():
            self.dismiss((new_id, path))
            return

        def answered(answer: str | None) -> None:
            if answer == "y":
                self.dismiss((new_id, path))

        self.app.push_screen(
            ConfirmScreen(f"{path} exists. Replace it with this copy?", {"y": "Replace"}),
            answered,
        )

    @on(Button.Pressed, "#copy-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class _YamlTree(DirectoryTree):
    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [
            p
            for p in paths
            if not p.name.startswith(".") and (p.is_dir() or p.suffix in (".yaml", ".yml"))
        ]


class OpenScreen(ModalScreen["Path | None"]):
    """Open a policy file: type a path or pick one in the tree."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="open-dialog"):
            yield Label("Open a policy file (type a path, or pick one below)", classes="title")
            yield Input(placeholder="path/to/policy.yaml", id="open-path")
            yield _YamlTree(self.folder, id="open-tree")
            yield Static("", id="open-error", classes="error")

    def on_mount(self) -> None:
        self.query_one("#open-path", Input).focus()

    @on(Input.Submitted, "#open-path")
    def _typed(self, event: Input.Submitted) -> None:
        raw = event.value.strip()
        if not raw:
            self.query_one("#open-tree").focus()
            return
        path = Path(raw).expanduser()
        self._pick(path if path.is_absolute() else self.folder / path)

    @on(DirectoryTree.FileSelected)
    def _selected(self, event: DirectoryTree.FileSelected) -> None:
        self._pick(event.path)

    def _pick(self, path: Path) -> None:
        if not path.is_file():
            self.query_one("#open-error", Static).update(f"No file {path}.")
            return
        self.dismiss(path)

    def action_cancel(self) -> None:
        self.dismiss(None)


class AddCategoryScreen(ModalScreen["tuple[str, str, str] | None"]):
    """Ask for a new category's id, name and severity."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, suggested_id: str, severities: list[str]) -> None:
        super().__init__()
        self.suggested_id = suggested_id
        self.severities = severities

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="add-dialog"):
            yield Label("Add a category", classes="title")
            yield Label("Id (shown to the model):")
            yield Input(self.suggested_id, id="add-id")
            yield Label("Name:")
            yield Input(placeholder="e.g. Gambling", id="add-name")
            yield Label("Severity:")
            default = "medium" if "medium" in self.severities else self.severities[0]
            yield Select(
                [(s, s) for s in self.severities], value=default, allow_blank=False, id="add-sev"
            )
            yield Static("", id="add-error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button(Content("Add [enter]"), variant="primary", id="add-ok")
                yield Button(Content("Cancel [esc]"), id="add-cancel")

    def on_mount(self) -> None:
        self.query_one("#add-name", Input).focus()

    @on(Input.Submitted)
    @on(Button.Pressed, "#add-ok")
    def _ok(self) -> None:
        category_id = self.query_one("#add-id", Input).value.strip()
        name = self.query_one("#add-name", Input).value.strip()
        if not category_id or not name:
            self.query_one("#add-error", Static).update("Both an id and a name are needed.")
            return
        severity = self.query_one("#add-sev", Select).value
        self.dismiss((category_id, name, str(severity)))

    @on(Button.Pressed, "#add-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
