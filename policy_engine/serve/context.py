"""What the service knows about a request while it runs, kept in the ASGI scope."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CONTEXT_KEY = "policy_engine.context"


@dataclass
class RequestContext:
    """Set by the access-log middleware, read by the guards, routes and error handlers."""

    request_id: str
    arrived: float  # event-loop time
    deadline: float  # event-loop time after which the request answers 504
    policy: str | None = None  # the policies it was judged against, for the access log


def request_context(scope: Any) -> RequestContext | None:
    ctx = scope.get(CONTEXT_KEY)
    return ctx if isinstance(ctx, RequestContext) else None
