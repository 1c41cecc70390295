"""The sglang backend through SGLang's real router (sglang-router, a Rust binary in a wheel that
runs on CPU) in front of two loopback SGLang workers: every transport, mode, score_answers and
list batching, and a worker killed in the middle of an audit.

The router re-serialises every body (adding SGLang's default fields), has no /tokenize, takes one
text per /generate (422 for a list), answers /get_server_info itself, retries a failed request
on another worker and circuit-breaks. Bound to 127.0.0.1 (its defaults bind 0.0.0.0, Prometheus
included); stopped by its PID.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sglang_server import FakeSGLang

from policy_engine import Engine

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sglang_router") is None,
    reason="sglang-router is not installed (pip install -e '.[dev]' brings it)",
)
READY_WITHIN = 120.0  # seconds to wait for the router's readiness, polling; not a measurement


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


@dataclass
class Router:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def start_router(workers: list[str], log: Path) -> Router:
    """The router in front of `workers`, once it routes to all of them."""
    port, metrics = free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics)),
        "--worker-urls",
        *workers,
        *("--policy", "round_robin"),
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    router = Router(f"http://127.0.0.1:{port}", process, log)
    give_up = time.monotonic() + READY_WITHIN
    while time.monotonic() < give_up:
        if process.poll() is not None:
            raise RuntimeError(f"the router exited ({process.returncode}): {router.tail()}")
        try:
            listed = get_json(router.url + "/workers")
        except (OSError, ValueError):
            listed = {}
        urls = {w.get("url") for w in listed.get("workers", []) if w.get("is_healthy")}
        if urls == set(workers):
            return router
        time.sleep(0.1)  # polling for readiness
    stop(process)
    raise RuntimeError(f"the router did not route to {workers}: {router.tail()}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def workers() -> Iterator[tuple[FakeSGLang, FakeSGLang]]:
    with FakeSGLang() as a, FakeSGLang() as b:
        yield a, b


@pytest.fixture(scope="module")
def router(
    workers: tuple[FakeSGLang, FakeSGLang], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Router]:
    log = tmp_path_factory.mktemp("router") / "router.log"
    running = start_router([w.url for w in workers], log)
    try:
        yield running
    finally:
        stop(running.process)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    return make_images(folder, 6)


def make_images(folder: Path, count: int) -> list[Path]:
    paths = []
    for index in range(count):
        path = folder / f"{index:03d}.png"
        Image.new("RGB", (24 + index % 7, 20), (index * 37 % 256, 80, 255 - index % 256)).save(path)
        paths.append(path)
    return paths


def engine(url: str, transport: str, mode: str, **options: Any) -> Engine:
    return Engine(
        "llavaguard",
        "sglang",
        mode=mode,  # type: ignore[arg-type]
        backend_options={"url": url, "transport": transport, **options},
    )


CASES = [
    (transport, mode, score_answers, list_batch)
    for transport in ("openai", "native")
    for mode in ("full", "verdict", "score")
    for score_answers in ((False, True) if mode != "score" else (False,))
    for list_batch in ((1, 3) if transport == "native" else (1,))
]


@pytest.mark.parametrize(
    ("transport", "mode", "score_answers", "list_batch"),
    CASES,
    ids=[f"{t}-{m}{'-scored' if s else ''}-list{n}" for t, m, s, n in CASES],
)
def test_every_transport_and_mode_through_the_router(
    router: Router,
    workers: tuple[FakeSGLang, FakeSGLang],
    images: list[Path],
    transport: str,
    mode: str,
    score_answers: bool,
    list_batch: int,
) -> None:
    for worker in workers:
        worker.clear()
    options = {"score_answers": score_answers, "list_batch": list_batch}
    with engine(router.url, transport, mode, **options) as e:
        decisions = list(e.assess_many(images))
        backend: Any = e.backend
        assert backend.server.kind == "sglang" and backend.server.router
    assert [d.verdict.source for d in decisions] == [str(p) for p in images]
    for decision in decisions:
        verdict = decision.verdict
        assert verdict.ok, (verdict.error, router.tail())
        assert verdict.rating in ("Safe", "Unsafe")
        if mode == "score" or score_answers:
            assert verdict.p_unsafe is not None and 0.0 <= verdict.p_unsafe <= 1.0
        else:
            assert verdict.p_unsafe is None
    path = "/v1/chat/completions" if transport == "openai" else "/generate"
    served = [w.counts[path] for w in workers]
    per_image = 2 if score_answers else 1
    assert sum(served) == per_image * len(images) and min(served) > 0  # round robin
    bodies = [r.body for w in workers for r in w.received]
    assert all(b is not None and not isinstance(b.get("text"), list) for b in bodies)
    added = "separate_reasoning" if transport == "openai" else "log_metrics"
    assert all(added in b for b in bodies if b is not None)  # re-serialised by the router


def test_a_refused_list_batch_falls_back_to_one_image_per_request(
    router: Router,
    workers: tuple[FakeSGLang, FakeSGLang],
    images: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Told only that it is SGLang, the backend sends a list; the router answers 422 and the
    images go one by one."""
    for worker in workers:
        worker.clear()
    with engine(router.url, "native", "score", server="sglang", list_batch=3) as e:
        decisions = list(e.assess_many(images))
    assert all(d.verdict.ok and d.verdict.p_unsafe is not None for d in decisions)
    assert sum(w.counts["/generate"] for w in workers) == len(images)
    refused = [r for r in caplog.records if "refuses a list of texts" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.WARNING


def results(path: Path) -> list[tuple[str, int, str | None]]:
    with sqlite3.connect(path) as db:
        return list(db.execute("SELECT id, ok, error FROM results ORDER BY id"))


def test_a_worker_killed_mid_audit_loses_nothing_and_doubles_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    ids = sorted(p.name for p in make_images(folder, 40))
    out = tmp_path / "audit.db"
    command = [
        str(Path(sys.executable).with_name("policy-engine")),
        "audit",
        str(folder),
        *("--backend", "sglang", "--transport", "native", "--mode", "verdict"),
        *("--concurrency", "4", "--out", str(out)),
        # the router's /get_model_info asks one fixed worker: name the template, skip the look-up
        *("-o", "chat_template=chatml-llava", "-o", "backoff=0.05", "-o", "backoff_max=0.5"),
    ]
    with FakeSGLang(service_time=0.05) as a, FakeSGLang(service_time=0.05) as b:
        router = start_router([a.url, b.url], tmp_path / "router.log")
        try:
            audit = subprocess.Popen(
                [*command, "--url", router.url],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            # the audit itself ends the wait if the worker never gets 5 requests
            while b.counts["/generate"] < 5 and audit.poll() is None:
                time.sleep(0.02)  # polling the worker's own count
            b.stop()  # killed mid-audit: its requests in flight are cut off
            answered_before = a.counts["/generate"] + b.counts["/generate"]
            first_out, first_err = audit.communicate(timeout=600)
            assert audit.returncode in (0, 1), first_err  # 1: some rows are errors
            rows = results(out)
            assert [row[0] for row in rows] == ids, first_err  # every input, exactly once
            if any(not ok for _, ok, _ in rows):
                again = subprocess.run(
                    [*command, "--url", router.url, "--retry-errors"],
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                assert again.returncode == 0, again.stderr
                rows = results(out)
        finally:
            stop(router.process)
    assert [row[0] for row in rows] == ids
    assert all(ok for _, ok, _ in rows), [row for row in rows if not row[1]]
    assert b.counts["/generate"] >= 5 and answered_before < len(ids)  # it died mid-audit
    summary = json.loads(first_out)
    assert summary["total"] == len(ids)
