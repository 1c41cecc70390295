"""policy_engine.calibration: the measures against hand computations, the fits against what
they optimise, the file (round trip, tampering, bad parameters), and an engine applying a
calibration: raw and calibrated scores in the verdict, score mode rating by the calibrated
score, and the refusals of a calibration fitted for another mode, prompt or model."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any

import pytest

from policy_engine import Engine, Generation, PluginHost, hookimpl, load_policy
from policy_engine.calibration import (
    Calibration,
    CalibrationError,
    FittedFor,
    brier,
    category_nll,
    ece,
    fit_category_temperature,
    fit_isotonic,
    fit_temperature,
    interpolate,
    load_calibration,
    logit,
    reliability,
    sigmoid,
    temper,
)
from policy_engine.compiler import _policy_data, policy_hash
from tests.colour_backend import ColourBackend, colour_host, colour_score, red_image, redness

# -- the measures ----------------------------------------------------------------------------


def test_ece_and_brier_by_hand() -> None:
    scores = [0.05, 0.15, 0.12, 0.95, 0.85, 0.91]
    labels = [False, True, False, True, True, False]
    # bins of width 0.5: [0.05, 0.15, 0.12] observed 1/3, [0.95, 0.85, 0.91] observed 2/3
    low = abs((0.05 + 0.15 + 0.12) / 3 - 1 / 3)
    high = abs((0.95 + 0.85 + 0.91) / 3 - 2 / 3)
    assert ece(scores, labels, bins=2) == pytest.approx((3 * low + 3 * high) / 6)
    expected_brier = sum((p - y) ** 2 for p, y in zip(scores, labels, strict=True)) / 6
    assert brier(scores, labels) == pytest.approx(expected_brier)
    bins = reliability(scores, labels, bins=10)
    assert [b.count for b in bins] == [1, 2, 0, 0, 0, 0, 0, 0, 1, 2]
    assert bins[2].mean_score is None and bins[2].observed is None
    assert bins[9].observed == pytest.approx(0.5)  # 0.95 Unsafe, 0.91 Safe
    assert reliability([1.0], [True], bins=4)[-1].count == 1  # 1.0 falls in the last bin
    assert ece([], []) is None and brier([], []) is None


def test_a_calibrated_score_has_no_calibration_error() -> None:
    scores = [0.25] * 4 + [0.75] * 4
    labels = [True, False, False, False, True, True, True, False]
    assert ece(scores, labels, bins=10) == pytest.approx(0.0)


# -- the fits --------------------------------------------------------------------------------


def _nll(scores: list[float], labels: list[bool], temperature: float) -> float:
    total = 0.0
    for p, y in zip(scores, labels, strict=True):
        q = sigmoid(logit(p) / temperature)
        total -= math.log(q if y else 1 - q)
    return total


def test_temperature_scaling_finds_the_temperature_that_made_the_labels() -> None:
    rng = random.Random(3)
    scores = [rng.random() for _ in range(4000)]
    true_temperature = 2.5  # the model is this overconfident
    labels = [rng.random() < sigmoid(logit(p) / true_temperature) for p in scores]
    fitted = fit_temperature(scores, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.15)
    best = _nll(scores, labels, fitted)
    for other in (fitted * 0.97, fitted * 1.03, 1.0):  # it is the minimum
        assert best <= _nll(scores, labels, other)
    assert fit_temperature(scores, labels) == fitted  # deterministic


def _brute_isotonic(values: list[float]) -> list[float]:
    """Least-squares non-decreasing fit by trying every partition into blocks (small n)."""
    best: tuple[float, list[float]] | None = None
    n = len(values)
    for cuts in itertools.product([False, True], repeat=n - 1):
        blocks: list[list[float]] = [[values[0]]]
        for value, cut in zip(values[1:], cuts, strict=True):
            if cut:
                blocks.append([value])
            else:
                blocks[-1].append(value)
        means = [sum(b) / len(b) for b in blocks]
        if any(b < a for a, b in itertools.pairwise(means)):
            continue
        fitted = [m for m, b in zip(means, blocks, strict=True) for _ in b]
        error = sum((f - v) ** 2 for f, v in zip(fitted, values, strict=True))
        if best is None or error < best[0] - 1e-12:
            best = (error, fitted)
    assert best is not None
    return best[1]


def test_isotonic_is_the_least_squares_monotone_fit() -> None:
    rng = random.Random(5)
    for _ in range(30):
        n = rng.randint(2, 9)
        scores = sorted(rng.sample(range(100), n))
        labels = [rng.random() < 0.5 for _ in range(n)]
        x, y = fit_isotonic([s / 100 for s in scores], labels)
        best = _brute_isotonic([float(v) for v in labels])
        # runs of equal fitted values are PAV's blocks: their values and mean scores
        runs = [
            list(run) for _, run in itertools.groupby(range(n), key=lambda i: round(best[i], 9))
        ]
        assert y == pytest.approx([best[run[0]] for run in runs])
        assert x == pytest.approx([sum(scores[i] for i in run) / len(run) / 100 for run in runs])
        assert all(b > a for a, b in itertools.pairwise(y))
        assert interpolate(x, y, x[0] / 2) == y[0] and interpolate(x, y, 2.0) == y[-1]


def test_isotonic_keeps_equal_scores_together() -> None:
    x, y = fit_isotonic([0.3, 0.3, 0.3, 0.8], [True, False, False, True])
    assert x == pytest.approx([0.3, 0.8]) and y == pytest.approx([1 / 3, 1.0])


# -- the file --------------------------------------------------------------------------------

FITTED = FittedFor(
    model="colour",
    mode="score",
    prompt_hash="sha256:0",
    policy_id="llavaguard",
    policy_version="1.2",
    policy_hash="sha256:1",
)


def test_the_file_round_trips_and_names_itself(tmp_path: Path) -> None:
    calibration = Calibration.make("temperature", {"temperature": 2.0}, FITTED, fit={"n": 3})
    path = tmp_path / "cal.yaml"
    path.write_text(calibration.dump())
    loaded = load_calibration(path)
    assert loaded == calibration
    assert loaded.name == f"temperature-{calibration.hash[7:19]}"
    assert loaded(0.9) == pytest.approx(sigmoid(logit(0.9) / 2.0))
    # the name and the fit figures do not change the hash; the parameters do
    renamed = Calibration.make("temperature", {"temperature": 2.0}, FITTED, name="x")
    assert renamed.hash == calibration.hash
    assert Calibration.make("temperature", {"temperature": 2.1}, FITTED).hash != calibration.hash


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("temperature: 2.0", "temperature: 3.0"), "hash does not match"),
        (lambda t: t.replace("temperature: 2.0", "temperature: -1"), "T > 0"),
        (lambda t: t.replace("method: temperature", "method: platt"), "method"),
        (lambda t: "[1, 2]", "expected a mapping"),
        (lambda t: "a: [", "not a calibration file"),
    ],
)
def test_a_bad_file_is_one_line(tmp_path: Path, edit: Any, message: str) -> None:
    calibration = Calibration.make("temperature", {"temperature": 2.0}, FITTED)
    path = tmp_path / "cal.yaml"
    path.write_text(edit(calibration.dump()))
    with pytest.raises(CalibrationError, match=message) as caught:
        load_calibration(path)
    assert "\n" not in str(caught.value)
    with pytest.raises(CalibrationError, match="no such calibration file"):
        load_calibration(tmp_path / "missing.yaml")


def test_isotonic_parameters_must_be_monotone(tmp_path: Path) -> None:
    bad = Calibration.make("isotonic", {"x": [0.1, 0.5], "y": [0.6, 0.2]}, FITTED)
    path = tmp_path / "cal.yaml"
    path.write_text(bad.dump())
    with pytest.raises(CalibrationError, match="non-decreasing"):
        load_calibration(path)


# -- an engine applying it -------------------------------------------------------------------


def fitted_for(engine: Engine, **changes: str) -> FittedFor:
    return FittedFor.of(engine.compiled, engine.mode, "colour").model_copy(update=changes)


def test_verdicts_carry_raw_and_calibrated_scores_and_the_calibration() -> None:
    with colour_host() as host:
        plain = Engine("llavaguard", "colour", mode="full", host=host)
        calibration = Calibration.make("temperature", {"temperature": 3.0}, fitted_for(plain))
        engine = Engine("llavaguard", "colour", mode="full", host=host, calibration=calibration)
        image = red_image(0.7)
        decision = engine.assess(image)
        before = plain.assess(image)
    raw = colour_score(redness(image))
    verdict = decision.verdict
    assert verdict.p_unsafe_raw == pytest.approx(raw)
    assert verdict.p_unsafe == pytest.approx(sigmoid(logit(raw) / 3.0))
    assert verdict.p_unsafe < raw  # an overconfident score is pulled towards 0.5
    assert verdict.calibration == {"name": calibration.name, "hash": calibration.hash}
    assert before.verdict.p_unsafe_raw is None and before.verdict.calibration is None
    assert before.verdict.p_unsafe == pytest.approx(raw)


def test_score_mode_rates_by_the_calibrated_score() -> None:
    with colour_host() as host:
        plain = Engine("llavaguard", "colour", mode="score", host=host)
        # an isotonic map that puts raw 0.6..0.9 under 0.5: those images become Safe
        calibration = Calibration.make(
            "isotonic", {"x": [0.0, 0.95, 1.0], "y": [0.0, 0.4, 1.0]}, fitted_for(plain)
        )
        engine = Engine("llavaguard", "colour", mode="score", host=host, calibration=calibration)
        image = red_image(0.55)
        raw_decision, decision = plain.assess(image), engine.assess(image)
    assert raw_decision.verdict.p_unsafe >= 0.5 and raw_decision.rating == "Unsafe"
    assert decision.verdict.p_unsafe < 0.5
    assert (decision.rating, decision.category_id) == ("Safe", "NA")
    assert decision.verdict.p_unsafe_raw == raw_decision.verdict.p_unsafe


def test_a_calibration_for_another_mode_prompt_or_model_is_refused() -> None:
    with colour_host() as host:
        plain = Engine("llavaguard", "colour", mode="score", host=host)
        calibration = Calibration.make("temperature", {"temperature": 2.0}, fitted_for(plain))
        with pytest.raises(CalibrationError, match="fitted for mode 'score', not 'full'"):
            Engine("llavaguard", "colour", mode="full", host=host, calibration=calibration)
        other = load_policy("llavaguard").model_copy(update={"id": "other", "version": "9"})
        Engine(other, "colour", mode="score", host=host, calibration=calibration)  # same prompt
        reworded = other.model_copy(update={"description": "x"})
        reworded = reworded.model_copy(
            update={
                "categories": [
                    reworded.categories[0].model_copy(update={"name": "Hate speech"}),
                    *reworded.categories[1:],
                ]
            }
        )
        with pytest.raises(CalibrationError, match="whose prompt differs"):
            Engine(reworded, "colour", mode="score", host=host, calibration=calibration)
        with pytest.raises(CalibrationError, match="fitted for model 'colour', not 'other'"):
            Engine(
                "llavaguard",
                "colour",
                mode="score",
                host=host,
                calibration=calibration,
                backend_options={"model": "other"},
            )


class Impostor(ColourBackend):
    """Says it is model `colour` in its options, answers as another model."""

    name = "impostor"

    def generate(self, batch: Any) -> list[Generation]:
        return [Generation(**{**g.__dict__, "model": "impostor"}) for g in super().generate(batch)]


class ImpostorPlugin:
    @hookimpl
    def register_backends(self, register: Any) -> None:
        register(Impostor)


def test_an_answer_from_another_model_is_an_error_verdict_not_a_wrong_score() -> None:
    host = PluginHost()
    host.register(ImpostorPlugin(), name="impostor")
    plain = Engine("llavaguard", "impostor", mode="score", host=host)
    calibration = Calibration.make("temperature", {"temperature": 2.0}, fitted_for(plain))
    engine = Engine("llavaguard", "impostor", mode="score", host=host, calibration=calibration)
    decision = engine.assess(red_image(0.9))
    assert decision.rating is None and decision.verdict.p_unsafe is None
    assert decision.verdict.error is not None and decision.verdict.error.kind == "config"
    assert "fitted for model 'colour', not 'impostor'" in decision.verdict.error.message


def test_the_policy_key_names_a_file_relative_to_the_policy(tmp_path: Path) -> None:
    with colour_host() as host:
        plain = Engine("llavaguard", "colour", mode="score", host=host)
        calibration = Calibration.make("temperature", {"temperature": 2.0}, fitted_for(plain))
        (tmp_path / "cal").mkdir()
        (tmp_path / "cal" / "c.yaml").write_text(calibration.dump())
        policy_file = tmp_path / "p.yaml"
        policy_file.write_text("extends: llavaguard\nid: calibrated\ncalibration: cal/c.yaml\n")
        engine = Engine(str(policy_file), "colour", mode="score", host=host)
        decision = engine.assess(red_image(0.8))
        assert decision.verdict.calibration == calibration.stamp
        # an engine option wins over the policy's key
        other = Calibration.make("temperature", {"temperature": 4.0}, fitted_for(plain))
        overridden = Engine(str(policy_file), "colour", mode="score", host=host, calibration=other)
        assert overridden.assess(red_image(0.8)).verdict.calibration == other.stamp


def test_a_calibration_enters_the_policy_hash_by_its_content(tmp_path: Path) -> None:
    with colour_host() as host:
        plain = Engine("llavaguard", "colour", mode="score", host=host)
        fitted = fitted_for(plain)
    hashes = []
    for folder, temperature in (("a", 2.0), ("b", 2.0), ("c", 3.0)):
        (tmp_path / folder).mkdir()
        calibration = Calibration.make("temperature", {"temperature": temperature}, fitted)
        (tmp_path / folder / "c.yaml").write_text(calibration.dump())
        policy_file = tmp_path / folder / "p.yaml"
        policy_file.write_text("extends: llavaguard\nid: calibrated\ncalibration: c.yaml\n")
        hashes.append(policy_hash(load_policy(policy_file)))
    same_content_elsewhere, refitted = hashes[0] == hashes[1], hashes[0] != hashes[2]
    assert same_content_elsewhere and refitted
    assert hashes[0] != policy_hash(load_policy("llavaguard"))


def test_a_policy_without_the_key_hashes_as_before() -> None:
    policy = load_policy("llavaguard")
    assert policy.calibration is None
    assert "calibration" not in _policy_data(policy)


def test_a_policy_naming_a_missing_calibration_fails_to_load_at_the_key(tmp_path: Path) -> None:
    from policy_engine.errors import PolicyError

    policy_file = tmp_path / "p.yaml"
    policy_file.write_text("extends: llavaguard\nid: calibrated\ncalibration: nowhere.yaml\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(str(policy_file))
    (problem,) = caught.value.problems
    assert (problem.line, problem.path) == (3, "calibration")
    assert "no such calibration file" in problem.message


def test_the_backend_option_is_compared_without_the_marker_answers_carry() -> None:
    with colour_host() as host:
        marked = Engine(
            "llavaguard",
            "colour",
            mode="score",
            host=host,
            backend_options={"model": "tiny (random weights)"},
        )
        calibration = Calibration.make(
            "temperature", {"temperature": 2.0}, fitted_for(marked, model="tiny (random weights)")
        )
        engine = Engine(
            "llavaguard",
            "colour",
            mode="score",
            host=host,
            calibration=calibration,
            backend_options={"model": "tiny"},  # answers say "tiny (random weights)"
        )
        assert engine.calibration == calibration
        with pytest.raises(CalibrationError, match="not 'tinier'"):
            Engine(
                "llavaguard",
                "colour",
                mode="score",
                host=host,
                calibration=calibration,
                backend_options={"model": "tinier"},
            )


def test_a_ray_worker_rebuilds_the_engine_with_its_calibration() -> None:
    import pickle

    from policy_engine.ray import EngineSpec

    with colour_host() as host:
        plain = Engine("llavaguard", "colour", mode="score", host=host)
        calibration = Calibration.make("temperature", {"temperature": 2.0}, fitted_for(plain))
        engine = Engine("llavaguard", "colour", mode="score", host=host, calibration=calibration)
        spec = pickle.loads(pickle.dumps(EngineSpec.from_engine(engine)))
        rebuilt = spec.build()
        assert rebuilt.calibration == calibration
        assert rebuilt.assess(red_image(0.8)).verdict.calibration == calibration.stamp


def test_temper_keeps_the_order_and_the_sum() -> None:
    scores = {"O1": 0.7, "O2": 0.2, "O3": 0.1, "NA": 0.0}
    for temperature in (0.5, 1.0, 3.0):
        tempered = temper(scores, temperature)
        assert sum(tempered.values()) == pytest.approx(1.0)
        assert sorted(tempered, key=tempered.__getitem__) == sorted(scores, key=scores.__getitem__)
        assert tempered["NA"] == 0.0
    assert temper(scores, 1.0) == pytest.approx(scores)
    assert temper(scores, 3.0)["O1"] < 0.7 < temper(scores, 0.5)["O1"]
    assert temper(dict.fromkeys(scores, 0.0), 2.0) == dict.fromkeys(scores, 0.0)


def test_the_category_temperature_minimises_the_category_nll() -> None:
    rng = random.Random(8)
    rows = []
    for _ in range(2000):
        share = rng.random()
        label = "O2" if rng.random() < share else "O1"
        sharp = sigmoid(3.0 * logit(share))  # as if T = 1/3 had been applied: overconfident
        rows.append(({"O1": 1 - sharp, "O2": sharp}, label))
    fitted = fit_category_temperature(rows)
    assert fitted == pytest.approx(3.0, rel=0.15)
    for other in (fitted * 0.97, fitted * 1.03, 1.0):
        assert category_nll(rows, fitted) <= category_nll(rows, other)


def test_a_bad_category_temperature_is_refused(tmp_path: Path) -> None:
    bad = Calibration.make("temperature", {"temperature": 2.0, "category_temperature": 0}, FITTED)
    path = tmp_path / "cal.yaml"
    path.write_text(bad.dump())
    with pytest.raises(CalibrationError, match="category_temperature must be a number > 0"):
        load_calibration(path)
