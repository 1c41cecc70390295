"""Provenance in every report and export: the model and decoding that made the verdicts, the
backend, the policy; a random-weights warning nobody can miss (text: the first line; JSON: a
field; HTML: a banner above everything; export: a warning and a column)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from support import run_cli
from test_report import check_html, image, make_store, open_summary, policy_meta, row

from policy_engine import Engine
from policy_engine.audit.export import export
from policy_engine.audit.report import report_command, write_html
from policy_engine.audit.report_provenance import describe_decoding
from policy_engine.audit.report_text import render_text
from policy_engine.audit.store import ResultRow, ResultStore

RANDOM = "tiny-random (random weights)"
GREEDY = {"method": "greedy"}
SAMPLING = {"method": "sampling", "temperature": 0.2, "top_p": 0.95, "top_k": 50, "seed": None}


def made_by(item: ResultRow, model: str | None, decoding: dict[str, Any] | None) -> ResultRow:
    verdict = item.decision["verdict"]
    if model is not None:
        verdict["model"] = model
    if decoding is not None:
        verdict["decoding"] = decoding
    return item


def results(tmp_path: Path, specs: list[tuple[str | None, dict[str, Any] | None]]) -> Path:
    rows = [made_by(row(f"r{i}", i, f"x{i}"), m, d) for i, (m, d) in enumerate(specs)]
    meta = {**policy_meta(), "backend": "transformers", "model": "the-meta-model"}
    return make_store(tmp_path / "r.db", rows, meta)


def html_page(path: Path, tmp_path: Path) -> str:
    out = tmp_path / "r.html"
    with ResultStore(path) as store:
        write_html(store, out)
    return out.read_text(encoding="utf-8")


def header_fields(page: str) -> dict[str, str]:
    """The header's provenance list, as raw HTML per field name."""
    check_html(page)
    start = page.index('<dl class="provenance">')
    block = page[start : page.index("</dl>", start)]
    pairs = block.split("<dt>")[1:]
    found = {}
    for pair in pairs:
        key, value = pair.split("</dt><dd>")
        found[key] = value.split("</dd>")[0]
    return found


# --- what the reports say ---------------------------------------------------------------------


def test_one_model_one_decoding_in_text_json_and_html(tmp_path: Path) -> None:
    path = results(tmp_path, [("guard-7b", GREEDY)] * 3)
    summary = open_summary(path)
    text = render_text(summary)
    assert text.startswith("Audit report: ")  # no warning for a real model
    lines = {line.split()[0]: line.split(None, 1)[1] for line in text.splitlines()[1:6]}
    assert lines["model"] == "guard-7b" and lines["decoding"] == "greedy"
    assert lines["policy"].startswith("llavaguard v1.2 (sha256:")

    data = summary.to_dict()
    assert data["warnings"] == []
    provenance = data["provenance"]
    assert provenance["model"] == "guard-7b" and provenance["decoding"] == GREEDY
    assert provenance["backend"] == "transformers" and provenance["random_weights"] is False
    assert data["policy"]["hash"] == policy_meta()["policy_hash"]

    page = html_page(path, tmp_path)
    fields = header_fields(page)
    assert fields["Model"] == "guard-7b" and fields["Decoding"] == "greedy"
    assert fields["Backend"] == "transformers"
    assert fields["Policy"] == "llavaguard v1.2"
    assert fields["Policy hash"] == policy_meta()["policy_hash"]
    assert 'class="banner"' not in page


def test_sampling_settings_are_spelled_out() -> None:
    assert describe_decoding(GREEDY) == "greedy"
    assert (
        describe_decoding(SAMPLING) == "sampling (temperature 0.2, top_p 0.95, top_k 50, seed none)"
    )
    assert describe_decoding({"score": "one forward pass, temperature 1"}) == (
        "score: one forward pass, temperature 1"
    )
    assert describe_decoding(None) == "not recorded"


def test_rows_decoded_differently_are_mixed(tmp_path: Path) -> None:
    # Error rows record no decoding: they do not make the decoding mixed.
    path = results(tmp_path, [("m", GREEDY), ("m", GREEDY), ("m", SAMPLING), (None, None)])
    summary = open_summary(path)
    provenance = summary.to_dict()["provenance"]
    assert provenance["decoding"] == "mixed"
    assert provenance["decodings"] == [
        {"decoding": GREEDY, "rows": 2},
        {"decoding": SAMPLING, "rows": 1},
    ]
    assert provenance["rows_without_decoding"] == 1
    assert summary.provenance.decoding_text == (
        "mixed: greedy (2 rows), sampling (temperature 0.2, top_p 0.95, top_k 50, seed none) "
        "(1 rows)"
    )
    assert "decoding   mixed: greedy (2 rows)" in render_text(summary)
    decoding = header_fields(html_page(path, tmp_path))["Decoding"]
    assert decoding.startswith("mixed: greedy (2 rows)") and "decoded differently" in decoding

    same = open_summary(results(tmp_path / "b", [("m", SAMPLING), (None, None)]))
    assert same.provenance.decoding == SAMPLING


def test_the_meta_model_when_no_verdict_names_one(tmp_path: Path) -> None:
    summary = open_summary(results(tmp_path, [(None, None)] * 2))
    assert summary.provenance.model == "the-meta-model"
    assert summary.provenance.decoding_text == "not recorded"
    several = open_summary(results(tmp_path / "b", [("a", GREEDY), ("b", GREEDY)]))
    assert several.provenance.model == "mixed: a, b"


def test_random_weights_warning_in_every_form(tmp_path: Path) -> None:
    path = results(tmp_path, [(RANDOM, SAMPLING), (RANDOM, SAMPLING), ("guard-7b", SAMPLING)])
    result = CliRunner().invoke(report_command, [str(path)])
    assert result.exit_code == 0
    first = result.stdout.splitlines()[0]
    assert first.startswith("WARNING: RANDOM WEIGHTS: 2 of 3 rows were judged by")
    assert RANDOM in first and "meaningless" in first

    data = json.loads(CliRunner().invoke(report_command, [str(path), "--json"]).stdout)
    assert data["provenance"]["random_weights"] is True
    assert data["provenance"]["random_weights_rows"] == 2
    assert data["warnings"] == [first.removeprefix("WARNING: ")]

    page = html_page(path, tmp_path)
    # The banner is the first thing in the page, above the title.
    assert page.index('<div class="banner" role="alert">') < page.index("<h1>")
    body = page[page.index("<body>") :]
    assert body.index('class="banner"') < body.index("<header>")
    assert "2 of 3 rows were judged by" in page and "random weights</span>" in page


# --- end to end: real runs ----------------------------------------------------------------------


def test_a_real_random_weights_run_is_flagged(tmp_path: Path, tiny_cache: Path) -> None:
    """The offline tiny model (random weights) through the real engine: its rows carry the
    marker, and every form of the report warns."""
    from policy_engine.audit.runner import results_meta

    sources = [image(tmp_path / f"{i}.png", color=c) for i, c in enumerate(["red", "blue"])]
    with Engine(
        "llavaguard", "transformers", backend_options={"model": "tiny-random"}, mode="score"
    ) as engine:
        decisions = list(engine.assess_many(sources))
        meta = results_meta(engine, str(tmp_path))
    rows = [ResultRow.from_decision(f"i{i}", i, d) for i, d in enumerate(decisions)]
    path = make_store(tmp_path / "r.db", rows, meta)

    summary = open_summary(path)
    assert summary.provenance.model == RANDOM
    assert summary.provenance.decoding_text.startswith("score: ")
    assert render_text(summary).startswith("WARNING: RANDOM WEIGHTS: all rows were judged by")
    assert 'class="banner"' in html_page(path, tmp_path)
    exported = tmp_path / "r.jsonl"
    export(path, exported, "jsonl")
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [x["random_weights"] for x in lines] == [True, True]


def test_an_eval_results_file_reports_its_provenance(tmp_path: Path) -> None:
    """`policy-engine eval --out` writes a results file: the report names its backend, model
    and policy, and estimates its throughput from the rows."""
    for i in range(5):
        image(tmp_path / "imgs" / f"{i}.png")
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        "".join(
            json.dumps({"image": f"imgs/{i}.png", "rating": "Safe" if i % 2 else "Unsafe"}).replace(
                '"Unsafe"}', '"Unsafe", "category": "O2"}'
            )
            + "\n"
            for i in range(5)
        ),
        encoding="utf-8",
    )
    out = tmp_path / "run.db"
    ran = run_cli(
        "eval", str(labels), "--backend", "static", "-o", "rating=Unsafe", "-o", "category=O2",
        "--out", str(out),
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    result = run_cli("report", str(out), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["warnings"] == []
    assert data["provenance"]["backend"] == "static" and data["provenance"]["model"] == "static"
    assert data["policy"]["id"] == "llavaguard"
    assert data["totals"]["rows"] == 5 and data["totals"]["flagged"] == 5
    throughput = data["throughput"]
    assert throughput["basis"] == "rows" and throughput["images"] == 5
    # The estimate covers the model's time at least (the first batch included).
    assert throughput["seconds"] >= data["generation_seconds"] > 0


# --- export -------------------------------------------------------------------------------------


@pytest.fixture
def mixed_models(tmp_path: Path) -> Path:
    return results(tmp_path, [(RANDOM, SAMPLING), ("guard-7b", GREEDY), (None, None)])


def test_export_rows_carry_their_provenance(mixed_models: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    assert export(mixed_models, target, "jsonl") == 3
    lines = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [(x["model"], x["decoding"], x["random_weights"]) for x in lines] == [
        (RANDOM, SAMPLING, True),
        ("guard-7b", GREEDY, False),
        (None, None, False),
    ]
    assert {(x["policy_id"], x["policy_version"], x["policy_hash"]) for x in lines} == {
        ("llavaguard", "1.2", "sha256:x")  # the verdicts' own (the test rows say sha256:x)
    }
    assert lines[0]["decision"]["verdict"]["model"] == RANDOM  # the Decision is still whole

    table = tmp_path / "out.parquet"
    export(mixed_models, table, "parquet")
    read = pq.read_table(table)
    assert read.schema.field("model").type == "string"
    assert read.schema.field("random_weights").type == "bool"
    records = read.to_pylist()
    assert [(x["model"], x["random_weights"]) for x in records] == [
        (RANDOM, True),
        ("guard-7b", False),
        (None, False),
    ]
    assert [json.loads(x["decoding"]) if x["decoding"] else None for x in records] == [
        SAMPLING,
        GREEDY,
        None,
    ]
    meta = json.loads(read.schema.metadata[b"policy_engine.meta"])
    assert meta["backend"] == "transformers" and meta["policy_id"] == "llavaguard"


def test_export_warns_about_random_weights(mixed_models: Path, tmp_path: Path) -> None:
    result = run_cli("export", str(mixed_models), str(tmp_path / "o.jsonl"))
    assert result.returncode == 0
    warning = [line for line in result.stderr.splitlines() if "RANDOM WEIGHTS" in line]
    assert len(warning) == 1 and "1 of 3 rows" in warning[0] and RANDOM in warning[0]
    assert json.loads(result.stdout)["rows"] == 3  # stdout stays the JSON summary

    clean = results(tmp_path / "clean", [("guard-7b", GREEDY)])
    quiet = run_cli("export", str(clean), str(tmp_path / "q.parquet"))
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_the_header_says_when_sampling_is_not_reproducible(tmp_path: Path) -> None:
    unseeded = header_fields(html_page(results(tmp_path, [("m", SAMPLING)]), tmp_path))
    assert "no seed: a rerun may give other verdicts" in unseeded["Decoding"]
    seeded = results(tmp_path / "s", [("m", {**SAMPLING, "seed": 7})])
    decoding = header_fields(html_page(seeded, tmp_path))["Decoding"]
    assert decoding == "sampling (temperature 0.2, top_p 0.95, top_k 50, seed 7)"
