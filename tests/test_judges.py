"""The cascade and ensemble backends, and the judges' agreement `eval` reports.

The judges are colour-keyed test backends (tests/colour_backend.py): the cheap one is the
overconfident colour backend, the "exact" one is Unsafe exactly when redness >= 0.5. On a
labelled set of images of known redness every expected answer can be worked out by hand.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from policy_engine.backends.cascade import CascadeBackend
from policy_engine.backends.ensemble import EnsembleBackend
from pydantic import Field

from policy_engine import Backend, Batch, Decision, Engine, Generation, PluginHost, hookimpl
from policy_engine.audit.agreement import cohen_kappa, judge_agreement
from policy_engine.calibration import Calibration, FittedFor
from policy_engine.cli import cli
from policy_engine.errors import PolicyEngineError
from tests.colour_backend import (
    ColourBackend,
    ColourOptions,
    colour_host,
    colour_score,
    red_image,
    redness,
)

VALUES = [i / 50 for i in range(51)]  # redness 0.00, 0.02, ..., 1.00; Unsafe from 0.5 on


class ExactOptions(ColourOptions):
    sharpness: float = Field(default=500.0, gt=0)  # a step at 0.5 (exp stays finite)
    model: str = "colour-exact"


class ExactColour(ColourBackend):
    """The expensive, right judge: Unsafe exactly when redness >= 0.5."""

    name = "colour-exact"
    Options = ExactOptions


class FlakyOptions(ColourOptions):
    fail_from: float = 2.0  # items with redness in [fail_from, fail_to] get an error
    fail_to: float = 2.0
    raise_call: bool = False  # every call raises


class FlakyColour(ColourBackend):
    name = "colour-flaky"
    Options = FlakyOptions
    options: FlakyOptions  # type: ignore[assignment]

    def generate(self, batch: Batch) -> list[Generation]:
        if self.options.raise_call:
            raise RuntimeError("the server went away")
        answers = super().generate(batch)
        lo, hi = self.options.fail_from, self.options.fail_to
        return [
            Generation(error="flaky judge failed", model="colour")
            if lo <= redness(image.image) <= hi
            else answer
            for image, answer in zip(batch.images, answers, strict=True)
        ]


class NoScores(ColourBackend):
    name = "colour-noscore"
    capabilities = ColourBackend.capabilities.__class__(images=True, json_schema=True)


class JudgesPlugin:
    @hookimpl
    def register_backends(self, register):  # type: ignore[no-untyped-def]
        for cls in (ExactColour, FlakyColour, NoScores):
            register(cls)


@pytest.fixture
def host() -> Iterator[PluginHost]:
    with colour_host() as host:
        host.register(JudgesPlugin(), name="judges-test-backends")
        yield host


CHEAP = {"backend": "colour", "mode": "score"}
EXACT = {"backend": "colour-exact"}


def truth(value: float) -> str:
    return "Unsafe" if redness(red_image(value)) >= 0.5 else "Safe"


def recall(decisions: list[Decision], values: list[float]) -> float:
    positives = [d for d, v in zip(decisions, values, strict=True) if truth(v) == "Unsafe"]
    return sum(d.rating == "Unsafe" for d in positives) / len(positives)


def run(host: PluginHost, backend: str, values: list[float], **options: Any) -> list[Decision]:
    engine = Engine("llavaguard", backend, backend_options=options, host=host)
    with engine:
        return list(engine.assess_many([red_image(v) for v in values]))


# -- cascade --------------------------------------------------------------------------------


def test_cascade_reaches_the_second_judges_recall_with_fewer_second_judge_calls(
    host: PluginHost,
) -> None:
    alone_engine = Engine("llavaguard", "colour-exact", host=host)
    with alone_engine:
        alone = list(alone_engine.assess_many([red_image(v) for v in VALUES]))
    engine = Engine(
        "llavaguard", "cascade", backend_options={"first": CHEAP, "second": EXACT}, host=host
    )
    with engine:
        cascaded = list(engine.assess_many([red_image(v) for v in VALUES]))
        cascade = engine.backend
        assert isinstance(cascade, CascadeBackend)
        first, second = cascade.first.backend, cascade.second.backend
        assert isinstance(first, ColourBackend) and isinstance(second, ColourBackend)
        # the images whose cheap score is inside [0.2, 0.8] (bounds included), and only they
        in_band = [v for v in VALUES if 0.2 <= colour_score(redness(red_image(v))) <= 0.8]
        assert first.images == len(VALUES)
        assert second.images == len(in_band) == 11  # redness 0.40 ... 0.60
        assert second.calls == 1  # the in-band images of a batch go in one batch
    assert alone_engine.backend.images == len(VALUES)  # type: ignore[attr-defined]
    assert [d.rating for d in cascaded] == [d.rating for d in alone]
    assert recall(cascaded, VALUES) == recall(alone, VALUES) == 1.0
    assert all(d.ok for d in cascaded)


def test_the_decision_names_the_deciding_judge_and_why(host: PluginHost) -> None:
    low, middle, high = run(host, "cascade", [0.1, 0.5, 0.9], first=CHEAP, second=EXACT)
    p_low = colour_score(redness(red_image(0.1)))
    assert low.verdict.decided_by == f"first: p_unsafe {p_low:.3f} below band [0.2, 0.8]"
    assert [(j.name, j.mode, j.decided) for j in low.verdict.judges or []] == [
        ("first", "score", True)
    ]
    assert low.rating == "Safe" and low.verdict.p_unsafe == pytest.approx(p_low)
    assert "no rationale" in (low.verdict.rationale or "")  # a score-mode judge wrote none
    assert high.rating == "Unsafe" and high.category_id == "O1"
    assert (high.verdict.decided_by or "").startswith("first: p_unsafe 0.99")
    assert "above band" in (high.verdict.decided_by or "")
    p_mid = colour_score(redness(red_image(0.5)))
    assert middle.verdict.decided_by == (
        f"second, because first's p_unsafe {p_mid:.3f} inside band [0.2, 0.8]"
    )
    judges = middle.verdict.judges or []
    assert [(j.name, j.backend, j.mode, j.decided) for j in judges] == [
        ("first", "colour", "score", False),
        ("second", "colour-exact", "full", True),
    ]
    assert middle.rating == "Unsafe" and middle.verdict.model == "colour-exact"
    assert middle.verdict.rationale == f"redness {redness(red_image(0.5)):.3f}"  # its own


def test_band_and_names_are_options(host: PluginHost) -> None:
    first = {**CHEAP, "name": "cheap"}
    second = {**EXACT, "name": "exact"}
    # a band of [0, 1] sends everything to the second judge
    decisions = run(host, "cascade", [0.1, 0.9], first=first, second=second, band=[0.0, 1.0])
    assert all((d.verdict.decided_by or "").startswith("exact, because cheap's") for d in decisions)
    with pytest.raises(PolicyEngineError, match="band"):
        CascadeBackend(host=host, first=CHEAP, second=EXACT, band=[0.8, 0.2])
    with pytest.raises(PolicyEngineError, match="both named 'x'"):
        CascadeBackend(host=host, first={**CHEAP, "name": "x"}, second={**EXACT, "name": "x"})


def test_a_failed_first_judge_sends_the_image_to_the_second(host: PluginHost) -> None:
    flaky = {
        "backend": "colour-flaky",
        "mode": "score",
        "options": {"fail_from": 0.0, "fail_to": 0.15},
    }
    grey, red = run(host, "cascade", [0.1, 0.9], first=flaky, second=EXACT)
    assert grey.rating == "Safe" and grey.ok  # decided by the second judge, not by the failure
    assert grey.verdict.decided_by == "second, because first failed (flaky judge failed)"
    assert [j.error for j in grey.verdict.judges or []] == ["flaky judge failed", None]
    assert red.verdict.decided_by is not None and red.verdict.decided_by.startswith("first:")


def test_a_calibrated_first_judge_compares_calibrated_scores_with_the_band(
    host: PluginHost, tmp_path: Path
) -> None:
    plain = Engine("llavaguard", "colour", mode="score", host=host)
    fitted = FittedFor.of(plain.compiled, "score", "colour")
    # temperature 3 pulls the overconfident scores towards 0.5: more images fall in the band
    calibration = Calibration.make("temperature", {"temperature": 3.0}, fitted)
    path = tmp_path / "calibration.yaml"
    path.write_text(calibration.dump(), encoding="utf-8")
    first = {**CHEAP, "calibration": str(path)}
    engine = Engine(
        "llavaguard", "cascade", backend_options={"first": first, "second": EXACT}, host=host
    )
    with engine:
        decisions = list(engine.assess_many([red_image(v) for v in VALUES]))
        cascade = engine.backend
        assert isinstance(cascade, CascadeBackend)
        second = cascade.second.backend
        assert isinstance(second, ColourBackend)
        raw = [colour_score(redness(red_image(v))) for v in VALUES]
        in_band = [p for p in raw if 0.2 <= calibration(p) <= 0.8]
        assert second.images == len(in_band) > 11  # 11 raw scores are in the band
    for decision, p in zip(decisions, raw, strict=True):
        first_answer = (decision.verdict.judges or [])[0]
        assert first_answer.p_unsafe == pytest.approx(calibration(p))
    assert recall(decisions, VALUES) == 1.0

    # fitted for another prompt: the judge's answers are errors (so the second judge decides)
    other = fitted.model_copy(update={"prompt_hash": "sha256:" + "0" * 64})
    path.write_text(
        Calibration.make("temperature", {"temperature": 3.0}, other).dump(), encoding="utf-8"
    )
    (grey,) = run(host, "cascade", [0.1], first=first, second=EXACT)
    assert grey.ok and grey.rating == "Safe"
    assert "whose prompt differs" in ((grey.verdict.judges or [])[0].error or "")
    with pytest.raises(PolicyEngineError, match=r"judge 'first': .*no such calibration file"):
        CascadeBackend(
            host=host, first={**CHEAP, "calibration": str(tmp_path / "x.yaml")}, second=EXACT
        )


def test_on_first_error_error_makes_the_image_an_error(host: PluginHost) -> None:
    flaky = {
        "backend": "colour-flaky",
        "mode": "score",
        "options": {"fail_from": 0.0, "fail_to": 1.0},
    }
    (grey,) = run(host, "cascade", [0.1], first=flaky, second=EXACT, on_first_error="error")
    assert grey.rating is None and grey.verdict.error is not None
    assert "first judge 'first' failed: flaky judge failed" in grey.verdict.error.message
    assert [j.name for j in grey.verdict.judges or []] == ["first"]


def test_a_failed_second_judge_is_an_error_never_safe(host: PluginHost) -> None:
    broken = {"backend": "colour-flaky", "options": {"raise_call": True}}
    low, middle, high = run(host, "cascade", [0.1, 0.45, 0.9], first=CHEAP, second=broken)
    assert (low.rating, high.rating) == ("Safe", "Unsafe")  # decided by the first judge
    assert middle.rating is None and middle.verdict.error is not None
    assert "second judge 'second' failed" in middle.verdict.error.message
    assert "RuntimeError" in middle.verdict.error.message
    assert [j.name for j in middle.verdict.judges or []] == ["first", "second"]


def test_capabilities_come_from_the_judges(host: PluginHost) -> None:
    scoring = CascadeBackend(host=host, first=CHEAP, second=EXACT)
    assert scoring.capabilities.scores and scoring.capabilities.max_batch_size == 16
    blind = CascadeBackend(host=host, first=CHEAP, second={"backend": "colour-noscore"})
    assert not blind.capabilities.scores
    with pytest.raises(PolicyEngineError, match="cannot score"):
        Engine("llavaguard", blind, mode="score", host=host)
    with pytest.raises(PolicyEngineError, match="judge 'first': backend 'colour-noscore' cannot"):
        CascadeBackend(
            host=host, first={"backend": "colour-noscore", "mode": "score"}, second=EXACT
        )
    with pytest.raises(PolicyEngineError, match=r"judge 'second'.*nosuch"):
        CascadeBackend(host=host, first=CHEAP, second={"backend": "nosuch"})


def test_score_mode_cascade(host: PluginHost) -> None:
    engine = Engine(
        "llavaguard",
        "cascade",
        mode="score",
        backend_options={"first": CHEAP, "second": EXACT},
        host=host,
    )
    with engine:
        low, middle = engine.assess_many([red_image(0.1), red_image(0.55)])
    assert low.rating == "Safe" and low.verdict.judges is not None
    assert middle.rating == "Unsafe" and middle.verdict.model == "colour-exact"
    assert [j.mode for j in middle.verdict.judges or []] == ["score", "score"]


def test_the_cascade_owns_and_closes_its_judges(host: PluginHost) -> None:
    engine = Engine(
        "llavaguard", "cascade", backend_options={"first": CHEAP, "second": EXACT}, host=host
    )
    cascade = engine.backend
    assert isinstance(cascade, CascadeBackend)
    judges: list[Backend] = [cascade.first.backend, cascade.second.backend]
    assert not any(j.loaded for j in judges)  # construction loads nothing
    engine.assess(red_image(0.5))
    assert all(j.loaded for j in judges)
    engine.close()
    assert not any(j.loaded for j in judges)


def test_serves_pool_shares_one_cascade_across_policies(host: PluginHost) -> None:
    from policy_engine.serve.pool import EnginePool

    options = {"first": CHEAP, "second": EXACT}
    pool = EnginePool(
        ["llavaguard", "children-platform"], "cascade", backend_options=options, host=host
    )
    cascade = pool.backend
    assert isinstance(cascade, CascadeBackend)
    pool.load()
    assert cascade.second.backend.loaded
    for policy_id in pool.policies:
        decision = pool.engine(policy_id).assess(red_image(0.55))
        assert decision.rating == "Unsafe" and decision.verdict.policy_id == policy_id
        assert (decision.verdict.decided_by or "").startswith("second, because")
    assert pool.modes == ("full", "verdict", "score")
    pool.close()
    assert not cascade.first.backend.loaded and not cascade.second.backend.loaded


# -- ensemble -------------------------------------------------------------------------------

THREE = [
    {"backend": "colour", "name": "low", "options": {"midpoint": 0.3}},
    {"backend": "colour", "name": "mid", "options": {"midpoint": 0.5}},
    {"backend": "colour", "name": "high", "options": {"midpoint": 0.7}},
]
SAMPLES = [0.2, 0.4, 0.6, 0.8]  # low says Unsafe from 0.3 on, mid from 0.5, high from 0.7


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"rule": "majority"}, ["Safe", "Safe", "Unsafe", "Unsafe"]),
        ({"rule": "any_unsafe"}, ["Safe", "Unsafe", "Unsafe", "Unsafe"]),
        ({"rule": "mean"}, ["Safe", "Safe", "Unsafe", "Unsafe"]),  # symmetric around 0.5
        # mean p_unsafe at 0.6: (0.992 + 0.769 + 0.231) / 3 = 0.664; at 0.8: 0.913
        ({"rule": "mean", "threshold": 0.9}, ["Safe", "Safe", "Safe", "Unsafe"]),
        ({"rule": "weighted"}, ["Safe", "Safe", "Safe", "Unsafe"]),  # "high" weighs 3 of 5
    ],
)
def test_ensemble_rules(host: PluginHost, options: dict[str, Any], expected: list[str]) -> None:
    judges = [dict(j) for j in THREE]
    if options["rule"] == "weighted":
        judges[2]["weight"] = 3.0
    decisions = run(host, "ensemble", SAMPLES, judges=judges, **options)
    assert [d.rating for d in decisions] == expected
    for decision in decisions:
        verdicts = decision.verdict.judges or []
        assert [j.name for j in verdicts] == ["low", "mid", "high"]  # every judge's verdict kept
        assert all(j.decided == (j.rating == decision.rating) for j in verdicts)
        assert (decision.verdict.decided_by or "").startswith(
            f"ensemble {options['rule']}".replace("_", " ")
        )
        if decision.rating == "Unsafe":
            assert decision.category_id == "O1"


def test_the_ensembles_p_unsafe_is_the_rules_score(host: PluginHost) -> None:
    (majority,) = run(host, "ensemble", [0.6], judges=THREE)
    assert majority.verdict.p_unsafe == pytest.approx(2 / 3)
    assert majority.verdict.decided_by == "ensemble majority: 2 of 3 judges Unsafe"
    (mean,) = run(host, "ensemble", [0.6], judges=THREE, rule="mean")
    value = redness(red_image(0.6))
    expected = sum(colour_score(value, 12, m) for m in (0.3, 0.5, 0.7)) / 3
    assert mean.verdict.p_unsafe == pytest.approx(expected)
    assert mean.verdict.model == "ensemble(colour)"


FAILING = {"backend": "colour-flaky", "name": "down", "options": {"raise_call": True}}


def test_by_default_a_failed_judge_is_an_error_unless_unsafe_holds(host: PluginHost) -> None:
    judges = [THREE[0], THREE[2], FAILING]
    safe, unsafe = run(host, "ensemble", [0.2, 0.8], judges=judges, rule="any_unsafe")
    assert unsafe.rating == "Unsafe"  # an Unsafe from a working judge: holds whatever "down" says
    assert "down failed, the outcome holds whatever they say" in (unsafe.verdict.decided_by or "")
    assert safe.rating is None and safe.verdict.error is not None
    assert "down failed and could change the outcome" in safe.verdict.error.message
    assert [j.error is not None for j in safe.verdict.judges or []] == [False, False, True]
    # majority: 2 Safe of 3 cannot be overturned, but a Safe is only decided with `robust`
    (safe_majority,) = run(host, "ensemble", [0.2], judges=judges)
    assert safe_majority.rating is None
    (robust,) = run(host, "ensemble", [0.2], judges=judges, errors="robust")
    assert robust.rating == "Safe" and "down failed" in (robust.verdict.decided_by or "")


def test_errors_ignore_uses_the_judges_that_answered(host: PluginHost) -> None:
    judges = [THREE[1], FAILING]
    safe, unsafe = run(host, "ensemble", [0.2, 0.8], judges=judges, errors="ignore")
    assert (safe.rating, unsafe.rating) == ("Safe", "Unsafe")
    assert "ignoring down (failed)" in (safe.verdict.decided_by or "")
    (nobody,) = run(
        host, "ensemble", [0.2], judges=[FAILING, {**FAILING, "name": "also"}], errors="ignore"
    )
    assert nobody.rating is None and "no judge answered" in (
        nobody.verdict.error.message if nobody.verdict.error else ""
    )


def test_judges_with_their_own_policy_and_mode(host: PluginHost) -> None:
    judges = [
        {"backend": "colour", "name": "v12"},
        {"backend": "colour", "name": "v10", "policy": "llavaguard-v1.0", "mode": "score"},
    ]
    (decision,) = run(host, "ensemble", [0.9], judges=judges)
    by_name = {j.name: j for j in decision.verdict.judges or []}
    assert by_name["v10"].policy_id == "llavaguard-v1.0" and by_name["v10"].mode == "score"
    assert by_name["v12"].policy_id == "llavaguard"
    assert decision.rating == "Unsafe" and decision.verdict.policy_id == "llavaguard"


def test_ensemble_needs_two_judges_and_known_rules(host: PluginHost) -> None:
    with pytest.raises(PolicyEngineError, match="judges"):
        EnsembleBackend(host=host, judges=[THREE[0]])
    with pytest.raises(PolicyEngineError, match="rule"):
        EnsembleBackend(host=host, judges=THREE, rule="unanimous")
    with pytest.raises(PolicyEngineError, match="weight"):
        EnsembleBackend(host=host, judges=[{**THREE[0], "weight": 0}, THREE[1]])
    with pytest.raises(PolicyEngineError, match="weight"):  # a cascade judge has no weight
        CascadeBackend(host=host, first={**CHEAP, "weight": 2}, second=EXACT)


def test_a_composite_judge_inside_a_composite(host: PluginHost) -> None:
    panel = {"backend": "ensemble", "name": "panel", "options": {"judges": THREE}}
    low, middle = run(host, "cascade", [0.1, 0.6], first=CHEAP, second=panel)
    assert (low.verdict.decided_by or "").startswith("first: ")
    assert middle.rating == "Unsafe" and middle.verdict.model == "ensemble(colour)"
    assert [(j.name, j.backend) for j in middle.verdict.judges or []] == [
        ("first", "colour"),
        ("panel", "ensemble"),
    ]


# -- kappa ----------------------------------------------------------------------------------


def test_kappa_on_a_hand_checked_table() -> None:
    # 10 items: both Unsafe 3, both Safe 5, A Unsafe/B Safe 1, A Safe/B Unsafe 1.
    # p_o = 0.8; p_A(U) = p_B(U) = 0.4; p_e = 0.16 + 0.36 = 0.52; kappa = 0.28 / 0.48
    pairs = [("Unsafe", "Unsafe")] * 3 + [("Safe", "Safe")] * 5
    pairs += [("Unsafe", "Safe"), ("Safe", "Unsafe"), (None, "Safe"), ("Unsafe", None)]
    kappa = cohen_kappa("a", "b", pairs)
    assert kappa.compared == 10  # the pairs with a None are left out
    assert kappa.agreement == pytest.approx(0.8)
    assert kappa.kappa == pytest.approx(0.28 / 0.48)
    assert cohen_kappa("a", "b", [("Safe", "Unsafe"), ("Unsafe", "Safe")]).kappa == pytest.approx(
        -1.0
    )
    constant = cohen_kappa("a", "b", [("Safe", "Safe")] * 4)
    assert (constant.agreement, constant.kappa) == (1.0, None)  # chance agreement is 1: undefined
    assert cohen_kappa("a", "b", []).kappa is None


def test_judge_agreement_skips_judges_absent_from_an_item() -> None:
    items = {
        "1": {"first": "Safe"},
        "2": {"first": "Unsafe", "second": "Unsafe"},
        "3": {"first": "Safe", "second": "Unsafe"},
        "4": {"first": None, "second": "Safe"},
    }
    agreement = judge_agreement(items)
    assert agreement is not None and agreement.judges == ["first", "second"]
    (pair,) = agreement.pairs
    assert (pair.compared, pair.agreement) == (2, 0.5)


# -- through the CLI ------------------------------------------------------------------------

KAPPA_VALUES = [0.1, 0.1, 0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 0.9, 0.95]


def labelled(tmp_path: Path, values: list[float]) -> Path:
    lines = []
    for index, value in enumerate(values):
        path = tmp_path / f"img{index}.png"
        red_image(value).save(path)
        label = truth(value)
        record = {"image": path.name, "rating": label, "id": f"s{index}"}
        if label == "Unsafe":
            record["category"] = "O1"
        lines.append(json.dumps(record))
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return labels


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args))
    return result


def test_eval_reports_the_ensembles_judge_agreement(host: PluginHost, tmp_path: Path) -> None:
    labels = labelled(tmp_path, KAPPA_VALUES)
    config = tmp_path / "ensemble.yaml"
    config.write_text(
        "rule: any_unsafe\njudges:\n"
        "  - {backend: colour, name: lenient, options: {midpoint: 0.3}}\n"
        "  - {backend: colour, name: strict, options: {midpoint: 0.7}}\n",
        encoding="utf-8",
    )
    out = tmp_path / "ens.db"
    result = invoke(
        "eval", str(labels), "-b", "ensemble", "-o", f"config={config}", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    # lenient says Unsafe for 7 (0.4 on), strict for 4 (0.8 on): both Unsafe 4, both Safe 3,
    # lenient only 3. p_o = 0.7, p_e = 0.7*0.4 + 0.3*0.6 = 0.46, kappa = 0.24 / 0.54 = 4/9
    assert "judges' agreement" in result.stdout and "0.444" in result.stdout
    result = invoke("eval", str(labels), "--predictions", str(out), "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (pair,) = report["judges"]["pairs"]
    assert (pair["a"], pair["b"], pair["compared"]) == ("lenient", "strict", 10)
    assert pair["agreement"] == pytest.approx(0.7)
    assert pair["kappa"] == pytest.approx(4 / 9)


def test_eval_compare_gives_kappa_between_two_runs(host: PluginHost, tmp_path: Path) -> None:
    labels = labelled(tmp_path, VALUES)
    cascade, exact = tmp_path / "cascade.db", tmp_path / "exact.db"
    first = "first={backend: colour, mode: score}"
    result = invoke(
        "eval",
        str(labels),
        "-b",
        "cascade",
        "-o",
        first,
        "-o",
        "second={backend: colour-exact}",
        "--out",
        str(cascade),
    )
    assert result.exit_code == 0, result.output
    result = invoke("eval", str(labels), "-b", "colour-exact", "--out", str(exact))
    assert result.exit_code == 0, result.output
    result = invoke(
        "eval",
        str(labels),
        "--predictions",
        str(exact),
        "--compare",
        str(cascade),
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["compare"]["kappa"] == {
        "a": "A",
        "b": "B",
        "compared": 51,
        "agreement": 1.0,
        "kappa": 1.0,
    }
    assert report["metrics"]["recall"] == report["compare"]["metrics"]["recall"] == 1.0
    # the cascade's own judges: the second rated only the 11 images inside the band
    (pair,) = report["compare"]["judges"]["pairs"]
    assert (pair["a"], pair["b"], pair["compared"]) == ("first", "second", 11)
    text = invoke("eval", str(labels), "--predictions", str(exact), "--compare", str(cascade))
    assert "agreement of A and B on ratings: Cohen's kappa 1.000" in text.stdout


def test_assess_with_a_cascade_from_the_command_line(host: PluginHost, tmp_path: Path) -> None:
    path = tmp_path / "mid.png"
    red_image(0.5).save(path)
    result = invoke(
        "assess",
        str(path),
        "-b",
        "cascade",
        "-o",
        "first={backend: colour, mode: score}",
        "-o",
        "second={backend: colour-exact, name: exact}",
        "-o",
        "band=[0.1, 0.9]",
    )
    assert result.exit_code == 0, result.output
    decision = json.loads(result.stdout)
    assert decision["verdict"]["decided_by"].startswith("exact, because first's p_unsafe")
    assert [j["name"] for j in decision["verdict"]["judges"]] == ["first", "exact"]


def test_bad_composite_options_are_one_line_user_errors(host: PluginHost, tmp_path: Path) -> None:
    path = tmp_path / "mid.png"
    red_image(0.5).save(path)
    for options, message in [
        (["-o", "band=[0.9, 0.1]"], "band"),
        (["-o", "second={backend: nosuch}"], "nosuch"),
        (["-o", "config=missing.yaml"], "missing.yaml"),
    ]:
        args = ["assess", str(path), "-b", "cascade", "-o", "first={backend: colour, mode: score}"]
        if not any(o.startswith("second=") for o in options):
            args += ["-o", "second={backend: colour-exact}"]
        result = invoke(*args, *options)
        assert result.exit_code == 2, result.output
        assert message in result.stderr and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1
