"""HTTP plumbing for server backends: one event loop in a thread, a pooled aiohttp session,
several endpoints, and POSTs retried within a deadline.

    client = HttpClient(["http://gpu-1:30000"], Settings(concurrency=64))
    client.open()                                   # loop thread, session, health check
    answer = client.run(client.post("/generate", body, parse))
    client.close()

Every POST holds one of `concurrency` slots while it is on the wire (not while it backs off).
Connect errors, timeouts, HTTP 408/429/5xx and replies that `parse` rejects (`BadReply`, or a
`ValueError` such as malformed JSON) are retried with exponential backoff and jitter; a 429's
Retry-After is honoured; no retry starts that would end past the request's deadline, counted
from its first attempt. A request that finally fails raises `Failed` with one line saying why.
GETs (the info routes a backend reads at start) retry the same faults with the same backoff and
return whatever else the server answered (`Reply`), so a caller can tell a 404 (not this kind
of server) from a fault. Messages name endpoints and paths, never headers: the API key stays out
of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from policy_engine import BackendError

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """How hard to try: the knobs a backend exposes as options."""

    concurrency: int = 64
    timeout: float = 120.0
    connect_timeout: float = 10.0
    deadline: float = 600.0
    retries: int = 5
    backoff: float = 0.5
    backoff_max: float = 20.0
    balance: str = "least-in-flight"
    api_key_env: str = "POLICY_ENGINE_SGLANG_API_KEY"
    server: str = "server"  # what to call the other side in messages ("SGLang server")


def normalize_url(url: str) -> str:
    """'http://host:30000/v1/' -> 'http://host:30000'; a bad URL is a ValueError."""
    url = url.strip()
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"{url!r} is not an http(s) URL")
    path = parsed.path.rstrip("/")
    path = path.removesuffix("/v1")
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


@dataclass
class Endpoint:
    url: str
    in_flight: int = 0
    down_until: float = 0.0
    failures: int = 0
    served: int = 0


class EndpointPool:
    """Picks the endpoint for the next attempt: least requests in flight (ties in turn) or
    round-robin, skipping endpoints that are resting after refused connections."""

    def __init__(self, urls: Sequence[str], balance: str) -> None:
        self.endpoints = [Endpoint(url) for url in urls]
        self.balance = balance
        self._turn = 0

    def pick(self) -> Endpoint:
        now = time.monotonic()
        up = [e for e in self.endpoints if e.down_until <= now]
        if not up:  # all resting: the one back soonest
            return min(self.endpoints, key=lambda e: e.down_until)
        self._turn += 1
        n = len(self.endpoints)
        order = {id(e): (i - self._turn) % n for i, e in enumerate(self.endpoints)}
        if self.balance == "round-robin":
            return min(up, key=lambda e: order[id(e)])
        return min(up, key=lambda e: (e.in_flight, order[id(e)]))

    @staticmethod
    def refused(endpoint: Endpoint) -> None:
        endpoint.failures += 1
        endpoint.down_until = time.monotonic() + min(30.0, 0.5 * 2 ** (endpoint.failures - 1))

    @staticmethod
    def answered(endpoint: Endpoint) -> None:
        endpoint.failures = 0
        endpoint.down_until = 0.0


# -- the I/O thread --------------------------------------------------------------------------
class IOThread:
    """An event loop in a daemon thread: the backend's HTTP runs here, whoever calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="policy-engine-sglang", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


class Failed(Exception):
    """A request that will not succeed: becomes this item's error. `status` is the HTTP status
    of the final answer (0: none came)."""

    def __init__(self, message: str, *, retryable: bool, status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status


class BadReply(Exception):
    """A reply whose content cannot be used (malformed JSON, wrong shape): worth a retry."""


class _Again(Exception):
    """An attempt that failed in a way another attempt may not (a 5xx, a bad reply)."""

    def __init__(self, problem: str, *, delay: float | None = None, status: int = 0) -> None:
        super().__init__(problem)
        self.problem = problem
        self.delay = delay
        self.status = status


@dataclass(frozen=True)
class Reply:
    """A GET's final answer: its status and JSON body (None when the body is not JSON)."""

    status: int
    body: Any
    url: str  # endpoint and path, for messages
    raw: bytes = b""

    def said(self) -> str:
        """The server's error message, if it gave one (': message')."""
        return server_message(self.raw)


class HttpClient:
    """A session to one or more endpoints of the same service, used from any thread."""

    def __init__(self, urls: Sequence[str], settings: Settings) -> None:
        self.settings = settings
        self.pool = EndpointPool(urls, settings.balance)
        self.io: IOThread | None = None
        self._session: Any = None
        self._semaphore: asyncio.Semaphore | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def open(self) -> None:
        """Start the loop thread and the session (aiohttp must be importable)."""
        self.io = IOThread()
        self.run(self._open())

    async def _open(self) -> None:
        import aiohttp

        opts = self.settings
        connector = aiohttp.TCPConnector(limit=opts.concurrency, limit_per_host=0)
        timeout = aiohttp.ClientTimeout(total=opts.timeout, sock_connect=opts.connect_timeout)
        headers = {"User-Agent": "policy-engine"}
        key = os.environ.get(opts.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=headers, raise_for_status=False
        )
        self._semaphore = asyncio.Semaphore(opts.concurrency)

    def close(self) -> None:
        io, self.io = self.io, None
        if io is None:
            return
        if self._session is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already gone
                io.run(self._session.close())
            self._session = None
        io.stop()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the client's loop and wait for it."""
        return self._io().run(coro)

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Start a coroutine on the client's loop."""
        return self._io().submit(coro)

    def _io(self) -> IOThread:
        if self.io is None:
            raise RuntimeError("the HTTP client is not open")
        return self.io

    # -- GETs ------------------------------------------------------------------------------
    async def healthy(self, endpoint: Endpoint, timeout: float | None = None) -> str | None:
        """None if `endpoint` answers /health with 200 within `timeout` seconds (default:
        connect_timeout + 5), else what is wrong."""
        import aiohttp

        seconds = self.settings.connect_timeout + 5 if timeout is None else timeout
        try:
            limit = aiohttp.ClientTimeout(total=seconds)
            async with self._session.get(endpoint.url + "/health", timeout=limit) as reply:
                await reply.read()
                return None if reply.status == 200 else f"HTTP {reply.status}"
        except (aiohttp.ClientError, TimeoutError) as err:
            return describe(err)

    async def probe(self, timeout: float) -> str | None:
        """None if at least one endpoint answers /health now, else one line saying why none
        does: a cheap check, nothing retried."""
        problems = await asyncio.gather(*(self.healthy(e, timeout) for e in self.pool.endpoints))
        if any(p is None for p in problems):
            return None
        pairs = zip(self.pool.endpoints, problems, strict=True)
        detail = "; ".join(f"{e.url}: {p}" for e, p in pairs)
        return f"no {self.settings.server} answers /health ({detail})"

    async def check_health(self) -> None:
        """Every endpoint's /health, tried again with the POSTs' backoff while none is healthy
        (a server still starting answers 503): none healthy in the end is a BackendError, a
        fault rather than a user's mistake. An unhealthy endpoint rests while others serve."""
        opts = self.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + opts.deadline
        attempt = 0
        while True:
            attempt += 1
            problems = await asyncio.gather(*(self.healthy(e) for e in self.pool.endpoints))
            down = [(e, p) for e, p in zip(self.pool.endpoints, problems, strict=True) if p]
            if len(down) < len(self.pool.endpoints):
                break
            detail = "; ".join(f"{e.url}: {p}" for e, p in down)
            delay = self._delay(attempt)
            if attempt > opts.retries or loop.time() + delay >= deadline:
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise BackendError(
                    f"no {opts.server} answers /health ({detail}){tries}", retryable=True
                )
            await asyncio.sleep(delay)
        for endpoint, problem in down:
            logger.warning("%s is not healthy (%s); using the others", endpoint.url, problem)
            self.pool.refused(endpoint)

    async def get(self, path: str) -> Reply:
        """GET `path` from a picked endpoint, retrying connect errors, timeouts, 408, 429 and
        5xx like a POST; any other answer is returned as it is. Raises Failed when no such
        answer came within the retries."""

        def settle(endpoint: Endpoint, status: int, raw: bytes, retry_after: str | None) -> Reply:
            where = endpoint.url + path
            if status in RETRY_STATUSES:
                delay = retry_after_seconds(retry_after) if status == 429 and retry_after else None
                raise _Again(f"{where}: HTTP {status}{server_message(raw)}", delay=delay)
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            return Reply(status, body, where, raw)

        return await self._exchange("GET", path, None, settle, bounded=False)

    # -- POSTs ---------------------------------------------------------------------------------
    async def post(self, path: str, body: Any, parse: Callable[[Any], T]) -> T:
        """POST `body` to `path` on a picked endpoint until `parse` accepts the reply, with
        retries, backoff and the per-request deadline. Raises Failed."""
        key_env = self.settings.api_key_env

        def settle(endpoint: Endpoint, status: int, raw: bytes, retry_after: str | None) -> T:
            where = endpoint.url + path
            if status == 200:
                try:
                    return parse(json.loads(raw))
                except (ValueError, BadReply) as err:  # json's errors are ValueErrors
                    raise _Again(f"{where}: unusable reply ({short(err)})") from None
            problem = f"{where}: HTTP {status}{server_message(raw)}"
            if status in (401, 403):
                raise Failed(
                    f"{problem}: the server refused the credentials (API key from ${key_env})",
                    retryable=False,
                    status=status,
                )
            if status not in RETRY_STATUSES:
                raise Failed(problem, retryable=False, status=status)
            delay = retry_after_seconds(retry_after) if status == 429 and retry_after else None
            raise _Again(problem, delay=delay, status=status)

        payload = json.dumps(body).encode("utf-8")
        return await self._exchange("POST", path, payload, settle, bounded=True)

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with jitter before attempt `attempt + 1`."""
        cap = min(self.settings.backoff_max, self.settings.backoff * 2.0 ** (attempt - 1))
        return cap / 2 + random.uniform(0, cap / 2)

    async def _exchange(
        self,
        method: str,
        path: str,
        payload: bytes | None,
        settle: Callable[[Endpoint, int, bytes, str | None], T],
        *,
        bounded: bool,
    ) -> T:
        """The retry loop shared by GETs and POSTs: `settle` turns an answer into the result,
        or raises _Again (try again) or Failed (final). `bounded` requests hold a concurrency
        slot while on the wire."""
        import aiohttp

        opts = self.settings
        assert self._semaphore is not None
        loop = asyncio.get_running_loop()
        started = deadline = 0.0
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        attempt = 0
        while True:
            attempt += 1
            delay: float | None = None
            status = 0
            async with self._semaphore if bounded else contextlib.nullcontext():
                if attempt == 1:  # the deadline counts from the first attempt, not the queue
                    started = loop.time()
                    deadline = started + opts.deadline
                remaining = deadline - loop.time()
                endpoint = self.pool.pick()
                endpoint.in_flight += 1
                try:
                    timeout = aiohttp.ClientTimeout(
                        total=min(opts.timeout, max(remaining, 0.001)),
                        sock_connect=opts.connect_timeout,
                    )
                    async with self._session.request(
                        method, endpoint.url + path, data=payload, headers=headers, timeout=timeout
                    ) as reply:
                        status = reply.status
                        raw = await reply.read()
                        retry_after = reply.headers.get("Retry-After")
                except aiohttp.ClientConnectorError as err:
                    self.pool.refused(endpoint)
                    problem = f"cannot connect to {endpoint.url}: {describe(err)}"
                except (aiohttp.ClientError, TimeoutError) as err:
                    problem = f"{endpoint.url}{path}: {describe(err)}"
                finally:
                    endpoint.in_flight -= 1
            if status:
                try:
                    result = settle(endpoint, status, raw, retry_after)
                except _Again as again:
                    problem, delay = again.problem, again.delay
                else:
                    self.pool.answered(endpoint)
                    endpoint.served += 1
                    return result
            elapsed = loop.time() - started
            if attempt > opts.retries:
                raise Failed(
                    f"{problem} (gave up after {attempt} attempts in {elapsed:.1f}s)",
                    retryable=True,
                    status=status,
                )
            if delay is None:
                delay = self._delay(attempt)
            if loop.time() + delay >= deadline:
                raise Failed(
                    f"{problem} (deadline of {opts.deadline:g}s reached after {attempt} attempts)",
                    retryable=True,
                    status=status,
                )
            await asyncio.sleep(delay)


def retry_after_seconds(value: str) -> float | None:
    """Retry-After in seconds: a number, or an HTTP date."""
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def server_message(raw: bytes) -> str:
    """The error message in an error reply's body, shortened, or nothing."""
    try:
        body = json.loads(raw)
    except ValueError:
        text = raw.decode("utf-8", "replace").strip()
        return f": {short(text)}" if text else ""
    message: Any = body
    if isinstance(body, dict):
        message = body.get("message") or body.get("error") or body.get("detail") or ""
        if isinstance(message, dict):
            message = message.get("message", "")
    return f": {short(str(message))}" if message else ""


def short(value: object, limit: int = 200) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(err: BaseException) -> str:
    """A connection problem in a few words (no URL, no headers: those are said elsewhere)."""
    name = type(err).__name__
    if isinstance(err, TimeoutError) or "Timeout" in name:
        return "timed out"
    os_error = getattr(err, "os_error", None)
    if isinstance(os_error, OSError):
        if name == "ClientConnectorDNSError":
            return f"unknown host ({os_error.strerror or os_error})".lower()
        if os_error.errno and os_error.errno > 0:
            return os.strerror(os_error.errno).lower()
    if name == "ServerDisconnectedError":
        return "the server closed the connection without an answer"
    text = str(err)
    return f"{name}: {short(text)}" if text else name
