"""What `/readyz` knows: the cached health probe of a loaded backend, and the warm-up.

- `HealthProbe`: `Backend.health()` (None when the backend can answer now, else one line saying
  why not) run in a worker thread, one probe at a time, its answer reused for `ttl` seconds. An
  HTTP backend whose server stopped answering makes `/readyz` say 503 within about `ttl`
  seconds, without every readiness poll hitting the server.
- `warm_up`: one assessment per (policy, mode) the pool serves, on a small generated image,
  before the service says ready: the first real request then does not pay for the backend's
  first-call costs (kernels, grammar compilation, the server's prefix cache). It calls the
  backend directly, as the engine does, but never runs post-processors nor the decision
  observers: a warm-up verdict must not reach a decision log or a review queue.

Only the engine's modules and Pillow are imported here: no web framework.
"""

from __future__ import annotations

import asyncio
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ..types import Mode
from .pool import EnginePool

State = Literal["loading", "warming_up", "ready", "failed", "stopping"]
Status = State | Literal["unavailable"]
"""What /readyz says: a lifecycle state, or "unavailable" (ready, but the probe fails)."""
WARMUP_SIDE = 384  # pixels: one native tile of LlavaGuard's vision tower
_MAX_REASON = 300  # characters of a reason kept
PROBE_TIMEOUT = 10.0  # seconds a health probe may take before it counts as unhealthy


def one_line(text: str) -> str:
    """`text` on one line, shortened: reasons go to JSON logs and readiness answers."""
    line = " ".join(text.split())
    return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 3] + "..."


class HealthProbe:
    """`probe()` cached for `ttl` seconds, run off the event loop, one at a time.

    `reason` is the last answer (None: healthy, the state before the first probe).
    `on_change(reason)` is called when the answer changes (for the log). A probe that gives no
    answer within `timeout` seconds counts as unhealthy; it is not started again while it
    still runs (its thread cannot be stopped), so a hanging backend never piles up threads.
    """

    def __init__(
        self,
        probe: Callable[[], str | None],
        ttl: float,
        on_change: Callable[[str | None], None] | None = None,
        timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self.probe = probe
        self.ttl = ttl
        self.on_change = on_change
        self.timeout = timeout
        self.reason: str | None = None
        self.probes = 0  # how many probes were started (tests and logs)
        self._checked: float | None = None  # time.monotonic() of the last answer
        self._lock: asyncio.Lock | None = None
        self._running: asyncio.Task[str | None] | None = None

    def reset(self) -> None:
        """Forget the event loop and the cached answer (a new loop serves the app)."""
        self._lock = None
        self._running = None
        self._checked = None
        self.reason = None

    async def check(self) -> str | None:
        """The backend's health, probing when the cached answer is older than `ttl`."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # callers arriving during a probe share its answer
            if self._checked is not None and time.monotonic() - self._checked < self.ttl:
                return self.reason
            if self._running is None:
                self._running = asyncio.create_task(asyncio.to_thread(self.probe))
                self.probes += 1
            try:
                answer = await asyncio.wait_for(asyncio.shield(self._running), self.timeout)
            except TimeoutError:
                answer = f"the health probe gave no answer within {self.timeout:g} s"
            except Exception as err:  # a buggy probe must not break readiness
                answer = f"health probe failed: {type(err).__name__}: {err}"
            if self._running.done():
                self._running = None
            reason = None if answer is None else one_line(str(answer)) or "unhealthy"
            self._checked = time.monotonic()
            changed, self.reason = reason != self.reason, reason
        if changed and self.on_change is not None:
            self.on_change(reason)
        return reason


@dataclass(frozen=True)
class WarmupResult:
    """One warm-up assessment. `error` None: a valid verdict. `fault`: the backend could not
    answer (an exception, a failed generation, no score, no answer in time), so the service
    must not say ready; an answer that is not a valid verdict (`fault` False) is only logged."""

    policy: str
    mode: Mode
    seconds: float
    error: str | None = None
    fault: bool = False


def warmup_image(max_pixels: int) -> bytes:
    """A small PNG (mid-grey, at most `max_pixels` pixels) made with Pillow."""
    from PIL import Image

    side = max(1, min(WARMUP_SIDE, math.isqrt(max_pixels)))
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (128, 128, 128)).save(buffer, "PNG")
    return buffer.getvalue()


async def warm_up(
    pool: EnginePool,
    *,
    metadata: dict[str, Any],
    timeout: float,
    stopping: Callable[[], bool] = lambda: False,
) -> list[WarmupResult]:
    """Judge a generated image once per (loaded policy, mode the backend runs), in order.

    Stops at the first fault (the backend is not usable: more calls would only wait), and when
    `stopping()` says the service is shutting down.
    """
    image = warmup_image(pool.max_pixels)
    results: list[WarmupResult] = []
    for policy_id in pool.policies:
        for mode in pool.modes:
            if stopping():
                return results
            result = await _warm_one(pool, policy_id, mode, image, metadata, timeout)
            results.append(result)
            if result.fault:
                return results
    return results


async def _warm_one(
    pool: EnginePool,
    policy_id: str,
    mode: Mode,
    image: bytes,
    metadata: dict[str, Any],
    timeout: float,
) -> WarmupResult:
    engine = pool.engine(policy_id, mode)
    started = time.perf_counter()

    def done(error: str | None = None, fault: bool = False) -> WarmupResult:
        seconds = time.perf_counter() - started
        return WarmupResult(policy_id, mode, seconds, one_line(error) if error else None, fault)

    try:
        async with asyncio.timeout(timeout):
            # backend and parser only: no post-processor, observer or metric sees a warm-up
            verdict = await engine.awarm_up(image)
    except TimeoutError:
        return done(f"no answer within {timeout:g} s", fault=True)
    if verdict.error is None:
        return done()
    # an answer the parser rejects (random weights) is a warning; any other failure a fault
    return done(verdict.error.message, fault=verdict.error.kind != "output")
