"""The engine: one policy, one backend; images in, Decisions out.

    engine = Engine("llavaguard", "static", backend_options={"rating": "Unsafe", "category": "O2"})
    decision = engine.assess("photo.jpg", metadata={"audience": "minors"})

Post-processors run in the order the policy lists them. A bad image or a failing backend call
becomes an error Decision for that item; `assess_many` never stops on one bad item.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .compiler import CompiledPolicy, compile_policy
from .components import MODES, Backend, Generation, Mode, PostProcessor, Request
from .errors import BackendError, ImageError, PolicyEngineError
from .host import PluginHost, get_host
from .images import DEFAULT_MAX_PIXELS, ImageSource, LoadedImage, describe_source, load_image
from .loader import check_policy, load_policy
from .policy import Category, NoneCategory, Policy
from .verdict import Decision, Verdict, error_verdict, parse_verdict

Item = ImageSource | tuple[ImageSource, dict[str, Any] | None]


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
    ) -> None:
        self.host = host or get_host()
        if mode not in MODES:
            raise PolicyEngineError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        if isinstance(policy, Policy):
            check_policy(policy, host=self.host)
            self.policy = policy
        else:
            self.policy = load_policy(policy, host=self.host)
        self.compiled: CompiledPolicy = compile_policy(self.policy, host=self.host)
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
        self.chain: list[tuple[str, PostProcessor]] = []
        for index, step in enumerate(self.policy.postprocess):
            cls = self.host.postprocessor(step.name)
            params = cls.Params.model_validate(step.params)
            self.chain.append((step.id or f"{index}:{step.name}", cls(params, self.policy)))
        self._load_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    def load(self) -> None:
        """Load the backend (weights, connections) once; assess() calls it when needed."""
        with self._load_lock:
            if not self.backend.loaded:
                self.backend.load()
                self.backend.loaded = True

    def close(self) -> None:
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

        def prepare_next() -> list[Request | Decision] | None:
            batch = next(batches, None)
            return None if batch is None else [self._prepare(i, metadata) for i in batch]

        # A pipeline: while the backend answers up to `depth` batches in worker threads, this
        # thread finishes the oldest (post-processing, the caller's work between items) and
        # decodes the images of the next.
        pending: deque[tuple[list[Request | Decision], Future[tuple[list[Generation], float]]]]
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
        self, batch: list[Item], metadata: dict[str, Any] | None
    ) -> list[Decision]:
        prepared = await asyncio.to_thread(lambda: [self._prepare(i, metadata) for i in batch])
        requests = [p for p in prepared if isinstance(p, Request)]
        started = time.perf_counter()
        generations: list[Generation] = []
        if requests:
            try:
                generations = self._checked(requests, await self.backend.agenerate(requests))
            except BackendError as err:
                generations = _failed(requests, err)
        return list(self._finish(prepared, generations, time.perf_counter() - started))

    # -- internals -------------------------------------------------------------------------
    def _prepare(self, item: Item, default_metadata: dict[str, Any] | None) -> Request | Decision:
        source, metadata = item if isinstance(item, tuple) else (item, None)
        metadata = dict(metadata if metadata is not None else default_metadata or {})
        started = time.perf_counter()
        try:
            image: LoadedImage = load_image(source, max_pixels=self.max_pixels)
        except ImageError as err:
            verdict = error_verdict(
                self.compiled, "image", err.message, source=describe_source(source)
            )
            return self._postprocess(verdict, metadata)
        request = Request(
            image=image,
            compiled=self.compiled,
            mode=self.mode,
            metadata=metadata,
            max_new_tokens=self.max_new_tokens,
        )
        request.decode_seconds = time.perf_counter() - started
        return request

    def _timed_generate(self, prepared: list[Request | Decision]) -> tuple[list[Generation], float]:
        requests = [p for p in prepared if isinstance(p, Request)]
        started = time.perf_counter()
        generations = self._generate(requests) if requests else []
        return generations, time.perf_counter() - started

    def _generate(self, requests: Sequence[Request]) -> list[Generation]:
        try:
            return self._checked(requests, self.backend.generate(requests))
        except BackendError as err:
            return _failed(requests, err)

    def _checked(
        self, requests: Sequence[Request], generations: list[Generation]
    ) -> list[Generation]:
        """The backend's answers, or one error per request if it broke the one-to-one contract."""
        if len(generations) == len(requests):
            return generations
        message = (
            f"backend {self.backend.name!r} returned {len(generations)} answers "
            f"for {len(requests)} requests"
        )
        return [Generation(error=message) for _ in requests]

    def _finish(
        self, prepared: list[Request | Decision], generations: list[Generation], seconds: float
    ) -> Iterator[Decision]:
        answers = iter(generations)
        share = seconds / max(1, len(generations))
        for item in prepared:
            if isinstance(item, Decision):
                yield item
                continue
            generation = next(answers)
            timings = {"decode_image": item.decode_seconds, "generate": share, **generation.timings}
            verdict = self._verdict(item, generation, timings)
            yield self._postprocess(verdict, item.metadata)

    def _verdict(self, request: Request, gen: Generation, timings: dict[str, float]) -> Verdict:
        extra: dict[str, Any] = {
            "model": gen.model,
            "source": request.image.source,
            "timings": timings,
        }
        if gen.error is not None:
            return error_verdict(
                self.compiled,
                "backend",
                gen.error,
                raw=gen.text or None,
                retryable=gen.retryable,
                **extra,
            )
        if self.mode == "score":
            if gen.p_unsafe is None:
                return error_verdict(self.compiled, "backend", "backend gave no score", **extra)
            rating = "Unsafe" if gen.p_unsafe >= self.score_threshold else "Safe"
            policy = self.compiled.policy
            category = _score_category(policy, rating, gen.category_scores)
            return Verdict(
                rating=rating,
                p_unsafe=gen.p_unsafe,
                category_scores=gen.category_scores,
                category_id=category.id if category else None,
                category_name=category.name if category else None,
                severity=category.severity if isinstance(category, Category) else None,
                policy_id=policy.id,
                policy_version=policy.version,
                policy_hash=self.compiled.hash,
                **extra,
            )
        verdict = parse_verdict(
            gen.text, self.compiled, schema=self.compiled.schema_for(self.mode), **extra
        )
        if verdict.ok:
            verdict.p_unsafe = gen.p_unsafe
            verdict.category_scores = gen.category_scores
        return verdict

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

    def _postprocess(self, verdict: Verdict, metadata: dict[str, Any]) -> Decision:
        decision = Decision(verdict=verdict, metadata=metadata)
        context: dict[str, Any] = {
            "metadata": metadata,
            "mode": self.mode,
            "compiled": self.compiled,
        }
        failed: list[str] = []
        for step_id, processor in self.chain:
            context["step_id"] = step_id
            try:
                processor(decision, context)
            except Exception as err:  # a plugin fault must not lose the verdict
                failed.append(step_id)
                decision.note(
                    step_id, f"post-processor failed: {type(err).__name__}: {err}", error=True
                )
        if failed:
            self._on_failure(decision, failed)
        self.host.observe_decision(decision)
        return decision


def _score_category(
    policy: Policy, rating: str, scores: dict[str, float] | None
) -> Category | NoneCategory | None:
    """A score-mode verdict's category: for Unsafe, the most likely violated category; for
    Safe, the none-applying one; None when the backend gave no category scores."""
    if not scores:
        return None
    if rating == "Safe":
        return policy.none_category
    known = {c.id: c for c in policy.categories}
    ranked = sorted((v, k) for k, v in scores.items() if k in known)
    return known[ranked[-1][1]] if ranked else None


def _failed(requests: Sequence[Request], err: BackendError) -> list[Generation]:
    return [Generation(error=err.message, retryable=err.retryable) for _ in requests]


T = TypeVar("T")


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
