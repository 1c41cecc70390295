"""What the routes share: `Service` holds the settings, the pool, the guards, the metrics and
the event log, and runs the service's life: load the backend, warm it up, say ready (or why
not), judge requests within their deadline and a concurrency slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from starlette.requests import Request

from ..audience import AudienceError
from ..engine import Engine
from ..engine import Item as EngineItem
from ..errors import PolicyEngineError
from ..types import Mode
from ..verdict import Decision
from .accesslog import EventLog
from .batching import Batcher, batches_across_requests
from .context import request_context
from .errors import ApiError
from .limits import Limiter, Saturated, busy
from .metrics import ServiceMetrics
from .pool import EnginePool, ModeUnavailableError
from .readiness import HealthProbe, State, Status, warm_up
from .settings import ServeSettings


class Service:
    """What the routes share: settings, the pool, guards, metrics, the event log."""

    def __init__(
        self,
        settings: ServeSettings,
        pool: EnginePool,
        log: EventLog,
        on_load_error: Callable[[str], None] | None,
        on_loaded: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.log = log
        self.on_load_error = on_load_error
        self.on_loaded = on_loaded
        self.state: State = "loading"
        self.error: str | None = None  # why the state is "failed"
        self.limiter = Limiter(settings.max_concurrency, settings.max_queue)
        self.health = HealthProbe(pool.backend.health, settings.health_cache, self._health_changed)
        self.batchers: dict[tuple[str, ...], Batcher | None] = {}
        self.metrics = ServiceMetrics(
            in_flight=lambda: self.limiter.running,
            queued=lambda: self.limiter.waiting,
            images_in_flight=lambda: self.limiter.images_running,
            images_queued=lambda: self.limiter.images_waiting,
            ready=lambda: 1 if self.state == "ready" and self.health.reason is None else 0,
        )

    async def load(self) -> None:
        """Load the backend, warm it up, then say ready (or why not)."""
        backend = self.pool.backend.name
        self.log.emit("backend_loading", backend=backend)
        try:
            await asyncio.to_thread(self._load)
        except Exception as err:
            message = self.pool.error or f"{type(err).__name__}: {err}"
            self._fail(message)
            self.log.emit("backend_failed", level="error", backend=backend, error=message)
            if self.on_load_error is not None:
                self.on_load_error(message)
            return
        if self.settings.warmup and self.state == "loading":
            self.state = "warming_up"
            if not await self.warm_up():
                return
        if self.state in ("loading", "warming_up"):  # not "stopping" meanwhile
            self.state = "ready"
            self.log.emit("ready", backend=backend, policies=list(self.pool.policies))

    def _load(self) -> None:
        self.pool.load()
        if self.on_loaded is not None:
            self.on_loaded()

    async def warm_up(self) -> bool:
        """One assessment per (policy, mode); False (and state "failed") after a fault."""
        started = time.perf_counter()
        results = await warm_up(
            self.pool,
            metadata=self.settings.default_metadata,
            timeout=self.settings.timeout,
            stopping=lambda: self.state == "stopping",
        )
        seconds = round(time.perf_counter() - started, 3)
        for result in results:
            if result.error is not None:
                self.log.emit(
                    "warmup_failed",
                    level="error" if result.fault else "warning",
                    policy=result.policy,
                    mode=result.mode,
                    fault=result.fault,
                    error=result.error,
                )
        fault = next((r for r in results if r.fault), None)
        failed = sum(1 for r in results if r.error is not None)
        self.log.emit(
            "warmup",
            level="error" if fault else "info",
            backend=self.pool.backend.name,
            seconds=seconds,
            assessments=len(results),
            failed=failed,
        )
        if fault is None:
            return True
        self._fail(f"warm-up ({fault.policy}, {fault.mode}): {fault.error}")
        return False

    def _fail(self, message: str) -> None:
        if self.state != "stopping":
            self.state = "failed"
        self.error = message

    def _health_changed(self, reason: str | None) -> None:
        backend = self.pool.backend.name
        if reason is None:
            self.log.emit("backend_healthy", backend=backend)
        else:
            self.log.emit("backend_unhealthy", level="warning", backend=backend, error=reason)

    async def readiness(self) -> tuple[Status, str | None]:
        """(status, reason) for /readyz: the lifecycle state, and once ready the health
        probe (cached for `settings.health_cache` seconds)."""
        if self.state != "ready":
            return self.state, self.error
        reason = await self.health.check()
        if reason is not None and self.state == "ready":
            return "unavailable", reason
        return self.state, None

    def engine(
        self, policy: str | None, mode: Mode | None, param: str, shadow: str | None = None
    ) -> Engine:
        """The engine for a request (with its shadow policy, if any); 404 for an unknown
        policy, 400 for an unusable mode."""
        policy_id = policy if policy is not None else self.pool.default
        if shadow is not None:
            try:
                self.pool.shadow_policy(shadow)
            except KeyError:
                known = ", ".join(self.pool.policies)
                where = param.rsplit(".", 1)[0] + ".shadow" if "." in param else "shadow"
                raise ApiError(
                    404,
                    "policy_not_found",
                    f"no policy {shadow!r} is loaded to run in shadow; policies: {known}",
                    param=where,
                ) from None
        try:
            return self.pool.engine(policy_id, mode, shadow)
        except KeyError:
            known = ", ".join(self.pool.policies)
            code = "model_not_found" if param == "model" else "policy_not_found"
            raise ApiError(
                404, code, f"no policy {policy_id!r} is loaded; policies: {known}", param=param
            ) from None
        except AudienceError as err:
            code = "model_not_found" if param == "model" else "policy_not_found"
            raise ApiError(404, code, err.message, param=param) from None
        except ModeUnavailableError as err:
            where = param.rsplit(".", 1)[0] + ".mode" if "." in param else "mode"
            raise ApiError(400, "mode_unavailable", err.message, param=where) from None
        except PolicyEngineError as err:
            raise ApiError(400, "invalid_request", err.message, param=param) from None

    def require_ready(self) -> None:
        if self.state == "ready":
            return
        self.metrics.reject("not_ready")
        if self.state == "failed":
            raise ApiError(503, "backend_unavailable", f"the backend failed: {self.error}")
        raise ApiError(
            503, "not_ready", f"the service is {self.state}", headers={"Retry-After": "5"}
        )

    async def judge(
        self, request: Request, groups: Sequence[tuple[Engine, list[EngineItem]]]
    ) -> list[list[Decision]]:
        """Judge each group with its engine, within slots for all its images (429 when they do
        not fit in the service) and the request's deadline (504 when it passes, while waiting
        or while judging)."""
        ctx = request_context(request.scope)
        loop = asyncio.get_running_loop()
        deadline = ctx.deadline if ctx else loop.time() + self.settings.timeout
        timer = asyncio.timeout_at(deadline)
        images = sum(len(items) for _, items in groups)
        try:
            async with timer, self.limiter.slot(images):
                started = time.perf_counter()
                results = await asyncio.gather(*(self._judge(e, items) for e, items in groups))
                seconds = time.perf_counter() - started
        except Saturated:
            self.metrics.reject("saturated")
            raise busy(self.limiter, images) from None
        except TimeoutError:
            if not timer.expired():
                raise
            self.metrics.reject("timeout")
            raise ApiError(
                504, "timeout", f"no answer within {self.settings.timeout:g} s"
            ) from None
        for (engine, _), decisions in zip(groups, results, strict=True):
            self.metrics.decisions(engine.policy.id, engine.mode, decisions, seconds)
        return results

    def batcher(self, engine: Engine) -> Batcher | None:
        """The engine's cross-request batcher, or None when its requests are not batched."""
        key: tuple[str, ...] = (engine.policy.id, engine.mode)
        if engine.shadow is not None:  # one batcher per engine: its shadow is part of it
            key += (engine.shadow.policy.id,)
        if key not in self.batchers:
            window = self.settings.batch_window_ms / 1000
            use = batches_across_requests(engine, window)
            self.batchers[key] = Batcher(engine, window) if use else None
        return self.batchers[key]

    async def _judge(self, engine: Engine, items: list[EngineItem]) -> list[Decision]:
        batcher = self.batcher(engine)
        if batcher is None:
            return await _collect(engine, items)
        return await batcher.judge(items)

    async def stop_batching(self) -> None:
        """Stop the batchers' collectors (at shutdown, after in-flight requests drained)."""
        for batcher in self.batchers.values():
            if batcher is not None:
                await batcher.close()

    def metadata(self, given: dict[str, Any]) -> dict[str, Any]:
        return {**self.settings.default_metadata, **given}


async def _collect(engine: Engine, items: list[EngineItem]) -> list[Decision]:
    stream = engine.aassess_many(items)
    try:
        return [decision async for decision in stream]
    finally:
        await stream.aclose()  # type: ignore[attr-defined]  # an async generator
