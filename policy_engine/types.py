"""Small types shared by the core and every kind of plugin."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Mode = Literal["full", "verdict", "score"]
"""What a backend is asked for: a whole answer, rating and category only, or P(Unsafe)."""
MODES: tuple[Mode, ...] = ("full", "verdict", "score")

RATINGS = ("Safe", "Unsafe")

Check = tuple[tuple[str | int, ...], str]
"""A semantic problem: (location relative to the checked object, message)."""


class NoParams(BaseModel):
    """Options or params for a plugin that takes none: any key is an error."""

    model_config = ConfigDict(extra="forbid")


def check_mode(mode: str) -> Mode:
    """`mode` as a Mode, or a PolicyEngineError listing the modes."""
    if mode not in MODES:
        from .errors import PolicyEngineError

        raise PolicyEngineError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
    return mode
