"""The backend contract: what an inference backend is, what it is given and what it returns.

A backend is registered as a class. Construction only validates options (cheap: `policy-engine
backends` and `--help` build nothing heavy); `load()` does the heavy work (imports, weights,
connections) and is called once through `ensure_loaded()`, whoever asks first; `close()`
releases it. The engine calls `generate` with a `Batch`: images judged against one compiled
policy in one mode, and expects one `Generation` per image, in order.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ValidationError

from .errors import PolicyEngineError, one_line
from .types import Mode, NoParams

if TYPE_CHECKING:
    from .compiler import CompiledPolicy
    from .images import LoadedImage
    from .verdict import JudgeVerdict


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the engine adapts to these, never to a backend's name."""

    images: bool = True
    json_schema: bool = False  # constrains decoding to the verdict schema
    scores: bool = False  # can give P(unsafe) from token logits (mode "score")
    batching: bool = False  # generate() profits from several images at once
    max_batch_size: int = 1
    concurrent: bool = False  # overlapping generate() calls help (a remote server): the engine
    # keeps the next batch in flight while the last one's stragglers finish


@dataclass(frozen=True)
class CliFlag:
    """A command-line flag a backend adds to the commands that run an engine (assess, audit,
    eval, test, serve): its value becomes the backend option `option` (a field of `Options`).
    Several backends may declare one flag for their own option of the same name; a flag given
    for a backend that lacks the option is an error."""

    flag: str  # "--url"
    option: str  # "url"
    help: str = ""
    short: str | None = None  # "-m"
    multiple: bool = False
    is_flag: bool = False
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


@dataclass(frozen=True)
class Batch:
    """Images to judge against one compiled policy in one mode: one `generate` call.

    `max_new_tokens` is the caller's budget (None: the policy's); `budget` resolves it.
    """

    compiled: CompiledPolicy
    mode: Mode
    images: tuple[LoadedImage, ...]
    max_new_tokens: int | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[LoadedImage]:
        return iter(self.images)

    @property
    def budget(self) -> int:
        return self.max_new_tokens or self.compiled.max_new_tokens

    def subset(self, images: Sequence[LoadedImage]) -> Batch:
        """The same policy, mode and budget for other images (e.g. one at a time)."""
        return Batch(self.compiled, self.mode, tuple(images), self.max_new_tokens)


@dataclass
class Generation:
    """A backend's raw answer for one image (or its failure)."""

    text: str = ""
    p_unsafe: float | None = None
    category_scores: dict[str, float] | None = None
    model: str | None = None
    decoding: dict[str, Any] | None = None  # how it was decoded: {"greedy": true}, sampling…
    error: str | None = None  # a per-item failure: becomes an error verdict
    retryable: bool = False
    hint: str | None = None  # added to the error if the text is not a valid verdict (why, fix)
    timings: dict[str, float] = field(default_factory=dict)
    judges: list[JudgeVerdict] | None = None  # a composite backend's per-judge answers
    decided_by: str | None = None  # a composite backend: which judge or rule decided, and why


class Backend(ABC):
    """An inference backend: cheap construction (validate options), heavy `load()`.

    Subclasses implement `generate` and, when they hold resources, `load` and `release`.
    Callers use `ensure_loaded()` (idempotent, thread-safe) and `close()`; whoever constructed
    the backend closes it (an Engine closes only the backends it built from a name).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoParams
    capabilities: Capabilities = Capabilities()  # per class; an instance may refine it
    install_hint: ClassVar[str] = ""
    cli_flags: ClassVar[tuple[CliFlag, ...]] = ()  # shortcuts for options, e.g. --url

    def __init__(self, **options: Any) -> None:
        try:
            self.options = self.Options.model_validate(options)
        except ValidationError as err:
            message = one_line(err, valid=self.Options.model_fields)
            raise PolicyEngineError(f"backend {self.name!r}: {message}") from None
        self.__loaded = False
        self.__lifecycle = threading.RLock()
        self.__call_thread: ThreadPoolExecutor | None = None

    # -- lifecycle (owned here) --------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self.__loaded

    def ensure_loaded(self) -> None:
        """Load once: the first caller runs `load()`, later ones return at once."""
        with self.__lifecycle:
            if not self.__loaded:
                self.load()
                self.__loaded = True

    def close(self) -> None:
        """Release what `load()` took; the backend can be loaded again afterwards."""
        with self.__lifecycle:
            self.release()
            self.__loaded = False
            thread, self.__call_thread = self.__call_thread, None
        if thread is not None:
            thread.shutdown(wait=False)

    def __enter__(self) -> Backend:
        self.ensure_loaded()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what subclasses implement -----------------------------------------------------------
    def load(self) -> None:  # noqa: B027 - optional: in-process backends may need nothing
        """Import heavy libraries, load weights, open connections. Called by `ensure_loaded`."""

    def release(self) -> None:  # noqa: B027 - optional, like load
        """Release resources (also after a failed `load`). Called by `close`."""

    @abstractmethod
    def generate(self, batch: Batch) -> list[Generation]:
        """Answer each image of the batch, in order. A per-item failure is a Generation with
        `error`; an exception fails the whole batch (each image gets an error verdict)."""

    async def agenerate(self, batch: Batch) -> list[Generation]:
        """Async twin; the default runs `generate` in a worker thread. For an in-process
        backend (not `concurrent`) that is always the same thread, the backend's call thread:
        native libraries keep per-thread state (under torch, one OpenMP thread team per
        calling thread), and batches handed round the event loop's shared worker threads ran
        about 45% slower, the idle teams spinning on the cores the model needed
        (bench/serve.py --model-throughput). A `concurrent` backend may be called from many
        threads at once and keeps the shared ones."""
        if self.capabilities.concurrent:
            return await asyncio.to_thread(self.generate, batch)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._call_thread(), self.generate, batch)

    def _call_thread(self) -> ThreadPoolExecutor:
        with self.__lifecycle:
            if self.__call_thread is None:
                name = f"policy-engine-{self.name}"
                self.__call_thread = ThreadPoolExecutor(1, thread_name_prefix=name)
            return self.__call_thread

    def health(self) -> str | None:
        """After `load()`: None when the backend can answer now, else one line saying why not
        (a server that stopped answering). Cheap enough to probe every few seconds; `serve`
        caches it for `/readyz`. In-process backends keep the default: always healthy."""
        return None
