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

import difflib
import re
from pathlib import Path
from typing import Any

from .errors import PolicyEngineError
from .policy import Audiences, Category, Policy
from .yamlsource import Located, LocatedList, located, located_list

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


def audience_problems(policy: Policy) -> list[tuple[str, str]]:
    """What is wrong with a policy's audience levels, as (dotted path, message): guideline
    levels name levels of `audiences` and guidelines of their category, and agree with where
    each guideline is written (at the level the text is written for). Policy.problems runs it."""
    found: list[tuple[str, str]] = []
    audiences = policy.audiences
    written_for = audiences.written_for if audiences is not None else None
    if audiences is not None and written_for is not None and audiences.index(written_for) is None:
        found.append(
            (
                "audiences.written_for",
                f"{str(written_for)!r} is not one of the levels: {audiences.names()}",
            )
        )
        return found
    for index, category in enumerate(policy.categories):
        if not category.audience:
            continue
        where = f"categories.{index}.audience"
        if audiences is None:
            found.append((where, "guideline audience levels need a top-level `audiences`"))
            continue
        written = audiences.written_index
        seen_texts: set[str] = set()
        for number, group in enumerate(category.audience):
            at = audiences.index(group.level)
            where = f"categories.{index}.audience.{number}"
            if at is None:
                found.append(
                    (
                        f"{where}.level",
                        f"{str(group.level)!r} is not an audience level; levels: "
                        f"{audiences.names()}",
                    )
                )
                continue
            for item, text in enumerate(group.guidelines):
                message = _level_problem(category, text, at, written, audiences)
                if message is None and text in seen_texts:
                    message = f"{text[:60]!r} has two audience levels"
                seen_texts.add(text)
                if message is not None:
                    found.append((f"{where}.guidelines.{item}", message))
    return found


def _level_problem(
    category: Category, text: str, at: int, written: int, audiences: Audiences
) -> str | None:
    """Why a guideline cannot have the level at position `at`, or None."""
    level, written_level = audiences.levels[at], audiences.levels[written]
    if text in category.can and at > written:
        return (
            f"{text[:40]!r}... is listed under can, but its level {level} is above the level "
            f"the text is written for ({written_level}): list it under should_not"
        )
    if text in category.should_not and at <= written:
        return (
            f"{text[:40]!r}... is listed under should_not, but its level {level} is not above "
            f"the level the text is written for ({written_level}): list it under can"
        )
    if text not in category.can and text not in category.should_not:
        close = difflib.get_close_matches(text, [*category.should_not, *category.can], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{text[:60]!r} is not one of {category.id}'s guidelines{hint}"
    return None


# -- extends ----------------------------------------------------------------------------------


def keep_levels_of_kept_guidelines(
    base: dict[str, Any], merged: dict[str, Any], fields: dict[str, Any]
) -> None:
    """In the loader's `extends` overlay of one category (`merged`: the parent's `base` with
    the child's `fields`, located YAML data): a child that rewrites the guidelines but not
    their levels keeps the parent's levels only for the guidelines it kept where the parent
    wrote them (the parent's levels are about the parent's texts)."""
    inherited = merged.get("audience")
    if "audience" in fields or not isinstance(inherited, LocatedList):
        return
    if "should_not" not in fields and "can" not in fields:
        return
    before, after = _placement(base), _placement(merged)
    groups = LocatedList()
    groups.mark, groups.marks = inherited.mark, []
    for group, mark in zip(inherited, inherited.marks, strict=True):
        texts = group.get("guidelines") if isinstance(group, Located) else None
        if not isinstance(texts, LocatedList):
            groups.append(group)  # validation reports what is wrong with it
            groups.marks.append(mark)
            continue
        kept = [(t, m) for t, m in zip(texts, texts.marks, strict=True) if _kept(t, before, after)]
        if kept:
            kept_list = located_list([t for t, _ in kept], texts.mark, [m for _, m in kept])
            groups.append(located({**group, "guidelines": kept_list}, group.mark, group.marks))
            groups.marks.append(mark)
    merged["audience"] = groups


def _kept(text: Any, before: dict[Any, str], after: dict[Any, str]) -> bool:
    return isinstance(text, str) and text in after and after[text] == before.get(text)


def _placement(category: dict[str, Any]) -> dict[Any, str]:
    """Guideline text -> the list it is in (should_not or can)."""
    found: dict[Any, str] = {}
    for key in ("should_not", "can"):
        value = category.get(key)
        if isinstance(value, list):
            for text in value:
                if isinstance(text, str):
                    found.setdefault(text, key)
    return found
