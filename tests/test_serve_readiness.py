"""Readiness of the HTTP service: the warm-up before ready and the backend's cached health
probe behind /readyz and the backend_ready metric (policy_engine/serve/readiness.py).

Backends whose health and answers the tests control are registered by name through a test
plugin host; the end-to-end case stops the loopback SGLang fake (tests/sglang_server.py) after
the service is ready. Conditions are polled, never timed.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Sequence
from typing import Any

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient
from policy_engine.backends.sglang import SGLangBackend
from policy_engine.backends.static import StaticBackend
from sglang_server import FakeSGLang
from test_serve import (
    KEY,
    RED,
    BrokenBackend,
    metric,
    parse_prometheus,
    serving,
    wait_for,
)

from policy_engine import Batch, Decision, Generation, PluginHost, hookimpl
from policy_engine.serve.accesslog import EventLog
from policy_engine.serve.app import create_app
from policy_engine.serve.pool import EnginePool
from policy_engine.serve.readiness import HealthProbe
from policy_engine.serve.settings import ServeSettings


class ProbedBackend(StaticBackend):
    """A backend whose health the test sets (`problem`), that records the (policy, mode) of
    each request it answers and, while `gate` is clear, waits before answering."""

    name = "probed-test"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.problem: str | None = None
        self.probes = 0
        self.calls: list[tuple[str, str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def health(self) -> str | None:
        self.probes += 1
        return self.problem

    def generate(self, batch: Batch) -> list[Generation]:
        self.calls.extend((batch.compiled.policy.id, batch.mode) for _ in batch)
        assert self.gate.wait(60)
        return super().generate(batch)


def probed_pool(
    policies: Sequence[str] = ("llavaguard",), observed: list[Decision] | None = None
) -> tuple[EnginePool, ProbedBackend]:
    """A pool whose backend is ProbedBackend, registered by name through a test plugin host
    (with an observer that collects every Decision into `observed`)."""
    seen = observed if observed is not None else []

    class Plugin:
        @hookimpl
        def register_backends(self, register):  # type: ignore[no-untyped-def]
            register(ProbedBackend)

        @hookimpl
        def observe_decision(self, decision):  # type: ignore[no-untyped-def]
            seen.append(decision)

    host = PluginHost()
    host.register(Plugin(), name="probed-test-plugin")
    options = {"rating": "Unsafe", "category": "O2"}
    pool = EnginePool(list(policies), "probed-test", backend_options=options, host=host)
    assert isinstance(pool.backend, ProbedBackend)
    return pool, pool.backend


def events(log: io.StringIO, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    return [line for line in lines if line["event"] == name]


def test_readyz_follows_the_backend_health_probe() -> None:
    pool, backend = probed_pool()
    log = io.StringIO()
    with serving(pool, ServeSettings(health_cache=0), log=log) as api:
        assert api.get("/readyz").json()["status"] == "ready"
        backend.problem = "no answer from http://10.0.0.7:30000/health"
        down = api.get("/readyz")
        down_metrics = parse_prometheus(api.get("/metrics").text)
        judged = api.post("/v1/assess", json={"image": RED})  # not refused: see docs/serve.md
        backend.problem = None
        up = api.get("/readyz")
        up_metrics = parse_prometheus(api.get("/metrics").text)
    assert down.status_code == 503
    assert down.json() == {
        "status": "unavailable",
        "backend": "probed-test",
        "error": "no answer from http://10.0.0.7:30000/health",
    }
    assert metric(down_metrics, "policy_engine_backend_ready") == 0
    assert judged.status_code == 200
    assert up.status_code == 200 and up.json()["status"] == "ready"
    assert metric(up_metrics, "policy_engine_backend_ready") == 1
    (unhealthy,) = events(log, "backend_unhealthy")
    assert unhealthy["level"] == "warning" and "10.0.0.7" in unhealthy["error"]
    assert len(events(log, "backend_healthy")) == 1


def test_the_health_probe_is_cached_and_its_reason_kept_behind_keys() -> None:
    pool, backend = probed_pool()
    settings = ServeSettings(api_keys=(KEY,), health_cache=3600)
    with serving(pool, settings, key=KEY) as api:
        backend.problem = "no answer from http://10.0.0.7:30000/health"
        answers = [api.get("/readyz") for _ in range(5)]
        probes = backend.probes
    # the first answer is reused for an hour: the change above is not seen yet
    assert [a.status_code for a in answers] == [200] * 5
    assert probes == 1
    pool, backend = probed_pool()
    backend.problem = "no answer from http://10.0.0.7:30000/health"
    with serving(pool, settings, key=KEY, ready=False) as api:
        wait_for(lambda: api.get("/readyz").json()["status"] == "unavailable")
        hidden = api.get("/readyz").json()
    assert hidden["error"] == "see the server log"


def test_one_health_probe_at_a_time_shared_by_the_callers_waiting_for_it() -> None:
    entered, release = threading.Event(), threading.Event()
    running: list[int] = []

    def slow() -> str | None:
        running.append(1)
        entered.set()
        assert release.wait(60)
        return "down"

    async def scenario() -> list[str | None]:
        probe = HealthProbe(slow, ttl=3600)
        tasks = [asyncio.create_task(probe.check()) for _ in range(4)]
        await asyncio.to_thread(entered.wait, 60)  # meanwhile, the other three are waiting
        release.set()
        return list(await asyncio.gather(*tasks))

    assert asyncio.run(scenario()) == ["down"] * 4
    assert len(running) == 1


def test_a_hanging_health_probe_is_unhealthy_and_never_started_twice() -> None:
    release = threading.Event()
    started: list[int] = []

    def hang() -> str | None:
        started.append(1)
        assert release.wait(60)
        return None

    async def scenario() -> list[str | None]:
        probe = HealthProbe(hang, ttl=0, timeout=0.05)
        answers = [await probe.check(), await probe.check()]  # the first probe still hangs
        release.set()
        for _ in range(1000):  # until the hung probe's answer arrives
            answers.append(await probe.check())
            if answers[-1] is None:
                break
        return answers

    answers = asyncio.run(scenario())
    assert answers[:2] == ["the health probe gave no answer within 0.05 s"] * 2
    assert answers[-1] is None
    assert len(started) == 1


def test_a_failing_health_probe_is_a_reason() -> None:
    def broken() -> str | None:
        raise OSError("probe\nexploded")

    async def scenario() -> str | None:
        return await HealthProbe(broken, ttl=0).check()

    assert asyncio.run(scenario()) == "health probe failed: OSError: probe exploded"


def test_warm_up_judges_every_policy_and_mode_before_ready() -> None:
    observed: list[Decision] = []
    pool, backend = probed_pool(["llavaguard", "children-platform"], observed)
    backend.gate.clear()
    log = io.StringIO()
    with serving(pool, log=log, ready=False) as api:
        wait_for(lambda: api.get("/readyz").json()["status"] == "warming_up")
        refused = api.post("/v1/assess", json={"image": RED})
        backend.gate.set()
        wait_for(lambda: api.get("/readyz").status_code == 200)
        warm = list(backend.calls)
        samples = parse_prometheus(api.get("/metrics").text)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
    assert warm == [
        (policy, mode)
        for policy in ("llavaguard", "children-platform")
        for mode in ("full", "verdict", "score")
    ]
    # warm-up verdicts reach no observer (sinks, decision logs) and no metric
    assert observed == []
    assert not [k for k in samples if k[0] == "policy_engine_verdicts_total"]
    (done,) = events(log, "warmup")
    assert done["assessments"] == 6 and done["failed"] == 0 and done["seconds"] >= 0
    names = [line["event"] for line in map(json.loads, log.getvalue().splitlines())]
    assert names.index("backend_loading") < names.index("warmup") < names.index("ready")


def test_no_warm_up_when_switched_off() -> None:
    pool, backend = probed_pool()
    with serving(pool, ServeSettings(warmup=False)) as api:
        assert api.get("/readyz").status_code == 200
        calls = list(backend.calls)
        api.post("/v1/assess", json={"image": RED})
    assert calls == []
    assert backend.calls == [("llavaguard", "full")]


def test_a_warm_up_fault_keeps_the_service_unready() -> None:
    failures: list[str] = []
    log = io.StringIO()
    pool = EnginePool(["llavaguard", "children-platform"], BrokenBackend())
    app = create_app(ServeSettings(), pool, log=EventLog(log), on_load_error=failures.append)
    with TestClient(app) as client:
        wait_for(lambda: client.get("/readyz").json()["status"] == "failed")
        readiness = client.get("/readyz")
        refused = client.post("/v1/assess", json={"image": RED})
        samples = parse_prometheus(client.get("/metrics").text)
    assert readiness.status_code == 503
    assert readiness.json()["error"] == (
        "warm-up (llavaguard, full): backend 'broken-test' failed unexpectedly: RuntimeError "
        "(see the log)"
    )
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "backend_unavailable"
    assert metric(samples, "policy_engine_backend_ready") == 0
    assert failures == []  # the process stays up, unready: the reason is in /readyz and the log
    (failed,) = events(log, "warmup_failed")  # the first fault ends the warm-up
    assert failed["level"] == "error" and failed["fault"] is True
    assert (failed["policy"], failed["mode"]) == ("llavaguard", "full")
    (done,) = events(log, "warmup")
    assert done["level"] == "error" and done["assessments"] == 1
    assert events(log, "ready") == []


def test_an_unparseable_warm_up_answer_is_logged_and_the_service_ready() -> None:
    log = io.StringIO()
    with serving(backend_options={"raw": "not a verdict"}, log=log) as api:
        assert api.get("/readyz").json()["status"] == "ready"
    failed = events(log, "warmup_failed")
    assert [(f["mode"], f["level"], f["fault"]) for f in failed] == [
        ("full", "warning", False),
        ("verdict", "warning", False),
    ]
    assert "no JSON object" in failed[0]["error"]
    (done,) = events(log, "warmup")
    assert done["level"] == "info" and (done["assessments"], done["failed"]) == (3, 2)


def test_readyz_turns_503_when_the_sglang_server_stops() -> None:
    assert "health" in vars(SGLangBackend)  # the sglang backend probes its servers
    fake = FakeSGLang().start()
    try:
        pool = EnginePool(["llavaguard"], "sglang", backend_options={"url": [fake.url]})
        log = io.StringIO()
        with serving(pool, ServeSettings(health_cache=1.0), log=log) as api:
            assert fake.counts["/v1/chat/completions"] >= 2  # the warm-up reached the server
            fake.stop()
            wait_for(lambda: api.get("/readyz").status_code == 503)
            readiness = api.get("/readyz").json()
            samples = parse_prometheus(api.get("/metrics").text)
    finally:
        fake.stop()
    assert readiness["status"] == "unavailable" and readiness["error"]
    assert metric(samples, "policy_engine_backend_ready") == 0
    assert events(log, "backend_unhealthy")
