"""The engine: one policy, one backend; images in, Decisions out.

    engine = Engine("llavaguard", "static", backend_options={"rating": "Unsafe", "category": "O2"})
    decision = engine.assess("photo.jpg", metadata={"audience": "minors"})

Post-processors run in the order the policy lists them. A bad image or a failing backend call
(any exception, not only a BackendError) becomes an error Decision for that item;
`assess_many` never stops on one bad item.

An Engine given a backend *name* builds the backend and closes it in `close()`; an Engine given
a backend *instance* shares it (loading it if needed) and never closes it: whoever built it
does. That is how eval, serve and the TUI keep one loaded model for several engines.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from . import shadow as shadow_mode
from .backend import Backend, Batch, Generation
from .calibration import Calibration, calibrate, engine_calibration
from .compiler import CompiledPolicy
from .errors import BackendError, ImageError, PolicyEngineError
from .host import PluginHost, get_host
from .images import DEFAULT_MAX_PIXELS, ImageSource, LoadedImage, describe_source, load_image
from .loader import check_policy, load_policy
from .policy import Policy
from .postprocess import PostProcessor, StepContext
from .types import Mode, check_mode
from .verdict import Decision, Verdict, build_verdict, error_verdict

Item = ImageSource | tuple[ImageSource, dict[str, Any] | None]
log = logging.getLogger(__name__)


class _Prepared:
    """One item on its way through the engine: a decoded image or an early Decision."""

    __slots__ = ("decision", "decode_seconds", "image", "metadata", "shadow_generation")

    def __init__(
        self,
        metadata: dict[str, Any],
        image: LoadedImage | None = None,
        decision: Decision | None = None,
        decode_seconds: float = 0.0,
    ) -> None:
        self.metadata = metadata
        self.image = image
        self.decision = decision
        self.decode_seconds = decode_seconds
        self.shadow_generation: Generation | None = None  # the shadow policy's own answer


class Engine:
    """Judge images against a policy with a backend, then post-process the verdicts."""

    def __init__(
        self,
        policy: Policy | str | Path,
        backend: Backend | str,
        *,
        mode: Mode = "full",
        backend_options: dict[str, Any] | None = None,
        batch_size: int | None = None,
        concurrency: int = 1,
        max_new_tokens: int | None = None,
        score_threshold: float = 0.5,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        host: PluginHost | None = None,
        lenient: bool = False,
        shadow: Policy | str | Path | Engine | None = None,
        calibration: Calibration | str | Path | None = None,
    ) -> None:
        """`lenient` reads replies that wrap their JSON object in prose (servers that ignore
        the schema); by default a reply must be exactly one JSON object. `shadow`: a policy
        judged on every item beside this one, its result recorded under `Decision.shadow`
        and never enforced (docs/shadow.md); it shares this engine's backend. `calibration`
        (a file or a `Calibration`; default: the policy's `calibration` key) maps P(Unsafe)."""
        self.host = host or get_host()
        check_mode(mode)
        if isinstance(policy, Policy):
            check_policy(policy, host=self.host)
            self.policy = policy
        else:
            self.policy = load_policy(policy, host=self.host)
        self.compiled: CompiledPolicy = self.host.compile(self.policy)
        self.owns_backend = isinstance(backend, str)
        self.backend = backend = make_backend(backend, backend_options, self.host)
        caps = backend.capabilities
        if mode == "score" and not caps.scores:
            raise PolicyEngineError(
                f"backend {backend.name!r} cannot score (mode 'score'); use mode full or verdict"
            )
        if not caps.images:
            raise PolicyEngineError(f"backend {backend.name!r} does not accept images")
        self.mode: Mode = mode
        limit = caps.max_batch_size if caps.batching else 1
        self.batch_size = max(1, min(batch_size or limit, limit))
        self.concurrency = max(1, concurrency)
        # backend calls in flight: `concurrency`, at least two for a concurrent backend
        self.depth = max(self.concurrency, 2 if caps.concurrent else 1)
        self.max_new_tokens = max_new_tokens
        self.score_threshold = score_threshold
        self.max_pixels = max_pixels
        self.lenient = lenient
        self.calibration = engine_calibration(calibration, self.compiled, mode, backend)
        self.chain: list[tuple[str, PostProcessor]] = []
        for index, step in enumerate(self.policy.postprocess):
            cls = self.host.postprocessor(step.name)
            params = step.bound_params(cls) or cls.Params.model_validate(step.params)
            self.chain.append((step.id or f"{index}:{step.name}", cls(params, self.policy)))
        self.shadow_steps = frozenset(
            self.chain[i][0] for i, step in enumerate(self.policy.postprocess) if step.shadow
        )
        self.shadow: Engine | None = None
        self.shadow_reuses = False  # the shadow policy reads the live answers (no own call)
        if shadow is not None:
            self.shadow, self.shadow_reuses = shadow_mode.beside(self, shadow)

    # -- lifecycle -------------------------------------------------------------------------
    def load(self) -> None:
        """Load the backend (weights, connections) unless it is loaded; assess() calls it."""
        self.backend.ensure_loaded()
        if self.shadow is not None and self.shadow.backend is not self.backend:
            self.shadow.load()

    def close(self) -> None:
        """Close the backend if this engine built it (a shared one is its owner's to close)."""
        if self.owns_backend:
            self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sync API --------------------------------------------------------------------------
    def assess(self, image: ImageSource, metadata: dict[str, Any] | None = None) -> Decision:
        """Judge one image. Errors for this image come back as an error Decision."""
        return next(self.assess_many([(image, metadata)]))

    def assess_many(
        self, images: Iterable[Item], metadata: dict[str, Any] | None = None
    ) -> Iterator[Decision]:
        """Judge many images lazily, in input order, batching when the backend can.

        Items are image sources or (source, metadata) pairs; `metadata` applies to every item
        that has none of its own.
        """
        self.load()
        batches = batched(images, self.batch_size)

        def prepare_next() -> list[_Prepared] | None:
            batch = next(batches, None)
            return None if batch is None else [self._prepare(i, metadata) for i in batch]

        # A pipeline: while the backend answers up to `depth` batches in worker threads, this
        # thread finishes the oldest (post-processing, the caller's work between items) and
        # decodes the images of the next.
        pending: deque[tuple[list[_Prepared], Future[tuple[list[Generation], float]]]]
        pending = deque()
        with ThreadPoolExecutor(self.depth, thread_name_prefix="policy-engine-generate") as pool:
            upcoming = prepare_next()
            while True:
                while upcoming is not None and len(pending) < self.depth:
                    pending.append((upcoming, pool.submit(self._timed_generate, upcoming)))
                    upcoming = prepare_next()
                if not pending:
                    break
                done, future = pending.popleft()
                generations, seconds = future.result()
                if upcoming is not None:  # keep the backend busy before finishing
                    pending.append((upcoming, pool.submit(self._timed_generate, upcoming)))
                    upcoming = None
                yield from self._finish(done, generations, seconds)
                upcoming = prepare_next()

    # -- async API -------------------------------------------------------------------------
    async def aassess(self, image: ImageSource, metadata: dict[str, Any] | None = None) -> Decision:
        async for decision in self.aassess_many([(image, metadata)]):
            return decision
        raise AssertionError("unreachable")  # pragma: no cover

    async def aassess_many(
        self, images: Iterable[Item], metadata: dict[str, Any] | None = None
    ) -> AsyncIterator[Decision]:
        """Async twin of assess_many: up to `concurrency` batches in flight, order preserved."""
        await asyncio.to_thread(self.load)
        pending: deque[asyncio.Task[list[Decision]]] = deque()
        for batch in batched(images, self.batch_size):
            pending.append(asyncio.create_task(self._arun_batch(batch, metadata)))
            if len(pending) >= self.depth:
                for decision in await pending.popleft():
                    yield decision
        while pending:
            for decision in await pending.popleft():
                yield decision

    async def _arun_batch(
        self, items: list[Item], metadata: dict[str, Any] | None
    ) -> list[Decision]:
        prepared = await asyncio.to_thread(lambda: [self._prepare(i, metadata) for i in items])
        batch = self._batch(prepared)
        started = time.perf_counter()
        generations: list[Generation] = []
        if batch is not None:
            try:
                generations = self._checked(batch, await self.backend.agenerate(batch))
            except Exception as err:  # any fault becomes the items' error verdicts
                generations = self._failed(batch, err)
        seconds = time.perf_counter() - started
        await self._ashadow_generate(prepared)
        return list(self._finish(prepared, generations, seconds))

    def decide(self, verdict: Verdict, metadata: dict[str, Any] | None = None) -> Decision:
        """Post-process a verdict obtained elsewhere (a policy test's given verdict, a verdict
        replayed from a log) with this engine's policy: steps in order, then observers. A
        shadow policy post-processes the same verdict (there is no image to judge again)."""
        return self._postprocess(verdict, dict(metadata or {}))

    # -- warm-up ---------------------------------------------------------------------------
    def warm_up(self, image: ImageSource | None = None) -> Verdict:
        """Judge one image (default: a small grey one) through the backend and the parser only:
        no post-processing, no observers, so no sink or queue ever sees it. For warming a
        model (or a server's caches) before serving. Loads the backend if needed."""
        self.load()
        prepared = self._prepare(image if image is not None else _grey(), None, observe=False)
        batch = self._batch([prepared])
        if batch is None:
            assert prepared.decision is not None
            return prepared.decision.verdict
        return self._only_verdict(prepared, self._generate(batch))

    async def awarm_up(self, image: ImageSource | None = None) -> Verdict:
        """Async twin of `warm_up`."""
        await asyncio.to_thread(self.load)
        source = image if image is not None else _grey()
        prepared = await asyncio.to_thread(self._prepare, source, None, observe=False)
        batch = self._batch([prepared])
        if batch is None:
            assert prepared.decision is not None
            return prepared.decision.verdict
        try:
            generations = self._checked(batch, await self.backend.agenerate(batch))
        except Exception as err:  # any fault becomes the item's error verdict
            generations = self._failed(batch, err)
        return self._only_verdict(prepared, generations)

    def _only_verdict(self, prepared: _Prepared, generations: list[Generation]) -> Verdict:
        assert prepared.image is not None
        return build_verdict(
            self.compiled,
            self.mode,
            generations[0],
            source=prepared.image.source,
            score_threshold=self.score_threshold,
            lenient=self.lenient,
        )

    # -- internals -------------------------------------------------------------------------
    def _prepare(
        self, item: Item, default_metadata: dict[str, Any] | None, *, observe: bool = True
    ) -> _Prepared:
        source, metadata = item if isinstance(item, tuple) else (item, None)
        metadata = dict(metadata if metadata is not None else default_metadata or {})
        started = time.perf_counter()
        try:
            image = load_image(source, max_pixels=self.max_pixels)
        except ImageError as err:
            verdict = error_verdict(
                self.compiled, "image", err.message, source=describe_source(source)
            )
            if not observe:
                return _Prepared(metadata, decision=Decision(verdict=verdict, metadata=metadata))
            return _Prepared(metadata, decision=self._postprocess(verdict, metadata))
        return _Prepared(metadata, image=image, decode_seconds=time.perf_counter() - started)

    def _batch(self, prepared: list[_Prepared]) -> Batch | None:
        images = tuple(p.image for p in prepared if p.image is not None)
        if not images:
            return None
        return Batch(self.compiled, self.mode, images, self.max_new_tokens)

    def _timed_generate(self, prepared: list[_Prepared]) -> tuple[list[Generation], float]:
        batch = self._batch(prepared)
        started = time.perf_counter()
        generations = self._generate(batch) if batch is not None else []
        seconds = time.perf_counter() - started
        self._shadow_generate(prepared)
        return generations, seconds

    def _generate(self, batch: Batch) -> list[Generation]:
        try:
            return self._checked(batch, self.backend.generate(batch))
        except Exception as err:  # any fault becomes the items' error verdicts
            return self._failed(batch, err)

    def _failed(self, batch: Batch, err: Exception) -> list[Generation]:
        """One error Generation per image for a batch whose call raised."""
        if isinstance(err, BackendError):
            message, retryable = err.message, err.retryable
        else:  # a bug or an unexpected fault (CUDA out of memory): not worded for users
            name = self.backend.name
            message = f"backend {name!r} failed unexpectedly: {type(err).__name__} (see the log)"
            retryable = False
            log.warning(
                "backend %r raised %s: %s; its %d images get error verdicts",
                name,
                type(err).__name__,
                err,
                len(batch),
            )
            log.debug("backend %r failure", name, exc_info=err)
        return [Generation(error=message, retryable=retryable) for _ in batch.images]

    def _checked(self, batch: Batch, generations: list[Generation]) -> list[Generation]:
        """The backend's answers, or one error per image if it broke the one-to-one contract."""
        if len(generations) == len(batch):
            return generations
        message = (
            f"backend {self.backend.name!r} returned {len(generations)} answers "
            f"for {len(batch)} images"
        )
        return [Generation(error=message) for _ in batch.images]

    def _finish(
        self, prepared: list[_Prepared], generations: list[Generation], seconds: float
    ) -> Iterator[Decision]:
        answers = iter(generations)
        share = seconds / max(1, len(generations))
        for item in prepared:
            if item.decision is not None:
                yield item.decision
                continue
            assert item.image is not None
            generation = next(answers)
            timings = {"decode_image": item.decode_seconds, "generate": share, **generation.timings}
            scored, calibrated = calibrate(self.calibration, generation)
            verdict = build_verdict(
                self.compiled,
                self.mode,
                scored,
                source=item.image.source,
                timings=timings,
                score_threshold=self.score_threshold,
                lenient=self.lenient,
            )
            verdict = calibrated(verdict)
            yield self._postprocess(
                verdict, item.metadata, generation=generation, prepared=item, timings=timings
            )

    def _on_failure(self, decision: Decision, failed: list[str]) -> None:
        """The policy's failure mode: fail-closed adds its action; fail-open only notes."""
        rule = self.policy.postprocess_failure
        if rule.mode == "fail-open":
            decision.note("postprocess-failure", "fail-open: the Decision stands as it is")
            return
        params: dict[str, Any] = {"reason": f"post-processor failed: {', '.join(failed)}"}
        params.update({k: v for k, v in (("queue", rule.queue), ("priority", rule.priority)) if v})
        decision.add_action(rule.action, by="postprocess-failure", **params)
        decision.note("postprocess-failure", f"fail-closed -> {rule.action} ({params['reason']})")

    def _postprocess(
        self,
        verdict: Verdict,
        metadata: dict[str, Any],
        *,
        generation: Generation | None = None,
        prepared: _Prepared | None = None,
        timings: dict[str, float] | None = None,
    ) -> Decision:
        decision = Decision(verdict=verdict, metadata=metadata)
        self._run_steps(decision, 0, [], shadows=True)
        if self.shadow is not None:
            decision.add_shadow(
                shadow_mode.policy_result(self, verdict, metadata, generation, prepared, timings)
            )
        self.host.observe_decision(decision)
        return decision

    def _run_steps(
        self, decision: Decision, start: int, failed: list[str], *, shadows: bool
    ) -> None:
        """Steps `start`.. of the chain on `decision`, then the failure rule. A shadow step
        runs on a copy (`shadows`) or not at all (inside a shadow run)."""
        for index in range(start, len(self.chain)):
            step_id, processor = self.chain[index]
            if step_id in self.shadow_steps:
                if shadows:
                    decision.add_shadow(shadow_mode.step_result(self, decision, index, failed))
                continue
            if not self._run_step(decision, step_id, processor):
                failed.append(step_id)
        if failed:
            self._on_failure(decision, failed)

    def _run_step(self, decision: Decision, step_id: str, processor: PostProcessor) -> bool:
        context = StepContext(step_id, self.mode, self.compiled, decision.metadata, decision)
        try:
            processor(decision, context)
        except Exception as err:  # a plugin fault must not lose the verdict
            decision.note(
                step_id, f"post-processor failed: {type(err).__name__}: {err}", error=True
            )
            return False
        return True

    def _shadow_generate(self, prepared: list[_Prepared]) -> None:
        """The shadow policy's own answers for these items, when it needs any."""
        shadow_mode.generate(self, prepared)

    async def _ashadow_generate(self, prepared: list[_Prepared]) -> None:
        await shadow_mode.agenerate(self, prepared)


T = TypeVar("T")


def _grey() -> Any:
    from PIL import Image

    return Image.new("RGB", (64, 64), (128, 128, 128))


def make_backend(
    backend: Backend | str, options: dict[str, Any] | None, host: PluginHost
) -> Backend:
    """A backend by registered name with its options validated (not loaded), or the given
    instance as it is; options only apply to a name."""
    if isinstance(backend, str):
        return host.backend(backend)(**(options or {}))
    if options:
        raise PolicyEngineError("backend_options only apply when the backend is given by name")
    return backend


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last may be shorter), lazily."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
