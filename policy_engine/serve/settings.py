"""The service's settings: what `policy-engine serve` options become, usable without the CLI.

Only the standard library is imported here (the CLI imports this module at start-up).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

DEFAULT_API_KEY_ENV = "POLICY_ENGINE_SERVE_API_KEYS"
MAX_BATCH_ITEMS = 64
"""Items per `/v1/assess/batch` request and images per moderation input, at most."""


@dataclass(frozen=True)
class ServeSettings:
    """How the service guards itself. Defaults are the command's defaults.

    - `api_keys`: accepted Bearer keys; empty means no authentication (loopback only, which
      the command enforces; `create_app` trusts its caller).
    - `max_concurrency`: images being assessed at once; `max_queue`: admitted images waiting
      for those slots (a request still sending its body counts one). Beyond both: 429.
    - `timeout`: seconds from a request's arrival to its answer: 504 beyond.
    - `max_body_bytes`: request body size limit: 413 beyond.
    - `shutdown_timeout`: seconds the command drains in-flight requests on SIGTERM/SIGINT.
    - `default_metadata`: request metadata every assessment starts from (`--meta`); a
      request's own metadata overrides it key by key.
    - `health_cache`: seconds `/readyz` and `/metrics` reuse the backend's last health probe
      (`Backend.health()`); 0 probes on every call (still one probe at a time).
    - `warmup`: judge a generated image once per (policy, mode) after loading the backend,
      before `/readyz` says ready (`--no-warmup` turns it off).
    - `batch_window_ms`: how long (milliseconds) the first image of a batch waits for images of
      other requests for the same (policy, mode) before the batch goes to the backend (sooner
      once it holds the engine's batch size); 0 turns cross-request batching off. Only for
      in-process backends that batch (`serve/batching.py`); a remote server batches itself.

    `host`, `port`, `api_key_env` and `shutdown_timeout` are the command's business;
    `create_app` reads the rest. The pixel limit is the pool's (`EnginePool(max_pixels=...)`):
    the engines enforce it while decoding.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: tuple[str, ...] = ()
    api_key_env: str = DEFAULT_API_KEY_ENV
    max_concurrency: int = 64
    max_queue: int = 256
    timeout: float = 120.0
    max_body_bytes: int = 20 * 1024 * 1024
    shutdown_timeout: float = 30.0
    default_metadata: dict[str, object] = field(default_factory=dict)
    health_cache: float = 5.0
    warmup: bool = True
    batch_window_ms: float = 5.0

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must not be negative")
        if self.timeout <= 0 or self.max_body_bytes < 1:
            raise ValueError("timeout and max_body_bytes must be positive")
        if self.health_cache < 0:
            raise ValueError("health_cache must not be negative")
        if not self.batch_window_ms >= 0:  # also refuses NaN
            raise ValueError("batch_window_ms must not be negative")

    @property
    def auth(self) -> bool:
        return bool(self.api_keys)


def api_keys_from_env(name: str, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The comma-separated keys held by environment variable `name` (blank entries dropped)."""
    value = (os.environ if environ is None else environ).get(name, "")
    return tuple(part.strip() for part in value.split(",") if part.strip())


def is_loopback(host: str) -> bool:
    """Whether binding `host` only accepts connections from this machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # any other host name may resolve to a public address
