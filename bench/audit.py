"""Benchmark `policy-engine audit`: the engine's own overhead and its memory, side by side.

    .venv/bin/python bench/audit.py                 # speed on 5,000; memory 1,000 vs 50,000
    .venv/bin/python bench/audit.py --large 20000   # a quicker memory comparison

With the `static` backend (a zero-latency backend: no model), in fresh processes, on this
machine's small PNG images:

- reading and decoding the images alone (`load_image` on each file), images per second;
- the whole audit (walk the folder, decode, assess, post-process, commit to the results file),
  images per second, and its ratio to decoding alone (goal: above 1,000 images per second);
- the audit's peak resident memory for 1,000 inputs versus `--large` (50,000) inputs (goal:
  within 10 %: memory stays flat whatever the dataset's size).

Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image


def make_images(folder: Path, count: int) -> Path:
    """`count` small PNGs (64x48), spread over subfolders of 1,000."""
    for index in range(count):
        sub = folder / f"{index // 1000:03d}"
        if index % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        color = (index % 256, (index // 256) % 256, (index * 7) % 256)
        Image.new("RGB", (64, 48), color).save(sub / f"{index:06d}.png", compress_level=1)
    return folder


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(kind: str, folder: str, out: str) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    from policy_engine import Engine
    from policy_engine.audit.runner import run_audit
    from policy_engine.audit.sources import Source
    from policy_engine.audit.store import ResultStore
    from policy_engine.images import load_image

    source = Source.open(folder)
    started = time.perf_counter()
    if kind == "decode":
        count = sum(1 for item in source.items() if load_image(item.image).image.size)
    else:
        engine = Engine(
            "llavaguard", "static", backend_options={"rating": "Unsafe", "category": "O2"}
        )
        with ResultStore(out, create=True) as store, engine:
            stats = run_audit(engine, source, store)
        count = stats.assessed
    seconds = time.perf_counter() - started
    print(json.dumps({"count": count, "rate": count / seconds, "peak_mb": peak_rss_mb()}))


def measure(kind: str, folder: Path, out: Path) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(folder), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", type=int, default=5000, help="images for the speed runs")
    parser.add_argument("--small", type=int, default=1000, help="inputs, small memory run")
    parser.add_argument("--large", type=int, default=50000, help="inputs, large memory run")
    parser.add_argument(
        "--child", nargs=3, metavar=("KIND", "FOLDER", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; backend: static (no model); images: 64x48 PNG"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        speed = make_images(root / "speed", args.speed)
        decode = measure("decode", speed, root / "unused.db")
        audit = measure("audit", speed, root / "speed.db")
        print(f"read + decode alone      {decode['rate']:8.0f} images/s")
        print(
            f"audit (static backend)   {audit['rate']:8.0f} images/s   "
            f"{audit['rate'] / decode['rate']:.2f} of decoding alone   (goal: > 1,000 images/s)"
        )
        small = measure("audit", make_images(root / "small", args.small), root / "small.db")
        large = measure("audit", make_images(root / "large", args.large), root / "large.db")
        growth = large["peak_mb"] / small["peak_mb"] - 1
        print(
            f"peak memory: {args.small:,} inputs {small['peak_mb']:.1f} MiB, {args.large:,} "
            f"inputs {large['peak_mb']:.1f} MiB: {growth:+.1%}   (goal: within 10 %)"
        )


if __name__ == "__main__":
    main()
