"""OpenAI's moderation API on top of Decisions.

Input: a list of parts (`text` and `image_url`) is one input and gets one result, as in
OpenAI's multimodal moderation; each image part is judged, text parts are not (the service
judges images), and input made only of text is refused with 400. Images must be data URLs: the
service never fetches a remote URL (no server-side request forgery).

Result, for a policy with categories O1..On (the category keys are the policy's ids):

- `flagged`: some image was rated Unsafe.
- `categories[c]`: c is the category of an Unsafe verdict (or one of its `categories`).
- `category_scores[c]`: with category scores from the backend, P(Unsafe) x score(c) (the joint
  probability, as the `thresholds` post-processor uses it) or score(c) when P(Unsafe) is
  missing; otherwise P(Unsafe) for the verdict's category (1.0 for an Unsafe verdict without a
  score) and 0.0 for the others. Several images: the maximum.
- `category_applied_input_types[c]`: ["image"] for flagged categories, [] otherwise.
- `policy_engine`: the deciding image's rating, category, P(Unsafe) and actions (the most
  likely Unsafe image, else the first), every image's, and the policy's id, version and hash;
  `policy_engine.shadow`: what each step or policy in shadow would have answered (flagged,
  categories, every image's rating and actions). Everything outside it is the live policy's.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence

from ..compiler import CompiledPolicy
from ..verdict import Decision, ShadowResult
from .errors import ApiError
from .models import (
    ImageJudgement,
    ImagePart,
    ModerationExtension,
    ModerationRequest,
    ModerationResponse,
    ModerationResult,
    ModerationShadow,
    ShadowImage,
)

TEXT_ONLY = (
    "this service judges images: send `input` as a list of parts with at least one "
    '{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}; text is not judged'
)
REMOTE_URL = (
    "image_url.url must be a data URL (data:image/png;base64,...): the service never fetches "
    "remote URLs"
)


def image_urls(request: ModerationRequest) -> list[str]:
    """The data URLs to judge, in input order; ApiError 400 for text-only input or a URL that is
    not a data URL."""
    parts = request.input
    if isinstance(parts, str):
        raise ApiError(400, "image_required", TEXT_ONLY, param="input")
    urls: list[str] = []
    for index, part in enumerate(parts):
        if not isinstance(part, ImagePart):
            continue
        url = part.image_url.url
        if url[:5].lower() != "data:":
            raise ApiError(
                400, "invalid_image_url", REMOTE_URL, param=f"input.{index}.image_url.url"
            )
        urls.append(url)
    if not urls:
        raise ApiError(400, "image_required", TEXT_ONLY, param="input")
    return urls


def _unit(value: float) -> float:
    """A score as a finite number in [0, 1]."""
    return 0.0 if not math.isfinite(value) else min(1.0, max(0.0, value))


NOT_FLAGGING = frozenset({"allow"})
"""Actions that leave an image as it is; any other action (block, blur, review, a flag, a
custom one) means the policy did something about it."""


def is_flagged(decision: Decision) -> bool:
    """The policy's decision, not only the model's rating: Unsafe, or any action but allow."""
    return decision.rating == "Unsafe" or any(a.name not in NOT_FLAGGING for a in decision.actions)


def shadow_flagged(result: ShadowResult) -> bool:
    """`is_flagged` for what a step or policy in shadow would have decided."""
    return result.rating == "Unsafe" or any(a.name not in NOT_FLAGGING for a in result.actions)


def shadow_results(decisions: Sequence[Decision]) -> list[ModerationShadow] | None:
    """Per shadow step or policy, what it would have answered for these images (the
    Decisions of one engine carry their shadow results in the same order)."""
    first = decisions[0].shadow
    if not first:
        return None
    found = []
    for index, head in enumerate(first):
        results = [d.shadow[index] for d in decisions if d.shadow and len(d.shadow) > index]
        flagged = [r for r in results if shadow_flagged(r)]
        found.append(
            ModerationShadow(
                kind=head.kind,
                source=head.source,
                flagged=bool(flagged),
                categories=sorted({r.category_id for r in flagged if r.category_id}),
                policy_id=head.policy_id,
                policy_version=head.policy_version,
                policy_hash=head.policy_hash,
                images=[
                    ShadowImage(
                        rating=r.rating,
                        category_id=r.category_id,
                        p_unsafe=r.p_unsafe,
                        actions=list(r.actions),
                        error=r.error.message if r.error is not None else None,
                    )
                    for r in results
                ],
            )
        )
    return found


def flagged_categories(decision: Decision, ids: Sequence[str]) -> set[str]:
    """The categories of a flagged Decision (its final category, and the model's list)."""
    if not is_flagged(decision):
        return set()
    found = {decision.category_id, *(decision.verdict.categories or [])}
    return {c for c in ids if c in found}


def category_scores(decision: Decision, ids: Sequence[str]) -> dict[str, float]:
    verdict = decision.verdict
    p_unsafe = verdict.p_unsafe
    if verdict.category_scores:
        scale = p_unsafe if p_unsafe is not None else 1.0
        return {c: _unit(verdict.category_scores.get(c, 0.0) * scale) for c in ids}
    flagged = flagged_categories(decision, ids)
    category_id = decision.category_id
    if category_id is not None and category_id in ids and p_unsafe is not None:
        flagged.add(category_id)  # a Safe verdict may still name the closest category
    value = p_unsafe if p_unsafe is not None else 1.0
    return {c: _unit(value) if c in flagged else 0.0 for c in ids}


def _judgement(decision: Decision) -> ImageJudgement:
    rating = decision.rating
    assert rating is not None, "error verdicts are answered before results are built"
    return ImageJudgement(
        rating=rating,
        category_id=decision.category_id,
        category_name=decision.category_name,
        p_unsafe=decision.verdict.p_unsafe,
        actions=list(decision.actions),
    )


def _weight(decision: Decision) -> tuple[bool, float]:
    p_unsafe = decision.verdict.p_unsafe
    unsafe = decision.rating == "Unsafe"
    score = p_unsafe if p_unsafe is not None else (1.0 if unsafe else 0.0)
    return unsafe, score


def moderation_result(compiled: CompiledPolicy, decisions: Sequence[Decision]) -> ModerationResult:
    """One result for the images of one input (every Decision has a rating)."""
    policy = compiled.policy
    ids = [c.id for c in policy.categories]
    flagged: set[str] = set()
    scores = dict.fromkeys(ids, 0.0)
    for decision in decisions:
        flagged |= flagged_categories(decision, ids)
        for c, value in category_scores(decision, ids).items():
            scores[c] = max(scores[c], value)
    judgements = [_judgement(d) for d in decisions]
    deciding = max(range(len(decisions)), key=lambda i: (*_weight(decisions[i]), -i))
    extension = ModerationExtension(
        **judgements[deciding].model_dump(),
        policy_id=policy.id,
        policy_version=policy.version,
        policy_hash=compiled.hash,
        images=judgements,
        shadow=shadow_results(decisions),
    )
    return ModerationResult(
        flagged=any(is_flagged(d) for d in decisions),
        categories={c: c in flagged for c in ids},
        category_scores=scores,
        category_applied_input_types={c: ["image"] if c in flagged else [] for c in ids},
        policy_engine=extension,
    )


def moderation_response(
    compiled: CompiledPolicy, decisions: Sequence[Decision]
) -> ModerationResponse:
    return ModerationResponse(
        id=f"modr-{uuid.uuid4().hex}",
        model=compiled.policy.id,
        results=[moderation_result(compiled, decisions)],
    )
