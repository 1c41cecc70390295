"""The log of `policy-engine serve` is JSON lines only (policy_engine/serve/logs.py).

In-process: `JsonLogging` routes logging records, warnings and stray stderr lines into the
EventLog and restores everything on exit, transformers' own handler included. End to end: the
command in a subprocess, with a backend that makes every kind of noise and with the tiny
random-weight transformers model; every line of its stderr must parse as one JSON object.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

import httpx
from test_serve import CHILD, RED, wait_for

from policy_engine.serve.accesslog import EventLog
from policy_engine.serve.logs import JsonLogging

NOISY_CHILD = (
    """\
import logging, sys, warnings
from policy_engine import get_host, hookimpl
from policy_engine.backends.static import StaticBackend

class Noisy(StaticBackend):
    name = "noisy-test"

    def load(self):
        print("a plain print to stderr", file=sys.stderr)
        sys.stderr.write("\\rloading 10%\\rloading 100%\\n")
        warnings.warn("a library's warning", UserWarning)
        logging.getLogger("policy_engine.backends.noisy").info("the project's own info")
        logging.getLogger("transformers.modeling_utils").warning("a third-party warning")
        logging.getLogger("httpx").info("HTTP Request: GET (third-party info: not shown)")

class Plugin:
    @hookimpl
    def register_backends(self, register):
        register(Noisy)

get_host().register(Plugin(), name="noisy-test-plugin")
"""
    + CHILD
)


@contextmanager
def serve_process(
    args: Sequence[str], env: dict[str, str] | None = None, child: str = CHILD
) -> Iterator[tuple[str, list[str]]]:
    """The command in a subprocess on a free port: (URL once ready, its stderr lines so far).
    Stopped with SIGTERM on exit; the lines are complete once the context has left."""
    command = [sys.executable, "-c", child, "--port", "0", *args]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    lines: list[str] = []

    def read() -> None:
        for line in process.stderr or ():
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: any('"listening"' in line for line in lines) or process.poll() is not None)
        assert process.poll() is None, "".join(lines)
        url = json.loads(next(line for line in lines if '"listening"' in line))["url"]
        # a model loads and warms up: a generous bound on attempts, not a timing assertion
        wait_for(lambda: httpx.get(url + "/readyz").status_code == 200, attempts=6000, pause=0.05)
        yield url, lines
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=10)


def json_lines(lines: list[str]) -> list[dict[str, Any]]:
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line in serve's log: {line!r}") from None
        assert line.endswith("\n") and "\n" not in line[:-1]
        assert isinstance(records[-1], dict)
        assert {"time", "level", "event"} <= set(records[-1])
    return records


def test_json_logging_routes_records_and_stderr_then_restores() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level, stderr, showwarning = (
        root.handlers[:],
        root.level,
        sys.stderr,
        (warnings.showwarning),
    )
    with JsonLogging(EventLog(stream)):
        print("half a ", end="", file=sys.stderr)
        print("line", file=sys.stderr)
        logging.getLogger("httpx").info("third-party info")
        logging.getLogger("httpx").warning("third-party warning")
        try:
            raise ValueError("boom 77")
        except ValueError:
            logging.getLogger("policy_engine.serve.test").exception("it failed")
        sys.stderr.write("an unfinished line")
    assert (root.handlers, root.level, sys.stderr) == (handlers, level, stderr)
    assert warnings.showwarning is showwarning
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["logger"], r["level"], r["message"]) for r in records] == [
        ("stderr", "warning", "half a line"),
        ("httpx", "warning", "third-party warning"),
        ("policy_engine.serve.test", "error", "it failed"),
        ("stderr", "warning", "an unfinished line"),
    ]
    assert all(r["event"] == "log" for r in records)
    assert "ValueError: boom 77" in records[2]["traceback"]


def test_json_logging_takes_over_transformers_own_handler() -> None:
    hf_logging = pytest.importorskip("transformers.utils.logging")
    library = logging.getLogger("transformers")
    hf_logging.get_verbosity()  # its own handler in place, as after `import transformers`
    before = (library.handlers[:], library.propagate, hf_logging.is_progress_bar_enabled())
    stream = io.StringIO()
    with JsonLogging(EventLog(stream)) as logs:
        logs.quiet_libraries()  # again, as after loading a backend: idempotent
        hf_logging.get_logger("transformers.modeling_utils").warning("weights were missing")
        assert not hf_logging.is_progress_bar_enabled()
        assert library.handlers == [] and library.propagate
    (record,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert (record["logger"], record["level"], record["message"]) == (
        "transformers.modeling_utils",
        "warning",
        "weights were missing",
    )
    after = (library.handlers, library.propagate, hf_logging.is_progress_bar_enabled())
    assert after == before


def test_serve_log_is_json_lines_only_with_library_noise() -> None:
    with serve_process(["--backend", "noisy-test"], child=NOISY_CHILD) as (url, lines):
        assert httpx.post(url + "/v1/assess", json={"image": RED}).status_code == 200
    records = json_lines(lines)
    logged = {(r.get("logger"), r["level"], r.get("message")) for r in records}
    assert ("stderr", "warning", "a plain print to stderr") in logged
    assert ("stderr", "warning", "loading 100%") in logged  # a redrawn line: its last state
    assert ("policy_engine.backends.noisy", "info", "the project's own info") in logged
    assert ("transformers.modeling_utils", "warning", "a third-party warning") in logged
    warned = [r for r in records if r.get("logger") == "py.warnings"]
    assert len(warned) == 1 and "UserWarning: a library's warning" in warned[0]["message"]
    assert not any("HTTP Request" in line for line in lines)
    assert not any("loading 10%" in line for line in lines)
    events = [r["event"] for r in records]
    assert {"listening", "backend_loading", "warmup", "ready", "access", "stopped"} <= set(events)
    assert any(r["event"] == "server" and r["logger"].startswith("uvicorn") for r in records)


def test_serve_log_is_json_lines_only_with_the_tiny_random_model(tiny_models: Path) -> None:
    env = {"POLICY_ENGINE_CACHE": str(tiny_models), "HF_HUB_OFFLINE": "1"}
    args = ["--model", "tiny-random", "--mode", "verdict", "-o", "max_new_tokens=40"]
    with serve_process(args, env=env) as (url, lines):
        answer = httpx.post(url + "/v1/assess", json={"image": RED}, timeout=300)
        assert answer.status_code == 200
    records = json_lines(lines)
    random_weights = [r for r in records if "RANDOM weights" in r.get("message", "")]
    assert random_weights and random_weights[0]["level"] == "warning"
    (warmup,) = [r for r in records if r["event"] == "warmup"]
    assert warmup["assessments"] == 3 and warmup["seconds"] > 0
