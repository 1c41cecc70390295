"""`-b brightness`: Unsafe (O9, else the policy's first category) when an image is dark."""

from __future__ import annotations

from typing import Any

from PIL import ImageStat
from pydantic import BaseModel, ConfigDict, Field

from policy_engine import (
    Backend,
    Batch,
    Capabilities,
    CliFlag,
    CompiledPolicy,
    Generation,
    LoadedImage,
)

DARK_CATEGORY = "O9"
MODEL_NAME = "brightness"


class BrightnessOptions(BaseModel):
    # extra="forbid": a misspelled option (-o dark_belw=...) is an error, not a no-op.
    model_config = ConfigDict(extra="forbid")

    dark_below: int = Field(
        default=60,
        ge=0,
        le=255,
        description="Mean grey level (0-255) below which an image is Unsafe.",
    )


def mean_grey(image: LoadedImage) -> float:
    """The mean grey level (0-255) of a decoded (RGB) image."""
    return float(ImageStat.Stat(image.image.convert("L")).mean[0])


def unsafe_category_id(compiled: CompiledPolicy) -> str:
    """O9 when the policy has it, else its first category."""
    ids = [category.id for category in compiled.policy.categories]
    return DARK_CATEGORY if DARK_CATEGORY in ids else ids[0]


class BrightnessBackend(Backend):
    """Judges by mean brightness: dark images are Unsafe. No model, nothing to load."""

    name = "brightness"
    description = "Judges by mean brightness (dark: Unsafe O9); no model, for demos and tests"
    Options = BrightnessOptions
    # Every answer is built to satisfy the policy's schema, so it is "constrained"; mode
    # `score` gets P(Unsafe) 1.0 or 0.0 and per-category scores (keyed by category id).
    capabilities = Capabilities(json_schema=True, scores=True, batching=True, max_batch_size=64)
    cli_flags = (
        CliFlag(
            "--dark-below",
            "dark_below",
            help="Mean grey level (0-255) below which an image is Unsafe.",
            metavar="LEVEL",
        ),
    )
    options: BrightnessOptions

    def generate(self, batch: Batch) -> list[Generation]:
        compiled = batch.compiled
        policy = compiled.policy
        layout = compiled.layout_for(batch.mode)
        label_of = {category_id: label for label, category_id in compiled.labels.items()}
        dark_id = unsafe_category_id(compiled)
        threshold = self.options.dark_below
        generations = []
        for image in batch.images:
            grey = mean_grey(image)
            unsafe = grey < threshold
            category_id = dark_id if unsafe else policy.none_category.id
            label = label_of[category_id]
            # Every key any layout may use; `layout.dumps` keeps the layout's keys, in order.
            answer: dict[str, Any] = {
                "rating": "Unsafe" if unsafe else "Safe",
                "category": label,
                "severity": (
                    policy.category(category_id).severity if unsafe else policy.severity_levels[0]
                ),
                "categories": [label] if unsafe else [],
                "rationale": (
                    f"Mean grey level {grey:.1f} is "
                    f"{'below' if unsafe else 'at or above'} {threshold}."
                )[: policy.output.rationale_max_chars],
            }
            p_unsafe: float | None = None
            category_scores: dict[str, float] | None = None
            if batch.mode == "score":
                p_unsafe = 1.0 if unsafe else 0.0
                category_scores = {
                    category.id: p_unsafe if category.id == dark_id else 0.0
                    for category in policy.categories
                }
            generations.append(
                Generation(
                    text=layout.dumps(answer),
                    p_unsafe=p_unsafe,
                    category_scores=category_scores,
                    model=MODEL_NAME,
                    decoding={"method": "greedy"},
                )
            )
        return generations
