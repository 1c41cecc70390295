"""Thresholds chosen for a target (policy_engine.audit.fit_thresholds): known small cases, the
grouping of the `thresholds` step, optimality against a brute-force search, and the Wilson
margin."""

from __future__ import annotations

import random

import pytest

from policy_engine.audit.fit_thresholds import (
    DEFAULT,
    Scored,
    Target,
    choose,
    figures,
    fit_thresholds,
    threshold_group,
    wilson,
)
from policy_engine.errors import PolicyEngineError

IDS = ["O1", "O2", "O3"]


def samples(*pairs: tuple[float, bool], group: str = "O1") -> list[Scored]:
    return [Scored(score, unsafe, group) for score, unsafe in pairs]


def test_known_cases_without_a_margin() -> None:
    data = samples((0.9, True), (0.8, True), (0.7, False), (0.6, True), (0.5, False), (0.4, True))
    # recall 0.75 of 4 Unsafe: 3 needed, the third highest Unsafe score is 0.6
    assert choose(data, Target.parse("recall=0.75")) == (0.6, True)
    # precision 0.75: the lowest threshold with 3 of 4 right is 0.6
    assert choose(data, Target.parse("precision=0.75")) == (0.6, True)
    # fpr 0.5 of 2 Safe: one may be flagged, so just above the second highest Safe (0.5)
    threshold, reached = choose(data, Target.parse("fpr=0.5"))
    assert reached and 0.5 < threshold <= 0.500001
    assert figures(data, {DEFAULT: threshold}).fpr == 0.5
    # unreachable: precision 1 is never reached below 0.8; the closest is returned
    assert choose(data, Target.parse("precision=1.0")) == (0.8, True)
    assert choose(samples((0.9, False), (0.1, True)), Target.parse("precision=0.9"))[1] is False


def test_the_group_is_the_one_the_thresholds_step_uses() -> None:
    assert threshold_group("O2", {"O1": 0.9}, IDS) == "O2"  # the verdict's category first
    assert threshold_group("NA", {"O1": 0.2, "O3": 0.7}, IDS) == "O3"  # then the top score
    assert threshold_group("NA", {"O1": 0.5, "O2": 0.5}, IDS) == "O1"  # a tie: policy order
    assert threshold_group(None, None, IDS) == DEFAULT


@pytest.mark.parametrize("metric", ["recall", "precision", "fpr"])
def test_the_threshold_is_the_best_one_reaching_the_target(metric: str) -> None:
    rng = random.Random(metric)
    for _ in range(200):
        data = samples(*((round(rng.random(), 3), rng.random() < 0.5) for _ in range(12)))
        if len({s.unsafe for s in data}) < 2:
            continue
        target = Target(metric, round(rng.uniform(0.2, 0.9), 2))  # type: ignore[arg-type]
        threshold, reached = choose(data, target)
        candidates = sorted({s.score for s in data} | {s.score + 1e-6 for s in data})
        meeting = [t for t in candidates if target.met(figures(data, {DEFAULT: t}))]
        assert reached == bool(meeting)
        if not meeting:
            continue
        assert target.met(figures(data, {DEFAULT: threshold}))
        result = figures(data, {DEFAULT: threshold})
        if metric == "recall":  # the highest threshold: no better precision is possible
            best = max(meeting)
            assert (
                result.tp + result.fp
                == figures(data, {DEFAULT: best}).tp + figures(data, {DEFAULT: best}).fp
            )
        else:  # the lowest threshold: no better recall is possible
            assert result.recall == figures(data, {DEFAULT: min(meeting)}).recall


def test_the_wilson_margin_makes_the_fit_part_beat_the_target() -> None:
    rng = random.Random(4)
    data = samples(*((rng.random(), rng.random() < 0.5) for _ in range(400)))
    plain, _ = choose(data, Target.parse("recall=0.9"))
    careful, reached = choose(data, Target.parse("recall=0.9"), confidence=0.95)
    assert reached and careful <= plain
    result = figures(data, {DEFAULT: careful})
    low, _ = wilson(result.tp, result.tp + (result.unsafe - result.tp), 1.6448536)
    assert low >= 0.9 - 1e-9


def test_a_category_needs_enough_samples_of_both_ratings() -> None:
    rng = random.Random(2)
    fit = [Scored(rng.random(), rng.random() < 0.5, "O1") for _ in range(60)]
    fit += [Scored(rng.random(), True, "O2") for _ in range(30)]  # Unsafe only: no threshold
    fit += [Scored(rng.random(), rng.random() < 0.5, "O3") for _ in range(5)]  # too few
    result = fit_thresholds(fit, fit, Target.parse("recall=0.8"), IDS, min_samples=20)
    assert set(result.thresholds) == {DEFAULT, "O1"}
    default = next(g for g in result.groups if g.group == DEFAULT)
    assert default.fitted_on == 35  # O2 and O3 samples: enough, both ratings
    assert result.overall_fit.recall is not None and result.overall_fit.recall >= 0.8


@pytest.mark.parametrize("text", ["recall", "recall=", "f1=0.5", "fpr=1.5", "precision=x"])
def test_bad_targets(text: str) -> None:
    with pytest.raises(PolicyEngineError):
        Target.parse(text)
