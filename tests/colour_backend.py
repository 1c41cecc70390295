"""A colour-keyed test backend: judges an image by how red it is, with known scores.

`redness` of an image is the mean over its pixels of (R - (G + B) / 2) / 255, clipped to
[0, 1]: a pure red image is 1.0, grey, green or blue images are 0.0. The backend's P(Unsafe) is
a deliberately *overconfident* function of it,

    p_unsafe = sigmoid(sharpness * (redness - midpoint))      (default sharpness 12, midpoint 0.5)

so a labelled set whose true P(Unsafe | redness) is `redness` itself has a known miscalibration
that temperature scaling or isotonic regression can repair. The rating is Unsafe when p_unsafe
>= 0.5 (in every mode), the category is `category` (default: the policy's first category). It
answers in the policy's answer layout for full and verdict modes, gives scores in every mode,
batches, and counts its calls and images (`calls`, `images`) for cost measurements.

    with colour_host() as host:          # the process-wide host has the "colour" backend
        engine = Engine("llavaguard", "colour", host=host)

The CLI (in-process, click's CliRunner or `policy_engine.cli.main`) sees it too while the
context is open.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from PIL import Image, ImageStat
from pydantic import BaseModel, ConfigDict, Field

from policy_engine import Backend, Batch, Capabilities, Generation, PluginHost, hookimpl
from policy_engine.host import set_host


class ColourOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    category: str | None = Field(default=None, description="Category id for Unsafe answers.")
    sharpness: float = Field(default=12.0, gt=0)
    midpoint: float = Field(default=0.5, ge=0, le=1)
    model: str = "colour"


def redness(image: Image.Image) -> float:
    """Mean (R - (G + B) / 2) / 255 over the pixels, clipped to [0, 1]."""
    r, g, b = ImageStat.Stat(image.convert("RGB")).mean[:3]
    return min(1.0, max(0.0, (r - (g + b) / 2) / 255))


def colour_score(value: float, sharpness: float = 12.0, midpoint: float = 0.5) -> float:
    """The backend's (overconfident) P(Unsafe) for a redness value."""
    return 1.0 / (1.0 + math.exp(-sharpness * (value - midpoint)))


class ColourBackend(Backend):
    name = "colour"
    description = "Test backend: Unsafe when red, P(Unsafe) an overconfident function of redness"
    Options = ColourOptions
    capabilities = Capabilities(
        images=True, json_schema=True, scores=True, batching=True, max_batch_size=16
    )
    options: ColourOptions
    made: ClassVar[list[ColourBackend]] = []

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.calls = 0
        self.images = 0
        self._count = threading.Lock()
        ColourBackend.made.append(self)

    def generate(self, batch: Batch) -> list[Generation]:
        with self._count:
            self.calls += 1
            self.images += len(batch.images)
        return [self._judge(batch, image.image) for image in batch.images]

    def _judge(self, batch: Batch, image: Image.Image) -> Generation:
        opts = self.options
        compiled = batch.compiled
        policy = compiled.policy
        p_unsafe = colour_score(redness(image), opts.sharpness, opts.midpoint)
        unsafe = p_unsafe >= 0.5
        flagged = opts.category or policy.categories[0].id
        category_id = flagged if unsafe else policy.none_category.id
        labels = {v: k for k, v in compiled.labels.items()}
        answer: dict[str, object] = {
            "rating": "Unsafe" if unsafe else "Safe",
            "category": labels[category_id],
            "rationale": f"redness {redness(image):.3f}",
        }
        if unsafe:
            answer["severity"] = policy.category(category_id).severity
            answer["categories"] = [labels[category_id]]
        else:
            answer["severity"] = policy.severity_levels[0]
            answer["categories"] = []
        scores = {c.id: p_unsafe if c.id == flagged else 0.0 for c in policy.categories}
        return Generation(
            text=compiled.layout_for(batch.mode).dumps(answer),
            p_unsafe=p_unsafe,
            category_scores=scores,
            model=opts.model,
            decoding={"greedy": True},
        )


class ColourPlugin:
    @hookimpl
    def register_backends(self, register):  # type: ignore[no-untyped-def]
        register(ColourBackend)


def make_colour_host() -> PluginHost:
    host = PluginHost()
    host.register(ColourPlugin(), name="colour-test-backend")
    return host


@contextmanager
def colour_host() -> Iterator[PluginHost]:
    """A host with the colour backend, installed as the process-wide host while open."""
    host = make_colour_host()
    previous = set_host(host)
    try:
        yield host
    finally:
        set_host(previous)


def red_image(value: float, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """An image of redness `value` (0..1): R = 128 + 127 * value, G = B = 128 - 128 * value."""
    r = round(128 + 127 * value)
    gb = round(128 - 128 * value)
    return Image.new("RGB", size, (r, gb, gb))
