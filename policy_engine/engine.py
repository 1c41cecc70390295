"""The engine: one policy, one backend; images in, Decisions out.

    engine = Engine("llavaguard", "static", backend_options={"rating": "Unsafe", "category": "O2"})
    decision = engine.assess("photo.jpg", metadata={"audience": "minors"})

A video or a `Post` (several images) is one item too: it expands into parts (sampled frames,
images) that fill the same backend batches as other items, and its parts' verdicts become one
Verdict by the policy's aggregation rule before post-processing (docs/video.md).

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
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from . import shadow as shadow_mode
from .aggregate import DEFAULT_MAX_POST_IMAGES, Post, aggregate
from .backend import Backend, Batch, Generation
from .calibration import Calibration, calibrate, engine_calibration
from .compiler import CompiledPolicy
from .errors import BackendError, ImageError, PolicyEngineError
from .host import PluginHost, get_host
from .images import DEFAULT_MAX_PIXELS, ImageSource, LoadedImage, describe_source, load_image
from .items import Chunk as _Chunk
from .items import Prepared as _Prepared
from .items import prepare_post, prepare_video
from .loader import check_policy, load_policy
from .policy import AggregationOptions, Policy, VideoOptions
from .postprocess import PostProcessor, StepContext
from .types import Mode, check_mode
from .verdict import Decision, Verdict, build_verdict, error_verdict
from .video import VideoLimits, is_video

Source = ImageSource | Post
Item = Source | tuple[Source, dict[str, Any] | None]
log = logging.getLogger(__name__)


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
        video_limits: VideoLimits | None = None,
        max_post_images: int = DEFAULT_MAX_POST_IMAGES,
    ) -> None:
        """`lenient` reads replies that wrap their JSON object in prose (servers that ignore
        the schema); by default a reply must be exactly one JSON object. `shadow`: a policy
        judged on every item beside this one, its result recorded under `Decision.shadow`
        and never enforced (docs/shadow.md); it shares this engine's backend. `calibration`
        (a file or a `Calibration`; default: the policy's `calibration` key) maps P(Unsafe).
        `video_limits` bound hostile video input; `max_post_images` the images of one `Post`."""
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
        self.video_limits = video_limits or VideoLimits()
        self.max_post_images = max_post_images
        self.video_options = self.policy.video or VideoOptions()
        self.aggregation = self.policy.aggregation or AggregationOptions()
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
    def assess(self, image: Source, metadata: dict[str, Any] | None = None) -> Decision:
        """Judge one image, video or Post. Errors for it come back as an error Decision."""
        return next(self.assess_many([(image, metadata)]))

    def assess_many(
        self, images: Iterable[Item], metadata: dict[str, Any] | None = None
    ) -> Iterator[Decision]:
        """Judge many images lazily, in input order, batching when the backend can.

        Items are image sources, videos, `Post`s or (source, metadata) pairs; `metadata`
        applies to every item that has none of its own.
        """
        self.load()
        chunks = self._chunks(images, metadata)

        def prepare_next() -> _Chunk | None:
            return next(chunks, None)

        # A pipeline: while the backend answers up to `depth` batches in worker threads, this
        # thread finishes the oldest (post-processing, the caller's work between items) and
        # decodes the images of the next.
        pending: deque[tuple[_Chunk, Future[tuple[list[Generation], float]]]]
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
                yield from self._settle(done, generations, seconds)
                upcoming = prepare_next()

    # -- async API -------------------------------------------------------------------------
    async def aassess(self, image: Source, metadata: dict[str, Any] | None = None) -> Decision:
        async for decision in self.aassess_many([(image, metadata)]):
            return decision
        raise AssertionError("unreachable")  # pragma: no cover

    async def aassess_many(
        self, images: Iterable[Item], metadata: dict[str, Any] | None = None
    ) -> AsyncIterator[Decision]:
        """Async twin of assess_many: up to `concurrency` batches in flight, order preserved."""
        await asyncio.to_thread(self.load)
        chunks = self._chunks(images, metadata)
        pending: deque[tuple[_Chunk, asyncio.Task[tuple[list[Generation], float]]]] = deque()
        while True:
            chunk = await asyncio.to_thread(next, chunks, None)  # decoding off the loop
            if chunk is None:
                break
            pending.append((chunk, asyncio.create_task(self._agenerate_chunk(chunk))))
            if len(pending) >= self.depth:
                done, task = pending.popleft()
                for decision in self._settle(done, *await task):
                    yield decision
        while pending:
            done, task = pending.popleft()
            for decision in self._settle(done, *await task):
                yield decision

    async def _agenerate_chunk(self, chunk: _Chunk) -> tuple[list[Generation], float]:
        batch = self._batch_of(chunk)
        started = time.perf_counter()
        generations = await self._agenerate(batch) if batch is not None else []
        seconds = time.perf_counter() - started
        await self._ashadow_generate(chunk.done)  # a shadow policy's own answers, if any
        return generations, seconds

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
        return self._item_verdict(prepared, self._generate(batch))

    async def awarm_up(self, image: ImageSource | None = None) -> Verdict:
        """Async twin of `warm_up`."""
        await asyncio.to_thread(self.load)
        source = image if image is not None else _grey()
        prepared = await asyncio.to_thread(self._prepare, source, None, observe=False)
        batch = self._batch([prepared])
        if batch is None:
            assert prepared.decision is not None
            return prepared.decision.verdict
        return self._item_verdict(prepared, await self._agenerate(batch))

    # -- internals -------------------------------------------------------------------------
    def _prepare(
        self, item: Item, default_metadata: dict[str, Any] | None, *, observe: bool = True
    ) -> _Prepared:
        source, metadata = item if isinstance(item, tuple) else (item, None)
        metadata = dict(metadata if metadata is not None else default_metadata or {})
        started = time.perf_counter()
        try:
            if isinstance(source, Post):
                return prepare_post(
                    source, metadata, started, self.max_post_images, self.max_pixels
                )
            if is_video(source):
                return prepare_video(
                    source,
                    metadata,
                    started,
                    self.video_options,
                    self.video_limits,
                    self.max_pixels,
                )
            image = load_image(source, max_pixels=self.max_pixels)
        except ImageError as err:
            name = source.source if isinstance(source, Post) else None
            verdict = error_verdict(
                self.compiled, "image", err.message, source=name or describe_source(source)
            )
            if not observe:
                return _Prepared(metadata, decision=Decision(verdict=verdict, metadata=metadata))
            return _Prepared(metadata, decision=self._postprocess(verdict, metadata))
        return _Prepared(metadata, image=image, decode_seconds=time.perf_counter() - started)

    def _chunks(self, items: Iterable[Item], metadata: dict[str, Any] | None) -> Iterator[_Chunk]:
        """Items decoded and packed into backend calls of `batch_size` images, lazily: a
        video's frames fill batches (across several calls when they must); an item that
        needs no call (an error) takes a place as it always did."""
        chunk = _Chunk()
        for item in items:
            prepared = self._prepare(item, metadata)
            if not prepared.images:
                chunk.early += 1
            for image in prepared.images:
                if chunk.size >= self.batch_size:
                    yield chunk
                    chunk = _Chunk()
                chunk.members.append((prepared, image))
            chunk.done.append(prepared)
            if chunk.size >= self.batch_size:
                yield chunk
                chunk = _Chunk()
        if chunk.done or chunk.members:
            yield chunk

    def _batch_of(self, chunk: _Chunk) -> Batch | None:
        return self._batch_for(tuple(image for _, image in chunk.members))

    def _settle(
        self, chunk: _Chunk, generations: list[Generation], seconds: float
    ) -> Iterator[Decision]:
        """Give each item its answers from one backend call; finish the items it completes."""
        share = seconds / max(1, len(generations))
        for (item, _), generation in zip(chunk.members, generations, strict=True):
            timings = {"generate": share, **generation.timings}
            item.generations.append(replace(generation, timings=timings))
        for item in chunk.done:
            yield from self._finish([item], item.generations, 0.0)

    def _batch(self, prepared: list[_Prepared]) -> Batch | None:
        return self._batch_for(tuple(image for p in prepared for image in p.images))

    def _batch_for(self, images: tuple[LoadedImage, ...]) -> Batch | None:
        """One backend call's Batch of `images` under this engine's policy (None: no images)."""
        if not images:
            return None
        return Batch(self.compiled, self.mode, images, self.max_new_tokens)

    def _timed_generate(self, chunk: _Chunk) -> tuple[list[Generation], float]:
        batch = self._batch_of(chunk)
        started = time.perf_counter()
        generations = self._generate(batch) if batch is not None else []
        seconds = time.perf_counter() - started
        self._shadow_generate(chunk.done)  # a shadow policy's own answers, if any
        return generations, seconds

    def _generate(self, batch: Batch) -> list[Generation]:
        try:
            return self._checked(batch, self.backend.generate(batch))
        except Exception as err:  # any fault becomes the items' error verdicts
            return self._failed(batch, err)

    async def _agenerate(self, batch: Batch) -> list[Generation]:
        """Async twin of `_generate`."""
        try:
            return self._checked(batch, await self.backend.agenerate(batch))
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
            # one answer for a single image; a video's frames, a post's images
            mine = [next(answers) for _ in item.images]
            verdict = self._item_verdict(item, mine, share)
            yield self._postprocess(verdict, item.metadata, generations=mine, prepared=item)

    def _item_verdict(
        self, item: _Prepared, generations: list[Generation], share: float = 0.0
    ) -> Verdict:
        """The Verdict of one item from its answers (one per decoded image): each answer
        calibrated, read under this policy, and an item of parts aggregated by its rule."""
        verdicts: list[Verdict] = []
        for image, generation in zip(item.images, generations, strict=True):
            timings = {"decode_image": item.decode_seconds, "generate": share, **generation.timings}
            scored, calibrated = calibrate(self.calibration, generation)
            verdict = build_verdict(
                self.compiled,
                self.mode,
                scored,
                source=image.source,
                timings=timings,
                score_threshold=self.score_threshold,
                lenient=self.lenient,
            )
            verdicts.append(calibrated(verdict))
        if item.parts is not None:
            return self._aggregate(item, verdicts)
        return verdicts[0]

    def _aggregate(self, item: _Prepared, judged: list[Verdict]) -> Verdict:
        """One Verdict of an item's parts by the policy's rule (parts that could not be
        decoded are error verdicts among them)."""
        assert item.parts is not None
        answers = iter(judged)
        verdicts = [
            error_verdict(self.compiled, "image", item.failed[part.index], source=part.source)
            if part.index in item.failed
            else next(answers)
            for part in item.parts
        ]
        timings: dict[str, float] = {}
        for verdict in judged:
            for key, value in verdict.timings.items():
                timings[key] = timings.get(key, 0.0) + value
        timings["decode_image"] = item.decode_seconds
        return aggregate(
            self.compiled,
            self.aggregation,
            item.parts,
            verdicts,
            source=item.source or "<item>",
            timings=timings,
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
        generations: list[Generation] | None = None,
        prepared: _Prepared | None = None,
    ) -> Decision:
        decision = Decision(verdict=verdict, metadata=metadata)
        self._run_steps(decision, 0, [], shadows=True)
        if self.shadow is not None:
            decision.add_shadow(
                shadow_mode.policy_result(self, verdict, metadata, generations, prepared)
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
