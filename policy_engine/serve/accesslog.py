"""Structured logs and the outermost guard of every request.

- One JSON line per request on stderr (the access log): time, request id, method, path,
  status, duration, client address, policy, bytes in and out. Never a body, an image, a query
  string or a header value other than the user agent: keys and images cannot leak into logs.
- `X-Request-ID`: echoed when the client sends a sane one, generated otherwise, on every answer.
- The last resort: an exception no handler took becomes a 500 JSON answer without details,
  logged (with its traceback) under the request id. The tests prove no input reaches it.

`EventLog` is where every JSON line goes; `logs.py` routes logging records and stray stderr
output of the command into it.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import threading
import time
import traceback
import uuid
from datetime import UTC, datetime
from typing import Any, TextIO

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .context import CONTEXT_KEY, RequestContext
from .errors import error_body
from .metrics import ServiceMetrics

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_MAX_FIELD = 200  # characters of a path or user agent kept in a log line
# metrics labels come from closed sets: a client must not mint new series with odd methods
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventLog:
    """JSON lines on a stream (default: the current sys.stderr), one write per event."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._lock = threading.Lock()

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        record = {"time": _now(), "level": level, "event": event, **fields}
        self.write(json.dumps(record, ensure_ascii=True, default=str, separators=(",", ":")))

    def write(self, line: str) -> None:
        """Write one JSON line (already rendered) and flush."""
        stream = self.stream or sys.stderr
        with self._lock:
            stream.write(line + "\n")
            stream.flush()


def _short(text: str) -> str:
    return text if len(text) <= _MAX_FIELD else text[: _MAX_FIELD - 3] + "..."


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class AccessLogMiddleware:
    """Outermost ASGI middleware: request id, deadline clock, access log, metrics, last resort.

    `routes` are the route templates used as the metrics' `route` label ("other" otherwise).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        log: EventLog,
        metrics: ServiceMetrics,
        timeout: float,
        routes: frozenset[str],
    ) -> None:
        self.app = app
        self.log = log
        self.metrics = metrics
        self.timeout = timeout
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        now = asyncio.get_running_loop().time()
        given = _header(scope, b"x-request-id")
        request_id = given if given and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        ctx = RequestContext(request_id=request_id, arrived=now, deadline=now + self.timeout)
        scope[CONTEXT_KEY] = ctx
        counts = {"in": 0, "out": 0}
        status: int | None = None

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                counts["in"] += len(message.get("body", b""))
            return message

        async def tagging_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [
                    (k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"
                ]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                counts["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, tagging_send)
        except Exception as err:
            self.log.emit(
                "error",
                level="error",
                request_id=request_id,
                error=type(err).__name__,
                traceback="".join(traceback.format_exception(err)),
            )
            if status is None:
                body = error_body(
                    500,
                    "internal_error",
                    "internal error; see the server log",
                    request_id=request_id,
                )
                await tagging_send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await tagging_send({"type": "http.response.body", "body": body})
        finally:
            seconds = time.perf_counter() - started
            path = scope.get("path", "")
            route = path if path in self.routes else "other"
            final = status if status is not None else 499  # cancelled before answering
            method = scope.get("method", "")
            self.metrics.request(method if method in _METHODS else "other", route, final, seconds)
            client = scope.get("client")
            declared = _header(scope, b"content-length")
            self.log.emit(
                "access",
                request_id=request_id,
                method=_short(method),
                path=_short(path),
                status=final,
                duration_ms=round(seconds * 1000, 3),
                client=f"{client[0]}:{client[1]}" if client else None,
                policy=ctx.policy,
                bytes_in=int(declared) if declared and declared.isdigit() else counts["in"],
                bytes_out=counts["out"],
                user_agent=_short(_header(scope, b"user-agent") or "") or None,
            )
