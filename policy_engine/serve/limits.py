"""The service's guards: API keys, body size, admission and concurrency.

`GuardMiddleware` runs before any body is read:

1. API keys: when keys are configured, everything but `/healthz` and `/readyz` needs
   `Authorization: Bearer <key>` (compared in constant time); otherwise 401. Unknown paths are
   no exception, so they cannot be probed without a key.
2. Body size: a declared Content-Length over the limit is refused at once (413); a body that
   grows past it while being read (chunked) is cut off with 413 as well.
3. Admission: the limits count images. Before its body is read, an assessment request counts
   as one image (it holds at least one) and is admitted while fewer than `max_concurrency +
   max_queue` images are in the service; beyond that 429 with Retry-After, so a burst cannot
   make the service hold more bodies than it will work on. Once its body is read and its
   images are known, `Limiter.slot(images)` counts the rest of them: a request whose images
   no longer fit is refused with the same 429 (a request alone in the service always fits),
   and an admitted one waits, first come first served, until `max_concurrency` images' worth
   of slots are free for it (all of them, for a request with more images than that).
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .context import request_context
from .errors import ApiError, error_response
from .metrics import ServiceMetrics

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class Saturated(Exception):
    """The request's images do not fit in the service now (answered 429)."""


class _Units:
    """A first-come-first-served weighted semaphore: `acquire(n)` waits for n free units."""

    def __init__(self, total: int) -> None:
        self.free = total
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, units: int) -> None:
        if not self._waiters and self.free >= units:
            self.free -= units
            return
        future = asyncio.get_running_loop().create_future()
        entry = (units, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:  # cancelled (deadline, client gone) while waiting or just after
            if future.done() and not future.cancelled():
                self.release(units)  # granted an instant too late: hand the units on
            else:
                self._waiters.remove(entry)
                self._wake()  # a large request at the head may have held others back
            raise

    def release(self, units: int) -> None:
        self.free += units
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.free >= self._waiters[0][0]:
            units, future = self._waiters.popleft()
            if future.done():
                continue
            self.free -= units
            future.set_result(None)


class Limiter:
    """Admission (`try_admit`/`leave`, per request) and concurrency (`slot`, per image)."""

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        self.max_concurrency = max_concurrency
        self.capacity = max_concurrency + max_queue  # images in the service
        self.admitted = 0  # requests in the service
        self.running = 0  # requests being assessed
        self.images = 0  # images in the service (a request not yet read counts one)
        self.images_running = 0  # images being assessed
        self._units: _Units | None = None
        self._average: float | None = None  # moving average of seconds per slot

    @property
    def waiting(self) -> int:
        """Admitted requests not being assessed yet (waiting for slots or still sending)."""
        return max(0, self.admitted - self.running)

    @property
    def images_waiting(self) -> int:
        return max(0, self.images - self.images_running)

    def reset(self) -> None:
        """Forget the event loop (a new one serves the app: tests start several)."""
        self._units = None

    def try_admit(self) -> bool:
        """Admit a request whose body is not read yet: it counts as one image."""
        if self.images >= self.capacity:
            return False
        self.admitted += 1
        self.images += 1
        return True

    def leave(self) -> None:
        self.admitted -= 1
        self.images -= 1

    @asynccontextmanager
    async def slot(self, images: int = 1) -> AsyncIterator[None]:
        """Assess an admitted request's `images`: Saturated when the ones beyond the image it
        was admitted as do not fit, else wait for their slots (FIFO)."""
        extra = max(0, min(images, self.capacity) - 1)
        if extra and self.images + extra > self.capacity:
            raise Saturated
        if self._units is None:
            self._units = _Units(self.max_concurrency)
        units, weight = self._units, max(1, min(images, self.max_concurrency))
        self.images += extra
        try:
            await units.acquire(weight)
            self.running += 1
            self.images_running += images
            started = time.perf_counter()
            try:
                yield
            finally:
                self.running -= 1
                self.images_running -= images
                units.release(weight)
                seconds = time.perf_counter() - started
                previous = self._average
                self._average = seconds if previous is None else 0.8 * previous + 0.2 * seconds
        finally:
            self.images -= extra

    def retry_after(self) -> int:
        """Seconds until slots are likely free: the usual time per request times the waves of
        images ahead (1 to 60)."""
        average = self._average if self._average is not None else 1.0
        waves = max(1.0, self.images / self.max_concurrency)
        return max(1, min(60, math.ceil(average * waves)))


def busy(limiter: Limiter, images: int | None = None) -> ApiError:
    """The 429 of a saturated service, with Retry-After."""
    retry = limiter.retry_after()
    what = f"{images} images do not fit: " if images else ""
    return ApiError(
        429,
        "server_busy",
        f"{what}the service is at capacity; retry in {retry} s",
        headers={"Retry-After": str(retry)},
    )


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
            await self._refuse(scope, receive, send, busy(self.limiter), "saturated")
            return
        try:
            await self.app(scope, limited_receive, send)
        finally:
            self.limiter.leave()
