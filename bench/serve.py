"""Benchmark the HTTP service (`policy-engine serve`) with a zero-latency backend.

    .venv/bin/python bench/serve.py                          # 1, 16, 64 clients, 4 s each
    .venv/bin/python bench/serve.py --clients 1 8 --seconds 10

The server runs the `static` backend (a fixed verdict, no model) in its own process, as the
command runs it (uvicorn, JSON access log on stderr, here into a file). A load generator in a
second process (asyncio + aiohttp, keep-alive connections on loopback) keeps N requests in
flight for a while, after a warm-up, against `POST /v1/assess` (a small PNG data URL) and
`POST /v1/moderations` (the same image as an `image_url` part). In the same run, in this
process, the engine alone judges the same image one call at a time (`Engine.assess`, and
`Engine.aassess`, the async path the service uses): the cost of the backend call itself.

For each endpoint and number of clients it prints requests per second, p50 and p99 latency
seen by the client, the server's own view from its /metrics (mean time from a request's arrival
to its answer, and the part spent judging), CPU time per request of the server and of the
client, and ratios: latency and server CPU per request over the in-process engine call, and
throughput over the in-process engine's calls per second. With a backend that takes no time,
everything above the engine call is the service's overhead; with a model it is a constant on
top of the model's latency. Server and client share this machine's cores, so at 16 and 64
clients the client's own CPU is part of what limits throughput. Nothing here is asserted.

    .venv/bin/python bench/serve.py --first-request    # tiny-random, with and without warm-up
    .venv/bin/python bench/serve.py --first-request --model PATH --mode verdict -o greedy=true

    .venv/bin/python bench/serve.py --model-throughput   # tiny-random: serve vs assess_many

`--model-throughput` compares `serve` with an in-process model (default `tiny-random`) with the
engine's own batched throughput: `Engine.assess_many` over the same image in batches of the
backend's batch size, images per second; then the server (once per `--windows` value of
`--batch-window-ms`, 0 being no cross-request batching) under 1, 16 and 64 clients of
`/v1/assess` (one image per request), and the ratio of its rate to the engine's.

`--first-request` measures what the warm-up buys: the server with a model (default `tiny-random`,
built offline on first use) is started twice, with and without `--no-warmup`; each time it
prints the seconds from start to ready, the warm-up's own seconds (its log line), the latency
of the first `/v1/assess` after ready and the median of the next five.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from policy_engine import Engine

STATIC = ["--backend", "static", "-o", "rating=Unsafe", "-o", "category=O2"]
PATHS = {"assess": "/v1/assess", "moderations": "/v1/moderations"}
SERVER = "from policy_engine.cli import main; main()"


def data_url(size: int = 64) -> str:
    """A small PNG of seeded noise (so it does not compress to nothing) as a data URL."""
    noise = random.Random(0).randbytes(size * size * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), noise).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def body(endpoint: str, url: str) -> bytes:
    if endpoint == "assess":
        return json.dumps({"image": url}).encode()
    part = {"type": "image_url", "image_url": {"url": url}}
    return json.dumps({"model": "llavaguard", "input": [part]}).encode()


# -- the load generator (its own process) -----------------------------------------------------
async def load(
    url: str, payload: bytes, clients: int, warmup: float, seconds: float
) -> dict[str, Any]:
    """`clients` requests in flight until the end; latencies of the requests that finished in
    the measured window (after `warmup`)."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    headers = {"Content-Type": "application/json"}
    loop = asyncio.get_running_loop()
    start = loop.time()
    window = (start + warmup, start + warmup + seconds)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    total = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal total
        while loop.time() < window[1]:
            sent = time.perf_counter()
            async with session.post(url, data=payload, headers=headers) as response:
                await response.read()
                status = response.status
            finished = loop.time()
            total += 1
            if window[0] <= finished <= window[1]:
                latencies.append(time.perf_counter() - sent)
                statuses[status] = statuses.get(status, 0) + 1

    cpu = time.process_time()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return {
        "latencies": latencies,
        "statuses": statuses,
        "seconds": seconds,
        "total": total,
        "cpu": time.process_time() - cpu,
    }


def client_main(args: argparse.Namespace) -> None:
    payload = body(args.endpoint, data_url())
    result = asyncio.run(
        load(args.url + PATHS[args.endpoint], payload, args.clients, args.warmup, args.seconds)
    )
    json.dump(result, sys.stdout)


# -- the server and its metrics ---------------------------------------------------------------
def start_server(
    log: Path, args: list[str] = STATIC, attempts: int = 600
) -> tuple[subprocess.Popen[bytes], str]:
    """`policy-engine serve --port 0` with `args` (the static backend); its URL once ready."""
    command = [sys.executable, "-c", SERVER, "serve", *args, "--port", "0"]
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    pause = threading.Event()
    for _ in range(attempts):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if '"listening"' in line:
                url = json.loads(line)["url"]
                wait_ready(url, process, attempts)
                return process, url
        if process.poll() is not None:
            break
        pause.wait(0.05)
    process.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text(errors='replace')}")


def wait_ready(url: str, process: subprocess.Popen[bytes], attempts: int = 600) -> None:
    pause = threading.Event()
    for _ in range(attempts):
        try:
            with urllib.request.urlopen(url + "/readyz") as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None:
            break
        pause.wait(0.05)
    raise SystemExit("the server never became ready")


SAMPLE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$")


def scrape(url: str) -> dict[tuple[str, str], float]:
    """(metric name, labels text) -> value, from the server's /metrics."""
    with urllib.request.urlopen(url + "/metrics") as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            samples[(match.group(1), match.group(2))] = float(match.group(3))
    return samples


def mean_delta(before: dict[Any, float], after: dict[Any, float], name: str, label: str) -> float:
    """Mean of histogram `name` over the observations between two scrapes (labels containing
    `label`), in seconds."""

    def total(samples: dict[Any, float], suffix: str) -> float:
        return sum(
            v for (n, labels), v in samples.items() if n == name + suffix and label in labels
        )

    count = total(after, "_count") - total(before, "_count")
    return (total(after, "_sum") - total(before, "_sum")) / count if count else float("nan")


def process_cpu(pid: int) -> float:
    """CPU seconds a process has used (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the engine alone ---------------------------------------------------------------------------
def per_call(run: Callable[[], object], seconds: float) -> float:
    """Seconds per call of `run`, one at a time, after a few warm-up calls."""
    for _ in range(20):
        run()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run()
        calls += 1
    return (time.perf_counter() - started) / calls


def engine_costs(url: str, seconds: float) -> tuple[float, float]:
    """(Engine.assess, Engine.aassess) seconds per call on the image of the requests."""
    options = {"rating": "Unsafe", "category": "O2"}
    with Engine("llavaguard", "static", backend_options=options) as engine:
        sync = per_call(lambda: engine.assess(url), seconds)

        async def calls() -> float:
            for _ in range(20):
                await engine.aassess(url)
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                await engine.aassess(url)
                count += 1
            return (time.perf_counter() - started) / count

        asynchronous = asyncio.run(calls())
    return sync, asynchronous


# -- the first request after ready, with and without warm-up ------------------------------------
def post(url: str, payload: bytes) -> float:
    """Seconds for one POST (a 200 expected)."""
    request = urllib.request.Request(
        url, data=payload, headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as reply:
        reply.read()
        if reply.status != 200:
            raise SystemExit(f"{url}: status {reply.status}")
    return time.perf_counter() - started


def first_request(model: str, mode: str, options: list[str]) -> None:
    payload = json.dumps({"image": data_url()}).encode()
    shown_options = " ".join(f"-o {o}" for o in options) or "none"
    print(f"model: {model}, mode: {mode}, options: {shown_options}; image: 64x64 PNG of noise")
    print(f"{'warm-up':<10}{'to ready s':>12}{'warm-up s':>11}{'first ms':>11}{'next p50 ms':>13}")
    for warm in (True, False):
        command = ["--model", model, "--mode", mode, *(f"-o{o}" for o in options)]
        command += [] if warm else ["--no-warmup"]
        with tempfile.TemporaryDirectory() as folder:
            log = Path(folder) / "server.log"
            started = time.perf_counter()
            process, url = start_server(log, command, attempts=12_000)
            ready = time.perf_counter() - started
            try:
                first = post(url + "/v1/assess", payload)
                later = sorted(post(url + "/v1/assess", payload) for _ in range(5))
            finally:
                process.terminate()
                process.wait(timeout=60)
            records = [json.loads(line) for line in log.read_text().splitlines()]
        warmups = [r["seconds"] for r in records if r["event"] == "warmup"]
        shown = f"{warmups[0]:.2f}" if warmups else "-"
        print(
            f"{'on' if warm else 'off':<10}{ready:>12.2f}{shown:>11}"
            f"{first * 1000:>11.0f}{later[2] * 1000:>13.0f}"
        )
    print(
        "to ready: process start to /readyz 200 (model load, and the warm-up when on); "
        "first: the first /v1/assess after ready; next p50: the median of the five after it."
    )


# -- a model behind the service vs the engine's own batches -------------------------------------
def engine_batched_rate(
    model: str, mode: str, options: list[str], images: int
) -> tuple[float, int]:
    """(images/s, batch size) of Engine.assess_many over `images` copies of the image."""
    image = data_url()
    backend_options: dict[str, Any] = {"model": model}
    for option in options:
        key, _, value = option.partition("=")
        backend_options[key] = value
    with Engine("llavaguard", "transformers", mode=mode, backend_options=backend_options) as e:
        for _ in e.assess_many([image] * e.batch_size):  # warm-up: first calls compile, cache
            pass
        started = time.perf_counter()
        decisions = list(e.assess_many([image] * images))
        seconds = time.perf_counter() - started
        failed = sum(1 for d in decisions if d.verdict.error is not None)
        if failed:
            print(f"note: {failed} of {images} engine verdicts are errors")
        return images / seconds, e.batch_size


def model_throughput(args: argparse.Namespace) -> None:
    shown_options = " ".join(f"-o {o}" for o in args.option) or "none"
    print(machine())
    print(f"model: {args.model}, mode: {args.mode}, options: {shown_options}; one image a request")
    rate, size = engine_batched_rate(args.model, args.mode, args.option, args.images)
    print(f"Engine.assess_many, batches of {size}: {rate:.2f} images/s")
    print(
        f"{'window ms':>10}{'clients':>8}{'req/s':>9}{'p50 s':>9}{'rate/engine':>13}{'errors':>8}"
    )
    for window in args.windows:
        command = ["--model", args.model, "--mode", args.mode, *(f"-o{o}" for o in args.option)]
        command += ["--batch-window-ms", f"{window:g}", "--timeout", "3600", "--max-queue", "1024"]
        with tempfile.TemporaryDirectory() as folder:
            process, url = start_server(Path(folder) / "server.log", command, attempts=12_000)
            try:
                for clients in args.clients:
                    row = run(url, process.pid, "assess", clients, args)
                    print(
                        f"{window:>10g}{clients:>8}{row['rate']:>9.2f}{row['p50']:>9.2f}"
                        f"{row['rate'] / rate:>12.2f}x{row['errors']:>8}"
                    )
            finally:
                process.terminate()
                process.wait(timeout=60)
    print(
        "req/s: answers per second in the measured window (one image each); rate/engine: that "
        "over Engine.assess_many's images/s; window 0: no cross-request batching."
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import aiohttp
    import fastapi
    import uvicorn

    return (
        f"machine: {model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, uvicorn {uvicorn.__version__}, fastapi "
        f"{fastapi.__version__}, aiohttp {aiohttp.__version__} (client)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument(
        "--first-request",
        action="store_true",
        help="measure the first request after ready, with and without warm-up",
    )
    parser.add_argument(
        "--model-throughput",
        action="store_true",
        help="a model behind the service vs Engine.assess_many (use --seconds 30 or more)",
    )
    parser.add_argument("--model", default="tiny-random", help="with a model")
    parser.add_argument("--mode", default="full", help="with a model")
    parser.add_argument(
        "-o", "--option", action="append", default=[], help="with a model: KEY=VALUE"
    )
    parser.add_argument(
        "--windows", type=float, nargs="+", default=[5.0, 0.0], help="--batch-window-ms values"
    )
    parser.add_argument("--images", type=int, default=64, help="images for Engine.assess_many")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", choices=sorted(PATHS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        args.clients = args.clients[0]
        client_main(args)
        return
    if args.first_request:
        first_request(args.model, args.mode, args.option)
        return
    if args.model_throughput:
        model_throughput(args)
        return

    image = data_url()
    print(machine())
    print(
        f"backend: static (no model); image: 64x64 PNG of noise, data URL of {len(image)} bytes; "
        "server and client processes on loopback, sharing the cores"
    )
    sync, asynchronous = engine_costs(image, min(args.seconds, 2.0))
    print(
        f"in-process engine, one call at a time: Engine.assess {sync * 1000:.3f} ms/call "
        f"({1 / sync:.0f}/s), Engine.aassess {asynchronous * 1000:.3f} ms/call "
        f"({1 / asynchronous:.0f}/s)"
    )
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_server(Path(folder) / "server.log")
        try:
            rows = []
            for endpoint in PATHS:
                for clients in args.clients:
                    rows.append(run(url, process.pid, endpoint, clients, args))
        finally:
            process.terminate()
            process.wait(timeout=30)
    header = (
        f"{'endpoint':<16}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'server ms':>11}{'judging ms':>12}{'srv cpu ms':>12}{'cli cpu ms':>12}"
        f"{'p50/engine':>12}{'cpu/engine':>12}{'rate/engine':>13}{'errors':>8}"
    )
    print(header)
    for row in rows:
        print(
            f"{PATHS[row['endpoint']]:<16}{row['clients']:>8}{row['rate']:>9.0f}"
            f"{row['p50'] * 1000:>9.2f}{row['p99'] * 1000:>9.2f}{row['server'] * 1000:>11.2f}"
            f"{row['judging'] * 1000:>12.2f}{row['server_cpu'] * 1000:>12.2f}"
            f"{row['client_cpu'] * 1000:>12.2f}{row['p50'] / sync:>11.1f}x"
            f"{row['server_cpu'] / sync:>11.1f}x"
            f"{row['rate'] * sync:>12.2f}x{row['errors']:>8}"
        )
    print(
        "server ms: mean arrival-to-answer inside the server (its /metrics); judging ms: the part "
        "spent in the engine after admission (waiting for its worker threads included); cpu ms: "
        "CPU time per request of each process; p50/engine, cpu/engine: client p50 and server "
        "CPU per request over one Engine.assess call; rate/engine: req/s over Engine.assess "
        "calls/s; errors: answers other than 200."
    )


def run(
    url: str, pid: int, endpoint: str, clients: int, args: argparse.Namespace
) -> dict[str, Any]:
    before, cpu = scrape(url), process_cpu(pid)
    command = [
        sys.executable,
        __file__,
        "--client",
        "--url",
        url,
        "--endpoint",
        endpoint,
        "--clients",
        str(clients),
        "--seconds",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
    ]
    result = json.loads(subprocess.run(command, capture_output=True, check=True).stdout)
    served = process_cpu(pid) - cpu
    after = scrape(url)
    latencies = result["latencies"]
    route = f'route="{PATHS[endpoint]}"'
    return {
        "endpoint": endpoint,
        "clients": clients,
        "rate": len(latencies) / result["seconds"],
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "server": mean_delta(before, after, "policy_engine_http_request_duration_seconds", route),
        "judging": mean_delta(before, after, "policy_engine_assessment_duration_seconds", ""),
        "server_cpu": served / result["total"],
        "client_cpu": result["cpu"] / result["total"],
        "errors": sum(n for status, n in result["statuses"].items() if status != "200"),
    }


if __name__ == "__main__":
    main()
