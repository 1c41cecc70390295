"""Driving Textual apps in tests without pytest-asyncio: run a script, wait for a condition.

Textual's own `Pilot.press` and `Pilot.pause()` decide the app is done when the process stops
using CPU. On a loaded machine the process also stops using CPU while it waits for a core, so
they return with messages still queued: a key the app has not yet forwarded to the focused
widget, a focus change that key scheduled. The next key then lands on the wrong widget, or an
assertion reads the screen one message early. `SteadyPilot` waits for the app itself instead.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from textual.app import App
from textual.message_pump import MessagePump
from textual.pilot import Pilot

A = TypeVar("A", bound=App[Any])

# Hang guards, not speed limits: an app that crashed never runs the callbacks we queue.
IDLE_GIVE_UP = 300.0  # seconds
IDLE_ROUNDS = 10_000


def _pumps(app: App[Any]) -> list[MessagePump]:
    """The app and every node of every screen on its stack."""
    pumps: list[MessagePump] = [app]
    for screen in app.screen_stack:
        pumps.extend(screen.walk_children(with_self=True))
    return pumps


async def idle(pilot: Pilot[Any]) -> None:
    """Return once the app has handled every message it had, and every message those caused.

    Each round queues a callback behind the messages of every message pump (the app, its
    screens, their widgets) and waits until all of them ran: whatever a pump was handling or
    had queued is then done. The app is idle after two rounds in a row that found every queue
    empty before and after (the second round flushes a handler still awaiting at the end of
    the first). Timers (debounces, cursor blinks) are not messages: tests flush them explicitly.
    """
    app = pilot.app
    clean = 0
    for _ in range(IDLE_ROUNDS):
        pumps = _pumps(app)
        queued = any(pump.message_queue_size for pump in pumps)
        handled: list[asyncio.Event] = []
        for pump in pumps:
            event = asyncio.Event()
            if pump.call_later(event.set):
                handled.append(event)
        try:
            await asyncio.wait_for(
                asyncio.gather(*(event.wait() for event in handled)), IDLE_GIVE_UP
            )
        except TimeoutError:
            raise AssertionError("the app stopped handling messages") from None
        queued = queued or any(pump.message_queue_size for pump in _pumps(app))
        clean = 0 if queued else clean + 1
        if clean == 2:
            return
    raise AssertionError(f"the app was still busy after {IDLE_ROUNDS} rounds")


class SteadyPilot(Pilot[Any]):
    """A Pilot that, after each key and click, waits until the app handled it (`idle`)."""

    async def press(self, *keys: str) -> None:
        for key in keys:  # one at a time: a key may move the focus the next one goes to
            await super().press(key)
            await idle(self)

    async def click(self, *args: Any, **kwargs: Any) -> bool:
        clicked = await super().click(*args, **kwargs)
        await idle(self)
        return clicked

    async def pause(self, delay: float | None = None) -> None:
        await super().pause(delay)
        if delay is None:
            await idle(self)


def steady(
    script: Callable[[SteadyPilot], Awaitable[None]],
) -> Callable[[Pilot[Any]], Awaitable[None]]:
    """`script` as a snapshot test's `run_before`, driven by a `SteadyPilot`."""

    async def run_before(pilot: Pilot[Any]) -> None:
        steady_pilot = SteadyPilot(pilot.app)
        await idle(steady_pilot)
        await script(steady_pilot)

    return run_before


def drive(
    app: A, script: Callable[[Pilot[Any], A], Awaitable[None]], size: tuple[int, int] = (80, 24)
) -> None:
    """Run `script(pilot, app)` against the app in a headless terminal of `size`, with a
    `SteadyPilot`."""

    record_notices(app)

    async def main() -> None:
        async with app.run_test(size=size):
            pilot = SteadyPilot(app)
            await pilot.pause()
            await script(pilot, app)

    asyncio.run(main())


async def until(pilot: Pilot[Any], condition: Callable[[], bool], what: str) -> None:
    """Wait for `condition`, for things that come from a timer or a thread (a debounce, a
    worker): polled, bounded generously (this is not a speed test)."""
    for _ in range(1200):
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"gave up waiting for {what}")


@dataclass(frozen=True)
class Notice:
    message: str
    severity: str


_NOTICES: weakref.WeakKeyDictionary[App[Any], list[Notice]] = weakref.WeakKeyDictionary()


def notices(app: App[Any]) -> list[Notice]:
    """Every notice `app` showed while `drive` ran it (see `record_notices`)."""
    return _NOTICES[app]


def record_notices(app: App[Any]) -> list[Notice]:
    """Every notice `app` shows from now on (`drive` calls it before the app runs). The app's
    own list drops a notice once its display time runs out, by the wall clock, which a test on
    a loaded machine can outlast; this list keeps them all."""
    if app in _NOTICES:
        return _NOTICES[app]
    shown = _NOTICES[app] = []
    notify = app.notify

    def recording(message: str, *args: Any, **kwargs: Any) -> None:
        shown.append(Notice(str(message), str(kwargs.get("severity", "information"))))
        notify(message, *args, **kwargs)

    app.notify = recording  # type: ignore[method-assign]
    return shown
