"""The service's limits count images, not requests (policy_engine/serve/limits.py).

The Limiter directly (admission, FIFO slots weighted by images, cancellation), then through
HTTP with a backend held by a gate (a threading.Event) until the test has seen the state it
waits for. No test bounds wall-clock time.
"""

from __future__ import annotations

import asyncio
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("fastapi")

import httpx
from test_serve import ColorBackend, data_url, live_server, metric, parse_prometheus, png, wait_for

from policy_engine import Batch, Capabilities, Generation
from policy_engine.serve.accesslog import EventLog
from policy_engine.serve.app import create_app
from policy_engine.serve.limits import Limiter, Saturated
from policy_engine.serve.pool import EnginePool
from policy_engine.serve.settings import ServeSettings

RED = data_url(png(color="red"))


def test_a_request_counts_its_images_once_its_body_is_read() -> None:
    async def scenario() -> None:
        limiter = Limiter(max_concurrency=2, max_queue=2)  # 4 images in the service
        assert limiter.try_admit()  # a request, body not read: one image
        async with limiter.slot(3):  # its body holds 3 images: it fits (3 of 4)
            assert (limiter.images, limiter.images_running, limiter.running) == (3, 3, 1)
            assert limiter.try_admit()  # another request: 4 of 4
            with pytest.raises(Saturated):  # its 2 images would make 5
                async with limiter.slot(2):
                    pass
            assert limiter.images == 4  # refused: only the image it was admitted as
            assert not limiter.try_admit()  # full: refused before its body is read
            limiter.leave()
        limiter.leave()
        assert (limiter.images, limiter.admitted, limiter.running) == (0, 0, 0)

    asyncio.run(scenario())


def test_a_lone_request_with_more_images_than_the_service_holds_still_runs() -> None:
    async def scenario() -> None:
        limiter = Limiter(max_concurrency=2, max_queue=1)
        assert limiter.try_admit()
        async with limiter.slot(50):  # counted as the whole service (3), slots: all 2
            assert limiter.images == 3
            assert not limiter.try_admit()
        limiter.leave()
        assert limiter.images == 0

    asyncio.run(scenario())


def test_slots_are_first_come_first_served_by_weight() -> None:
    """A request of 2 images waiting for both slots is not overtaken by 1-image requests."""

    async def scenario() -> list[str]:
        limiter = Limiter(max_concurrency=2, max_queue=8)
        order: list[str] = []
        first_in = asyncio.Event()
        release_first = asyncio.Event()

        async def request(name: str, images: int, hold: asyncio.Event | None = None) -> None:
            assert limiter.try_admit()
            try:
                async with limiter.slot(images):
                    order.append(name)
                    if name == "first":
                        first_in.set()
                    if hold is not None:
                        await hold.wait()
            finally:
                limiter.leave()

        first = asyncio.create_task(request("first", 1, release_first))
        await first_in.wait()  # one slot taken, one free
        big = asyncio.create_task(request("big", 2))
        await asyncio.sleep(0)
        small = asyncio.create_task(request("small", 1))  # one slot is free, but big is first
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == ["first"]
        release_first.set()
        await asyncio.gather(first, big, small)
        return order

    assert asyncio.run(scenario()) == ["first", "big", "small"]


def test_a_request_cancelled_while_waiting_lets_those_behind_it_go() -> None:
    async def scenario() -> list[str]:
        limiter = Limiter(max_concurrency=2, max_queue=8)
        order: list[str] = []
        hold = asyncio.Event()

        async def request(name: str, images: int, wait: asyncio.Event | None = None) -> None:
            limiter.try_admit()
            try:
                async with limiter.slot(images):
                    order.append(name)
                    if wait is not None:
                        await wait.wait()
            finally:
                limiter.leave()

        holder = asyncio.create_task(request("holder", 1, hold))
        await asyncio.sleep(0)
        big = asyncio.create_task(request("big", 2))  # waits for both slots
        await asyncio.sleep(0)
        small = asyncio.create_task(request("small", 1))  # waits behind big
        for _ in range(5):
            await asyncio.sleep(0)
        big.cancel()  # its deadline passed: small must not wait for it
        small_done = await asyncio.wait_for(small, timeout=60)
        assert small_done is None
        hold.set()
        await holder
        with pytest.raises(asyncio.CancelledError):
            await big
        assert (limiter.images, limiter.admitted) == (0, 0)
        async with limiter.slot(2):  # all slots free again
            order.append("after")
        return order

    assert asyncio.run(scenario()) == ["holder", "small", "after"]


class GatedColor(ColorBackend):
    """ColorBackend whose calls wait for `gate`, counting the images it has started on."""

    name = "gated-color-test"
    capabilities = Capabilities(images=True, json_schema=True, scores=True, concurrent=True)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.gate = threading.Event()
        self.started = 0
        self.lock = threading.Lock()

    def generate(self, batch: Batch) -> list[Generation]:
        with self.lock:
            self.started += len(batch)
        assert self.gate.wait(60)
        return super().generate(batch)


def test_http_limits_count_images() -> None:
    backend = GatedColor()
    pool = EnginePool(["llavaguard"], backend)
    settings = ServeSettings(max_concurrency=2, max_queue=1, warmup=False)
    app = create_app(settings, pool, log=EventLog(io.StringIO()))
    two = {"items": [{"image": RED}, {"image": RED}]}
    with live_server(app) as url, ThreadPoolExecutor(2) as threads:
        post = httpx.post
        held = threads.submit(post, url + "/v1/assess/batch", json=two, timeout=60)
        wait_for(lambda: backend.started >= 2)  # 2 images hold both slots
        refused_batch = post(url + "/v1/assess/batch", json=two, timeout=60)  # 2 + 2 > 3
        queued = threads.submit(post, url + "/v1/assess", json={"image": RED}, timeout=60)

        def gauges() -> tuple[float, float]:
            samples = parse_prometheus(httpx.get(url + "/metrics").text)
            return (
                metric(samples, "policy_engine_images_in_flight"),
                metric(samples, "policy_engine_images_queued"),
            )

        wait_for(lambda: gauges() == (2, 1))  # 3 images in the service: it is full
        refused_single = post(url + "/v1/assess", json={"image": RED}, timeout=60)
        backend.gate.set()
        answers = [held.result(), queued.result()]
        samples = parse_prometheus(httpx.get(url + "/metrics").text)
    assert refused_batch.status_code == 429
    error = refused_batch.json()["error"]
    assert error["code"] == "server_busy"
    assert error["message"].startswith("2 images do not fit: the service is at capacity")
    assert int(refused_batch.headers["retry-after"]) >= 1
    assert refused_single.status_code == 429
    assert [a.status_code for a in answers] == [200, 200]
    assert [d["rating"] for d in answers[0].json()["decisions"]] == ["Unsafe", "Unsafe"]
    assert answers[1].json()["decision"]["rating"] == "Unsafe"
    assert metric(samples, "policy_engine_requests_rejected_total", reason="saturated") == 2
    assert metric(samples, "policy_engine_images_in_flight") == 0
