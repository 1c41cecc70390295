"""Agreement between judges: Cohen's kappa on Safe/Unsafe ratings, for `eval`.

Two runs (`eval --predictions A --compare B`) are two judges; so is every pair of the judges a
composite backend recorded in its verdicts (`verdict.judges` of the cascade and ensemble
backends). Kappa corrects the observed agreement for the agreement two raters with the same
rating frequencies would reach by chance:

    kappa = (p_o - p_e) / (1 - p_e),   p_e = sum over ratings r of p_A(r) * p_B(r)

over the items both rated (an error, a missing or a skipped answer is left out). It is
undefined (None) without items, or when chance agreement is 1 (both always gave the same one
rating). Only the standard library and pydantic are imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

from pydantic import BaseModel, Field

RATINGS = ("Safe", "Unsafe")


class Kappa(BaseModel):
    """The agreement of two judges (or runs) on the items both rated."""

    a: str
    b: str
    compared: int = Field(description="Items both rated (a valid rating from each).")
    agreement: float | None = Field(description="Observed agreement p_o; None without items.")
    kappa: float | None = Field(description="Cohen's kappa; None when undefined.")


class JudgeAgreement(BaseModel):
    """Pairwise kappa between the judges a composite backend recorded in its verdicts."""

    judges: list[str] = Field(description="Judge names, in the order first seen.")
    items: int = Field(description="Items whose verdict recorded judges.")
    pairs: list[Kappa]


def cohen_kappa(a: str, b: str, ratings: Sequence[tuple[str | None, str | None]]) -> Kappa:
    """Kappa between rater `a` and rater `b` over (rating by a, rating by b) pairs; a pair
    with a None (or any value that is not a rating) is left out."""
    both = [(x, y) for x, y in ratings if x in RATINGS and y in RATINGS]
    n = len(both)
    if n == 0:
        return Kappa(a=a, b=b, compared=0, agreement=None, kappa=None)
    observed = sum(x == y for x, y in both) / n
    chance = sum(
        (sum(x == r for x, _ in both) / n) * (sum(y == r for _, y in both) / n) for r in RATINGS
    )
    kappa = None if chance >= 1.0 else (observed - chance) / (1.0 - chance)
    return Kappa(a=a, b=b, compared=n, agreement=observed, kappa=kappa)


def judges_of(verdict: Any) -> dict[str, str | None] | None:
    """A verdict's (as JSON data) judges: name -> rating (None for a judge that failed), or
    None when the verdict recorded no judges."""
    if not isinstance(verdict, Mapping):
        return None
    judges = verdict.get("judges")
    if not isinstance(judges, list) or not judges:
        return None
    found: dict[str, str | None] = {}
    for judge in judges:
        if isinstance(judge, Mapping) and isinstance(judge.get("name"), str):
            rating = judge.get("rating")
            found[judge["name"]] = rating if rating in RATINGS and not judge.get("error") else None
    return found or None


def judge_agreement(per_item: Mapping[str, Mapping[str, str | None]]) -> JudgeAgreement | None:
    """Pairwise kappa between every two judges over the items (id -> judge -> rating); None
    when no item recorded judges. A judge absent from an item (a cascade's second judge on an
    item the first decided) does not rate it."""
    if not per_item:
        return None
    names = list(dict.fromkeys(name for judges in per_item.values() for name in judges))
    pairs = [
        cohen_kappa(a, b, [(judges.get(a), judges.get(b)) for judges in per_item.values()])
        for a, b in combinations(names, 2)
    ]
    return JudgeAgreement(judges=names, items=len(per_item), pairs=pairs)
