"""What the policy means right now: compiled prompt, verdict schema, prompt diff, problems."""

from __future__ import annotations

import json

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.widgets import OptionList, Static, TextArea
from textual.widgets.option_list import Option

from policy_engine import Problem

from .analysis import Analysis


class ReadOnlyView(TextArea):
    """A scrollable, selectable, read-only text (copy with the mouse or ctrl+c)."""

    def __init__(self, *, language: str | None = None, id: str | None = None) -> None:
        super().__init__(read_only=True, soft_wrap=True, show_line_numbers=True, id=id)
        self.wanted_language = language

    def on_mount(self) -> None:
        if self.wanted_language in self.available_languages:
            self.language = self.wanted_language

    def show(self, text: str) -> None:
        if text != self.text:
            line = self.cursor_location[0]
            self.load_text(text)
            self.move_cursor((min(line, max(self.document.line_count - 1, 0)), 0))


class PromptView(ReadOnlyView):
    def update_from(self, analysis: Analysis) -> None:
        if analysis.compiled is not None:
            self.show(analysis.compiled.prompt)


class SchemaView(ReadOnlyView):
    def update_from(self, analysis: Analysis) -> None:
        if analysis.compiled is not None:
            self.show(json.dumps(analysis.compiled.schema, indent=2, ensure_ascii=False) + "\n")


class DiffView(VerticalScroll):
    """The prompt's diff against the last saved version, coloured by line."""

    def compose(self) -> ComposeResult:
        yield Static("", id="diff-text")

    def show(self, diff: str) -> None:
        text = Text()
        if not diff:
            text.append("The prompt is the same as in the saved file.", style="dim")
        for line in diff.splitlines():
            style = ""
            if line.startswith(("+++", "---")):
                style = "bold"
            elif line.startswith("+"):
                style = "green"
            elif line.startswith("-"):
                style = "red"
            elif line.startswith("@@"):
                style = "cyan"
            text.append(line + "\n", style=style)
        self.query_one("#diff-text", Static).update(text)


class ProblemsPanel(OptionList):
    """Validation problems; choosing one asks the app to jump to its line."""

    class Jump(Message):
        """Go to a line (1-based) and column (1-based) of the edited file."""

        def __init__(self, line: int, column: int) -> None:
            super().__init__()
            self.line, self.column = line, column

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.problems: list[Problem] = []
        self.file = ""

    def show(self, problems: list[Problem], file: str) -> None:
        self.problems, self.file = problems, file
        self.clear_options()
        for index, problem in enumerate(problems):
            self.add_option(Option(Content(_describe(problem, file)), id=str(index)))
        self.display = bool(problems)
        self.border_title = f"{len(problems)} problem{'s' if len(problems) != 1 else ''} (F9)"

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        problem = self.problems[int(event.option.id or 0)]
        if problem.file == self.file and problem.line:
            self.post_message(self.Jump(problem.line, problem.column))
        else:
            self.app.notify(
                f"This problem is in {problem.file}, not in the file you are editing.",
                severity="warning",
                markup=False,
            )


def _describe(problem: Problem, file: str) -> str:
    where = f"line {problem.line}" if problem.line else "file"
    if problem.file != file:
        where = f"{problem.file}:{problem.line}" if problem.line else problem.file
    path = f"{problem.path}: " if problem.path else ""
    return f"{where}: {path}{problem.message}"
