"""The engine as a step of a Ray Data pipeline, and the pieces `audit --executor ray` uses.

    import ray, policy_engine.ray as per
    ds = ray.data.read_images("s3://bucket/photos/", include_paths=True)
    judged = per.assess_dataset(ds, "llavaguard", "transformers",
                                backend_options={"model": "AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf"},
                                workers=4, gpus_per_worker=1)

Each worker is a Ray actor holding one Engine: the model loads once per actor (the backend's
`ensure_loaded`), batches of rows go through `Engine.assess_many`, and every row comes back
with the verdict columns. A bad image or a failing backend call is an error row (`error` set,
`rating` null), never a failed job. Ray itself retries a batch whose actor died (Ray Data's
actor pools restart actors and retry their tasks by default).

Ray is imported only here and only when a function of this module runs; `import
policy_engine` never loads it. Needs the `ray` extra: `pip install 'policy-engine[ray]'`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .aggregate import DEFAULT_MAX_POST_IMAGES
from .backend import Backend
from .calibration import Calibration
from .engine import Engine
from .errors import PolicyEngineError
from .loader import load_policy
from .policy import Policy
from .types import Mode
from .video import VideoLimits

if TYPE_CHECKING:
    import numpy as np
    import ray.data

INSTALL_HINT = "pip install 'policy-engine[ray]'"
# The verdict columns assess_dataset adds, in this order.
COLUMNS = (
    *("rating", "category", "p_unsafe", "actions", "error"),
    *("policy_id", "policy_version", "policy_hash", "model", "decoding"),
)
# Environment variables a worker needs to see the same plugins and model cache as the driver.
FORWARDED_ENV = (
    "POLICY_ENGINE_PLUGINS",
    "POLICY_ENGINE_DISABLE_PLUGINS",
    "POLICY_ENGINE_CACHE",
    "HF_HUB_OFFLINE",
    "HF_HOME",
)
# Ray starts its workers at niceness 15 so that its own daemons win the CPU; on a machine
# running other work, that starved the actors (where an audit's whole work happens) to a
# crawl: 12 photos took 5 min instead of 30 s. A local instance we start runs them at 0.
LOCAL_SYSTEM_CONFIG: dict[str, Any] = {"worker_niceness": 0}
log = logging.getLogger(__name__)


def require_ray() -> Any:
    """The `ray` module, or a user error saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise PolicyEngineError(f"--executor ray needs ray: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class EngineSpec:
    """Everything a worker needs to build the same Engine as the driver: picklable, cheap.

    `backend` is a registered name or a Backend subclass (pickled to the workers; a class
    defined in a module the workers cannot import must be registered with cloudpickle's
    `register_pickle_by_value`)."""

    policy: Policy
    backend: str | type[Backend]
    mode: Mode = "full"
    backend_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None
    concurrency: int = 1
    max_new_tokens: int | None = None
    lenient: bool = False
    calibration: Calibration | None = None
    video_limits: VideoLimits | None = None
    max_post_images: int = DEFAULT_MAX_POST_IMAGES

    @classmethod
    def from_engine(cls, engine: Engine) -> EngineSpec:
        """The spec of a built (not necessarily loaded) engine: its policy object, backend
        name and the options it was given. An engine with a shadow policy is refused (Ray
        workers would judge without it)."""
        if engine.shadow is not None:
            raise PolicyEngineError("an Engine with a shadow policy does not run on Ray")
        return cls(
            policy=engine.policy,
            backend=engine.backend.name if engine.owns_backend else type(engine.backend),
            mode=engine.mode,
            backend_options=engine.backend.options.model_dump(exclude_unset=True),
            batch_size=engine.batch_size,
            concurrency=engine.concurrency,
            max_new_tokens=engine.max_new_tokens,
            lenient=engine.lenient,
            calibration=engine.calibration,
            video_limits=engine.video_limits,
            max_post_images=engine.max_post_images,
        )

    def build(self) -> Engine:
        backend: Backend | str
        options: dict[str, Any] | None = self.backend_options
        if isinstance(self.backend, str):
            backend = self.backend
        else:
            backend, options = self.backend(**self.backend_options), None
        return Engine(
            self.policy,
            backend,
            mode=self.mode,
            backend_options=options,
            batch_size=self.batch_size,
            concurrency=self.concurrency,
            max_new_tokens=self.max_new_tokens,
            lenient=self.lenient,
            calibration=self.calibration,
            video_limits=self.video_limits,
            max_post_images=self.max_post_images,
        )


class EngineActor:
    """A Ray Data callable class: one loaded Engine per actor.

    `output="ledger"` is the audit's shape: rows of `id`, `seq`, `source`, `path`/`data`,
    `metadata` (JSON) in; `id`, `seq`, `source`, `decision` (the Decision as JSON), `seconds`
    out. `output="columns"` keeps the user's columns and adds `COLUMNS`."""

    def __init__(self, spec: EngineSpec, output: str = "columns", image_column: str = "image"):
        self.engine = spec.build()
        self.engine.load()
        self.owned_backend = None if isinstance(spec.backend, str) else self.engine.backend
        self.output = output
        self.image_column = image_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.output == "ledger":
            return self._ledger(batch)
        return self._columns(batch)

    def __del__(self) -> None:
        try:
            self.engine.close()
            if self.owned_backend is not None:
                self.owned_backend.close()
        except Exception:  # interpreter shutdown: nothing left to release cleanly
            pass

    def _ledger(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import numpy as np

        from .aggregate import Post

        posts = batch["post"] if "post" in batch else [""] * len(batch["path"])
        items = [
            (
                Post(json.loads(str(post)), source=str(source))
                if post
                else str(path)
                if path
                else bytes(data),
                json.loads(str(meta)),
            )
            for path, data, post, source, meta in zip(
                batch["path"], batch["data"], posts, batch["source"], batch["metadata"], strict=True
            )
        ]
        decisions = list(self.engine.assess_many(items))
        seconds = [d.verdict.timings.get("generate") for d in decisions]
        return {
            "id": batch["id"],
            "seq": batch["seq"],
            "source": batch["source"],
            "decision": np.array(
                [d.model_dump_json(exclude_none=True) for d in decisions], dtype=object
            ),
            "seconds": np.array([math.nan if s is None else s for s in seconds], dtype=float),
        }

    def _columns(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import numpy as np

        if self.image_column not in batch:
            raise PolicyEngineError(
                f"assess_dataset: no column {self.image_column!r} (columns: {', '.join(batch)})"
            )
        images = [_image(value) for value in batch[self.image_column]]
        decisions = list(self.engine.assess_many(images))
        out: dict[str, Any] = dict(batch)
        model = str(getattr(self.engine.backend.options, "model", None) or "")
        p_unsafe = [d.verdict.p_unsafe for d in decisions]
        errors = [d.verdict.error for d in decisions]
        out.update(
            rating=np.array([d.rating or "" for d in decisions], dtype=object),
            category=np.array([d.category_id or "" for d in decisions], dtype=object),
            p_unsafe=np.array([math.nan if p is None else p for p in p_unsafe], dtype=float),
            actions=np.array(
                [",".join(a.name for a in d.actions) for d in decisions], dtype=object
            ),
            error=np.array([f"{e.kind}: {e.message}" if e else "" for e in errors], dtype=object),
            policy_id=np.array([d.verdict.policy_id for d in decisions], dtype=object),
            policy_version=np.array([d.verdict.policy_version for d in decisions], dtype=object),
            policy_hash=np.array([d.verdict.policy_hash for d in decisions], dtype=object),
            model=np.array([d.verdict.model or model for d in decisions], dtype=object),
            decoding=np.array(
                [json.dumps(d.verdict.decoding) if d.verdict.decoding else "" for d in decisions],
                dtype=object,
            ),
        )
        return out


def _image(value: Any) -> Any:
    """A cell as `load_image` takes it: paths and bytes as they are, HF image structs
    ({bytes, path}), and the pixel arrays `ray.data.read_images` yields."""
    import numpy as np

    if isinstance(value, dict):
        return bytes(value["bytes"]) if value.get("bytes") else str(value.get("path") or "")
    if isinstance(value, np.ndarray):
        from PIL import Image

        return Image.fromarray(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value)


def assess_dataset(
    ds: ray.data.Dataset,
    policy: Policy | str | Path,
    backend: str | type[Backend],
    *,
    mode: Mode = "full",
    backend_options: dict[str, Any] | None = None,
    image_column: str = "image",
    workers: int = 1,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    batch_size: int = 16,
    lenient: bool = False,
) -> ray.data.Dataset:
    """`ds` with the verdict columns added: rating, category (the final Decision's; "" on an
    error), p_unsafe (NaN when the mode gives none), actions (comma-separated names), error
    ("kind: message", "" when fine), and what produced the verdict: policy_id,
    policy_version, policy_hash, model and decoding (JSON; "" when the backend decodes
    nothing).

    `image_column` holds paths or URLs readable by the workers, encoded bytes, HF image structs
    or pixel arrays (`ray.data.read_images`). `workers` actors each load the backend once;
    `cpus_per_worker` / `gpus_per_worker` are what Ray reserves for each (give CPU-only actors a
    fraction on a small machine, so Ray Data's read tasks still get a CPU). Lazy, like every
    Ray Data transform: nothing runs until the dataset is consumed."""
    require_ray()
    import ray.data

    if workers < 1:
        raise PolicyEngineError("assess_dataset: workers must be at least 1")
    the_policy = policy if isinstance(policy, Policy) else load_policy(policy)
    spec = EngineSpec(the_policy, backend, mode, dict(backend_options or {}), lenient=lenient)
    spec.build().close()  # fail here, in the caller, on a bad policy, backend or option
    return ds.map_batches(
        EngineActor,
        fn_constructor_kwargs={"spec": spec, "output": "columns", "image_column": image_column},
        compute=ray.data.ActorPoolStrategy(size=workers),
        batch_size=batch_size,
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None,
    )


def forwarded_env() -> dict[str, str]:
    """The driver's settings the workers must share (plugins allowed, model cache)."""
    return {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: float | None = None) -> Iterator[Any]:
    """Ray, connected: an existing connection of this process as it is; else `address`'s
    cluster, or (None) a new local instance with at least `num_cpus` logical CPUs (and more
    than the machine's, so actors never starve Ray Data's read tasks) whose workers run at
    normal priority (`LOCAL_SYSTEM_CONFIG`). Shuts down only what it started."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "configure_logging": True,
        "runtime_env": {"env_vars": forwarded_env()},
    }
    if address:
        ray.init(address=address, **kwargs)
    else:
        cpus = max(os.cpu_count() or 1, math.ceil(num_cpus or 0) + 2, 4)
        ray.init(address="local", num_cpus=cpus, _system_config=LOCAL_SYSTEM_CONFIG, **kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()
