"""policy-engine-brightness: a `brightness` backend and a `night-review` post-processor.

- `register_backends`: the `brightness` backend judges an image by its mean grey level: below
  `dark_below` (default 60) it is Unsafe with category O9 (or the policy's first category when
  the policy has no O9), otherwise Safe with the none-applying category. No model: a
  deterministic stand-in for demos and for testing post-processing chains.
- `register_postprocessors`: the `night-review` post-processor adds a custom `night_review`
  action (with a queue) to every valid Unsafe decision, first raising the final severity to
  `min_severity` when it is set and the decision's severity is lower.

Found through the entry point `brightness` in the group `policy_engine`.
"""

from __future__ import annotations

from pe_brightness.backend import BrightnessBackend, BrightnessOptions
from pe_brightness.night_review import NightReview, NightReviewParams
from pe_brightness.plugin import register_backends, register_postprocessors

__version__ = "0.1.0"

__all__ = [
    "BrightnessBackend",
    "BrightnessOptions",
    "NightReview",
    "NightReviewParams",
    "__version__",
    "register_backends",
    "register_postprocessors",
]
