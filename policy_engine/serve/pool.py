"""The policies a service judges against, and the one backend they all share.

One backend instance serves every policy: `Engine(policy, backend, mode=...)` per (policy, mode),
created on first use and kept. The pool loads the backend once (`load`, which the app's lifespan
runs in a worker thread while the service already answers `/healthz`) and closes it once
(`close`); engines never load or close it themselves.

Only the engine's own modules are imported here: no web framework.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..audience import at_level
from ..backend import Backend
from ..engine import Engine, make_backend
from ..errors import PolicyEngineError
from ..host import PluginHost, get_host
from ..images import DEFAULT_MAX_PIXELS
from ..loader import check_policy, load_policy
from ..policy import Policy
from ..types import MODES, Mode, check_mode
from ..video import VideoLimits


class ModeUnavailableError(PolicyEngineError):
    """A mode the pool's backend cannot run (score mode without token scores)."""


class EnginePool:
    """Policies by id (the first is the default), one shared backend, engines per mode.

    Construction loads and compiles every policy and builds the engine of each policy in the
    default `mode`, so a bad policy, post-processor parameters or a mode the backend cannot run
    fail here (PolicyEngineError), before the service binds a port. Nothing heavy happens until
    `load()`.
    """

    def __init__(
        self,
        policies: Sequence[Policy | str | Path],
        backend: Backend | str,
        *,
        backend_options: dict[str, Any] | None = None,
        mode: Mode = "full",
        batch_size: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        host: PluginHost | None = None,
        lenient: bool = False,
        shadow: Policy | str | Path | None = None,
        video_limits: VideoLimits | None = None,
    ) -> None:
        self.host = host or get_host()
        self.lenient = lenient
        self.video_limits = video_limits
        check_mode(mode)
        self.backend: Backend = make_backend(backend, backend_options, self.host)
        self.mode: Mode = mode
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.policies: dict[str, Policy] = {}
        for ref in policies:
            policy = ref if isinstance(ref, Policy) else load_policy(ref, host=self.host)
            if policy.id in self.policies:
                raise PolicyEngineError(
                    f"two policies have the id {policy.id!r}: the service names policies by id"
                )
            self.policies[policy.id] = policy
        if not self.policies:
            raise PolicyEngineError("the service needs at least one policy (--policy)")
        self.default = next(iter(self.policies))
        # the service's shadow policy (--shadow): judged in shadow when a request names none
        self.shadow: Policy | None = None
        if shadow is not None:
            self.shadow = (
                shadow if isinstance(shadow, Policy) else load_policy(shadow, host=self.host)
            )
        self._engines: dict[tuple[str, ...], Engine] = {}
        self._lock = threading.Lock()
        self.ready = False
        self.error: str | None = None
        self.failure: BaseException | None = None
        for policy_id in self.policies:
            self.engine(policy_id, mode)

    @property
    def modes(self) -> tuple[Mode, ...]:
        """The modes this backend can run."""
        return tuple(m for m in MODES if m != "score" or self.backend.capabilities.scores)

    def shadow_policy(self, shadow_id: str) -> Policy:
        """A policy a request may run in shadow: the service's shadow policy, a loaded one, or
        `ID@LEVEL` of a loaded one. KeyError for another id; AudienceError for a bad level."""
        if self.shadow is not None and shadow_id == self.shadow.id:
            return self.shadow
        return self.policies.get(shadow_id) or self._at_level(shadow_id)

    def engine(self, policy_id: str, mode: Mode | None = None, shadow: str | None = None) -> Engine:
        """The engine of a loaded policy (or of `ID@LEVEL`, a loaded policy at an audience
        level) in `mode` (default: the pool's), with `shadow` (a policy id, default: the
        service's shadow policy) in shadow. KeyError for an unknown policy id
        (`shadow_policy` for the shadow's); AudienceError for an unknown level;
        ModeUnavailableError for a mode the backend cannot run."""
        mode = mode or self.mode
        policy = self.policies.get(policy_id) or self._at_level(policy_id)
        if shadow is None and self.shadow is not None:
            shadow = self.shadow.id
        shadow_policy = self.shadow_policy(shadow) if shadow is not None else None
        if mode not in self.modes:
            raise ModeUnavailableError(
                f"backend {self.backend.name!r} cannot run mode {mode!r}; "
                f"modes: {', '.join(self.modes)}"
            )
        key = (policy_id, mode) if shadow is None else (policy_id, mode, shadow)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = Engine(
                    policy,
                    self.backend,
                    mode=mode,
                    batch_size=self.batch_size,
                    max_pixels=self.max_pixels,
                    host=self.host,
                    lenient=self.lenient,
                    shadow=shadow_policy,
                    video_limits=self.video_limits,
                )
                self._engines[key] = engine
            return engine

    def _at_level(self, policy_id: str) -> Policy:
        """`ID@LEVEL` of a loaded policy with audience levels, derived on first use and kept
        (levels are few). KeyError when ID is not loaded; AudienceError for an unknown level."""
        base, _, level = policy_id.rpartition("@")
        if not base or base not in self.policies:
            raise KeyError(policy_id)
        derived = at_level(self.policies[base], level)
        check_policy(derived, host=self.host)
        with self._lock:
            return self.policies.setdefault(derived.id, derived)

    def load(self) -> None:
        """Load the backend (weights, connections), once. Blocking: run it in a thread.
        On failure `error` holds the message and the exception propagates."""
        try:
            self.backend.ensure_loaded()
        except PolicyEngineError as err:
            self.error, self.failure = err.message, err
            raise
        except Exception as err:  # a backend bug must still leave a readable state
            self.error, self.failure = f"{type(err).__name__}: {err}", err
            raise
        self.ready = True

    def close(self) -> None:
        self.ready = False
        self.backend.close()
