"""Driving Textual apps in tests without pytest-asyncio: run a script, wait for a condition."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from textual.app import App
from textual.pilot import Pilot

A = TypeVar("A", bound=App[Any])


def drive(
    app: A, script: Callable[[Pilot[Any], A], Awaitable[None]], size: tuple[int, int] = (80, 24)
) -> None:
    """Run `script(pilot, app)` against the app in a headless terminal of `size`."""

    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await script(pilot, app)

    asyncio.run(main())


async def until(pilot: Pilot[Any], condition: Callable[[], bool], what: str) -> None:
    """Wait for `condition`, bounded generously at a minute (this is not a speed test)."""
    for _ in range(1200):
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"gave up waiting for {what}")
