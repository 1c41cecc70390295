"""`policy-engine serve`: the HTTP service (docs/serve.md).

Imported by the CLI at start-up, so this module imports only click and the CLI's own helpers;
FastAPI, uvicorn and the engine are imported inside the command.

Start-up order: refuse a non-loopback address without API keys; load and compile the policies
and build the backend (not loaded); bind the socket; then serve, loading the backend in the
background (`/readyz` says when it is done). Every failure up to here is one line on stderr.
SIGTERM or SIGINT stop accepting connections, let in-flight requests finish (at most
`--shutdown-timeout` seconds), close the backend and exit 0.

Logging: from the policies' loading on, everything on stderr is one JSON object per line
(`logs.JsonLogging`): the events, the access log, uvicorn's, the project's and third-party
libraries' log records, Python warnings and whatever else writes to `sys.stderr`. Only a failed
start ends with the CLI's one-line `error: ...`.
"""

from __future__ import annotations

import contextlib
import math
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import click

from ..cli import POLICY_HELP, EngineChoice, EngineCommand, engine_options
from ..errors import BackendUnavailableError, PolicyEngineError
from .settings import DEFAULT_API_KEY_ENV, ServeSettings, api_keys_from_env, is_loopback

if TYPE_CHECKING:
    from .accesslog import EventLog
    from .logs import JsonLogging
    from .pool import EnginePool

INSTALL_HINT = "pip install 'policy-engine[serve]'"


@click.command(name="serve", cls=EngineCommand)
@click.option(
    "--policy",
    "-p",
    "policies",
    multiple=True,
    metavar="POLICY",
    help=f"{POLICY_HELP} Repeatable; the first is the default. [default: llavaguard]",
)
@engine_options(policy=False)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; anything but loopback requires API keys.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Port (0: a free one, shown in the 'listening' log line).",
)
@click.option(
    "--api-key-env",
    default=DEFAULT_API_KEY_ENV,
    show_default=True,
    metavar="NAME",
    help="Environment variable holding the accepted API keys, comma-separated. With keys set, "
    "every endpoint but /healthz and /readyz needs 'Authorization: Bearer KEY'.",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Images being assessed at once (a request holds as many slots as it has images).",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    help="Images admitted to wait for a slot; beyond: 429 with Retry-After.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=120.0,
    show_default=True,
    help="Seconds per request, queueing included; beyond: 504.",
)
@click.option(
    "--max-body-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=20.0,
    show_default=True,
    help="Request body size limit in MiB; beyond: 413.",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=None,
    help="Width x height limit per image, checked before decoding; beyond: 422. "
    "[default: the engine's, 64000000]",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds to let in-flight requests finish on SIGTERM/SIGINT.",
)
@click.option(
    "--health-cache",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds /readyz reuses the backend's last health probe (0: probe every time).",
)
@click.option(
    "--batch-window-ms",
    type=float,
    default=5.0,
    show_default=True,
    help="Milliseconds an image waits for images of other requests (same policy and mode) "
    "to be judged in one batch, sent sooner once the batch is full; adds up to this much "
    "latency. 0: off. Only in-process backends that batch (a server such as SGLang batches "
    "itself).",
)
@click.option(
    "--no-warmup",
    is_flag=True,
    help="Say ready as soon as the backend is loaded, without judging a generated image once "
    "per policy and mode first.",
)
def serve_command(
    policies: tuple[str, ...],
    host: str,
    port: int,
    api_key_env: str,
    max_concurrency: int,
    max_queue: int,
    timeout: float,
    max_body_mb: float,
    max_pixels: int | None,
    shutdown_timeout: float,
    health_cache: float,
    batch_window_ms: float,
    no_warmup: bool,
    engine: EngineChoice,
) -> None:
    """Serve policies over HTTP: OpenAI-compatible /v1/moderations and the native /v1/assess.

    One backend (--backend and its options) serves every --policy; clients choose the policy by
    its id. Logs are JSON lines on stderr. See docs/serve.md.
    """
    if not batch_window_ms >= 0:
        raise PolicyEngineError(
            f"--batch-window-ms must be 0 (off) or a positive number, not {batch_window_ms:g}"
        )
    keys = api_keys_from_env(api_key_env)
    if not keys and not is_loopback(host):
        raise PolicyEngineError(
            f"refusing to serve on {host} without API keys: set {api_key_env}=KEY[,KEY...] "
            "or listen on a loopback address (--host 127.0.0.1)"
        )
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise BackendUnavailableError(
            f"the HTTP service needs FastAPI, uvicorn and prometheus-client: {INSTALL_HINT}"
        ) from None
    from .accesslog import EventLog
    from .logs import JsonLogging

    choice = engine.with_policy((policies or ("llavaguard",))[0])
    choice.check_flags()
    if choice.calibration is not None:  # several policies: each names its own
        raise PolicyEngineError("serve: put `calibration: FILE` in each policy, not --calibration")
    settings = ServeSettings(
        host=host,
        port=port,
        api_keys=keys,
        api_key_env=api_key_env,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        timeout=timeout,
        max_body_bytes=max(1, int(max_body_mb * 1024 * 1024)),
        shutdown_timeout=shutdown_timeout,
        default_metadata=choice.metadata,
        health_cache=health_cache,
        warmup=not no_warmup,
        batch_window_ms=batch_window_ms,
    )
    log = EventLog(sys.stderr)
    # from here on, stderr is JSON lines only (until a start-up error's one `error:` line)
    with JsonLogging(log) as logs:
        pool = _build_pool(choice, policies or ("llavaguard",), settings, max_pixels)
        sock = _bind(host, port)
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        log.emit(
            "listening",
            url=f"http://{shown}:{bound[1]}",
            policies=list(pool.policies),
            backend=pool.backend.name,
            auth=settings.auth,
        )
        _run(settings, pool, sock, log, logs)


def _build_pool(
    choice: EngineChoice,
    policies: tuple[str, ...],
    settings: ServeSettings,
    max_pixels: int | None,
) -> EnginePool:
    from ..host import get_host
    from ..images import DEFAULT_MAX_PIXELS
    from .pool import EnginePool

    options = choice.backend_options()
    backend_cls = get_host().backend(choice.backend)
    if "concurrency" in backend_cls.Options.model_fields:
        options.setdefault("concurrency", settings.max_concurrency)
    return EnginePool(
        list(policies),
        choice.backend,
        backend_options=options,
        mode=choice.mode,  # type: ignore[arg-type]
        batch_size=choice.batch_size,
        max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
        lenient=choice.lenient,
        shadow=choice.shadow,
        video_limits=choice.limits(),
    )


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, so that errors are ours to word and port 0 can be reported."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise PolicyEngineError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise PolicyEngineError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def _run(
    settings: ServeSettings,
    pool: EnginePool,
    sock: socket.socket,
    log: EventLog,
    logs: JsonLogging,
) -> None:
    import uvicorn

    from .app import create_app

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn's, minus re-raising the signal once drained: a clean drain exits 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    server: Server | None = None

    def stop_on_load_error(message: str) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(
        settings,
        pool,
        log=log,
        on_load_error=stop_on_load_error,
        on_loaded=logs.quiet_libraries,  # the backend may have imported chatty libraries
    )
    config = uvicorn.Config(
        app,
        http="h11",
        ws="none",
        loop="asyncio",
        lifespan="on",
        access_log=False,
        log_config=None,  # uvicorn's loggers propagate to the root logger: JsonLogging
        server_header=False,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout),
    )
    server = Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if pool.failure is not None:
        if isinstance(pool.failure, PolicyEngineError):
            raise pool.failure
        raise BackendUnavailableError(f"the backend could not be loaded: {pool.error}")
