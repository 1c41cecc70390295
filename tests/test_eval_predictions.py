"""`policy-engine eval --predictions` on every kind of file: results databases, the JSONL rows
`export` writes, the Decision lines `assess` prints (matched by image path) and minimal JSONL
from other tools; broken and mixed files; provenance and the random-weights warning; and
`--compare` across kinds. The files come from the real commands wherever one writes them."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from PIL import Image
from support import run_cli

from policy_engine.audit.predictions import describe_decoding
from policy_engine.cli import cli

STATIC_UNSAFE = ("-b", "static", "-o", "rating=Unsafe", "-o", "category=O2", "-o", "p_unsafe=0.8")
STATIC_SAFE = ("-b", "static", "-o", "p_unsafe=0.3")


def run(*args: str) -> Result:
    """A real command of the CLI, in this process; never a traceback."""
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.output + result.stderr
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def assess_to(target: Path, *args: str) -> Path:
    """`policy-engine assess ARGS > target`; the exit status is 1 when an image failed."""
    result = run("assess", *args)
    assert result.exit_code in (0, 1), result.stderr
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(result.stdout, encoding="utf-8")
    return target


def export_to(results: Path, target: Path) -> Path:
    result = run("export", str(results), str(target))
    assert result.exit_code == 0, result.stderr
    return target


def evaluate(*args: str, code: int | None = None) -> dict[str, Any]:
    """`policy-engine eval ARGS --format json`, its document."""
    result = run("eval", *args, "--format", "json")
    document: dict[str, Any] = json.loads(result.stdout)
    expected = (1 if document["coverage"]["invalid"] else 0) if code is None else code
    assert result.exit_code == expected, result.stderr
    return document


def error_line(result: Result, code: int = 2) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def png(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def write_lines(path: Path, rows: Sequence[dict[str, Any] | str]) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """data/labels.jsonl: u0, u1 Unsafe (O2), s0, s1 Safe, images under data/images; the
    current folder is tmp_path (not data/)."""
    folder = tmp_path / "data"
    for name, color in (("u0", (200, 0, 0)), ("u1", (210, 0, 0)), ("s0", (0, 200, 0))):
        png(folder / "images" / f"{name}.png", color)
    png(folder / "images" / "s1.png", (0, 210, 0))
    write_lines(
        folder / "labels.jsonl",
        [
            {"image": "images/u0.png", "rating": "Unsafe", "category": "O2"},
            {"image": "images/u1.png", "rating": "Unsafe", "category": "O2"},
            {"image": "images/s0.png", "rating": "Safe"},
            {"image": "images/s1.png", "rating": "Safe"},
        ],
    )
    monkeypatch.chdir(tmp_path)
    yield folder


LABELS = "data/labels.jsonl"


# -- assess: Decision lines matched by image path --------------------------------------------


def test_assess_lines_match_by_path_relative_to_the_predictions_file(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # assess runs where the predictions are written, as in `cd data && assess ... > preds`
    monkeypatch.chdir(data)
    images = ("images/u0.png", "./images/u1.png", "images/s0.png", "images/other.png")
    assess_to(data / "preds.jsonl", *images, *STATIC_UNSAFE)
    elsewhere = data.parent / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # eval runs from another folder: the file's folder decides

    report = evaluate("../data/labels.jsonl", "--predictions", "../data/preds.jsonl")
    predictions = report["predictions"]
    assert (predictions["kind"], predictions["format"]) == ("file", "assess")
    assert predictions["matching"] == {
        "by": "source",
        "records": 4,
        "matched": 3,
        "unmatched": 1,
        "unmatched_examples": ["images/other.png"],  # not a labelled image (and missing)
        "relative_to": [str(data.resolve()), str(elsewhere.resolve())],
    }
    coverage = report["coverage"]
    assert (coverage["predicted"], coverage["missing_ids"]) == (3, ["images/s1.png"])
    assert coverage["invalid"] == 0  # the failed other.png is not a labelled sample
    m = report["metrics"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 0, 0)
    assert report["scores"]["scored"] == 3


def test_assess_lines_match_relative_to_the_current_folder_and_absolute(data: Path) -> None:
    # run from data's parent, predictions written into another folder: only the current
    # folder makes these relative paths meaningful
    assess_to(Path("out/preds.jsonl"), "data/images/u0.png", "data/images/s0.png", *STATIC_SAFE)
    absolute = [str((data / "images" / n).resolve()) for n in ("u1.png", "s1.png")]
    assess_to(Path("out/absolute.jsonl"), *absolute, *STATIC_UNSAFE)

    relative = evaluate(LABELS, "--predictions", "out/preds.jsonl")
    assert relative["predictions"]["matching"]["matched"] == 2
    assert relative["coverage"]["missing_ids"] == ["images/u1.png", "images/s1.png"]
    m = relative["metrics"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 0, 1, 1)

    by_absolute_path = evaluate(LABELS, "--predictions", "out/absolute.jsonl")
    assert by_absolute_path["coverage"]["missing_ids"] == ["images/u0.png", "images/s0.png"]
    m = by_absolute_path["metrics"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 0, 0)


def test_unmatched_decision_lines_are_reported_not_measured(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # assess ran in a folder that holds images of the same names, but not the labelled ones
    other = data.parent / "other"
    png(other / "images" / "u0.png", (1, 2, 3))
    monkeypatch.chdir(other)
    assess_to(other / "preds.jsonl", "images/u0.png", *STATIC_UNSAFE)
    result = run("eval", "../data/labels.jsonl", "--predictions", "preds.jsonl")
    assert error_line(result, 1) == "error: no labelled sample has a valid prediction"
    assert (
        "matched by image path (relative paths tried in "
        f"{other.resolve()}): 0 of 1 Decision lines name a labelled image; 1 ignored: "
        "images/u0.png"
    ) in result.stdout


def test_error_decisions_are_invalid_predictions(data: Path) -> None:
    (data / "images" / "s1.png").write_bytes(b"not an image")
    images = [f"data/images/{n}.png" for n in ("u0", "u1", "s0", "s1")]
    assess_to(Path("preds.jsonl"), *images, *STATIC_SAFE)
    report = evaluate(LABELS, "--predictions", "preds.jsonl")  # exit 1: an error line
    coverage = report["coverage"]
    assert (coverage["predicted"], coverage["invalid"]) == (4, 1)
    assert coverage["invalid_ids"] == ["images/s1.png"]
    text = run("eval", LABELS, "--predictions", "preds.jsonl")
    assert text.exit_code == 1
    assert text.stderr == (
        "error: 1 of 4 predictions are errors (excluded from the metrics; the report lists "
        "their ids)\n"
    )


def test_a_data_url_label_cannot_match_by_source(data: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    write_lines(
        data / "inline.jsonl",
        [
            {"id": "inline", "image": url, "rating": "Safe"},
            {"image": "images/s0.png", "rating": "Safe"},
        ],
    )
    assess_to(Path("preds.jsonl"), url, "data/images/s0.png", *STATIC_SAFE)
    report = evaluate("data/inline.jsonl", "--predictions", "preds.jsonl")
    assert report["coverage"]["missing_ids"] == ["inline"]
    assert report["predictions"]["matching"]["unmatched_examples"][0].startswith("<data URL")


def test_labels_sharing_an_image_share_its_decision(data: Path) -> None:
    write_lines(
        data / "twice.jsonl",
        [
            {"id": "adults", "image": "images/u0.png", "rating": "Safe"},
            {
                "id": "minors",
                "image": "./images/../images/u0.png",
                "rating": "Unsafe",
                "category": "O2",
            },
        ],
    )
    assess_to(Path("preds.jsonl"), "data/images/u0.png", *STATIC_UNSAFE)
    report = evaluate("data/twice.jsonl", "--predictions", "preds.jsonl")
    m = report["metrics"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 0, 0)
    assert report["predictions"]["matching"]["matched"] == 1


def test_the_policy_of_decision_lines_checks_the_labels(data: Path) -> None:
    assess_to(Path("preds.jsonl"), "data/images/u0.png", "-p", "children-platform", "-b", "static")
    report = evaluate(LABELS, "--predictions", "preds.jsonl")
    assert report["policy"]["id"] == "children-platform"
    assert report["predictions"]["policy_id"] == "children-platform"


# -- export rows, results databases, minimal JSONL -------------------------------------------


def test_export_rows_measure_what_their_results_database_does(data: Path) -> None:
    (data / "images" / "s1.png").write_bytes(b"broken")  # one error row
    ran = evaluate(LABELS, *STATIC_UNSAFE, "--out", "run.db")
    export_to(Path("run.db"), Path("run.jsonl"))
    from_db = evaluate(LABELS, "--predictions", "run.db")
    from_export = evaluate(LABELS, "--predictions", "run.jsonl")
    for key in ("coverage", "metrics", "confusion", "per_category", "scores", "policy"):
        assert from_db[key] == ran[key] == from_export[key], key
    assert from_export["coverage"]["invalid_ids"] == ["images/s1.png"]
    assert from_db["predictions"]["format"] == "results"
    assert from_export["predictions"]["format"] == "export"
    for document in (from_db, from_export):
        assert document["predictions"]["matching"] == {
            "by": "id",
            "records": 4,
            "matched": 4,
            "unmatched": 0,
            "unmatched_examples": [],
            "relative_to": None,
        }


def test_an_audit_over_the_labels_then_export(data: Path) -> None:
    audit = run("audit", LABELS, "--out", "audit.db", *STATIC_UNSAFE, "--no-progress")
    assert audit.exit_code == 0, audit.stderr
    export_to(Path("audit.db"), Path("audit.jsonl"))
    report = evaluate(LABELS, "--predictions", "audit.jsonl")
    m = report["metrics"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 0, 0)


def test_minimal_jsonl_from_another_tool(tmp_path: Path) -> None:
    labels = write_lines(
        tmp_path / "labels.jsonl",
        [
            {"id": "a", "image": "a.png", "rating": "Unsafe", "category": "O2"},
            {"id": 7, "image": "b.png", "rating": "Unsafe", "category": "O3"},
            {"id": "c", "image": "c.png", "rating": "Safe"},
            {"id": "d", "image": "d.png", "rating": "Safe"},
            {"id": "e", "image": "e.png", "rating": "Safe"},
            {"id": "f", "image": "f.png", "rating": "Safe"},
        ],
    )
    predictions = write_lines(
        tmp_path / "tool.jsonl",
        [
            {"id": "a", "rating": "Unsafe", "category_id": "O2", "p_unsafe": 0.9},
            {"id": 7, "rating": "Unsafe", "category_id": "O2", "p_unsafe": 1},
            "",
            {"id": "c", "rating": "Safe"},
            {"id": "d", "rating": None, "error": "timeout"},
            {"id": "e", "rating": None},
            {"id": "zz", "rating": "Safe"},
        ],
    )
    report = evaluate(str(labels), "--predictions", str(predictions))
    m = report["metrics"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 0, 1, 0)
    assert m["category_accuracy"] == 0.5
    coverage = report["coverage"]
    assert coverage["invalid_ids"] == ["d", "e"] and coverage["missing_ids"] == ["f"]
    assert report["scores"]["scored"] == 2
    info = report["predictions"]
    assert info["format"] == "minimal"
    assert info["matching"]["unmatched_examples"] == ["zz"]
    for key in ("backend", "mode", "model", "decoding", "policy_id", "policy_hash"):
        assert info[key] is None, key
    assert info["models"] == [] and info["random_weights"] is False
    text = run("eval", str(labels), "--predictions", str(predictions)).stdout
    assert (
        "made by: model unknown; backend unknown; decoding unknown; mode unknown; policy unknown\n"
    ) in text
    assert "matched by id: 5 of 6 lines have a labelled id; 1 ignored: zz\n" in text


# -- broken files ----------------------------------------------------------------------------

GOOD = '{"id": "x.png", "rating": "Safe"}'
DECISION = json.dumps({"verdict": {"source": "x.png", "policy_id": "llavaguard"}, "rating": "Safe"})


@pytest.mark.parametrize(
    ("name", "lines", "message"),
    [
        (
            "p.jsonl",
            [GOOD, DECISION],
            "p.jsonl:2: a Decision line of `policy-engine assess` in a file of minimal JSONL "
            "predictions; one kind per file",
        ),
        (
            "p.jsonl",
            [DECISION, "", GOOD],
            "p.jsonl:3: a minimal prediction in a file of Decision lines of "
            "`policy-engine assess`; one kind per file",
        ),
        ("p.jsonl", [GOOD, "", '{"id": "y.png", "rating": '], "p.jsonl:3: invalid JSON ("),
        ("p.jsonl", [GOOD, "[1, 2]"], "p.jsonl:2: expected a JSON object, got list"),
        (
            "p.csv",
            ["id,rating", "x.png,Safe"],
            "p.csv:1: neither a results database (SQLite) nor JSONL predictions: invalid JSON",
        ),
        (
            "p.db",
            ["", '"just a string"'],
            "p.db:2: neither a results database (SQLite) nor JSONL predictions: expected a JSON "
            "object, got str",
        ),
        (
            "p.jsonl",
            ['{"image": "x.png", "label": "Safe"}'],
            "p.jsonl:1: not a prediction: expected a Decision line of `policy-engine assess` "
            '(with "verdict"), a row of `policy-engine export` (with "decision") or a minimal '
            '{"id": ..., "rating": ...}; this line has keys: image, label',
        ),
        (
            "p.jsonl",
            ['{"id": "x.png", "rating": "Safe", "p_unsafee": 0.2}'],
            "p.jsonl:1: a minimal prediction: unknown key 'p_unsafee'; allowed: id, rating, "
            "category_id, p_unsafe, error",
        ),
        (
            "p.jsonl",
            ['{"id": "x.png", "rating": "unsafe"}'],
            "p.jsonl:1: a minimal prediction: rating: Input should be 'Safe' or 'Unsafe'",
        ),
        (
            "p.jsonl",
            ['{"id": "x.png", "category_id": "O2"}'],
            'p.jsonl:1: a minimal prediction: rating: required ("Safe" or "Unsafe"; null with '
            'an "error")',
        ),
        (
            "p.jsonl",
            ['{"id": "x.png", "rating": "Safe", "p_unsafe": 1.5}'],
            "p.jsonl:1: a minimal prediction: p_unsafe: Input should be less than or equal to 1",
        ),
        (
            "p.jsonl",
            ['{"id": "x.png", "rating": "Safe", "p_unsafe": "0.5"}'],
            "p.jsonl:1: a minimal prediction: p_unsafe: Input should be a valid number",
        ),
        (
            "p.jsonl",
            [GOOD, '{"id": "x.png", "rating": "Unsafe"}'],
            "p.jsonl:2: a second prediction for id 'x.png' (first on line 1)",
        ),
        (
            "p.jsonl",
            [DECISION, DECISION.replace('"x.png"', '"./x.png"')],
            "p.jsonl:2: a second prediction for image './x.png' (first on line 1)",
        ),
        (
            "p.jsonl",
            [json.dumps({"verdict": {"policy_id": "llavaguard"}, "rating": "Safe"})],
            "p.jsonl:1: a Decision line of `policy-engine assess`: verdict.source: required",
        ),
        (
            "p.jsonl",
            ['{"id": "x.png", "decision": {}, "ok": "yes"}'],
            "p.jsonl:1: a row of `policy-engine export`: ok: Input should be a valid boolean",
        ),
        ("p.jsonl", ["", "  "], "p.jsonl: no predictions (the file is empty)"),
        ("p.parquet", ["x"], "p.parquet: Parquet is not read; export JSONL instead"),
    ],
)
def test_a_broken_predictions_file_is_one_error_line(
    tmp_path: Path, name: str, lines: list[str], message: str
) -> None:
    labels = write_lines(tmp_path / "labels.jsonl", [{"image": "x.png", "rating": "Safe"}])
    broken = write_lines(tmp_path / name, lines)
    good = write_lines(tmp_path / "good.jsonl", [GOOD])
    for args in (
        ("--predictions", str(broken)),
        ("--predictions", str(good), "--compare", str(broken)),
    ):
        line = error_line(run("eval", str(labels), *args))
        assert line.startswith(f"error: {tmp_path / message}"), line


def test_a_binary_file_is_neither_kind(tmp_path: Path) -> None:
    labels = write_lines(tmp_path / "labels.jsonl", [{"image": "x.png", "rating": "Safe"}])
    png(tmp_path / "x.png", (1, 1, 1))
    line = error_line(run("eval", str(labels), "--predictions", str(tmp_path / "x.png")))
    assert line == (
        f"error: {tmp_path / 'x.png'}:1: neither a results database (SQLite) nor JSONL "
        "predictions: not UTF-8 text"
    )


def test_an_sqlite_file_of_another_kind_says_so(tmp_path: Path) -> None:
    labels = write_lines(tmp_path / "labels.jsonl", [{"image": "x.png", "rating": "Safe"}])
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    line = error_line(run("eval", str(labels), "--predictions", str(other)))
    assert line.startswith(f"error: {other}: not a results file")


def test_concatenated_outputs_of_two_commands_are_refused_at_the_seam(data: Path) -> None:
    evaluate(LABELS, *STATIC_UNSAFE, "--out", "run.db")
    export_to(Path("run.db"), Path("run.jsonl"))
    assess_to(Path("preds.jsonl"), "data/images/u0.png", *STATIC_UNSAFE)
    mixed = Path("mixed.jsonl")
    mixed.write_text(Path("run.jsonl").read_text() + Path("preds.jsonl").read_text())
    line = error_line(run("eval", LABELS, "--predictions", str(mixed)))
    assert line == (
        "error: mixed.jsonl:5: a Decision line of `policy-engine assess` in a file of rows of "
        "`policy-engine export`; one kind per file"
    )


# -- provenance and the random-weights warning -----------------------------------------------


def test_provenance_of_each_kind(data: Path) -> None:
    ran = evaluate(LABELS, *STATIC_UNSAFE, "-o", "model=guard-7", "--out", "run.db")
    policy = ran["policy"]
    export_to(Path("run.db"), Path("run.jsonl"))
    assess_to(Path("preds.jsonl"), "data/images/u0.png", *STATIC_UNSAFE, "-o", "model=guard-7")
    expected = {
        "model": "guard-7",
        "models": ["guard-7"],
        "decoding": None,  # the static backend records none
        "decodings": [],
        "policy_id": "llavaguard",
        "policy_version": policy["version"],
        "policy_hash": policy["hash"],
        "policy_hashes": [policy["hash"]],
        "random_weights": False,
    }
    database = evaluate(LABELS, "--predictions", "run.db")["predictions"]
    assert database.items() >= {**expected, "backend": "static", "mode": "full"}.items()
    for path in ("run.jsonl", "preds.jsonl"):  # JSONL does not record the backend or mode
        info = evaluate(LABELS, "--predictions", path)["predictions"]
        assert info.items() >= {**expected, "backend": None, "mode": None}.items(), path
    assert ran["predictions"].items() >= {**expected, "backend": "static"}.items()

    text = run("eval", LABELS, "--predictions", "run.db").stdout
    assert text.startswith("eval: ")  # no warning
    assert (
        "made by: model guard-7; backend static; decoding unknown; mode full; policy "
        f"llavaguard v{policy['version']} ({policy['hash'][:19]})\n"
    ) in text


def test_several_models_and_policies_are_warned_about(tmp_path: Path) -> None:
    labels = write_lines(
        tmp_path / "labels.jsonl",
        [{"image": "a.png", "rating": "Safe"}, {"image": "b.png", "rating": "Safe"}],
    )

    def line(name: str, model: str, digest: str) -> dict[str, Any]:
        verdict = {"source": name, "model": model, "policy_id": "llavaguard", "policy_hash": digest}
        return {"verdict": verdict, "rating": "Safe"}

    predictions = write_lines(
        tmp_path / "p.jsonl",
        [line("a.png", "m1", "sha256:aaa"), line("b.png", "m2", "sha256:bbb")],
    )
    report = evaluate(str(labels), "--predictions", str(predictions))
    info = report["predictions"]
    assert (info["model"], info["models"]) == (None, ["m1", "m2"])
    assert (info["policy_hash"], info["policy_hashes"]) == (None, ["sha256:aaa", "sha256:bbb"])
    assert report["warnings"] == [
        "the predictions were made by 2 models: m1, m2",
        "the predictions were made under 2 policies: sha256:aaa, sha256:bbb",
    ]


def test_random_weights_warning_from_the_tiny_model(data: Path, tiny_cache: Path) -> None:
    images = [str(data / "images" / f"{n}.png") for n in ("u0", "s0")]
    result = run_cli(
        "assess", *images, "-m", "tiny-random", "--mode", "verdict", "-o", "greedy=true",
        env={"HF_HUB_OFFLINE": "1", "POLICY_ENGINE_CACHE": str(tiny_cache)},
    )  # fmt: skip
    Path("tiny.jsonl").write_text(result.stdout)
    verdicts = [json.loads(line)["verdict"] for line in result.stdout.splitlines()]
    assert len(verdicts) == 2

    text = run("eval", LABELS, "--predictions", "tiny.jsonl").stdout
    first = text.splitlines()[0]
    assert first == (
        "WARNING: the predictions come from a model with random weights (tiny-random (random "
        "weights)): these metrics say nothing about a real model"
    )
    assert "made by: model tiny-random (random weights); backend unknown; decoding greedy;" in text

    report = evaluate(LABELS, "--predictions", "tiny.jsonl", code=None)
    assert report["warnings"][0] == first.removeprefix("WARNING: ")
    info = report["predictions"]
    assert info["random_weights"] is True
    assert info["model"] == "tiny-random (random weights)"
    assert info["decoding"] == verdicts[0]["decoding"] == {"method": "greedy"}


def test_random_weights_of_either_run_in_a_comparison_come_first(data: Path) -> None:
    # A: two assess runs with different models, concatenated (a mixed-origin warning);
    # B: the static backend reporting the model name the transformers backend gives tiny-random
    assess_to(Path("m1.jsonl"), "data/images/u0.png", *STATIC_UNSAFE, "-o", "model=m1")
    assess_to(Path("m2.jsonl"), "data/images/s0.png", *STATIC_UNSAFE, "-o", "model=m2")
    Path("a.jsonl").write_text(Path("m1.jsonl").read_text() + Path("m2.jsonl").read_text())
    evaluate(LABELS, *STATIC_SAFE, "-o", "model=tiny-random (random weights)", "--out", "tiny.db")
    report = evaluate(LABELS, "--predictions", "a.jsonl", "--compare", "tiny.db")
    assert report["warnings"] == [
        "B's predictions (tiny.db) come from a model with random weights (tiny-random (random "
        "weights)): these metrics say nothing about a real model",
        "A's predictions (a.jsonl) were made by 2 models: m1, m2",
    ]
    assert report["predictions"]["random_weights"] is False
    assert report["compare"]["predictions"]["random_weights"] is True
    text = run("eval", LABELS, "--predictions", "a.jsonl", "--compare", "tiny.db").stdout
    assert text.startswith("WARNING: B's predictions (tiny.db) come from a model with random")
    assert (
        text.splitlines()[1] == "WARNING: A's predictions (a.jsonl) were made by 2 models: m1, m2"
    )


def test_decoding_in_words() -> None:
    assert describe_decoding({"method": "greedy"}) == "greedy"
    sampling = {"method": "sampling", "temperature": 0.2, "top_p": 0.95, "top_k": 50, "seed": None}
    assert describe_decoding(sampling) == "sampling (temperature 0.2, top_p 0.95, top_k 50)"
    assert describe_decoding({"score": "one forward pass"}) == "score one forward pass"


# -- --compare across kinds ------------------------------------------------------------------


def test_compare_across_kinds(data: Path) -> None:
    evaluate(LABELS, *STATIC_UNSAFE, "--out", "unsafe.db")  # right on u0, u1
    export_to(Path("unsafe.db"), Path("unsafe.jsonl"))
    images = [f"data/images/{n}.png" for n in ("u0", "u1", "s0", "s1")]
    assess_to(Path("safe.jsonl"), *images, *STATIC_SAFE)  # right on s0, s1
    minimal = write_lines(
        Path("minimal.jsonl"),
        [
            {"id": "images/u0.png", "rating": "Unsafe", "category_id": "O2"},
            {"id": "images/s0.png", "rating": "Safe"},
        ],
    )
    for a in ("unsafe.db", "unsafe.jsonl"):
        report = evaluate(LABELS, "--predictions", a, "--compare", "safe.jsonl")
        comparison = report["compare"]
        assert comparison["predictions"]["format"] == "assess"
        assert comparison["compared"] == 4
        assert comparison["fixed"] == {"count": 2, "ids": ["images/s0.png", "images/s1.png"]}
        assert comparison["broken"] == {"count": 2, "ids": ["images/u0.png", "images/u1.png"]}
        assert comparison["difference"]["recall"] == -1.0

    report = evaluate(LABELS, "--predictions", "safe.jsonl", "--compare", str(minimal))
    comparison = report["compare"]
    assert comparison["predictions"]["format"] == "minimal"
    assert comparison["compared"] == 2  # minimal has two of the four
    assert comparison["fixed"]["ids"] == ["images/u0.png"] and comparison["broken"]["count"] == 0
    assert comparison["coverage"]["missing_ids"] == ["images/u1.png", "images/s1.png"]

    text = run("eval", LABELS, "--predictions", "unsafe.db", "--compare", "safe.jsonl").stdout
    assert "compare: A = unsafe.db, B = safe.jsonl\n" in text
    assert "\nB: predictions safe.jsonl (Decision lines of `policy-engine assess`)\n" in text
    assert text.count("made by: model static;") == 2
