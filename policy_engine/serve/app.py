"""The FastAPI application: `create_app(settings, pool)`.

    app = create_app(ServeSettings(), EnginePool(["llavaguard"], "static"))

The app's lifespan starts loading the pool's backend in a worker thread, then warms it up (one
assessment per policy and mode, `readiness.py`); the service answers `/healthz` at once,
`/readyz` and the assessment endpoints say 503 until both are done. Once ready, `/readyz` (and
the `backend_ready` metric) also follow the backend's cached health probe. The lifespan closes
the backend at shutdown, after uvicorn has drained in-flight requests. Assessments use the
engine's async API, so the event loop stays free while images are judged.

Middleware, outermost first: access log (request id, deadline clock, last-resort 500), guards
(API keys, body size, admission: `limits.py`), then FastAPI's routing and error handlers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

from .. import __version__
from ..aggregate import Post
from ..engine import Engine
from ..engine import Item as EngineItem
from ..types import Mode
from ..verdict import Decision
from .accesslog import AccessLogMiddleware, EventLog
from .context import request_context
from .errors import ApiError, install_handlers
from .limits import OPEN_PATHS, GuardMiddleware
from .models import (
    AssessRequest,
    AssessResponse,
    BatchAssessRequest,
    BatchAssessResponse,
    CategoryInfo,
    ErrorResponse,
    Health,
    ModerationRequest,
    ModerationResponse,
    PolicyInfo,
    PolicyList,
    Readiness,
)
from .moderation import image_urls, moderation_response
from .native import REQUEST_BODY, read_item
from .pool import EnginePool
from .service import Service
from .settings import ServeSettings

ASSESS_PATHS = frozenset({"/v1/moderations", "/v1/assess", "/v1/assess/batch"})
ROUTES = frozenset({*ASSESS_PATHS, "/v1/policies", "/healthz", "/readyz", "/metrics"})
ROUTES_LOGGED = ROUTES | {"/openapi.json"}

_DESCRIPTIONS = {
    400: "Invalid request (malformed JSON, text-only moderation input, unsupported mode...).",
    401: "Missing or invalid API key.",
    404: "Unknown policy (`model` or `policy`).",
    413: "Request body over the size limit.",
    415: "Unsupported content type.",
    422: "Invalid request body, or an image that cannot be decoded or has too many pixels.",
    429: "The service is at capacity: retry after Retry-After seconds.",
    502: "The backend failed to judge an image.",
    503: "The backend is not loaded and warmed up (yet), or it failed.",
    504: "The request did not finish within the service's timeout.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}


def json_response(model: BaseModel, status: int = 200) -> Response:
    """`model` as JSON, ASCII-escaped: no input can make encoding the answer fail."""
    body = json.dumps(model.model_dump(mode="json"), ensure_ascii=True, separators=(",", ":"))
    return Response(body.encode(), status_code=status, media_type="application/json")


def _note_policy(request: Request, policy_ids: Sequence[str]) -> None:
    ctx = request_context(request.scope)
    if ctx is not None:
        ctx.policy = ",".join(dict.fromkeys(policy_ids))


def _image_error(decision: Decision, param: str) -> None:
    error = decision.verdict.error
    if error is not None and error.kind == "image":
        raise ApiError(422, "invalid_image", error.message, param=param)


def create_app(
    settings: ServeSettings,
    pool: EnginePool,
    *,
    log: EventLog | None = None,
    on_load_error: Callable[[str], None] | None = None,
    on_loaded: Callable[[], None] | None = None,
) -> FastAPI:
    """The service as an ASGI app (no socket: tests drive it with starlette's TestClient).

    `pool` must not be loaded or used elsewhere: the app loads it at startup and closes it at
    shutdown. `log` receives the JSON event lines (default: stderr). `on_load_error(message)`
    is called if loading the backend fails (the command stops the server then);
    `on_loaded()` in the loading thread once the backend is loaded, before the warm-up (the
    command switches libraries the backend imported over to its JSON log).
    """
    service = Service(settings, pool, log or EventLog(), on_load_error, on_loaded)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.limiter.reset()
        service.health.reset()
        service.state, service.error = "loading", None
        loading = asyncio.create_task(service.load())
        try:
            yield
        finally:
            service.state = "stopping"
            await loading
            await service.stop_batching()
            await asyncio.to_thread(pool.close)
            service.log.emit("stopped", backend=pool.backend.name)

    app = FastAPI(
        title="policy-engine",
        version=__version__,
        description="Judge images against safety policies (docs/serve.md).",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    install_handlers(app)
    app.add_middleware(
        GuardMiddleware,
        api_keys=settings.api_keys,
        max_body_bytes=settings.max_body_bytes,
        limiter=service.limiter,
        metrics=service.metrics,
        admitted=lambda method, path: method == "POST" and path in ASSESS_PATHS,
    )
    app.add_middleware(
        AccessLogMiddleware,
        log=service.log,
        metrics=service.metrics,
        timeout=settings.timeout,
        routes=ROUTES_LOGGED,
    )

    def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
        wanted = sorted({*codes, 401} if settings.auth else set(codes))
        responses: dict[int | str, dict[str, Any]] = {}
        for code in wanted:
            entry: dict[str, Any] = {"model": ErrorResponse, "description": _DESCRIPTIONS[code]}
            if code in (429, 503):
                entry["headers"] = _RETRY_AFTER
            responses[code] = entry
        return responses

    assess_errors = (400, 404, 413, 422, 429, 503, 504)

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Response:
        """The process is up (no key needed)."""
        return json_response(Health())

    @app.get(
        "/readyz",
        response_model=Readiness,
        tags=["health"],
        responses={
            503: {
                "model": Readiness,
                "description": "Loading, warming up, unavailable, failed or stopping.",
            }
        },
    )
    async def readyz() -> Response:
        """The backend is loaded, warmed up and answers its health probe (no key needed)."""
        status, reason = await service.readiness()
        # the reason is for operators: behind keys, it stays in the server log
        error = reason if not settings.auth or reason is None else "see the server log"
        body = Readiness(status=status, backend=pool.backend.name, error=error)
        return json_response(body, 200 if status == "ready" else 503)

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format 0.0.4, or OpenMetrics when "
                "the Accept header asks for it.",
                "content": {
                    "text/plain": {"schema": {"type": "string"}},
                    "application/openmetrics-text": {"schema": {"type": "string"}},
                },
            },
            **errors(),
        },
    )
    async def metrics(request: Request) -> Response:
        """Requests, latencies, verdicts per category, errors (Prometheus text)."""
        await service.readiness()  # backend_ready follows a fresh enough health probe
        body, content_type = service.metrics.render(request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    @app.get("/v1/policies", response_model=PolicyList, tags=["policies"], responses=errors())
    async def policies() -> Response:
        """The loaded policies, their compiled hash and version; the first is the default."""
        data = []
        for policy_id, policy in pool.policies.items():
            compiled = pool.engine(policy_id).compiled
            data.append(
                PolicyInfo(
                    id=policy.id,
                    version=policy.version,
                    description=policy.description,
                    prompt_format=policy.prompt_format,
                    hash=compiled.hash,
                    default=policy_id == pool.default,
                    categories=[
                        CategoryInfo(id=c.id, name=c.name, severity=c.severity)
                        for c in policy.categories
                    ],
                    modes=list(pool.modes),
                )
            )
        return json_response(PolicyList(default=pool.default, data=data))

    @app.post(
        "/v1/moderations",
        response_model=ModerationResponse,
        tags=["moderation"],
        responses=errors(*assess_errors, 502),
    )
    async def moderations(body: ModerationRequest, request: Request) -> Response:
        """OpenAI-compatible moderation of images: category keys are the policy's ids."""
        engine = service.engine(body.model, None, "model", body.shadow)
        _note_policy(request, [engine.policy.id])
        urls = image_urls(body)
        service.require_ready()
        metadata = service.metadata({})
        items: list[EngineItem] = [(url, metadata) for url in urls]
        (decisions,) = await service.judge(request, [(engine, items)])
        for index, decision in enumerate(decisions):
            _image_error(decision, "input")
            error = decision.verdict.error
            if error is not None:
                raise ApiError(
                    502, "backend_error", f"image {index + 1}: {error.message}", param="input"
                )
        return json_response(moderation_response(engine.compiled, decisions))

    @app.post(
        "/v1/assess",
        response_model=AssessResponse,
        tags=["assess"],
        responses=errors(*assess_errors, 415),
        openapi_extra={"requestBody": REQUEST_BODY},
    )
    async def assess(request: Request) -> Response:
        """Judge one image (JSON with a data URL, or a multipart upload): the full Decision.

        A verdict that failed (backend fault, unparseable answer) is still a 200: the
        Decision's `verdict.error` says why. An image that cannot be decoded is a 422.
        """
        item = await read_item(request, settings.max_body_bytes)
        engine = service.engine(item.policy, item.mode, "policy", item.shadow)
        _note_policy(request, [engine.policy.id])
        service.require_ready()
        source = Post(item.image) if isinstance(item.image, list) else item.image
        (decisions,) = await service.judge(
            request, [(engine, [(source, service.metadata(item.metadata))])]
        )
        _image_error(decisions[0], "image")
        return json_response(AssessResponse(decision=decisions[0]))

    @app.post(
        "/v1/assess/batch",
        response_model=BatchAssessResponse,
        tags=["assess"],
        responses=errors(*assess_errors),
    )
    async def assess_batch(body: BatchAssessRequest, request: Request) -> Response:
        """Judge several images in one request; each item's failure is in its Decision."""
        # items of one (policy, mode) go to their engine together, in order
        groups: dict[tuple[str, Mode, str | None], tuple[Engine, list[int]]] = {}
        for index, entry in enumerate(body.items):
            param = f"items.{index}.policy"
            engine = service.engine(entry.policy, entry.mode, param, entry.shadow)
            shadow = engine.shadow.policy.id if engine.shadow is not None else None
            key = (engine.policy.id, engine.mode, shadow)
            groups.setdefault(key, (engine, []))[1].append(index)
        _note_policy(request, [policy_id for policy_id, _, _ in groups])
        service.require_ready()
        work = [
            (engine, [_engine_item(service, body.items[i]) for i in indexes])
            for engine, indexes in groups.values()
        ]
        results = await service.judge(request, work)
        ordered: list[Decision | None] = [None] * len(body.items)
        for (_, indexes), decisions in zip(groups.values(), results, strict=True):
            for index, decision in zip(indexes, decisions, strict=True):
                ordered[index] = decision
        return json_response(BatchAssessResponse(decisions=[d for d in ordered if d is not None]))

    _secure_openapi(app, settings)
    return app


def _engine_item(service: Service, item: AssessRequest) -> EngineItem:
    source = Post(item.image) if isinstance(item.image, list) else item.image
    return (source, service.metadata(item.metadata))


def _secure_openapi(app: FastAPI, settings: ServeSettings) -> None:
    """Declare Bearer auth in the OpenAPI document when keys are configured."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            if settings.auth:
                components = schema.setdefault("components", {})
                components.setdefault("securitySchemes", {})["bearerAuth"] = {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "One of the keys in the service's API key variable.",
                }
                for path, operations in schema.get("paths", {}).items():
                    if path in OPEN_PATHS:
                        continue
                    for operation in operations.values():
                        operation["security"] = [{"bearerAuth": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
