"""The library's warnings as the app's notices.

The CLI prints library messages (`logging`, loggers under `policy_engine`) on stderr; a running
Textual app draws on stderr and swallows them, so a warning such as "model 'tiny-random' has
RANDOM weights" would never be seen. `LogToApp` posts them to the app instead.
"""

from __future__ import annotations

import logging
from typing import Any

from textual.app import App
from textual.message import Message

LOGGER = "policy_engine"


class LibraryMessage(Message):
    """A warning (or error) the library logged."""

    def __init__(self, text: str, error: bool) -> None:
        super().__init__()
        self.text = text
        self.error = error


class LogToApp(logging.Handler):
    """Posts the library's warnings to `app` as `LibraryMessage`s while attached (`attach`,
    `detach`). Thread-safe: workers log too, and `post_message` is."""

    def __init__(self, app: App[Any]) -> None:
        super().__init__(logging.WARNING)
        self.app = app

    def attach(self) -> None:
        logging.getLogger(LOGGER).addHandler(self)

    def detach(self) -> None:
        logging.getLogger(LOGGER).removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a bad format string in someone's log call
            return
        self.app.post_message(LibraryMessage(text, record.levelno >= logging.ERROR))
