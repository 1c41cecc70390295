"""Benchmark the policy loader's limits: what rejecting a hostile document costs, side by side.

    .venv/bin/python bench/loader.py             # best of 3 rounds
    .venv/bin/python bench/loader.py --rounds 5

In one process, each case timed the same way (best of `--rounds`):

- a document of just over the value limit (100,001 values) versus one of four times as many:
  the loader stops at the limit while parsing, so the ratio should stay near 1 (goal: below 1.5);
- the "billion laughs" alias bomb versus loading the shipped `children-platform` policy: the bomb
  is rejected from the document's shape, never expanded (goal: a ratio below 1);
- the absolute seconds, for reference only: pure-Python YAML parses about 20,000 values a second
  here, so the first two take seconds.

The unit tests check the same properties by counting work (tests/test_loader_errors.py); the
time lives here, where a busy machine cannot fail a test. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from policy_engine.errors import PolicyError
from policy_engine.loader import load_policy
from policy_engine.yamlsource import MAX_NODES

REPO = Path(__file__).resolve().parent.parent
BOMB = REPO / "tests" / "data" / "bad_policies" / "billion_laughs.yaml"


def many_values(folder: Path, count: int) -> Path:
    path = folder / f"many-{count}.yaml"
    path.write_text(
        "extends: llavaguard\nid: many\nmetadata: {l: [" + "a," * count + "]}\n", encoding="utf-8"
    )
    return path


def rejected(path: Path | str) -> Callable[[], None]:
    def load() -> None:
        try:
            load_policy(path)
        except PolicyError:
            return
        raise SystemExit(f"{path} loaded: expected it to be rejected")

    return load


def best(work: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    load_policy("children-platform")  # imports and plugin loading before any timing
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        just_over = best(rejected(many_values(folder, MAX_NODES + 1)), args.rounds)
        four_times = best(rejected(many_values(folder, 4 * MAX_NODES)), args.rounds)
    bomb = best(rejected(BOMB), args.rounds)
    policy = best(lambda: load_policy("children-platform"), args.rounds)
    print(f"python {platform.python_version()}, best of {args.rounds}")
    print(f"reject {MAX_NODES + 1:,} values        {just_over:8.3f} s")
    print(f"reject {4 * MAX_NODES:,} values        {four_times:8.3f} s")
    print(f"  ratio (goal < 1.5)             {four_times / just_over:8.2f}")
    print(f"reject the alias bomb           {bomb:8.4f} s")
    print(f"load children-platform          {policy:8.4f} s")
    print(f"  ratio (goal < 1)               {bomb / policy:8.2f}")


if __name__ == "__main__":
    main()
