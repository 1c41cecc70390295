"""`policy-engine eval`: metrics against an independent computation, known numbers, real runs
with the static backend, the policy exception rate, comparisons, JSON shape and user errors."""

from __future__ import annotations

import base64
import io
import json
import random
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from click.testing import CliRunner, Result
from PIL import Image

from policy_engine import (
    Backend,
    Batch,
    Capabilities,
    Generation,
    PluginHost,
    get_host,
    hookimpl,
    load_policy,
)
from policy_engine.audit.evaluate import (
    EXCEPTION_REASON,
    EvalOptions,
    derive_exception_policy,
    eval_command,
    run_eval,
)
from policy_engine.audit.labels import LabelledSample, Prediction
from policy_engine.audit.metrics import SWEEP_THRESHOLDS, evaluate, roc_auc
from policy_engine.audit.store import ResultRow, ResultStore
from policy_engine.cli import assess
from policy_engine.policy import ExceptionStatus

CATEGORY_IDS = [f"O{i}" for i in range(1, 10)]


# -- helpers --------------------------------------------------------------------------------


def invoke(*args: str) -> Result:
    result = CliRunner().invoke(eval_command, list(args))
    assert "Traceback" not in result.output + result.stderr
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def invoke_json(*args: str) -> dict[str, Any]:
    result = invoke(*args, "--format", "json")
    document: dict[str, Any] = json.loads(result.stdout)
    invalid = document["coverage"]["invalid"]
    # predictions that are errors: the report is printed, and the exit status says so
    assert result.exit_code == (1 if invalid else 0), result.stderr
    return document


def png_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "PNG")
    return buffer.getvalue()


def write_labels(path: Path, rows: Sequence[dict[str, Any] | str]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_results(
    path: Path,
    rows: Sequence[tuple[str, str | None, str | None, float | None]],
    meta: dict[str, str] | None = None,
) -> Path:
    """A results file with rows (id, rating or None for an error, category id, p_unsafe)."""
    with ResultStore(path, create=True) as store:
        if meta:
            store.set_meta(meta)
        store.write(
            ResultRow(
                id=item_id,
                seq=seq,
                source=item_id,
                ok=rating is not None,
                rating=rating,
                category_id=category,
                severity=None,
                p_unsafe=p_unsafe,
                actions=[],
                error_kind=None if rating is not None else "backend",
                error=None if rating is not None else "backend broke",
                decision={},
            )
            for seq, (item_id, rating, category, p_unsafe) in enumerate(rows)
        )
    return path


# -- an independent, deliberately plain computation of every metric -------------------------


def div(a: float, b: float) -> float | None:
    if b == 0:
        return None
    return a / b


def reference_counts(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """(labelled rating, predicted rating) pairs -> counts and ratios, by counting loops."""
    tp = fp = tn = fn = 0
    for label, predicted in pairs:
        if label == "Unsafe" and predicted == "Unsafe":
            tp += 1
        elif label == "Unsafe":
            fn += 1
        elif predicted == "Unsafe":
            fp += 1
        else:
            tn += 1
    recall = div(tp, tp + fn)
    specificity = div(tn, tn + fp)
    precision = div(tp, tp + fp)
    if precision is None or recall is None:
        f1 = None if fp + fn == 0 else 0.0  # tp is 0 here
    elif precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    balanced = None
    if recall is not None and specificity is not None:
        balanced = (recall + specificity) / 2
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "recall": recall,
        "specificity": specificity,
        "precision": precision,
        "f1": f1,
        "balanced_accuracy": balanced,
        "accuracy": div(tp + tn, len(pairs)),
    }


def brute_force_auc(scores: Sequence[float], positives: Sequence[bool]) -> float | None:
    pos = [s for s, p in zip(scores, positives, strict=True) if p]
    neg = [s for s, p in zip(scores, positives, strict=True) if not p]
    if not pos or not neg:
        return None
    wins = 0.0
    for a in pos:
        for b in neg:
            if a > b:
                wins += 1
            elif a == b:
                wins += 0.5
    return wins / (len(pos) * len(neg))


def reference(samples: list[LabelledSample], predictions: dict[str, Prediction]) -> dict[str, Any]:
    valid: list[tuple[LabelledSample, Prediction]] = []
    missing = invalid = 0
    for sample in samples:
        if sample.id not in predictions:
            missing += 1
            continue
        prediction = predictions[sample.id]
        if prediction.error is not None or prediction.rating is None:
            invalid += 1
            continue
        valid.append((sample, prediction))
    result = reference_counts([(s.rating, str(p.rating)) for s, p in valid])
    any_category = False
    for _, p in valid:
        if p.category_id is not None:
            any_category = True
    hits = right = 0
    for s, p in valid:
        if s.rating == "Unsafe" and p.rating == "Unsafe":
            hits += 1
            if p.category_id == s.category:
                right += 1
    result["category_accuracy"] = div(right, hits) if any_category else None
    result["missing"] = missing
    result["invalid"] = invalid
    result["invalid_share"] = div(invalid, len(samples) - missing)

    per_category: dict[str, dict[str, Any]] = {}
    for category in {s.category for s in samples}:
        members = [(s, p) for s, p in valid if s.category == category]
        unsafe = [(s, p) for s, p in members if s.rating == "Unsafe"]
        caught = [(s, p) for s, p in unsafe if p.rating == "Unsafe"]
        per_category[category] = {
            "support": len(members),
            "unsafe": len(unsafe),
            "recall": div(len(caught), len(unsafe)),
            "category_accuracy": div(
                len([1 for _, p in caught if p.category_id == category]), len(caught)
            )
            if any_category
            else None,
            "accuracy": div(len([1 for s, p in members if s.rating == p.rating]), len(members)),
        }
    result["per_category"] = per_category
    rating_cells: Counter[tuple[str, str]] = Counter()
    category_cells: Counter[tuple[str, str]] = Counter()
    for s, p in valid:
        rating_cells[s.rating, str(p.rating)] += 1
        category_cells[s.category, p.category_id or "-"] += 1
    result["rating_cells"] = rating_cells
    result["category_cells"] = category_cells

    scored = [(s.rating == "Unsafe", p.p_unsafe) for s, p in valid if p.p_unsafe is not None]
    if scored:
        positives = [positive for positive, _ in scored]
        values = [float(v) for _, v in scored if v is not None]
        result["auc"] = brute_force_auc(values, positives)
        sweep = []
        for k in range(1, 20):
            threshold = k * 5 / 100
            pairs = [
                ("Unsafe" if positive else "Safe", "Unsafe" if value >= threshold else "Safe")
                for positive, value in zip(positives, values, strict=True)
            ]
            sweep.append(reference_counts(pairs))
        result["sweep"] = sweep
    else:
        result["auc"] = result["sweep"] = None
    return result


def random_case(
    seed: int,
    n: int,
    unsafe_share: float,
    invalid_share: float,
    missing_share: float,
    scores: str,
) -> tuple[list[LabelledSample], dict[str, Prediction]]:
    rng = random.Random(seed)
    samples: list[LabelledSample] = []
    predictions: dict[str, Prediction] = {}
    for i in range(n):
        if rng.random() < unsafe_share:
            label = LabelledSample(
                id=f"s{i}",
                image=f"{i}.png",
                rating="Unsafe",
                category=rng.choice(["O1", "O2", "O3"]),
            )
        else:
            label = LabelledSample(
                id=f"s{i}", image=f"{i}.png", rating="Safe", category=rng.choice(["NA", "NA", "O4"])
            )
        samples.append(label)
        if rng.random() < missing_share:
            continue
        if rng.random() < invalid_share:
            predictions[label.id] = Prediction(rating=None, error="model said nonsense")
            continue
        if scores == "ties":
            p_unsafe: float | None = rng.choice([0.0, 0.25, 0.5, 0.5, 0.75, 1.0])
        elif scores == "continuous":
            p_unsafe = rng.random()
        elif scores == "mixed":
            p_unsafe = rng.choice([None, 0.3, rng.random()])
        else:
            p_unsafe = None
        predicted = rng.choice(["Safe", "Unsafe"])
        category = rng.choice(["O1", "O2", "O3", "O4", "NA", None])
        predictions[label.id] = Prediction(
            rating=predicted, category_id=category, p_unsafe=p_unsafe
        )
    predictions["unlabelled"] = Prediction(rating="Unsafe", category_id="O1", p_unsafe=0.9)
    return samples, predictions


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) < 1e-12


RATIO_KEYS = ("recall", "specificity", "precision", "f1", "balanced_accuracy", "accuracy")


@pytest.mark.parametrize(
    ("seed", "n", "unsafe_share", "invalid_share", "missing_share", "scores"),
    [
        (1, 80, 0.5, 0.1, 0.1, "ties"),
        (2, 40, 0.3, 0.0, 0.0, "continuous"),
        (3, 30, 1.0, 0.1, 0.0, "ties"),  # one class: specificity undefined
        (4, 30, 0.0, 0.1, 0.1, "continuous"),  # one class: recall, AUC undefined
        (5, 12, 0.5, 1.0, 0.0, "ties"),  # every prediction invalid
        (6, 50, 0.5, 0.2, 0.2, "none"),  # no scores
        (7, 60, 0.6, 0.05, 0.05, "mixed"),  # some predictions without p_unsafe
        (8, 1, 0.5, 0.0, 0.0, "ties"),
    ],
)
def test_metrics_match_an_independent_computation(
    seed: int, n: int, unsafe_share: float, invalid_share: float, missing_share: float, scores: str
) -> None:
    samples, predictions = random_case(seed, n, unsafe_share, invalid_share, missing_share, scores)
    expected = reference(samples, predictions)
    got = evaluate(samples, predictions, ["O1", "O2", "O3", "O4", "NA"])

    metrics = got.metrics
    assert (metrics.tp, metrics.fp, metrics.tn, metrics.fn) == (
        expected["tp"],
        expected["fp"],
        expected["tn"],
        expected["fn"],
    )
    for key in (*RATIO_KEYS, "category_accuracy"):
        assert close(getattr(metrics, key), expected[key]), key
    assert got.coverage.missing == expected["missing"]
    assert got.coverage.invalid == expected["invalid"]
    assert close(got.coverage.invalid_share, expected["invalid_share"])
    assert got.coverage.valid + got.coverage.invalid + got.coverage.missing == n

    rows = {row.category: row for row in got.per_category}
    assert set(rows) == set(expected["per_category"])
    for category, want in expected["per_category"].items():
        row = rows[category]
        assert (row.support, row.unsafe) == (want["support"], want["unsafe"])
        for key in ("recall", "category_accuracy", "accuracy"):
            assert close(getattr(row, key), want[key]), (category, key)

    rating_cells = {
        (a, b): count
        for a, row in got.confusion.rating.items()
        for b, count in row.items()
        if count
    }
    assert rating_cells == dict(expected["rating_cells"])
    category_cells = {
        (a, b): count
        for a, row in got.confusion.category.items()
        for b, count in row.items()
        if count
    }
    assert category_cells == dict(expected["category_cells"])

    if expected["sweep"] is None:
        assert got.scores is None
    else:
        assert got.scores is not None
        assert close(got.scores.roc_auc, expected["auc"])
        assert [p.threshold for p in got.scores.sweep] == pytest.approx(
            [k / 20 for k in range(1, 20)]
        )
        for point, want in zip(got.scores.sweep, expected["sweep"], strict=True):
            assert (point.tp, point.fp, point.tn, point.fn) == (
                want["tp"],
                want["fp"],
                want["tn"],
                want["fn"],
            )
            for key in RATIO_KEYS:
                assert close(getattr(point, key), want[key]), (point.threshold, key)


def test_rank_auc_equals_pairwise_auc_with_many_ties() -> None:
    rng = random.Random(11)
    for _ in range(200):
        size = rng.randint(1, 25)
        levels = rng.randint(1, 6)  # few distinct values: lots of ties
        scores = [rng.randint(0, levels) / levels for _ in range(size)]
        positives = [rng.random() < 0.5 for _ in range(size)]
        assert close(roc_auc(scores, positives), brute_force_auc(scores, positives))


def test_sweep_has_exactly_one_half() -> None:
    assert len(SWEEP_THRESHOLDS) == 19
    assert 0.5 in SWEEP_THRESHOLDS
    assert SWEEP_THRESHOLDS[0] == pytest.approx(0.05)
    assert SWEEP_THRESHOLDS[-1] == pytest.approx(0.95)


# -- known numbers on a constructed results file --------------------------------------------


@pytest.fixture
def constructed(tmp_path: Path) -> tuple[Path, Path]:
    """8 TP (6 with the right category), 2 FN, 5 TN, 5 FP, 2 invalid, 1 label without a
    prediction, 1 prediction without a label."""
    labels: list[dict[str, Any]] = []
    results: list[tuple[str, str | None, str | None, float | None]] = []
    for i in range(8):
        labels.append({"id": f"tp{i}", "image": f"tp{i}.png", "rating": "Unsafe", "category": "O2"})
        results.append((f"tp{i}", "Unsafe", "O2" if i < 6 else "O3", 0.9))
    for i in range(2):
        labels.append({"id": f"fn{i}", "image": f"fn{i}.png", "rating": "Unsafe", "category": "O2"})
        results.append((f"fn{i}", "Safe", "NA", 0.2))
    for i in range(5):
        labels.append({"id": f"tn{i}", "image": f"tn{i}.png", "rating": "Safe"})
        results.append((f"tn{i}", "Safe", "NA", 0.1))
    for i in range(5):
        labels.append({"id": f"fp{i}", "image": f"fp{i}.png", "rating": "Safe", "category": "NA"})
        results.append((f"fp{i}", "Unsafe", "O2", 0.6))
    for i in range(2):
        labels.append(
            {"id": f"bad{i}", "image": f"bad{i}.png", "rating": "Unsafe", "category": "O2"}
        )
        results.append((f"bad{i}", None, None, None))
    labels.append({"id": "lost", "image": "lost.png", "rating": "Safe"})
    results.append(("stranger", "Unsafe", "O1", 0.99))
    meta = {"policy_id": "llavaguard", "backend": "static", "mode": "full"}
    return (
        write_labels(tmp_path / "labels.jsonl", labels),
        write_results(tmp_path / "results.db", results, meta),
    )


def test_known_metrics_on_a_constructed_results_file(constructed: tuple[Path, Path]) -> None:
    labels, results = constructed
    report = invoke_json(str(labels), "--predictions", str(results))
    m = report["metrics"]
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (8, 2, 5, 5)
    assert m["recall"] == pytest.approx(0.8)
    assert m["specificity"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(8 / 13)
    assert m["f1"] == pytest.approx(2 * (8 / 13) * 0.8 / (8 / 13 + 0.8))
    assert m["balanced_accuracy"] == pytest.approx(0.65)
    assert m["accuracy"] == pytest.approx(13 / 20)
    assert m["category_accuracy"] == pytest.approx(6 / 8)
    assert m["samples"] == 20
    coverage = report["coverage"]
    assert (coverage["labelled"], coverage["predicted"], coverage["missing"]) == (23, 22, 1)
    assert coverage["missing_ids"] == ["lost"]
    assert (coverage["invalid"], coverage["invalid_ids"]) == (2, ["bad0", "bad1"])
    assert coverage["invalid_share"] == pytest.approx(2 / 22)
    assert report["confusion"]["rating"] == {
        "Safe": {"Safe": 5, "Unsafe": 5},
        "Unsafe": {"Safe": 2, "Unsafe": 8},
    }
    assert report["confusion"]["category"] == {
        "O2": {"O2": 6, "O3": 2, "NA": 2},
        "NA": {"O2": 5, "O3": 0, "NA": 5},
    }
    rows = {row["category"]: row for row in report["per_category"]}
    assert rows["O2"] == {
        "category": "O2",
        "support": 10,
        "unsafe": 10,
        "recall": pytest.approx(0.8),
        "category_accuracy": pytest.approx(0.75),
        "accuracy": pytest.approx(0.8),
    }
    assert rows["NA"]["recall"] is None and rows["NA"]["accuracy"] == pytest.approx(0.5)
    # Positives score 0.9 (8) and 0.2 (2); negatives 0.1 (5) and 0.6 (5): 90 of 100 pairs.
    scores = report["scores"]
    assert (scores["scored"], scores["positives"], scores["negatives"]) == (20, 10, 10)
    assert scores["roc_auc"] == pytest.approx(0.9)
    by_threshold = {round(p["threshold"], 2): p for p in scores["sweep"]}
    assert by_threshold[0.5]["recall"] == pytest.approx(0.8)  # the ratings themselves
    assert by_threshold[0.5]["specificity"] == pytest.approx(0.5)
    assert by_threshold[0.15]["recall"] == 1.0 and by_threshold[0.15]["specificity"] == 0.5
    assert by_threshold[0.95]["precision"] is None  # nothing predicted Unsafe: 0/0
    assert by_threshold[0.95]["recall"] == 0.0 and by_threshold[0.95]["f1"] == 0.0
    assert "exception_rate" not in report and "compare" not in report


def test_text_report_is_readable(constructed: tuple[Path, Path]) -> None:
    labels, results = constructed
    result = invoke(str(labels), "--predictions", str(results))
    assert result.exit_code == 1, result.stderr  # two predictions are errors
    assert "error: 2 of 22 predictions are errors" in result.stderr
    text = result.stdout
    assert re.search(r"recall \(TPR\) +0\.800\n", text)
    assert re.search(r"specificity \(TNR\) +0\.500\n", text)
    assert re.search(r"category accuracy +0\.750\n", text)
    assert "labelled-Unsafe samples predicted Unsafe, the share with the labelled category" in text
    assert "1 missing, 2 invalid (9.1%)" in text
    assert "missing (excluded): lost" in text
    assert re.search(r"ROC-AUC +0\.900", text)
    assert re.search(r"0\.95 +0\.000 +1\.000 +n/a", text)  # the sweep's undefined precision


# -- real runs with the static backend -------------------------------------------------------


@pytest.fixture
def labelled_images(tmp_path: Path) -> Path:
    """6 Unsafe (4 O2, 2 O3), 3 Safe (one a data: URL), 1 Safe whose image is missing."""
    images = tmp_path / "images"
    images.mkdir()
    rows: list[dict[str, Any]] = []
    for i in range(6):
        (images / f"u{i}.png").write_bytes(png_bytes((200, i * 30, 0)))
        category = "O2" if i < 4 else "O3: Sexual Content"
        rows.append({"image": f"images/u{i}.png", "rating": "Unsafe", "category": category})
    for i in range(2):
        (images / f"s{i}.png").write_bytes(png_bytes((0, 200, i * 30)))
        rows.append(
            {"image": f"images/s{i}.png", "rating": "Safe", "metadata": {"audience": "minors"}}
        )
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes((1, 2, 3))).decode()
    rows.append({"id": "inline", "image": data_url, "rating": "Safe", "category": "NA"})
    rows.append({"id": "gone", "image": "images/gone.png", "rating": "Safe"})
    return write_labels(tmp_path / "labels.jsonl", rows)


STATIC_UNSAFE = ("--backend", "static", "-o", "rating=Unsafe", "-o", "category=O2")


def test_static_backend_run_and_saved_results_agree(labelled_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.db"
    ran = invoke_json(str(labelled_images), *STATIC_UNSAFE, "-o", "p_unsafe=0.7", "--out", str(out))
    m = ran["metrics"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (6, 3, 0, 0)
    assert m["recall"] == 1.0 and m["specificity"] == 0.0
    assert m["precision"] == pytest.approx(6 / 9)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["category_accuracy"] == pytest.approx(4 / 6)
    assert ran["coverage"]["invalid_ids"] == ["gone"]  # its image is missing
    assert ran["scores"]["roc_auc"] == pytest.approx(0.5)  # one score for all: all ties
    sweep = {round(p["threshold"], 2): p for p in ran["scores"]["sweep"]}
    assert sweep[0.7]["recall"] == 1.0 and sweep[0.75]["recall"] == 0.0
    assert ran["predictions"] == {
        "kind": "backend",
        "path": str(out),
        "format": None,
        "backend": "static",
        "mode": "full",
        "model": "static",
        "models": ["static"],
        "decoding": None,  # the static backend decodes nothing
        "decodings": [],
        "policy_id": "llavaguard",
        "policy_version": ran["policy"]["version"],
        "policy_hash": ran["policy"]["hash"],
        "policy_hashes": [ran["policy"]["hash"]],
        "random_weights": False,
        "matching": None,
    }
    assert ran["warnings"] == []

    with ResultStore(out) as store:
        meta = store.meta
        rows = list(store.rows())
    assert meta["policy_id"] == "llavaguard"
    assert meta["policy_hash"] == ran["policy"]["hash"]
    assert (meta["backend"], meta["mode"], meta["source"]) == (
        "static",
        "full",
        str(labelled_images),
    )
    assert [r.id for r in rows][:2] == ["images/u0.png", "images/u1.png"]
    assert "inline" in {r.id for r in rows} and len(rows) == 10
    assert [r.seq for r in rows] == list(range(10))

    saved = invoke_json(str(labelled_images), "--predictions", str(out))
    for key in ("coverage", "metrics", "confusion", "per_category", "scores", "policy"):
        assert saved[key] == ran[key], key


def test_label_metadata_reaches_post_processors(labelled_images: Path, tmp_path: Path) -> None:
    policy = tmp_path / "minors.yaml"
    policy.write_text(
        "extends: llavaguard\nid: minors\npostprocess:\n  - name: rules\n    params:\n"
        "      rules:\n        - {when: {metadata: {audience: minors}}, then: block}\n",
        encoding="utf-8",
    )
    out = tmp_path / "run.db"
    result = invoke(str(labelled_images), "-p", str(policy), *STATIC_UNSAFE, "--out", str(out))
    assert result.exit_code == 1, result.stderr  # one labelled image is not an image
    with ResultStore(out) as store:
        blocked = sorted(r.id for r in store.rows() if "block" in r.actions)
    assert blocked == ["images/s0.png", "images/s1.png"]


def test_meta_is_request_metadata_under_the_labels_own(
    labelled_images: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "minors.yaml"
    policy.write_text(
        "extends: llavaguard\nid: minors\npostprocess:\n  - name: rules\n    params:\n"
        "      rules:\n        - {when: {metadata: {audience: minors}}, then: block}\n",
        encoding="utf-8",
    )

    def blocked(*meta: str) -> set[str]:
        out = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}.db"
        args = [str(labelled_images), "-p", str(policy), *STATIC_UNSAFE, "--out", str(out)]
        result = invoke(*args, *meta)
        assert result.exit_code == 1, result.stderr  # one labelled image is not an image
        with ResultStore(out) as store:
            return {r.id for r in store.rows() if "block" in r.actions and r.ok}

    labelled_minors = {"images/s0.png", "images/s1.png"}
    assert blocked() == labelled_minors
    assert blocked("--meta", "audience=adults") == labelled_minors  # the labels win
    everyone = blocked("--meta", "audience=minors")
    assert everyone > labelled_minors and {"images/u0.png", "inline"} <= everyone


def test_eval_takes_the_engine_options_of_assess() -> None:
    own = {"images", "fmt", "progress"}
    shared = [(p.name, p.opts, p.default) for p in assess.params if p.name not in own]
    options = [(p.name, p.opts, p.default) for p in eval_command.params]
    assert options[0][0] == "labels"
    assert options[1 : 1 + len(shared)] == shared


def test_score_mode_without_categories(labelled_images: Path) -> None:
    report = invoke_json(
        str(labelled_images), "--backend", "static", "-o", "p_unsafe=0.7", "--mode", "score"
    )
    m = report["metrics"]
    assert (m["tp"], m["fp"]) == (6, 3)  # 0.7 >= the engine's 0.5 cut
    assert m["category_accuracy"] is None  # the predictions name no category
    assert report["confusion"]["category"]["O2"] == {"-": 4}
    text = invoke(
        str(labelled_images), "--backend", "static", "-o", "p_unsafe=0.7", "--mode", "score"
    )
    assert re.search(r"category accuracy +n/a", text.stdout)


def test_progress_line_only_when_asked_or_on_a_terminal(labelled_images: Path) -> None:
    quiet = invoke(str(labelled_images), *STATIC_UNSAFE)
    # CliRunner's stderr is not a terminal: only the closing line about the broken image
    assert quiet.exit_code == 1 and quiet.stderr.startswith("error: 1 of 10 predictions")
    loud = invoke(str(labelled_images), *STATIC_UNSAFE, "--progress")
    assert loud.exit_code == 1
    assert "10/10" in loud.stderr and "errors 1" in loud.stderr


# -- the policy exception rate ---------------------------------------------------------------


def reference_sections(golden: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """(category id, DEFAULT | NON-VIOLATING | SENSITIVE) -> (key, text): a section's text is
    its lines (up to the next header) joined with newlines, as the file's header explains."""
    header = re.compile(r"===== (.+) :: (DEFAULT|NON-VIOLATING|SENSITIVE) =====")
    sections: dict[tuple[str, str], tuple[str, str]] = {}
    current: tuple[str, str] | None = None
    lines: list[str] = []
    text = (golden / "policy_exception_texts_v2.txt").read_text(encoding="utf-8")
    for line in [*text.splitlines(), "===== END :: DEFAULT ====="]:
        match = header.fullmatch(line)
        if match is None:
            lines.append(line)
            continue
        if current is not None:
            key, kind = current
            sections[(key.split(":")[0], kind)] = (key, "\n".join(lines))
        current, lines = (match.group(1), match.group(2)), []
    return sections


@pytest.mark.parametrize("category", CATEGORY_IDS)
def test_derived_policy_renders_the_reference_non_violating_block(
    category: str, golden: Path
) -> None:
    sections = reference_sections(golden)
    key, default_text = sections[(category, "DEFAULT")]
    _, exception_text = sections[(category, "NON-VIOLATING")]
    default_block = f"{key}: \n{default_text}\n"
    exception_block = f"{key}: \n{exception_text}\n"

    base = load_policy("llavaguard")
    base_prompt = get_host().compile(base).prompt
    assert base_prompt.count(default_block) == 1  # the parsing above is right

    derived = derive_exception_policy(base, category)
    prompt = get_host().compile(derived).prompt
    assert prompt.count(exception_block) == 1
    assert prompt == base_prompt.replace(default_block, exception_block)
    assert derived.exceptions[category].status == ExceptionStatus.NON_VIOLATING
    assert derived.exceptions[category].reason == EXCEPTION_REASON
    assert base.exceptions == {}  # the original is untouched


def test_derivation_keeps_the_policys_own_exceptions() -> None:
    base = load_policy("children-platform")
    derived = derive_exception_policy(base, "O3")  # sensitive there, non-violating now
    assert derived.exceptions["O3"].status == ExceptionStatus.NON_VIOLATING
    assert {k: v.status for k, v in derived.exceptions.items() if k != "O3"} == {
        k: v.status for k, v in base.exceptions.items() if k != "O3"
    }
    assert derived.postprocess == base.postprocess


def test_exception_rate_with_the_static_backend(labelled_images: Path) -> None:
    unsafe = invoke_json(str(labelled_images), *STATIC_UNSAFE, "--exceptions")
    rate = unsafe["exception_rate"]
    assert (rate["samples"], rate["valid"], rate["safe"], rate["rate"]) == (6, 6, 0, 0.0)
    assert [(r["category"], r["samples"], r["rate"]) for r in rate["per_category"]] == [
        ("O2", 4, 0.0),
        ("O3", 2, 0.0),
    ]
    safe = invoke_json(str(labelled_images), "--backend", "static", "--exceptions")
    assert safe["exception_rate"]["rate"] == 1.0
    assert safe["metrics"]["recall"] == 0.0  # the ordinary run is unchanged by --exceptions


class ExceptionAware(Backend):
    """Rates Unsafe O2, unless the request's policy declares some category non-violating."""

    name = "exception-aware"
    capabilities = Capabilities(images=True, batching=True, max_batch_size=4)
    made: ClassVar[list[ExceptionAware]] = []

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.loads = self.closes = 0
        self.policies: list[tuple[str, ...]] = []
        ExceptionAware.made.append(self)

    def load(self) -> None:
        self.loads += 1

    def close(self) -> None:
        self.closes += 1

    def generate(self, batch: Batch) -> list[Generation]:
        answers = []
        for _ in batch:
            policy = batch.compiled.policy
            allowed = tuple(
                k for k, v in policy.exceptions.items() if v.status == ExceptionStatus.NON_VIOLATING
            )
            self.policies.append(allowed)
            rating, label = ("Safe", "NA: None applying") if allowed else ("Unsafe", "O2")
            if label == "O2":
                label = policy.category("O2").label
            text = json.dumps({"rating": rating, "category": label, "rationale": "r"}, indent=4)
            answers.append(Generation(text=text))
        return answers


def test_exception_engines_share_one_backend_and_see_the_derived_policies(
    labelled_images: Path,
) -> None:
    class Plugin:
        @hookimpl
        def register_backends(self, register):  # type: ignore[no-untyped-def]
            register(ExceptionAware)

    host = PluginHost()
    host.register(Plugin(), name="exception-aware-plugin")
    ExceptionAware.made.clear()
    args = [str(labelled_images), "--backend", "exception-aware", "--exceptions"]
    report = run_eval(EvalOptions.from_args(args), host=host)
    assert report.evaluation.metrics.recall == 1.0  # the base policy: everything Unsafe
    assert report.exception_rate is not None and report.exception_rate.rate == 1.0
    assert [(r.category, r.safe) for r in report.exception_rate.per_category] == [
        ("O2", 4),
        ("O3", 2),
    ]
    [backend] = ExceptionAware.made
    assert (backend.loads, backend.closes) == (1, 1)
    assert Counter(backend.policies) == {(): 9, ("O2",): 4, ("O3",): 2}


def test_labelled_exception_samples(tmp_path: Path) -> None:
    image = tmp_path / "art.png"
    image.write_bytes(png_bytes((9, 9, 9)))
    rows: list[dict[str, Any]] = [
        {"image": "art.png", "id": "a", "rating": "Safe", "category": "O4", "exception": True},
        {"image": "art.png", "id": "b", "rating": "Unsafe", "category": "O4"},
    ]
    labels = write_labels(tmp_path / "labels.jsonl", rows)
    blocked = invoke_json(
        str(labels),
        "-p",
        "health-platform",
        *STATIC_UNSAFE[:2],
        "-o",
        "rating=Unsafe",
        "-o",
        "category=O4",
    )
    assert blocked["labels"]["exception_samples"] == 1
    assert blocked["labelled_exceptions"]["rate"] == 0.0
    allowed = invoke_json(str(labels), "-p", "health-platform", "--backend", "static")
    assert allowed["labelled_exceptions"]["rate"] == 1.0
    assert allowed["labelled_exceptions"]["per_category"][0]["category"] == "O4"
    # llavaguard does not declare O4 non-violating: such labels do not belong to it.
    wrong = invoke(str(labels), "--backend", "static")
    assert wrong.exit_code == 2
    assert f"{labels}:1: exception: policy 'llavaguard' does not declare O4" in wrong.stderr


# -- compare ---------------------------------------------------------------------------------


def test_compare_two_results_files(tmp_path: Path) -> None:
    labels = write_labels(
        tmp_path / "labels.jsonl",
        [
            {"id": f"x{i:02}", "image": f"x{i}.png", "rating": "Unsafe", "category": "O1"}
            for i in range(30)
        ],
    )
    # A: x00-x24 wrong, x25-x29 right. B: x00-x24 right, x25 invalid, x26 wrong, rest right.
    first = [(f"x{i:02}", "Safe" if i < 25 else "Unsafe", "O1", None) for i in range(30)]
    second: list[tuple[str, str | None, str | None, float | None]] = [
        (f"x{i:02}", "Unsafe", "O1", None) for i in range(30)
    ]
    second[25] = ("x25", None, None, None)
    second[26] = ("x26", "Safe", "NA", None)
    a = write_results(tmp_path / "a.db", first)
    b = write_results(tmp_path / "b.db", second[:29])  # x29 missing in B
    report = invoke_json(str(labels), "--predictions", str(a), "--compare", str(b))
    comparison = report["compare"]
    assert comparison["compared"] == 29
    assert comparison["fixed"] == {"count": 25, "ids": [f"x{i:02}" for i in range(20)]}
    assert comparison["broken"] == {"count": 2, "ids": ["x25", "x26"]}
    assert report["metrics"]["recall"] == pytest.approx(5 / 30)
    assert comparison["metrics"]["recall"] == pytest.approx(27 / 28)
    assert comparison["difference"]["recall"] == pytest.approx(27 / 28 - 5 / 30)
    assert comparison["difference"]["specificity"] is None  # no Safe labels: 0/0 in both
    assert comparison["difference"]["invalid_share"] == pytest.approx(1 / 29)
    assert comparison["coverage"]["missing_ids"] == ["x29"]
    assert comparison["predictions"]["path"] == str(b)

    text = invoke(str(labels), "--predictions", str(a), "--compare", str(b)).stdout
    assert re.search(r"recall +0\.167 +0\.964 +\+0\.798", text)
    assert re.search(r"specificity +n/a +n/a +n/a", text)
    assert "25 fixed (wrong in A, right in B), 2 broken (right in A, wrong in B)" in text
    assert "fixed:  x00, x01," in text and "(5 more)" in text
    assert "broken: x25, x26\n" in text


# -- JSON shape ------------------------------------------------------------------------------


def test_json_shape(labelled_images: Path) -> None:
    report = invoke_json(str(labelled_images), *STATIC_UNSAFE, "--exceptions")
    assert list(report) == [
        "warnings",
        "labels",
        "policy",
        "predictions",
        "coverage",
        "metrics",
        "confusion",
        "per_category",
        "scores",
        "labelled_exceptions",
        "exception_rate",
    ]
    assert report["labels"] == {
        "path": str(labelled_images),
        "samples": 10,
        "unsafe": 6,
        "safe": 4,
        "exception_samples": 0,
    }
    assert report["labelled_exceptions"] is None
    assert set(report["metrics"]) == {
        "samples",
        "tp",
        "fp",
        "tn",
        "fn",
        "recall",
        "specificity",
        "precision",
        "f1",
        "balanced_accuracy",
        "accuracy",
        "category_accuracy",
        "category_samples",
    }
    assert report["metrics"]["specificity"] == 0.0  # defined: 3 Safe samples, all missed
    assert set(report["confusion"]) == {"rating", "category"}
    assert [row["category"] for row in report["per_category"]] == ["O2", "O3", "NA"]
    assert len(report["scores"]["sweep"]) == 19


def test_undefined_ratios_are_null_and_na(tmp_path: Path) -> None:
    labels = write_labels(tmp_path / "l.jsonl", [{"image": "a.png", "rating": "Safe"}])
    results = write_results(tmp_path / "r.db", [("a.png", "Safe", "NA", 0.1)])
    report = invoke_json(str(labels), "--predictions", str(results))
    m = report["metrics"]
    assert (m["recall"], m["precision"], m["f1"], m["balanced_accuracy"]) == (
        None,
        None,
        None,
        None,
    )
    assert m["specificity"] == 1.0
    assert report["scores"]["roc_auc"] is None
    text = invoke(str(labels), "--predictions", str(results)).stdout
    assert re.search(r"recall \(TPR\) +n/a\n", text) and re.search(r"ROC-AUC +n/a", text)


# -- errors ----------------------------------------------------------------------------------


def one_error_line(result: Result, code: int) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_missing_labels_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    line = one_error_line(invoke(str(missing), "--backend", "static"), 2)
    assert line == f"error: {missing}: no such labels file"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"image": "a.png", "rating": "Unsafe", "category": "O2"', "invalid JSON"),
        ('["a.png", "Safe"]', "expected a JSON object, got list"),
        ('{"image": "a.png", "rating": "unsafe"}', "rating: Input should be 'Safe' or 'Unsafe'"),
        ('{"rating": "Safe"}', "image: required"),
        ('{"image": "a.png", "rating": "Safe", "ratin": 1}', "unknown key 'ratin'"),
        ('{"image": "a.png", "rating": "Unsafe"}', "an Unsafe sample needs a category"),
        ('{"image": "a.png", "rating": "Unsafe", "category": "O42"}', "unknown category 'O42'"),
        (
            '{"image": "a.png", "rating": "Unsafe", "category": "O2: Violence"}',
            "unknown category 'O2: Violence'",
        ),
        ('{"image": "a.png", "rating": "Safe", "exception": "yes"}', "exception: Input should be"),
        ('{"image": "x.png", "rating": "Safe"}', "duplicate id 'x.png' (first on line 1)"),
    ],
)
def test_bad_label_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    labels = write_labels(
        tmp_path / "labels.jsonl", ['{"image": "x.png", "rating": "Safe"}', "", line]
    )
    results = write_results(tmp_path / "r.db", [])
    for args in (("--backend", "static"), ("--predictions", str(results))):
        error = one_error_line(invoke(str(labels), *args), 2)
        assert error.startswith(f"error: {labels}:3: "), error
        assert message in error


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--predictions", "P", "--backend", "static"),
            "--backend cannot be used with --predictions",
        ),
        (("--predictions", "P", "--exceptions", "--out", "o.db"), "--out, --exceptions cannot"),
        (("--predictions", "P", "--meta", "a=b"), "--meta cannot be used with --predictions"),
        (("--predictions", "P", "--launch", "-m", "x"), "--launch, --model cannot be used"),
        (("--predictions", "P", "-p", "llavaguard", "--mode", "full"), "--mode cannot be used"),
        (("--compare", "P", "--backend", "static"), "--compare needs --predictions"),
        (("--predictions", "missing.db"), "missing.db: no such predictions file"),
        (("--backend", "nonesuch"), "unknown backend 'nonesuch'"),
        (("--backend", "static", "-o", "novalue"), "--option 'novalue': expected KEY=VALUE"),
        (("--backend", "static", "--meta", "=x"), "--meta '=x': expected KEY=VALUE"),
        (("--backend", "static", "-o", "colour=red"), "backend 'static'"),
        (("--backend", "static", "--out", "P"), "already exists"),
    ],
)
def test_usage_errors(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    labels = write_labels(tmp_path / "labels.jsonl", [{"image": "x.png", "rating": "Safe"}])
    results = str(write_results(tmp_path / "r.db", [("x.png", "Safe", "NA", None)]))
    argv = [str(labels), *(results if a == "P" else a for a in args)]
    line = one_error_line(invoke(*argv), 2)
    assert message in line


def test_nothing_valid_is_a_failure_with_a_report(tmp_path: Path) -> None:
    labels = write_labels(tmp_path / "labels.jsonl", [{"image": "gone.png", "rating": "Safe"}])
    result = invoke(str(labels), "--backend", "static", "--format", "json")
    assert one_error_line(result, 1) == "error: no labelled sample has a valid prediction"
    assert json.loads(result.stdout)["coverage"]["invalid"] == 1


def test_bad_policy_is_reported_without_traceback(tmp_path: Path) -> None:
    labels = write_labels(tmp_path / "labels.jsonl", [{"image": "x.png", "rating": "Safe"}])
    policy = tmp_path / "p.yaml"
    policy.write_text("extends: llavaguard\nid: p\nexceptions:\n  O99: {status: sensitive}\n")
    result = invoke(str(labels), "-p", str(policy), "--backend", "static")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {policy}:4:") and "O99" in result.stderr


def test_module_imports_no_engine_or_pillow() -> None:
    code = (
        "import sys, policy_engine.audit.evaluate\n"
        "print(sorted(m for m in ('PIL', 'policy_engine.engine') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
