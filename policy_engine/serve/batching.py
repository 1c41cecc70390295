"""Cross-request batching: images of concurrent requests for one engine, judged together.

A moderation client sends one image per request, many requests at a time; an in-process model
judges a batch of 8 much faster per image than 8 single images. A `Batcher` per engine (one
policy, one mode) collects the images of concurrent requests: the first image waits at most
`window` seconds for others, and a batch goes to the backend as soon as it holds the engine's
`batch_size` images (or the window has passed). While the backend answers a batch, new images
queue up, so under load batches fill without waiting for the window.

What stays per request:
- decoding: each request decodes its own images (in a worker thread) before queueing them, so
  an image that cannot be decoded is that request's error Decision and never enters a batch;
- post-processing: each request turns its own answers into Decisions, in its own order, with
  its own metadata (observers and sinks see exactly the Decisions answered);
- deadlines and cancellation: a request that times out or whose client went away stops
  waiting (its futures are cancelled); images not yet sent are dropped from the batch, and a
  batch already with the backend runs on for the other requests in it. Its answers for the
  gone request are dropped, never post-processed.

A backend failure (an exception from `agenerate`) becomes an error Generation for each image of
that batch, as in `Engine.aassess_many`.

Only for backends that batch in-process: a backend marked `concurrent` (a remote server such
as SGLang) batches across requests on its own server, so the service sends it requests as they
come (`batcher_for` returns None).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, replace

from ..backend import Generation
from ..engine import Engine
from ..engine import Item as EngineItem
from ..images import LoadedImage
from ..verdict import Decision


def batches_across_requests(engine: Engine, window: float) -> bool:
    """Whether requests for `engine` are batched together with a `window` (seconds)."""
    caps = engine.backend.capabilities
    return window > 0 and engine.batch_size > 1 and not caps.concurrent


@dataclass
class _Entry:
    image: LoadedImage
    future: asyncio.Future[Generation]
    queued: float  # event-loop time


class Batcher:
    """Judges the images of concurrent requests for one engine in shared backend calls."""

    def __init__(self, engine: Engine, window: float) -> None:
        self.engine = engine
        self.window = window
        self.batches = 0  # backend calls made
        self.images = 0  # images queued
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Entry] | None = None
        self._collector: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def judge(self, items: list[EngineItem]) -> list[Decision]:
        """The Decisions of `items`, in order, as `Engine.aassess_many` would give them."""
        engine = self.engine
        if not engine.backend.loaded:
            await asyncio.to_thread(engine.load)
        prepared = await asyncio.to_thread(lambda: [engine._prepare(i, None) for i in items])
        queue = self._started()
        loop = asyncio.get_running_loop()
        entries = [  # a video's frames and a post's images are judged like other images
            _Entry(image, loop.create_future(), loop.time()) for p in prepared for image in p.images
        ]
        for entry in entries:
            queue.put_nowait(entry)
        self.images += len(entries)
        try:
            generations = [await entry.future for entry in entries]
        finally:  # cancelled (deadline, client gone): the collector skips what is left
            for entry in entries:
                entry.future.cancel()
        await engine._ashadow_generate(prepared)  # a shadow policy's own answers, if any
        return list(engine._finish(prepared, generations, 0.0))

    async def close(self) -> None:
        """Stop collecting; batches with the backend finish for their requests."""
        collector, self._collector = self._collector, None
        if collector is not None:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._queue = None
        self._loop = None

    def _started(self) -> asyncio.Queue[_Entry]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._queue is None:  # a new loop (tests start several)
            self._loop, self._queue = loop, asyncio.Queue()
            self._running = set()
            self._collector = None
        if self._collector is None or self._collector.done():
            self._collector = loop.create_task(self._collect(self._queue))
        return self._queue

    async def _collect(self, queue: asyncio.Queue[_Entry]) -> None:
        loop = asyncio.get_running_loop()
        size = self.engine.batch_size
        slots = asyncio.Semaphore(self.engine.depth)  # batches with the backend at once
        while True:
            await slots.acquire()
            batch: list[_Entry] = []
            try:
                while not batch:
                    first = await queue.get()
                    if not first.future.done():
                        batch.append(first)
                closes = batch[0].queued + self.window
                while len(batch) < size:
                    try:
                        entry = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        remaining = closes - loop.time()
                        if remaining <= 0:
                            break
                        try:
                            async with asyncio.timeout(remaining):
                                entry = await queue.get()
                        except TimeoutError:
                            break
                    if not entry.future.done():
                        batch.append(entry)
            except BaseException:
                slots.release()
                for entry in batch:
                    entry.future.cancel()
                raise
            task = loop.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            task.add_done_callback(lambda _: slots.release())

    async def _run(self, entries: list[_Entry]) -> None:
        entries = [e for e in entries if not e.future.done()]  # gone while the batch formed
        if not entries:
            return
        engine = self.engine
        batch = engine._batch_for(tuple(e.image for e in entries))
        assert batch is not None  # entries is not empty
        self.batches += 1
        started = time.perf_counter()
        try:
            generations = await engine._agenerate(batch)  # a fault: the items' error verdicts
            share = (time.perf_counter() - started) / len(entries)
            for entry, generation in zip(entries, generations, strict=True):
                if not entry.future.done():
                    timings = {"generate": share, **generation.timings}
                    entry.future.set_result(replace(generation, timings=timings))
        finally:
            for entry in entries:  # cancelled itself (shutdown): no request waits forever
                entry.future.cancel()
