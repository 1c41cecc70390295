"""`policy-engine calibrate` end to end on a labelled set with a known miscalibration.

The images come from the colour-keyed test backend (P(Unsafe) an overconfident sigmoid of
redness); each label is drawn with P(Unsafe | redness) = redness from a seeded RNG. The real
path runs: `audit` of the labels file with the colour backend (a results file), `calibrate`
(both methods), `assess` with the calibration, `check` and `eval` of the written policy.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from PIL import Image, ImageStat

from policy_engine import Generation, hookimpl
from policy_engine.audit.calibrate import split
from policy_engine.audit.labels import read_labels
from policy_engine.calibration import ece, load_calibration, logit, sigmoid, temper
from policy_engine.cli import cli
from policy_engine.host import set_host
from policy_engine.loader import load_policy
from tests.colour_backend import (
    ColourBackend,
    colour_host,
    colour_score,
    make_colour_host,
    red_image,
)
from tests.colour_backend import redness as measured_redness

SAMPLES = 600


def run(*args: str) -> Result:
    with colour_host():
        result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def run_json(*args: str, code: int = 0) -> Any:
    result = run(*args, "--format", "json")
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A labels file, the redness of each image, and an audit of it in mode full."""
    folder = tmp_path_factory.mktemp("labelled")
    (folder / "images").mkdir()
    rng = random.Random(2024)
    redness: dict[str, float] = {}
    lines = []
    for index in range(SAMPLES):
        value = round(rng.random(), 3)
        image = f"images/{index:04d}.png"
        picture = red_image(value, (4, 4))
        picture.save(folder / image)
        redness[image] = measured_redness(picture)  # what the backend will measure
        unsafe = rng.random() < value  # the truth: P(Unsafe | redness) = redness
        line = {"image": image, "rating": "Unsafe" if unsafe else "Safe"}
        lines.append(json.dumps({**line, "category": "O1"} if unsafe else line))
    labels = folder / "labels.jsonl"
    labels.write_text("\n".join(lines) + "\n")
    results = folder / "run.db"
    audit = run("audit", labels, "--out", results, "-b", "colour", "--no-progress")
    assert audit.exit_code == 0, audit.output
    return {"folder": folder, "labels": labels, "results": results, "redness": redness}


@pytest.mark.parametrize("method", ["temperature", "isotonic"])
def test_calibrate_lowers_the_calibration_error_on_held_out_data(
    labelled: dict[str, Any], method: str
) -> None:
    out = labelled["folder"] / f"{method}.yaml"
    report = run_json(
        "calibrate", labelled["labels"], "--predictions", labelled["results"], "--out", out,
        "--method", method,
    )  # fmt: skip
    held, fit = report["heldout"], report["fit"]
    assert held["after"]["ece"] < held["before"]["ece"]
    assert held["after"]["brier"] < held["before"]["brier"]
    assert fit["after"]["ece"] < fit["before"]["ece"]
    assert report["split"]["fit"] + report["split"]["heldout"] == SAMPLES
    calibration = load_calibration(out)
    assert calibration.method == method
    # the colour backend's category scores are no distribution: left as they are
    assert "do not sum to 1" in report["categories"]["note"]
    assert calibration.category_temperature is None
    fitted = calibration.fitted_for
    assert (fitted.model, fitted.mode, fitted.policy_id) == ("colour", "full", "llavaguard")
    assert calibration.fit["heldout"]["after"]["ece"] == held["after"]["ece"]
    # the held-out figures are those of the file's own map on the held-out samples
    policy = load_policy("llavaguard")
    samples = read_labels(labelled["labels"], policy)
    scores = {s.id: colour_score(labelled["redness"][s.image]) for s in samples}
    _, held_out = split([(s, scores[s.id]) for s in samples], 0.3, 0)
    chosen = [samples[i] for i in held_out]
    raw = [scores[s.id] for s in chosen]
    truth = [s.rating == "Unsafe" for s in chosen]
    assert ece(raw, truth) == pytest.approx(held["before"]["ece"])
    assert ece([calibration(p) for p in raw], truth) == pytest.approx(held["after"]["ece"])


def test_the_split_is_stratified_and_seeded(labelled: dict[str, Any]) -> None:
    samples = read_labels(labelled["labels"], load_policy("llavaguard"))
    items = [(s, 0.5) for s in samples]
    fit, held = split(items, 0.3, 0)
    assert sorted(fit + held) == list(range(len(items)))
    for rating in ("Safe", "Unsafe"):
        total = sum(s.rating == rating for s in samples)
        assert sum(samples[i].rating == rating for i in held) == round(0.3 * total)
    assert split(items, 0.3, 0) == (fit, held)
    assert split(items, 0.3, 1) != (fit, held)


@pytest.fixture(scope="module")
def calibrated(labelled: dict[str, Any]) -> Path:
    out = labelled["folder"] / "calibration.yaml"
    result = run(
        "calibrate", labelled["labels"], "--predictions", labelled["results"], "--out", out
    )
    assert result.exit_code == 0, result.output
    assert "ECE before" in result.stdout and "reliability on the held-out part" in result.stdout
    return out


def test_assess_with_the_calibration_reports_raw_and_calibrated(
    labelled: dict[str, Any], calibrated: Path
) -> None:
    calibration = load_calibration(calibrated)
    temperature = calibration.parameters["temperature"]
    assert temperature > 1.5  # the colour backend is overconfident
    image = labelled["folder"] / "images" / "0007.png"
    result = run("assess", image, "-b", "colour", "--calibration", calibrated)
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)["verdict"]
    raw = colour_score(labelled["redness"]["images/0007.png"])
    assert verdict["p_unsafe_raw"] == pytest.approx(raw, abs=1e-3)
    assert verdict["p_unsafe"] == pytest.approx(
        sigmoid(logit(verdict["p_unsafe_raw"]) / temperature)
    )
    assert verdict["calibration"] == {"name": calibration.name, "hash": calibration.hash}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "score"], "was fitted for mode 'full', not 'score'"),
        (["-o", "model=colour-v2"], "was fitted for model 'colour', not 'colour-v2'"),
        (["-p", "llavaguard-v1.0"], "whose prompt differs"),
    ],
)
def test_a_mismatched_calibration_is_refused_in_one_line(
    labelled: dict[str, Any], calibrated: Path, extra: list[str], message: str
) -> None:
    image = labelled["folder"] / "images" / "0001.png"
    result = run("assess", image, "-b", "colour", "--calibration", calibrated, *extra)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_fitted_thresholds_reach_the_target_on_held_out_data_and_act(
    labelled: dict[str, Any],
) -> None:
    folder = labelled["folder"]
    out, policy_file = folder / "tuned-calibration.yaml", folder / "tuned.yaml"
    report = run_json(
        "calibrate", labelled["labels"], "--predictions", labelled["results"], "--out", out,
        "--target", "recall=0.9", "--write-policy", policy_file,
    )  # fmt: skip
    fitted = report["thresholds"]
    assert fitted["target"] == "recall >= 0.9" and fitted["confidence"] == 0.95
    assert fitted["overall_heldout"]["recall"] >= 0.9
    assert fitted["met_on_heldout"] is True
    assert fitted["overall_fit"]["recall"] >= 0.9
    thresholds = fitted["thresholds"]
    assert set(thresholds) == {"default", "O1"}  # every colour verdict falls under O1

    check = run("check", policy_file)
    assert check.exit_code == 0, check.output
    assert json.loads(check.stdout)["postprocess"] == ["fitted-thresholds"]

    # the written policy, run on the labelled images, rates by the thresholds on calibrated
    # scores: its held-out recall is the one calibrate reported
    decisions_file = folder / "tuned.db"
    evaluated = run_json(
        "eval", labelled["labels"], "--policy", policy_file, "-b", "colour", "--out",
        decisions_file, "--no-progress",
    )  # fmt: skip
    assert evaluated["scores"]["calibration"]["ece"] is not None
    from policy_engine.audit.store import ResultStore

    with ResultStore(decisions_file) as store:
        rows = {row.id: row for row in store.rows()}
    for row in rows.values():
        verdict = row.decision["verdict"]
        assert verdict["calibration"]["name"] == report["calibration"]["name"]
        assert (row.rating == "Unsafe") == (verdict["p_unsafe"] >= thresholds["O1"] - 1e-9)
    samples = read_labels(labelled["labels"], load_policy("llavaguard"))
    _, held = split([(s, 0.0) for s in samples], 0.3, 0)
    unsafe = [samples[i] for i in held if samples[i].rating == "Unsafe"]
    caught = sum(rows[s.id].rating == "Unsafe" for s in unsafe)
    assert caught / len(unsafe) == pytest.approx(fitted["overall_heldout"]["recall"])


def test_a_false_positive_budget(labelled: dict[str, Any]) -> None:
    report = run_json(
        "calibrate", labelled["labels"], "--predictions", labelled["results"], "--out",
        labelled["folder"] / "fpr.yaml", "--target", "fpr=0.2", "--method", "isotonic",
    )  # fmt: skip
    fitted = report["thresholds"]
    assert fitted["overall_fit"]["fpr"] <= 0.2
    assert fitted["overall_heldout"]["fpr"] <= 0.2


def test_eval_reports_the_calibration_figures(labelled: dict[str, Any], calibrated: Path) -> None:
    raw = run_json("eval", labelled["labels"], "--predictions", labelled["results"])
    figures = raw["scores"]["calibration"]
    assert figures["bins"] == 10 and len(figures["reliability"]) == 10
    assert sum(b["count"] for b in figures["reliability"]) == SAMPLES
    # an audit with the calibration measures better calibrated
    again = labelled["folder"] / "calibrated-run.db"
    audit = run(
        "audit", labelled["labels"], "--out", again, "-b", "colour", "--calibration", calibrated,
        "--no-progress",
    )  # fmt: skip
    assert audit.exit_code == 0, audit.output
    compared = run_json(
        "eval", labelled["labels"], "--predictions", labelled["results"], "--compare", again
    )
    assert compared["compare"]["difference"]["ece"] < 0
    assert compared["compare"]["difference"]["brier"] < 0
    text = run("eval", labelled["labels"], "--predictions", labelled["results"])
    assert "ECE" in text.stdout and "Brier score" in text.stdout and "reliability" in text.stdout
    html = run("eval", labelled["labels"], "--predictions", labelled["results"], "--format", "html")
    assert html.exit_code == 0
    assert "<svg" in html.stdout and "Reliability of p_unsafe" in html.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "recall"], "expected recall=X"),
        (["--target", "recall=2"], "not a number in 0..1"),
        (["--write-policy", "x.yaml"], "--write-policy needs --target"),
        (["--policy", "llavaguard-v1.0"], "were made under policy 'llavaguard'"),
        (["--holdout", "1"], "--holdout"),
    ],
)
def test_user_errors_are_one_line(labelled: dict[str, Any], extra: list[str], message: str) -> None:
    out = labelled["folder"] / "never.yaml"
    result = run(
        "calibrate", labelled["labels"], "--predictions", labelled["results"], "--out", out, *extra
    )
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_an_existing_out_is_refused(labelled: dict[str, Any], calibrated: Path) -> None:
    before = calibrated.read_text()
    result = run(
        "calibrate", labelled["labels"], "--predictions", labelled["results"], "--out", calibrated
    )
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert calibrated.read_text() == before


def test_serve_refuses_one_calibration_for_several_policies(calibrated: Path) -> None:
    pytest.importorskip("fastapi")
    result = run("serve", "-b", "colour", "--calibration", calibrated, "--port", "0")
    assert result.exit_code == 2
    assert "put `calibration: FILE` in each policy" in result.stderr


def test_predictions_made_with_a_calibration_are_refitted_on_their_raw_scores(
    labelled: dict[str, Any], calibrated: Path
) -> None:
    again = labelled["folder"] / "refit-run.db"
    audit = run(
        "audit", labelled["labels"], "--out", again, "-b", "colour", "--calibration", calibrated,
        "--no-progress",
    )  # fmt: skip
    assert audit.exit_code == 0, audit.output
    refit = run_json(
        "calibrate", labelled["labels"], "--predictions", again, "--out",
        labelled["folder"] / "refit.yaml",
    )  # fmt: skip
    assert refit["already_calibrated"] == SAMPLES
    # the same raw scores and split give the same temperature as the first fit
    assert refit["calibration"]["parameters"] == load_calibration(calibrated).parameters


def test_an_audit_is_not_continued_with_another_calibration(
    labelled: dict[str, Any], calibrated: Path
) -> None:
    out = labelled["folder"] / "resumed.db"
    first = run("audit", labelled["labels"], "--out", out, "-b", "colour", "--no-progress")
    assert first.exit_code == 0, first.output
    again = run(
        "audit", labelled["labels"], "--out", out, "-b", "colour", "--calibration", calibrated,
        "--no-progress",
    )  # fmt: skip
    assert again.exit_code == 2
    assert "holds an audit with another calibration" in again.stderr


def test_assess_lines_need_the_mode_they_were_made_in(labelled: dict[str, Any]) -> None:
    folder = labelled["folder"]
    images = sorted(str(p) for p in (folder / "images").glob("*.png"))
    assessed = run("assess", *images, "-b", "colour")
    assert assessed.exit_code == 0, assessed.output
    lines = folder / "assessed.jsonl"
    lines.write_text(assessed.stdout)
    args = ["calibrate", labelled["labels"], "--predictions", lines, "--out", folder / "a.yaml"]
    refused = run(*args)
    assert refused.exit_code == 2 and "does not record the mode; give --mode" in refused.stderr
    report = run_json(*args, "--mode", "full")
    assert report["predictions_format"] == "assess"
    assert report["calibration"]["fitted_for"]["mode"] == "full"
    assert report["heldout"]["after"]["ece"] < report["heldout"]["before"]["ece"]


# -- category scores: a colour backend whose category scores follow a second colour ---------


class TiltBackend(ColourBackend):
    """The colour backend, with category scores that are a real distribution: O2's share is an
    overconfident sigmoid of how much bluer than green the image is (`tilt` in 0..1), O1 has
    the rest. P(Unsafe) is the colour backend's."""

    name = "tilt"

    def _judge(self, batch: Any, image: Image.Image) -> Generation:
        generation = super()._judge(batch, image)
        _, green, blue = ImageStat.Stat(image.convert("RGB")).mean[:3]
        share = colour_score(tilt(green, blue), sharpness=12.0)
        ids = [c.id for c in batch.compiled.policy.categories]
        scores = dict.fromkeys(ids, 0.0) | {"O1": 1 - share, "O2": share}
        return Generation(**{**generation.__dict__, "category_scores": scores})


class TiltPlugin:
    @hookimpl
    def register_backends(self, register: Any) -> None:
        register(TiltBackend)


MIDDLE = 60  # (green + blue) / 2 of every tilt image


def tilt(green: float, blue: float) -> float:
    return min(1.0, max(0.0, 0.5 + (blue - green) / (4 * MIDDLE)))


def tilt_image(red: float, bluer: float) -> Image.Image:
    """Redness about 0.76 * `red`, tilt `bluer` (both 0..1)."""
    shift = round(2 * MIDDLE * (bluer - 0.5))
    colour = (MIDDLE + round(195 * red), MIDDLE - shift, MIDDLE + shift)
    return Image.new("RGB", (4, 4), colour)


def run_tilt(*args: Any) -> Result:
    host = make_colour_host()
    host.register(TiltPlugin(), name="tilt-test-backend")
    previous = set_host(host)
    try:
        result = CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        set_host(previous)
    assert "Traceback" not in result.output, result.output
    return result


def tilted_set(tmp_path: Path, *, seed: int, count: int) -> tuple[Path, Path]:
    """`count` tilted images under tmp_path/images, labelled at random by their measured
    redness (Unsafe) and tilt (O2 over O1), and audited in score mode by the tilt backend:
    (labels.jsonl, run.db)."""
    rng = random.Random(seed)
    (tmp_path / "images").mkdir()
    lines = []
    for index in range(count):
        picture = tilt_image(rng.random(), rng.random())
        name = f"images/{index:04d}.png"
        picture.save(tmp_path / name)
        _, green, blue = ImageStat.Stat(picture).mean[:3]
        if rng.random() < measured_redness(picture):
            category = "O2" if rng.random() < tilt(green, blue) else "O1"
            lines.append(json.dumps({"image": name, "rating": "Unsafe", "category": category}))
        else:
            lines.append(json.dumps({"image": name, "rating": "Safe"}))
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(lines) + "\n")
    results = tmp_path / "run.db"
    audited = run_tilt("audit", labels, "--out", results, "-b", "tilt", "--mode", "score")
    assert audited.exit_code == 0, audited.output
    return labels, results


def test_category_scores_are_calibrated_where_they_are_a_distribution(tmp_path: Path) -> None:
    labels, results = tilted_set(tmp_path, seed=11, count=1200)

    out = tmp_path / "c.yaml"
    result = run_tilt(
        "calibrate", labels, "--predictions", results, "--out", out, "--format", "json"
    )
    assert result.exit_code == 0, result.output
    categories = json.loads(result.stdout)["categories"]
    assert categories["note"] is None
    assert categories["temperature"] > 1  # the shares were overconfident
    assert categories["nll"]["heldout"]["after"] < categories["nll"]["heldout"]["before"]
    assert categories["nll"]["fit"]["after"] < categories["nll"]["fit"]["before"]
    calibration = load_calibration(out)
    assert calibration.category_temperature == categories["temperature"]

    assessed = run_tilt("assess", tmp_path / "images" / "0003.png", "-b", "tilt", "--mode", "score",
                        "--calibration", out)  # fmt: skip
    decision = json.loads(assessed.stdout)
    verdict = decision["verdict"]
    raw = verdict["category_scores_raw"]
    assert verdict["category_scores"] == pytest.approx(
        temper(raw, calibration.category_temperature)
    )
    assert verdict["category_scores"] != pytest.approx(raw)
    if decision["rating"] == "Unsafe":  # the category stays the likeliest one
        assert decision["category_id"] == max(raw, key=raw.__getitem__)


def test_each_category_with_enough_samples_gets_its_own_threshold(tmp_path: Path) -> None:
    labels, results = tilted_set(tmp_path, seed=12, count=1000)
    policy_file = tmp_path / "tuned.yaml"
    result = run_tilt(
        "calibrate", labels, "--predictions", results, "--out", tmp_path / "c.yaml",
        "--target", "recall=0.85", "--write-policy", policy_file, "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    fitted = json.loads(result.stdout)["thresholds"]
    # score mode: a Safe verdict's group is its top category score, so both colours have one
    assert {"O1", "O2"} <= set(fitted["thresholds"])
    rows = {g["group"]: g for g in fitted["groups"]}
    for group in ("O1", "O2"):
        assert rows[group]["fitted_on"] >= 20
        assert rows[group]["fit"]["recall"] >= 0.85
    assert fitted["overall_heldout"]["recall"] >= 0.85
    written = load_policy(str(policy_file))
    (step,) = [s for s in written.postprocess if s.name == "thresholds"]
    assert step.params["p_unsafe"] == fitted["thresholds"]
