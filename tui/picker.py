"""Choosing what to run: an image file (`ImagePicker`), a backend with its mode and options
(`BackendPicker`, giving a `BackendChoice`), and the `BackendCache` that keeps one loaded backend
across runs so that trying an image twice does not reload the model."""

from __future__ import annotations

import re
import shlex
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import click
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import DirectoryTree, Input, Label, Select

from policy_engine import Backend, CliFlag, Mode, PluginHost, PolicyEngineError, get_host
from policy_engine.cli import parse_pairs

MODES: tuple[str, ...] = get_args(Mode)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
DEFAULT_BACKEND = "static"
"""The backend the picker starts with: it answers offline, with no model and no set-up."""
DEFAULT_OPTIONS: dict[str, str] = {
    "transformers": "model=AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf",
    "sglang": "url=http://127.0.0.1:30000",
}
"""Options a backend starts with in the picker."""
HINTS: dict[str, str] = {
    "static": "static: a fixed answer, no model (offline). Set it: rating=Unsafe category=O2",
    "transformers": "model=HUB-ID or a checkpoint folder; offline without one: model=tiny-random",
    "sglang": "url=http://HOST:PORT of a running SGLang or OpenAI-compatible server",
}
"""One line under the picker: what the backend's options field takes."""
RANDOM_WEIGHTS = (
    "model={model} has RANDOM weights: its verdicts are meaningless (it tries the pipeline offline)"
)


def app_host(widget: Widget) -> PluginHost:
    """The app's plugin host (`app.host`), or the process-wide one."""
    host = getattr(widget.app, "host", None)
    return host if isinstance(host, PluginHost) else get_host()


def one_line(err: Exception) -> str:
    """An error as one line: the first of several (a policy's problems) and how many more."""
    lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    more = f" (+{len(lines) - 1} more)" if len(lines) > 1 else ""
    return lines[0] + more


def in_app_terms(message: str, flags: Iterable[CliFlag]) -> str:
    """A backend's message in the Try tab's terms: the command-line flags it suggests
    (`--model tiny-random`) become the options they set (`model=tiny-random`), which the
    options field takes."""
    changed = 0
    for flag in flags:
        names = "|".join(re.escape(n) for n in (flag.flag, flag.short) if n)
        pattern = rf"(?<![\w-])(?:{names})"
        if flag.is_flag:
            message, count = re.subn(rf"{pattern}(?![\w-])", f"{flag.option}=true", message)
        else:
            message, count = re.subn(
                rf"{pattern}(?:=|\s+)([^\s,;)]+)", rf"{flag.option}=\1", message
            )
        changed += count
    if changed:
        message += "; type it in the options field (ctrl+t)"
    return message


def random_weights_model(options: dict[str, Any]) -> str | None:
    """The model named in `options` when it is one of the tiny random-weight models."""
    model = options.get("model")
    return model if isinstance(model, str) and model.startswith("tiny-random") else None


def parse_options(text: str, what: str = "options") -> dict[str, Any]:
    """Space-separated KEY=VALUE pairs, values read as YAML like the CLI's `-o` (quotes group
    words: `rationale="two words"`). A bad pair raises PolicyEngineError naming `what`."""
    try:
        pairs = shlex.split(text)
    except ValueError as err:  # an unbalanced quote
        raise PolicyEngineError(f"{what}: {err}") from None
    try:
        values: dict[str, Any] = parse_pairs(tuple(pairs), what)
        return values
    except click.BadParameter as err:
        raise PolicyEngineError(f"{what}: {err.message}") from None


@dataclass(frozen=True)
class BackendChoice:
    """What to run images with: a backend name, a mode and the backend's options."""

    backend: str
    mode: str = "full"
    options: dict[str, Any] = field(default_factory=dict)


class BackendCache:
    """Keeps one backend instance (and its loaded weights) while (host, name, options) stay the
    same; a different choice replaces it, and the replaced one is closed once no run uses it.

    Thread-safe: workers lease from it. The owner calls `close()` when done (on app exit)."""

    def __init__(self, host: PluginHost | None = None) -> None:
        self.host = host
        """Resolves backend names when a lease names no host (default: the process-wide one)."""
        self._lock = threading.Lock()
        self._key: tuple[PluginHost, str, dict[str, Any]] | None = None
        self._backend: Backend | None = None
        self._users: dict[int, int] = {}  # id(backend) -> runs using it
        self._retired: list[Backend] = []  # replaced while in use: closed when released

    @property
    def current(self) -> Backend | None:
        return self._backend

    def holds(self, name: str, options: dict[str, Any], host: PluginHost | None = None) -> bool:
        """Whether a lease of this choice would reuse the backend already here."""
        host = host or self.host or get_host()
        with self._lock:
            return self._backend is not None and self._key == (host, name, options)

    @contextmanager
    def lease(
        self, name: str, options: dict[str, Any], host: PluginHost | None = None
    ) -> Iterator[Backend]:
        """The cached backend for this choice, loaded; a new one (closing the old) if the
        choice changed. Raises PolicyEngineError (unknown name, bad options, failed load)."""
        host = host or self.host or get_host()
        with self._lock:
            key = (host, name, options)
            if self._backend is None or self._key != key:
                backend = host.backend(name)(**options)  # validates options, loads nothing
                if self._backend is not None:
                    self._retire(self._backend)
                self._backend, self._key = backend, key
            backend = self._backend
            # Loading under the lock: a second run waits for the weights instead of loading
            # them twice.
            backend.ensure_loaded()
            self._users[id(backend)] = self._users.get(id(backend), 0) + 1
        try:
            yield backend
        finally:
            with self._lock:
                self._users[id(backend)] -= 1
                if not self._users[id(backend)]:
                    del self._users[id(backend)]
                    if backend in self._retired:
                        self._retired.remove(backend)
                        backend.close()

    def _retire(self, backend: Backend) -> None:
        if self._users.get(id(backend)):
            self._retired.append(backend)
        else:
            backend.close()

    def close(self) -> None:
        """Close the cached backend (one still in use by a run is closed when it ends)."""
        with self._lock:
            if self._backend is not None:
                self._retire(self._backend)
            self._backend = self._key = None


class BackendPicker(Widget):
    """Backend, mode and options on one compact row; under it, what the options field takes
    (or a random-weights warning), and a line for a bad option."""

    DEFAULT_CSS = """
    BackendPicker { height: auto; }
    BackendPicker > Horizontal { height: 1; }
    BackendPicker Label { padding: 0 1 0 0; }
    BackendPicker #backend { width: 18; margin: 0 1 0 0; }
    BackendPicker #mode { width: 12; margin: 0 1 0 0; }
    BackendPicker #options { width: 1fr; }
    BackendPicker #picker-hint { color: $text-muted; width: 100%; height: auto; }
    BackendPicker #picker-hint.-warning { color: $text-warning; text-style: bold; }
    BackendPicker #picker-error { color: $text-error; display: none; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._edited: dict[str, str] = {}  # options typed per backend, kept across switches

    def compose(self) -> ComposeResult:
        names = sorted(app_host(self).backends())
        default = DEFAULT_BACKEND if DEFAULT_BACKEND in names else (names[0] if names else None)
        with Horizontal():
            yield Label("Backend")
            yield Select(
                [(n, n) for n in names],
                value=default if default else Select.NULL,
                allow_blank=default is None,
                compact=True,
                id="backend",
            )
            yield Label("Mode")
            yield Select(
                [(m, m) for m in MODES], value="full", allow_blank=False, compact=True, id="mode"
            )
            yield Input(
                DEFAULT_OPTIONS.get(default or "", ""),
                placeholder="key=value …",
                compact=True,
                id="options",
            )
        yield Label("", id="picker-hint")
        yield Label("", id="picker-error")

    def on_mount(self) -> None:
        self._show_hint()

    def _show_hint(self) -> None:
        """The line under the row: what this backend's options take, or, for a model with
        random weights, that its verdicts mean nothing."""
        backend = self.query_one("#backend", Select).value
        name = "" if backend is Select.NULL else str(backend)
        try:
            model = random_weights_model(parse_options(self.query_one("#options", Input).value))
        except PolicyEngineError:
            model = None
        if model is not None:
            text = RANDOM_WEIGHTS.format(model=model)
        elif name in HINTS:
            text = HINTS[name]
        else:
            try:
                text = f"{name}: {app_host(self).backend(name).description}" if name else ""
            except PolicyEngineError:
                text = ""
        hint = self.query_one("#picker-hint", Label)
        hint.update(Content(text))
        hint.set_class(model is not None, "-warning")

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id != "backend":
            return
        event.stop()
        name = str(event.value)
        self.query_one("#options", Input).value = self._edited.get(
            name, DEFAULT_OPTIONS.get(name, "")
        )
        self._show_hint()

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        backend = self.query_one("#backend", Select).value
        if backend is not Select.NULL:
            self._edited[str(backend)] = event.value
        error = self.query_one("#picker-error", Label)
        try:
            parse_options(event.value)
            error.update("")
        except PolicyEngineError as err:
            error.update(Content(one_line(err)))
        error.display = bool(error.content)
        self._show_hint()

    def configure(self, backend: str, mode: str = "full", options: str | None = None) -> None:
        """Set the form (e.g. from saved settings); `options` as typed, None: that backend's
        last typed or default options."""
        if options is not None:
            self._edited[backend] = options  # what the backend's Changed handler restores
        self.query_one("#backend", Select).value = backend
        self.query_one("#mode", Select).value = mode
        self.query_one("#options", Input).value = self._edited.get(
            backend, DEFAULT_OPTIONS.get(backend, "")
        )

    def choice(self) -> BackendChoice:
        """The current settings; PolicyEngineError for no or an unknown backend, a bad mode or
        a bad option pair."""
        backend = self.query_one("#backend", Select).value
        mode = self.query_one("#mode", Select).value
        if backend is Select.NULL:
            raise PolicyEngineError("no backend is installed")
        app_host(self).backend(str(backend))  # UnknownNameError lists the installed ones
        if mode not in MODES:
            raise PolicyEngineError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        options = parse_options(self.query_one("#options", Input).value)
        return BackendChoice(str(backend), str(mode), options)


class ImageTree(DirectoryTree):
    """A directory tree showing only folders and image files (hidden ones left out)."""

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [
            p
            for p in paths
            if not p.name.startswith(".") and (p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES)
        ]


class ImagePicker(ModalScreen[Path | None]):
    """Pick an image file: enter or a click picks it, backspace shows the parent folder,
    escape closes (dismisses with None)."""

    DEFAULT_CSS = """
    ImagePicker { align: center middle; }
    ImagePicker > Vertical {
        width: 90%; height: 80%; background: $panel; border: round $primary;
    }
    ImagePicker Label { padding: 0 1; color: $text-muted; }
    ImagePicker ImageTree { height: 1fr; }
    """
    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("backspace", "parent", "Parent folder"),
    ]

    def __init__(self, start: Path) -> None:
        super().__init__()
        self.start = start

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self._title(self.start))
            yield ImageTree(self.start)

    @staticmethod
    def _title(folder: Path) -> Content:
        return Content(f"{folder}: enter picks an image, backspace goes up, esc closes")

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        event.stop()
        self.dismiss(event.path)

    def action_close(self) -> None:
        self.dismiss(None)

    def action_parent(self) -> None:
        tree = self.query_one(ImageTree)
        tree.path = Path(tree.path).parent
        self.query_one(Label).update(self._title(Path(tree.path)))
