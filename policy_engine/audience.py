"""Audience levels: one policy compiled for several audiences (`NAME@LEVEL`).

A policy declares its `audiences` (ordered levels, youngest first, and the level its text is
written for) and gives guidelines a level under each category's `audience`: the lowest level
the guideline is *permitted* for. `at_level(policy, LEVEL)` derives the policy for one
audience: every annotated guideline whose level is above LEVEL becomes a "should not", every
other annotated one a "can"; guidelines without a level stay where they are written. The
derived policy is named `ID@LEVEL` (so verdicts name the audience, and its hash differs from the
base), and at the level the text is written for it renders the base's text byte for byte.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import PolicyEngineError
from .policy import Audiences, Category, Policy

_LEVEL = re.compile(r"[A-Za-z0-9_.+-]+")


class AudienceError(PolicyEngineError):
    """`@LEVEL` on a policy without audience levels, or a level the policy does not have."""


def split_level(ref: str) -> tuple[str, str | None]:
    """(reference, level) of `NAME@LEVEL` or `path.yaml@LEVEL`; (ref, None) without a level.

    An existing file whose name holds an `@` is that file, not a level."""
    if "@" not in ref or Path(ref).is_file():
        return ref, None
    base, level = ref.rsplit("@", 1)
    if not base or not _LEVEL.fullmatch(level) or level.endswith((".yaml", ".yml")):
        if not level:
            raise AudienceError(f"{ref!r}: no audience level after '@' (write NAME@LEVEL)")
        return ref, None
    return base, level


def at_level(policy: Policy, level: str) -> Policy:
    """The policy for audience `level` (see the module doc). Raises AudienceError."""
    audiences = policy.audiences
    if audiences is None:
        raise AudienceError(
            f"policy {policy.id!r} has no audience levels, so {policy.id}@{level} means nothing; "
            "declare `audiences:` and give guidelines levels (docs/policies.md#audience-levels)"
        )
    at = audiences.index(level)
    if at is None:
        raise AudienceError(
            f"policy {policy.id!r} has no audience level {level!r}; levels: {audiences.names()}"
        )
    categories = [_category_at(category, audiences, at) for category in policy.categories]
    base_id = policy.id
    if audiences.written_for is not None and base_id.endswith(f"@{audiences.written_for}"):
        base_id = base_id.rpartition("@")[0]  # a derived policy at another level: ID@OTHER
    derived = policy.model_copy(
        update={
            "id": f"{base_id}@{audiences.levels[at]}",
            "categories": categories,
            "audiences": audiences.model_copy(update={"written_for": audiences.levels[at]}),
        }
    )
    # model_copy does not validate: check the result like any loaded policy
    return Policy.model_validate(derived.model_dump())


def _category_at(category: Category, audiences: Audiences, at: int) -> Category:
    levels = category.levels()
    if not levels:
        return category

    def permitted(text: str, written_permitted: bool) -> bool:
        if text not in levels:
            return written_permitted
        index = audiences.index(levels[text])
        return index is not None and index <= at

    should_not = [t for t in category.should_not if not permitted(t, False)]
    should_not += [t for t in category.can if not permitted(t, True)]
    can = [t for t in category.should_not if permitted(t, False)]
    can = [t for t in category.can if permitted(t, True)] + can
    return category.model_copy(update={"should_not": should_not, "can": can})


def levels_of(policy: Policy) -> list[str]:
    """The audience levels a policy can be compiled for (empty without `audiences`)."""
    return [str(level) for level in policy.audiences.levels] if policy.audiences else []
