"""Library messages go through `logging` (loggers under `policy_engine`), so that embedders
route them where they want: serve into its JSON log, the TUI into its status line. The CLI
attaches one handler that prints them as `policy-engine: warning: …` lines on stderr."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from typing import TextIO

ROOT = "policy_engine"
THIRD_PARTY = r"(transformers|torch|torchvision|huggingface_hub|tokenizers|accelerate)(\.|$)"


class _Stderr(logging.StreamHandler[TextIO]):
    """Writes to whatever `sys.stderr` is when a record comes (click's test runner swaps it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"policy-engine: {record.levelname.lower()}: {record.getMessage()}"


def log_to_stderr(level: int = logging.INFO) -> None:
    """Print the library's messages on stderr, once per process (idempotent)."""
    logger = logging.getLogger(ROOT)
    if any(isinstance(h, _Stderr) for h in logger.handlers):
        return
    handler = _Stderr()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    # third-party deprecation notices are for developers, not for a CLI user's stderr
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY)


def detach_stderr() -> Callable[[], None]:
    """Take the CLI's stderr handler off (an embedder such as serve routes the records itself);
    returns the function that puts it back."""
    logger = logging.getLogger(ROOT)
    ours = [h for h in logger.handlers if isinstance(h, _Stderr)]
    for handler in ours:
        logger.removeHandler(handler)

    def restore() -> None:
        for handler in ours:
            logger.addHandler(handler)

    return restore
