"""JSON lines only: every log record and stray stderr line of `policy-engine serve` in its log.

`JsonLogging(log)` is entered by the command for the life of the service, never at import nor
by `create_app` (an embedder's logging is its own business). While it is active:

- Python `logging`: the root logger has one handler, which writes each record through the
  `EventLog` as one JSON object (`time`, `level`, `event`, `logger`, `message`, and `traceback`
  when there is one). The project's own `policy_engine.*` loggers and uvicorn's log from INFO,
  third-party libraries (`transformers`, `httpx`, ...) from WARNING. `warnings.warn` is routed
  there too (`logging.captureWarnings`, logger `py.warnings`).
- Libraries that print on their own are switched to logging where a switch exists: progress bars
  off (`HF_HUB_DISABLE_PROGRESS_BARS` and `TQDM_DISABLE`, read when huggingface_hub, transformers
  and tqdm are imported, which the backend does later; transformers' `disable_progress_bar`), and
  transformers' own stderr handler replaced by propagation to the root logger. transformers is
  never imported for this: `quiet_libraries()` acts on it when it is already imported, and the
  service calls it again once the backend is loaded.
- The last resort: `sys.stderr` is a stand-in that turns each line written to it (a `print` to
  stderr, a library's own handler bound to it) into a JSON record of logger `stderr`, level
  `warning`; of a line redrawn with carriage returns (a progress bar), only the last state.

Everything goes through the `EventLog`'s lock, so lines from threads never interleave. Output
that bypasses Python's `sys.stderr` (a native library writing to file descriptor 2) cannot be
caught here. Leaving the context restores what it changed.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

from ..logs import detach_stderr
from .accesslog import EventLog

QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
VERBOSE_LOGGERS = ("policy_engine", "uvicorn")
"""Loggers shown from INFO; every other logger from WARNING."""


class JsonFormatter(logging.Formatter):
    """A logging record as one JSON line in the EventLog's shape.

    `event` is "server" for uvicorn's records (as the log always called them), "log" for
    every other logger.
    """

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": "server" if record.name.split(".")[0] == "uvicorn" else "log",
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["traceback"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=True, default=str, separators=(",", ":"))


class EventLogHandler(logging.Handler):
    """Writes records through an EventLog, as JSON lines."""

    def __init__(self, log: EventLog) -> None:
        super().__init__()
        self.log = log
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.log.write(line)


class StderrLines(io.TextIOBase):
    """A stand-in for `sys.stderr`: each complete line written becomes a JSON record."""

    def __init__(self, log: EventLog, real: TextIO) -> None:
        super().__init__()
        self.log = log
        self.real = real
        self._pending = ""
        self._lock = threading.Lock()
        self._inside = threading.local()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False  # nobody should draw on it

    def fileno(self) -> int:
        return self.real.fileno()  # for subprocesses and faulthandler: the real stream

    def write(self, text: str) -> int:
        if getattr(self._inside, "active", False):  # the log itself failed and reports it
            self.real.write(text)
            return len(text)
        with self._lock:
            *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        pass  # a partial line waits for its end (or for `drain`)

    def drain(self) -> None:
        """Log what is left of an unfinished line."""
        with self._lock:
            rest, self._pending = self._pending, ""
        self._emit(rest)

    def _emit(self, line: str) -> None:
        shown = line.rsplit("\r", 1)[-1].rstrip() or line.strip("\r").rstrip()
        if not shown.strip():
            return
        self._inside.active = True
        try:
            self.log.emit("log", level="warning", logger="stderr", message=shown)
        finally:
            self._inside.active = False


class JsonLogging:
    """Route logging, warnings, library output and stray stderr lines into `log` (a context
    manager; see the module docstring). `log` must write to a stream of its own (the real
    stderr), not to whatever `sys.stderr` is when it writes."""

    def __init__(self, log: EventLog) -> None:
        if log.stream is None:
            raise ValueError("JsonLogging needs an EventLog bound to a stream")
        self.log = log
        self._undo: list[Callable[[], object]] = []
        self._quieted: set[str] = set()
        self._lock = threading.Lock()

    def __enter__(self) -> JsonLogging:
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level

        def restore_root() -> None:
            root.handlers = handlers
            root.setLevel(level)

        root.handlers = [EventLogHandler(self.log)]
        root.setLevel(logging.WARNING)
        self._undo.append(restore_root)
        self._undo.append(detach_stderr())  # the CLI's plain-text handler: JSON lines only
        for name in VERBOSE_LOGGERS:
            logger = logging.getLogger(name)
            previous = logger.level
            logger.setLevel(logging.INFO)
            self._undo.append(functools.partial(logger.setLevel, previous))
        showwarning = warnings.showwarning
        logging.captureWarnings(True)
        if warnings.showwarning is not showwarning:  # not already captured by the embedder
            self._undo.append(functools.partial(logging.captureWarnings, False))
        for key, value in QUIET_ENV.items():
            if key not in os.environ:
                os.environ[key] = value
                self._undo.append(functools.partial(os.environ.pop, key, None))
        self.quiet_libraries()
        real = sys.stderr
        stand_in = StderrLines(self.log, real)

        def restore_stderr() -> None:
            stand_in.drain()
            sys.stderr = real

        sys.stderr = stand_in
        self._undo.append(restore_stderr)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        while self._undo:
            self._undo.pop()()

    def quiet_libraries(self) -> None:
        """Switch the already imported libraries that print on their own to logging; safe to
        call again (the service does once the backend is loaded) and from any thread."""
        with self._lock:
            hf = sys.modules.get("transformers.utils.logging")
            if hf is not None and "transformers" not in self._quieted:
                self._quieted.add("transformers")
                library = logging.getLogger("transformers")
                try:
                    hf.get_verbosity()  # sets up its handler if nothing did yet
                    handlers, propagate = library.handlers[:], library.propagate
                    progress = hf.is_progress_bar_enabled()
                    hf.disable_progress_bar()
                    hf.disable_default_handler()
                    hf.enable_propagation()
                except Exception as err:  # its API moved: its lines still reach the stand-in
                    logging.getLogger(__name__).warning(
                        "cannot route transformers' logging: %s: %s", type(err).__name__, err
                    )
                    return

                def restore() -> None:
                    library.handlers, library.propagate = handlers, propagate
                    if progress:
                        hf.enable_progress_bar()

                self._undo.append(restore)
