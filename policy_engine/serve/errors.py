"""Error answers: one JSON shape everywhere (OpenAI's), never a stack trace.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "model",
               "code": "model_not_found", "request_id": "..."}}

`/v1/moderations` speaks OpenAI's dialect of it (validation errors are 400, as OpenAI answers);
the native endpoints answer validation errors with 422. Bodies are encoded with ASCII escapes,
so no input (a lone surrogate, say) can make an error answer itself fail.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ..errors import plain_message
from .context import request_context

MODERATIONS_PATH = "/v1/moderations"

_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "server_busy",
    500: "internal_error",
    502: "backend_error",
    503: "not_ready",
    504: "timeout",
}


class ApiError(HTTPException):
    """An error answer, raised anywhere in a route (or while the body is read)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=dict(headers or {}))
        self.code = code
        self.message = message
        self.param = param


def error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(
    status: int, code: str, message: str, *, param: str | None = None, request_id: str | None = None
) -> bytes:
    error: dict[str, Any] = {
        "message": message,
        "type": error_type(status),
        "param": param,
        "code": code,
        "request_id": request_id,
    }
    return json.dumps({"error": error}, ensure_ascii=True, separators=(",", ":")).encode()


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    request_id: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = error_body(status, code, message, param=param, request_id=request_id)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def validation_message(errors: Sequence[Any], limit: int = 3) -> tuple[str, str | None]:
    """Pydantic errors as one readable line, and the first field at fault (dotted)."""
    parts: list[str] = []
    first: str | None = None
    for item in errors[:limit]:
        loc = [str(p) for p in item.get("loc", ()) if p != "body" and not _is_tag(p)]
        where = ".".join(loc)
        if first is None and where:
            first = where
        parts.append(f"{where or 'body'}: {plain_message(item)}")
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts), first


def _is_tag(part: object) -> bool:
    """A union member's tag in an error location (models.py writes them as <tag>)."""
    return isinstance(part, str) and part.startswith("<") and part.endswith(">")


def install_handlers(app: FastAPI) -> None:
    """Turn HTTP and validation errors into the JSON error shape."""

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        ctx = request_context(request.scope)
        if isinstance(exc, ApiError):
            code, message, param = exc.code, exc.message, exc.param
        else:
            code = _CODES.get(exc.status_code, "error")
            message = _http_message(exc.status_code, str(exc.detail))
            param = None
        return error_response(
            exc.status_code,
            code,
            message,
            param=param,
            request_id=ctx.request_id if ctx else None,
            headers=exc.headers,
        )

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        ctx = request_context(request.scope)
        errors = list(exc.errors())
        if errors and errors[0].get("type") == "json_invalid":
            status, code = 400, "invalid_json"
            message, param = "the request body is not valid JSON", None
        else:
            status = 400 if request.scope.get("path") == MODERATIONS_PATH else 422
            code = "invalid_request"
            message, param = validation_message(errors)
        return error_response(
            status, code, message, param=param, request_id=ctx.request_id if ctx else None
        )

    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)


def _http_message(status: int, detail: str) -> str:
    if status == 404:
        return "no such endpoint; see /openapi.json"
    if status == 405:
        return "method not allowed on this endpoint"
    if status == 400:
        return f"bad request: {detail}"
    return detail
