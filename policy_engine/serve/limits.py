"""The service's guards: API keys, body size, admission and concurrency.

`GuardMiddleware` runs before any body is read:

1. API keys: when keys are configured, everything but `/healthz` and `/readyz` needs
   `Authorization: Bearer <key>` (compared in constant time); otherwise 401. Unknown paths are
   no exception, so they cannot be probed without a key.
2. Body size: a declared Content-Length over the limit is refused at once (413); a body that
   grows past it while being read (chunked) is cut off with 413 as well.
3. Admission: assessment requests are admitted while fewer than `max_concurrency + max_queue`
   are in the service; beyond that 429 with Retry-After, before the body is read, so a burst
   cannot make the service hold more bodies than it will work on. An admitted request then
   waits for one of `max_concurrency` slots (`Limiter.slot`) to be assessed.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .context import request_context
from .errors import ApiError, error_response
from .metrics import ServiceMetrics

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class Limiter:
    """Admission (`try_admit`/`leave`) and concurrency (`slot`) of assessment requests."""

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        self.max_concurrency = max_concurrency
        self.capacity = max_concurrency + max_queue
        self.admitted = 0
        self.running = 0
        self._semaphore: asyncio.Semaphore | None = None
        self._average: float | None = None  # moving average of seconds per slot

    @property
    def waiting(self) -> int:
        return max(0, self.admitted - self.running)

    def reset(self) -> None:
        """Forget the event loop (a new one serves the app: tests start several)."""
        self._semaphore = None

    def try_admit(self) -> bool:
        if self.admitted >= self.capacity:
            return False
        self.admitted += 1
        return True

    def leave(self) -> None:
        self.admitted -= 1

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        semaphore = self._semaphore
        await semaphore.acquire()
        self.running += 1
        started = time.perf_counter()
        try:
            yield
        finally:
            self.running -= 1
            semaphore.release()
            seconds = time.perf_counter() - started
            previous = self._average
            self._average = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the usual time per request times the waves of
        requests ahead (1 to 60)."""
        average = self._average if self._average is not None else 1.0
        waves = max(1.0, self.admitted / self.max_concurrency)
        return max(1, min(60, math.ceil(average * waves)))


def bearer_ok(scope: Scope, keys: tuple[bytes, ...]) -> bool:
    """Whether the request carries `Authorization: Bearer <one of keys>`."""
    value = b""
    for name, raw in scope.get("headers", ()):
        if name.lower() == b"authorization":
            value = bytes(raw)
            break
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return False
    token = token.strip()
    matched = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        matched |= hmac.compare_digest(token, key)
    return matched


def _content_length(scope: Scope) -> int | None:
    for name, raw in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(raw)
            except ValueError:
                return None
    return None


class GuardMiddleware:
    """Keys, body size and admission (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: tuple[str, ...],
        max_body_bytes: int,
        limiter: Limiter,
        metrics: ServiceMetrics,
        admitted: Callable[[str, str], bool],
    ) -> None:
        self.app = app
        self.keys = tuple(key.encode() for key in api_keys)
        self.max_body = max_body_bytes
        self.limiter = limiter
        self.metrics = metrics
        self.admitted = admitted

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        error: ApiError,
        reason: str,
    ) -> None:
        self.metrics.reject(reason)
        ctx = request_context(scope)
        response = error_response(
            error.status_code,
            error.code,
            error.message,
            request_id=ctx.request_id if ctx else None,
            headers=error.headers,
        )
        await response(scope, receive, send)

    def _too_large(self) -> ApiError:
        mb = self.max_body / (1024 * 1024)
        return ApiError(
            413, "request_too_large", f"the request body is larger than the limit of {mb:g} MB"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if self.keys and path not in OPEN_PATHS and not bearer_ok(scope, self.keys):
            error = ApiError(
                401,
                "invalid_api_key",
                "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await self._refuse(scope, receive, send, error, "unauthorized")
            return
        length = _content_length(scope)
        if length is not None and length > self.max_body:
            await self._refuse(scope, receive, send, self._too_large(), "too_large")
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    self.metrics.reject("too_large")
                    raise self._too_large()
            return message

        if not self.admitted(scope.get("method", ""), path):
            await self.app(scope, limited_receive, send)
            return
        if not self.limiter.try_admit():
            retry = self.limiter.retry_after()
            error = ApiError(
                429,
                "server_busy",
                f"the service is at capacity; retry in {retry} s",
                headers={"Retry-After": str(retry)},
            )
            await self._refuse(scope, receive, send, error, "saturated")
            return
        try:
            await self.app(scope, limited_receive, send)
        finally:
            self.limiter.leave()
