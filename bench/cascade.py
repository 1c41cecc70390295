"""Benchmark the cascade backend: cost and recall against its second judge alone, side by side.

    .venv/bin/python bench/cascade.py          # 200 images, 20 ms per second-judge image
    .venv/bin/python bench/cascade.py --images 500 --delay 0.05 --band 0.1 0.9

In one process, on one labelled set of images of known redness (uniform in [0, 1], Unsafe
exactly when redness >= 0.5, a fixed seed):

- **second judge alone**: the expensive judge, a *slowed colour judge*: the colour-keyed test
  backend (tests/colour_backend.py) made exact (Unsafe iff redness >= 0.5) and made to sleep
  `--delay` seconds per image, standing in for a large model or a remote server;
- **cascade**: the colour backend in score mode as the cheap first judge (P(Unsafe) an
  overconfident sigmoid of redness; `--cheap-midpoint 0.7` biases it towards Safe, so the
  band lets some Unsafe images through and recall drops), the same slowed judge as second,
  band `--band`.

For each it prints the judge calls and images per judge, the wall time, and recall, specificity
and accuracy against the labels, then the ratios (second-judge images and time, cascade vs
alone). Nothing is asserted: tests/test_judges.py checks recall and call counts exactly; the
time lives here.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policy_engine.backends.cascade import CascadeBackend

from policy_engine import Batch, Engine, Generation, hookimpl
from tests.colour_backend import (
    ColourBackend,
    ColourOptions,
    colour_host,
    red_image,
    redness,
)


class SlowOptions(ColourOptions):
    sharpness: float = Field(default=500.0, gt=0)  # a step at 0.5: the exact judge
    model: str = "slow-exact-colour"
    delay: float = Field(default=0.02, ge=0)


class SlowExactColour(ColourBackend):
    """The expensive judge: exact, and `delay` seconds per image."""

    name = "slow-colour"
    Options = SlowOptions
    options: SlowOptions  # type: ignore[assignment]

    def generate(self, batch: Batch) -> list[Generation]:
        time.sleep(self.options.delay * len(batch))
        return super().generate(batch)


class Plugin:
    @hookimpl
    def register_backends(self, register):  # type: ignore[no-untyped-def]
        register(SlowExactColour)


def measure(engine: Engine, images: list[Any], labels: list[bool]) -> dict[str, float]:
    started = time.perf_counter()
    with engine:
        ratings = [d.rating for d in engine.assess_many(images)]
    seconds = time.perf_counter() - started
    tp = sum(r == "Unsafe" and y for r, y in zip(ratings, labels, strict=True))
    tn = sum(r == "Safe" and not y for r, y in zip(ratings, labels, strict=True))
    positives = sum(labels)
    return {
        "seconds": seconds,
        "recall": tp / positives,
        "specificity": tn / (len(labels) - positives),
        "accuracy": (tp + tn) / len(labels),
        "errors": sum(r is None for r in ratings),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.02, help="second judge, s per image")
    parser.add_argument("--band", type=float, nargs=2, default=(0.2, 0.8))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--cheap-midpoint",
        type=float,
        default=0.5,
        help="the cheap judge's midpoint: above 0.5 it is biased towards Safe (try 0.7)",
    )
    args = parser.parse_args()

    rng = random.Random(args.seed)
    images = [red_image(rng.random()) for _ in range(args.images)]
    labels = [redness(image) >= 0.5 for image in images]
    second = {"backend": "slow-colour", "options": {"delay": args.delay}}
    with colour_host() as host:
        host.register(Plugin(), name="bench-slow-colour")
        alone_engine = Engine(
            "llavaguard", "slow-colour", backend_options=second["options"], host=host
        )
        alone = measure(alone_engine, images, labels)
        alone_backend = alone_engine.backend
        assert isinstance(alone_backend, ColourBackend)
        options = {
            "first": {
                "backend": "colour",
                "mode": "score",
                "options": {"midpoint": args.cheap_midpoint},
            },
            "second": second,
            "band": list(args.band),
        }
        cascade_engine = Engine("llavaguard", "cascade", backend_options=options, host=host)
        cascade = cascade_engine.backend
        assert isinstance(cascade, CascadeBackend)
        cascaded = measure(cascade_engine, images, labels)
        first_backend, second_backend = cascade.first.backend, cascade.second.backend
        assert isinstance(first_backend, ColourBackend)
        assert isinstance(second_backend, ColourBackend)

    print(
        f"cascade benchmark: {args.images} labelled images ({sum(labels)} Unsafe), seed "
        f"{args.seed}; {platform.machine()}, Python {platform.python_version()}"
    )
    print(
        f"cheap judge: colour backend (midpoint {args.cheap_midpoint:g}), score mode; "
        "second judge: slowed exact colour judge "
        f"({args.delay * 1000:g} ms per image); band [{args.band[0]:g}, {args.band[1]:g}]"
    )
    print()
    print(f"{'':<22}{'second alone':>14}{'cascade':>14}")
    rows = [
        ("first-judge calls", "-", str(first_backend.calls)),
        ("first-judge images", "-", str(first_backend.images)),
        ("second-judge calls", str(alone_backend.calls), str(second_backend.calls)),
        ("second-judge images", str(alone_backend.images), str(second_backend.images)),
        ("time (s)", f"{alone['seconds']:.3f}", f"{cascaded['seconds']:.3f}"),
        ("recall", f"{alone['recall']:.3f}", f"{cascaded['recall']:.3f}"),
        ("specificity", f"{alone['specificity']:.3f}", f"{cascaded['specificity']:.3f}"),
        ("accuracy", f"{alone['accuracy']:.3f}", f"{cascaded['accuracy']:.3f}"),
        ("errors", f"{alone['errors']:g}", f"{cascaded['errors']:g}"),
    ]
    for name, a, b in rows:
        print(f"{name:<22}{a:>14}{b:>14}")
    print()
    share = second_backend.images / max(1, alone_backend.images)
    print(f"second-judge images, cascade / alone: {share:.3f}")
    print(f"time, alone / cascade: {alone['seconds'] / cascaded['seconds']:.2f}x")
    print(f"recall, cascade - alone: {cascaded['recall'] - alone['recall']:+.3f}")


if __name__ == "__main__":
    main()
