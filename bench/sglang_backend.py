"""Benchmark the sglang backend against the loopback SGLang server: ratios side by side.

    .venv/bin/python bench/sglang_backend.py                       # 100 ms per request, 64 slots
    .venv/bin/python bench/sglang_backend.py --service-time 0.2 --images 2000

The server (tests/sglang_server.py) runs in its own process and answers each request after a
fixed service time, with room for `--slots` requests at once: a GPU server whose batch never
fills. Against it, in one run:

- the one-request-at-a-time client the LlavaGuard README shows (a blocking POST per image to
  the native /generate endpoint);
- the engine's sync API (`assess_many`) and async API (`aassess_many`) with the sglang backend at
  concurrency 64 (native and openai transports);

and prints each one's throughput, its speed-up over the sequential client, its efficiency
versus the ideal (slots / service time; goal >= 0.9) and the client's CPU time per request
(all threads of this process: image decoding, encoding, JSON, HTTP, parsing, post-processing),
and the server's. Both processes share this machine's cores: at 640 images/s the loopback server
alone needs about two thirds of a core, and its queueing shows up as lost efficiency. Nothing
here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from policy_engine import Engine
from policy_engine.compiler import compile_policy
from policy_engine.loader import load_policy

SERVER = Path(__file__).resolve().parent.parent / "tests" / "sglang_server.py"


def start_server(service_time: float, slots: int) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            str(SERVER),
            "--port",
            "0",
            "--service-time",
            str(service_time),
            "--max-running",
            str(slots),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("listening on "):
        process.kill()
        raise SystemExit(f"the test server did not start: {line!r}")
    return process, line.removeprefix("listening on ")


def make_images(folder: Path, count: int) -> list[Path]:
    paths = []
    for index in range(count):
        image = Image.new("RGB", (64, 48), (index % 256, (index * 7) % 256, (index * 13) % 256))
        path = folder / f"{index:05d}.png"
        image.save(path)
        paths.append(path)
    return paths


def sequential(url: str, paths: list[Path]) -> None:
    """The LlavaGuard README's client: one blocking request per image, template applied by the
    SGLang frontend (here: the same text the native transport sends)."""
    compiled = compile_policy(load_policy("llavaguard"))
    text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
        f"{compiled.prompt}<|im_end|>\n<|im_start|>assistant\n"
    )
    for path in paths:
        encoded = base64.b64encode(path.read_bytes()).decode()
        body = {
            "text": text,
            "image_data": encoded,
            "sampling_params": {
                "temperature": 0.2,
                "top_p": 0.95,
                "top_k": 50,
                "max_new_tokens": 500,
            },
        }
        request = urllib.request.Request(
            url + "/generate", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request) as reply:
            json.loads(reply.read())["text"]


def engine_sync(url: str, transport: str, concurrency: int) -> Callable[[list[Path]], None]:
    def run(paths: list[Path]) -> None:
        options = {"url": url, "transport": transport, "concurrency": concurrency}
        with Engine("llavaguard", "sglang", backend_options=options) as engine:
            failed = sum(not d.verdict.ok for d in engine.assess_many(paths))
        if failed:
            raise SystemExit(f"{failed} requests failed")

    return run


def engine_async(url: str, transport: str, concurrency: int) -> Callable[[list[Path]], None]:
    def run(paths: list[Path]) -> None:
        options = {"url": url, "transport": transport, "concurrency": concurrency}

        async def main() -> int:
            with Engine(
                "llavaguard", "sglang", backend_options=options, batch_size=64, concurrency=4
            ) as engine:
                return sum([not d.verdict.ok async for d in engine.aassess_many(paths)])

        failed = asyncio.run(main())
        if failed:
            raise SystemExit(f"{failed} requests failed")

    return run


def server_cpu(pid: int) -> float:
    """CPU seconds the server process has used (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    run: Callable[[list[Path]], None], paths: list[Path], server_pid: int
) -> tuple[float, float, float]:
    """(images per second, client and server CPU seconds per image). The engine is built and
    loaded inside the timed run (health check included); a one-image run warms up first."""
    run(paths[:1])
    cpu, served = time.process_time(), server_cpu(server_pid)
    started = time.perf_counter()
    run(paths)
    seconds = time.perf_counter() - started
    client = (time.process_time() - cpu) / len(paths)
    return len(paths) / seconds, client, (server_cpu(server_pid) - served) / len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--service-time", type=float, default=0.1, help="seconds per request")
    parser.add_argument("--slots", type=int, default=64, help="requests the server runs at once")
    parser.add_argument("--concurrency", type=int, default=64, help="the engine's bound")
    parser.add_argument("--images", type=int, default=2560, help="images per engine run")
    parser.add_argument("--sequential-images", type=int, default=30)
    args = parser.parse_args()

    process, url = start_server(args.service_time, args.slots)
    try:
        with tempfile.TemporaryDirectory() as folder:
            paths = make_images(Path(folder), args.images)
            ideal = args.slots / args.service_time
            print(
                f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
                f"{platform.python_version()}; server: {args.service_time * 1000:g} ms per "
                f"request, {args.slots} slots (ideal {ideal:.0f} images/s); engine concurrency "
                f"{args.concurrency}; {args.images} images of 64x48"
            )
            base, base_cpu, _ = measure(
                lambda p: sequential(url, p), paths[: args.sequential_images], process.pid
            )
            print(
                f"{'one at a time (LlavaGuard README)':<30} {base:7.1f} images/s  "
                f"efficiency {base / ideal:5.3f}  client cpu {base_cpu * 1000:5.2f} ms/image"
            )
            rows: list[tuple[str, Any]] = [
                ("engine sync, native", engine_sync(url, "native", args.concurrency)),
                ("engine sync, openai", engine_sync(url, "openai", args.concurrency)),
                ("engine async, native", engine_async(url, "native", args.concurrency)),
            ]
            for label, run in rows:
                rate, cpu, served = measure(run, paths, process.pid)
                print(
                    f"{label:<30} {rate:7.1f} images/s  efficiency {rate / ideal:5.3f}  "
                    f"client cpu {cpu * 1000:5.2f} ms/image  x{rate / base:.1f} vs one at a "
                    f"time  (server cpu {served * 1000:.2f} ms/image)"
                )
    finally:
        process.terminate()
        process.wait(timeout=10)


if __name__ == "__main__":
    main()
