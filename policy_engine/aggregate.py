"""Items judged as several parts (a video's frames, a post's images) and the rules that make
their verdicts one.

    engine.assess(Post(["a.jpg", "b.jpg"]))   # one Decision for the post
    engine.assess("clip.mp4")                 # one Decision for the video

Rules (a policy's `aggregation:` block; default any-unsafe):

- `any-unsafe`: Unsafe when any part is rated Unsafe; the deciding part is the first one.
- `k-of-n`: Unsafe when at least `k` of the n parts have P(Unsafe) >= `threshold`; the deciding
  part is the likeliest of them.
- `max-score`: Unsafe when the highest P(Unsafe) >= `threshold`; the deciding part is that one.

A part without P(Unsafe) (a backend that gives no scores) counts by its rating: 1.0 when
Unsafe, 0.0 when Safe. When the aggregate is not Unsafe, the deciding part is the likeliest
part (the first when there are no scores). Never a silent Safe: when any part failed and the
rule did not find the item Unsafe, the item is an error verdict that says how many parts failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .verdict import Verdict, VerdictPart, error_verdict

if TYPE_CHECKING:
    from .compiler import CompiledPolicy
    from .images import ImageSource
    from .policy import AggregationOptions

DEFAULT_MAX_POST_IMAGES = 16


@dataclass(frozen=True)
class Post:
    """Several images judged as one item (a social-media post): one Decision, by the
    policy's aggregation rule. `source` names it in the verdict (default: its images' names)."""

    images: Sequence[ImageSource]
    source: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.images, str | bytes):
            raise TypeError("Post takes a list of images, not one")
        object.__setattr__(self, "images", tuple(self.images))


@dataclass(frozen=True)
class PartInfo:
    """Where a part comes from: its index, a video timestamp, its source."""

    index: int
    timestamp: float | None
    source: str


def rule_name(rule: AggregationOptions, parts: int) -> str:
    """The rule as a verdict records it: 'any-unsafe', 'k-of-n:2/5@0.7', 'max-score@0.5'."""
    if rule.rule == "k-of-n":
        return f"k-of-n:{rule.k}/{parts}@{rule.threshold:g}"
    if rule.rule == "max-score":
        return f"max-score@{rule.threshold:g}"
    return "any-unsafe"


def aggregate(
    compiled: CompiledPolicy,
    rule: AggregationOptions,
    infos: Sequence[PartInfo],
    verdicts: Sequence[Verdict],
    *,
    source: str,
    timings: dict[str, float] | None = None,
) -> Verdict:
    """One Verdict for an item from its parts' verdicts (one per `infos`, in order)."""
    parts = [_part(info, verdict) for info, verdict in zip(infos, verdicts, strict=True)]
    name = rule_name(rule, len(parts))
    judged = [(i, v) for i, v in enumerate(verdicts) if v.ok]
    failed = [(i, v) for i, v in enumerate(verdicts) if not v.ok]
    deciding, unsafe = _decide(rule, judged)
    extra: dict[str, Any] = {
        "parts": parts,
        "aggregation": name,
        "source": source,
        "timings": timings or {},
    }
    first_ok = judged[0][1] if judged else None
    provenance: dict[str, Any] = {
        "model": (first_ok or verdicts[0]).model if verdicts else None,
        "decoding": (first_ok or verdicts[0]).decoding if verdicts else None,
    }
    if not unsafe and failed:
        index, first = failed[0]
        assert first.error is not None
        kind = first.error.kind
        message = (
            f"{len(failed)} of {len(parts)} parts could not be judged and none was decisive "
            f"under {name}; part {index}: {first.error.message}"
        )
        retryable = all(v.error is not None and v.error.retryable for _, v in failed)
        return error_verdict(
            compiled, kind, message, retryable=retryable, **provenance, **extra
        ).model_copy(update={"deciding_part": index})
    if deciding is None:  # no parts at all (a post of no images is refused earlier)
        return error_verdict(compiled, "image", "no parts to judge", **provenance, **extra)
    chosen = verdicts[deciding]
    update: dict[str, object] = {**extra, "deciding_part": deciding}
    rating = "Unsafe" if unsafe else "Safe"
    if chosen.rating != rating:
        update |= _category_for(compiled, rating, chosen, [v for _, v in judged])
    update["rating"] = rating
    return chosen.model_copy(update=update)


def _part(info: PartInfo, verdict: Verdict) -> VerdictPart:
    return VerdictPart(
        index=info.index,
        timestamp=info.timestamp,
        source=info.source,
        rating=verdict.rating,
        category_id=verdict.category_id,
        p_unsafe=verdict.p_unsafe,
        error=verdict.error.message if verdict.error is not None else None,
    )


def _score(verdict: Verdict) -> float:
    if verdict.p_unsafe is not None:
        return verdict.p_unsafe
    return 1.0 if verdict.rating == "Unsafe" else 0.0


def _likeliest(candidates: Sequence[tuple[int, Verdict]]) -> int | None:
    """The index of the highest-scoring part, the earliest on ties."""
    best: tuple[float, int] | None = None
    for index, verdict in candidates:
        key = (-_score(verdict), index)
        if best is None or key < best:
            best = key
    return None if best is None else best[1]


def _decide(
    rule: AggregationOptions, judged: Sequence[tuple[int, Verdict]]
) -> tuple[int | None, bool]:
    """(deciding part, Unsafe?) among the parts that were judged."""
    if rule.rule == "any-unsafe":
        unsafe = [(i, v) for i, v in judged if v.rating == "Unsafe"]
        if unsafe:
            return unsafe[0][0], True
        return _likeliest(judged), False
    over = [(i, v) for i, v in judged if _score(v) >= rule.threshold]
    needed = rule.k if rule.rule == "k-of-n" else 1
    if len(over) >= needed:
        return _likeliest(over), True
    return _likeliest(judged), False


def _category_for(
    compiled: CompiledPolicy, rating: str, chosen: Verdict, judged: Sequence[Verdict]
) -> dict[str, object]:
    """Category fields when the aggregate rating differs from the deciding part's own: Safe
    takes the none-applying category; Unsafe the part's likeliest category score, else the
    category most parts rated Unsafe named, else none."""
    policy = compiled.policy
    if rating == "Safe":
        none = policy.none_category
        return {"category_id": none.id, "category_name": none.name, "severity": None}
    known = {c.id: c for c in policy.categories}
    category_id: str | None = None
    if chosen.category_scores:
        ranked = sorted((v, k) for k, v in chosen.category_scores.items() if k in known)
        category_id = ranked[-1][1] if ranked else None
    if category_id is None:
        named = [v.category_id for v in judged if v.rating == "Unsafe" and v.category_id in known]
        category_id = max(sorted(set(named)), key=named.count) if named else None
    if category_id is None:
        return {"category_id": None, "category_name": None, "severity": None}
    category = known[category_id]
    return {
        "category_id": category.id,
        "category_name": category.name,
        "severity": category.severity,
    }
