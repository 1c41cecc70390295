"""Benchmark `audit --executor ray`: its overhead over the local audit, and 1 vs 2 workers.

    .venv/bin/python bench/ray_audit.py                      # 2,000 static, 24 tiny-model images
    .venv/bin/python bench/ray_audit.py --static 500 --tiny 12

Needs the `ray` and `transformers` extras. One local Ray (4 logical CPUs) serves every Ray run;
its start-up is printed on its own and excluded from the runs, which do include starting and
stopping their actor pool (what every audit pays). Runs alternate local / Ray, `--repeats`
times, and the best of each is kept (other work on the machine only ever slows a run down):

- static backend (no model): local audit vs `--executor ray --workers 1`, images per second and
  their ratio: the price of the Ray machinery per image;
- the tiny random-weight model: local vs Ray with 1 and 2 workers (each loads its own copy):
  whether a second actor helps on this machine.

Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image


def make_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for index in range(count):
        color = (index % 256, (index // 256) % 256, (index * 7) % 256)
        Image.new("RGB", (64, 48), color).save(folder / f"{index:06d}.png", compress_level=1)
    return folder


def timed(run: Callable[[Path], int], out: Path) -> float:
    """Images per second of one run into a fresh results file."""
    started = time.perf_counter()
    count = run(out)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--static", type=int, default=2000, help="images, static backend")
    parser.add_argument("--tiny", type=int, default=24, help="images, tiny model")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    os.environ["POLICY_ENGINE_CACHE"] = str(root / "cache")  # before Ray: workers inherit it
    os.environ["HF_HUB_OFFLINE"] = "1"

    import ray
    from policy_engine.backends.tiny import tiny_model_path

    from policy_engine import Engine
    from policy_engine.audit.ray_executor import RaySettings, run_ray_audit
    from policy_engine.audit.runner import run_audit
    from policy_engine.audit.sources import Source
    from policy_engine.audit.store import ResultStore
    from policy_engine.ray import LOCAL_SYSTEM_CONFIG

    tiny_model_path("tiny-random")  # built once, into the cache above
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, Ray {ray.__version__}; images: 64x48 PNG"
    )
    started = time.perf_counter()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        logging_level="WARNING",
        _system_config=LOCAL_SYSTEM_CONFIG,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"ray.init (local, 4 logical CPUs): {time.perf_counter() - started:.1f} s")

    def audit(folder: Path, engine_args: dict, workers: int | None) -> Callable[[Path], int]:
        def run(out: Path) -> int:
            engine = Engine("llavaguard", **engine_args)
            with ResultStore(out, create=True) as store, engine:
                if workers is None:
                    stats = run_audit(engine, Source.open(str(folder)), store)
                else:
                    settings = RaySettings(workers=workers, cpus_per_worker=0.5)
                    stats = run_ray_audit(engine, Source.open(str(folder)), store, settings)
            return stats.assessed

        return run

    runs = 0

    def best(run: Callable[[Path], int]) -> float:
        nonlocal runs
        rates = []
        for _ in range(args.repeats):
            runs += 1
            rates.append(timed(run, root / f"run{runs}.db"))
        return max(rates)

    try:
        static = make_images(root / "static", args.static)
        static_args = {"backend": "static", "backend_options": {"rating": "Safe"}}
        local = best(audit(static, static_args, None))
        on_ray = best(audit(static, static_args, 1))
        print(
            f"static, {args.static:,} images: local {local:8.0f} images/s, ray (1 worker) "
            f"{on_ray:8.0f} images/s: ray/local = {on_ray / local:.3f}"
        )
        tiny = make_images(root / "tiny", args.tiny)
        tiny_args = {"backend": "transformers", "backend_options": {"model": "tiny-random"}}
        local = best(audit(tiny, tiny_args, None))
        one = best(audit(tiny, tiny_args, 1))
        two = best(audit(tiny, tiny_args, 2))
        print(
            f"tiny-random, {args.tiny} images: local {local:.2f}, ray 1 worker {one:.2f}, "
            f"2 workers {two:.2f} images/s: 2/1 workers = {two / one:.2f}, "
            f"ray 1 worker/local = {one / local:.2f}"
        )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
