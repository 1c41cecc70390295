"""Cross-request batching in the service (policy_engine/serve/batching.py).

Backends here record the batches they receive. No test bounds wall-clock time: batches are
made to fill (batch size reached) or a gate (a threading.Event) holds the backend until the
test has seen what it waits for.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest

pytest.importorskip("fastapi")

from click.testing import CliRunner
from fastapi.testclient import TestClient
from test_serve import Api, ColorBackend, data_url, metric, parse_prometheus, png, wait_for

from policy_engine import Batch, Capabilities, Generation
from policy_engine.cli import cli
from policy_engine.serve import service as service_module
from policy_engine.serve.accesslog import EventLog
from policy_engine.serve.app import create_app
from policy_engine.serve.batching import batches_across_requests
from policy_engine.serve.command import serve_command
from policy_engine.serve.context import RequestContext
from policy_engine.serve.pool import EnginePool
from policy_engine.serve.settings import ServeSettings

RED = data_url(png(color="red"))
BLUE = data_url(png(color="blue"))
NOT_AN_IMAGE = "data:image/png;base64,aGVsbG8gd29ybGQ="


class RecordingBackend(ColorBackend):
    """ColorBackend (red: Unsafe) that records the size of each batch it is given; once
    `armed`, each call waits for `gate`."""

    name = "recording-test"
    capabilities = Capabilities(
        images=True, json_schema=True, scores=True, batching=True, max_batch_size=8
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.batches: list[int] = []
        self.armed = False
        self.gate = threading.Event()
        self.lock = threading.Lock()

    def generate(self, batch: Batch) -> list[Generation]:
        if self.armed:
            with self.lock:
                self.batches.append(len(batch))
            assert self.gate.wait(120)
        else:
            with self.lock:
                self.batches.append(len(batch))
        return super().generate(batch)


class ServerBackend(RecordingBackend):
    """Like a remote server: concurrent calls help, it batches on its own."""

    name = "server-test"
    capabilities = Capabilities(
        images=True, json_schema=True, scores=True, batching=True, max_batch_size=8,
        concurrent=True,
    )  # fmt: skip


@contextmanager
def serving(
    backend: RecordingBackend, window_ms: float, batch_size: int | None = None, **settings: Any
) -> Iterator[Api]:
    pool = EnginePool(["llavaguard"], backend, batch_size=batch_size)
    app = create_app(
        ServeSettings(batch_window_ms=window_ms, **settings), pool, log=EventLog(io.StringIO())
    )
    with TestClient(app) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200)
        yield Api(client)


def _stable(decision: dict[str, Any]) -> dict[str, Any]:
    """A Decision without its timings (they differ from run to run)."""
    verdict = {k: v for k, v in decision["verdict"].items() if k != "timings"}
    return {**decision, "verdict": verdict}


def _concurrently(api: Api, bodies: list[dict[str, Any]]) -> list[Any]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: api.post("/v1/assess", json=body), bodies))


def _bodies(n: int) -> list[dict[str, Any]]:
    return [
        {"image": RED if i % 3 else BLUE, "metadata": {"n": i, "audience": "adults"}}
        for i in range(n)
    ]


def test_concurrent_requests_share_backend_calls_with_the_same_decisions() -> None:
    bodies = _bodies(16)
    unbatched = RecordingBackend()
    with serving(unbatched, 0) as api:
        calls_before = len(unbatched.batches)
        expected = [api.post("/v1/assess", json=body).json()["decision"] for body in bodies]
        assert len(unbatched.batches) - calls_before == len(bodies)

    batched = RecordingBackend()
    # a window far longer than the test: batches leave because they are full (8 images)
    with serving(batched, 600_000, batch_size=8) as api:
        batched.batches.clear()
        answers = _concurrently(api, bodies)
        samples = parse_prometheus(api.get("/metrics").text)
    assert [a.status_code for a in answers] == [200] * len(bodies)
    assert batched.batches == [8, 8]
    # metrics count requests and Decisions as without batching (warm-up is not counted)
    requests = "policy_engine_http_requests_total"
    assert metric(samples, requests, method="POST", route="/v1/assess", status="200") == 16
    verdicts = "policy_engine_verdicts_total"
    reds = sum(1 for body in bodies if body["image"] == RED)
    assert metric(samples, verdicts, policy="llavaguard", rating="Unsafe", category="O2") == reds
    assert metric(samples, verdicts, policy="llavaguard", rating="Safe", category="NA") == 16 - reds
    count = "policy_engine_assessment_duration_seconds_count"
    assert metric(samples, count, policy="llavaguard", mode="full") == 16
    got = [a.json()["decision"] for a in answers]
    assert [_stable(d) for d in got] == [_stable(d) for d in expected]
    assert [d["metadata"]["n"] for d in got] == list(range(len(bodies)))


def test_a_batch_request_and_moderation_are_batched_too() -> None:
    backend = RecordingBackend()
    with serving(backend, 600_000, batch_size=4) as api:
        backend.batches.clear()
        with ThreadPoolExecutor(3) as pool:
            batch = pool.submit(
                api.post, "/v1/assess/batch", json={"items": [{"image": RED}, {"image": BLUE}]}
            )
            moderation = pool.submit(
                api.post,
                "/v1/moderations",
                json={"input": [{"type": "image_url", "image_url": {"url": u}} for u in (BLUE,)]},
            )
            single = pool.submit(api.post, "/v1/assess", json={"image": RED})
            answers = [batch.result(), moderation.result(), single.result()]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert backend.batches == [4]
    ratings = [d["verdict"]["rating"] for d in answers[0].json()["decisions"]]
    assert ratings == ["Unsafe", "Safe"]
    assert answers[1].json()["results"][0]["flagged"] is False
    assert answers[2].json()["decision"]["verdict"]["rating"] == "Unsafe"


def test_a_bad_image_is_an_error_for_its_request_only() -> None:
    backend = RecordingBackend()
    with serving(backend, 600_000, batch_size=3) as api:
        backend.batches.clear()
        bodies = [
            {"image": RED},
            {"items": [{"image": NOT_AN_IMAGE}, {"image": BLUE}]},
            {"image": NOT_AN_IMAGE},
            {"image": BLUE},
        ]
        paths = ["/v1/assess", "/v1/assess/batch", "/v1/assess", "/v1/assess"]
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(
                pool.map(lambda a: api.post(a[0], json=a[1]), zip(paths, bodies, strict=True))
            )
    assert [a.status_code for a in answers] == [200, 200, 422, 200]
    assert backend.batches == [3]  # the undecodable images never reached the backend
    items = answers[1].json()["decisions"]
    assert items[0]["verdict"]["error"]["kind"] == "image"
    assert items[1]["verdict"]["error"] is None
    assert answers[0].json()["decision"]["verdict"]["rating"] == "Unsafe"
    assert answers[3].json()["decision"]["verdict"]["rating"] == "Safe"


def test_a_request_past_its_deadline_gets_504_while_its_batch_completes_for_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Request "late" has a short deadline (0.3 s), "patient" a long one; both are in one
    batch, which the backend holds until the late one has had its 504."""

    def context(scope: Any) -> RequestContext | None:
        ctx = scope.get("policy_engine.context")
        if not isinstance(ctx, RequestContext):
            return None
        if (b"x-test-patient", b"1") in scope.get("headers", ()):
            ctx.deadline = ctx.arrived + 600
        else:
            ctx.deadline = ctx.arrived + 0.3
        return ctx

    monkeypatch.setattr(service_module, "request_context", context)
    backend = RecordingBackend()
    # a window longer than the short deadline: if the late request's image came too late for
    # the batch (a loaded machine), the patient one still goes to the backend after it
    with serving(backend, 2000, batch_size=2) as api:
        service = api.client.app.state.service  # type: ignore[attr-defined]
        backend.batches.clear()
        backend.armed = True
        with ThreadPoolExecutor(2) as pool:
            patient = pool.submit(
                api.post, "/v1/assess", json={"image": BLUE}, headers={"x-test-patient": "1"}
            )
            wait_for(lambda: any(b and b.images for b in service.batchers.values()))
            late = pool.submit(api.post, "/v1/assess", json={"image": RED})
            late_answer = late.result()  # the 504 comes while the backend holds the batch
            assert not patient.done()
            backend.gate.set()
            patient_answer = patient.result()
    assert late_answer.status_code == 504
    assert late_answer.json()["error"]["code"] == "timeout"
    assert patient_answer.status_code == 200
    assert patient_answer.json()["decision"]["verdict"]["rating"] == "Safe"
    assert sum(backend.batches) <= 2


def test_the_backend_gets_no_gone_request_images() -> None:
    """A request cancelled while its image waits in the queue withdraws it."""
    import asyncio

    from policy_engine.serve.batching import Batcher

    backend = RecordingBackend()
    backend.ensure_loaded()
    pool = EnginePool(["llavaguard"], backend, batch_size=4)
    engine = pool.engine("llavaguard")
    batcher = Batcher(engine, window=600.0)

    async def scenario() -> tuple[list[Any], list[int]]:
        gone = asyncio.create_task(batcher.judge([(RED, None)]))
        while batcher._queue is None or batcher._queue.qsize() + len(batcher._running) == 0:
            await asyncio.sleep(0)
        # the collector holds the first image and waits for more; cancel its request
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        stays = [asyncio.create_task(batcher.judge([(BLUE, {"n": i})])) for i in range(4)]
        decisions = await asyncio.gather(*stays)
        await batcher.close()
        return decisions, list(backend.batches)

    decisions, batches = asyncio.run(scenario())
    assert batches == [4]  # the gone request's image was dropped from the batch
    assert [d[0].metadata["n"] for d in decisions] == [0, 1, 2, 3]
    assert all(d[0].verdict.rating == "Safe" for d in decisions)


def test_a_concurrent_server_backend_is_not_batched_across_requests() -> None:
    backend = ServerBackend()
    with serving(backend, 600_000, batch_size=8) as api:
        engine = api.client.app.state.service.pool.engine("llavaguard")  # type: ignore[attr-defined]
        assert not batches_across_requests(engine, 0.6)
        backend.batches.clear()
        answers = _concurrently(api, _bodies(4))
    assert [a.status_code for a in answers] == [200] * 4
    assert backend.batches == [1, 1, 1, 1]


def test_the_sglang_engine_does_not_batch_across_requests() -> None:
    pytest.importorskip("aiohttp")
    pool = EnginePool(["llavaguard"], "sglang", backend_options={"url": ["http://127.0.0.1:9"]})
    assert not batches_across_requests(pool.engine("llavaguard"), 0.005)
    static = EnginePool(["llavaguard"], "static")
    assert batches_across_requests(static.engine("llavaguard"), 0.005)
    assert not batches_across_requests(static.engine("llavaguard"), 0)


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_the_window_option_is_validated(value: str) -> None:
    cli.add_command(serve_command)
    result = CliRunner().invoke(
        cli, ["serve", "--port", "0", "--backend", "static", "--batch-window-ms", value]
    )
    assert result.exit_code == 2, result.output
    assert "--batch-window-ms" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    with pytest.raises(ValueError, match="batch_window_ms"):
        ServeSettings(batch_window_ms=float(value))


class FlakyBackend(RecordingBackend):
    """Once armed, its first call raises (a bug), later calls answer."""

    name = "flaky-test"

    def generate(self, batch: Batch) -> list[Generation]:
        if self.armed:
            self.armed = False
            with self.lock:
                self.batches.append(len(batch))
            raise RuntimeError("internal detail 4242")
        return super().generate(batch)


def test_a_failing_batch_call_is_an_error_verdict_for_each_of_its_images_only() -> None:
    backend = FlakyBackend()
    with serving(backend, 600_000, batch_size=2) as api:
        backend.batches.clear()
        backend.armed = True
        failed = _concurrently(api, [{"image": RED}, {"image": BLUE}])
        after = _concurrently(api, [{"image": RED}, {"image": BLUE}])
    assert backend.batches == [2, 2]
    for answer in failed:
        assert answer.status_code == 200
        error = answer.json()["decision"]["verdict"]["error"]
        assert error["kind"] != "image" and "4242" not in answer.text
    ratings = [a.json()["decision"]["verdict"]["rating"] for a in after]
    assert ratings == ["Unsafe", "Safe"]
