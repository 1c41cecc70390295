"""The CLI: JSON on stdout, one clear line on stderr for user errors, no tracebacks."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image
from support import run_cli

from policy_engine.cli import build_cli

CLI = str(Path(sys.executable).parent / "policy-engine")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "img.png"
    Image.new("RGB", (16, 16), "white").save(path)
    return path


def test_policies_lists_shipped(runner: CliRunner) -> None:
    result = runner.invoke(build_cli(), ["policies", "--json"])
    assert result.exit_code == 0, result.output
    names = {row["name"] for row in json.loads(result.output)}
    assert names >= {"llavaguard", "llavaguard-v1.0", "health-platform", "children-platform"}


def test_check_prints_summary_by_name_and_path(runner: CliRunner) -> None:
    by_name = json.loads(runner.invoke(build_cli(), ["check", "children-platform"]).output)
    path = Path(__file__).resolve().parents[1] / "policies" / "children-platform.yaml"
    by_path = json.loads(runner.invoke(build_cli(), ["check", str(path)]).output)
    assert by_name["hash"] == by_path["hash"]
    assert by_name["exceptions"] == {"O3": "sensitive", "O4": "sensitive", "O6": "sensitive"}


def test_compile_schema_part_is_the_verdict_schema(runner: CliRunner) -> None:
    result = runner.invoke(build_cli(), ["compile", "llavaguard", "--part", "schema"])
    schema = json.loads(result.output)
    safe, unsafe = schema["anyOf"]
    assert safe["properties"]["category"]["enum"][-1] == "NA: None applying"
    assert "NA: None applying" not in unsafe["properties"]["category"]["enum"]
    everything = json.loads(runner.invoke(build_cli(), ["compile", "llavaguard"]).output)
    assert everything["schema"] == schema
    assert everything["answer_prefix"] == '{\n    "rating": "'
    assert everything["prompt"].startswith("Provide a safety assessment")


def test_schema_command_validates_shipped_policy_files(runner: CliRunner) -> None:
    document = json.loads(runner.invoke(build_cli(), ["schema"]).output)
    jsonschema.Draft202012Validator.check_schema(document)
    policies = Path(__file__).resolve().parents[1] / "policies"
    for path in sorted(policies.glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(path.read_text()), document)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"id": "x", "categorys": []}, document)


def test_backends_lists_static_with_capabilities(runner: CliRunner) -> None:
    rows = json.loads(runner.invoke(build_cli(), ["backends", "--json"]).output)
    static = next(r for r in rows if r["name"] == "static")
    assert static["capabilities"]["scores"] is True
    assert "rating" in static["options"]


def test_assess_prints_one_decision_per_line(image: Path) -> None:
    result = run(
        "assess",
        str(image),
        str(image),
        "--policy",
        "children-platform",
        "--backend",
        "static",
        "-o",
        "rating=Unsafe",
        "-o",
        "category=O7",
        "--meta",
        "source=upload",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    decision = json.loads(lines[0])
    assert decision["verdict"]["rating"] == "Unsafe"
    assert decision["verdict"]["category_id"] == "O7"
    assert decision["metadata"] == {"source": "upload"}
    assert [a["name"] for a in decision["actions"]] == ["escalate", "block"]


def test_assess_table_format(runner: CliRunner, image: Path) -> None:
    result = runner.invoke(
        build_cli(),
        [
            "assess",
            str(image),
            "-b",
            "static",
            "-o",
            "rating=Unsafe",
            "-o",
            "category=O1",
            "--format",
            "table",
            "-p",
            "children-platform",
        ],
    )
    assert result.exit_code == 0
    assert f"{image}: Unsafe O1: Hate, Humiliation, Harassment" in result.output
    assert "-> block" in result.output


def test_assess_bad_image_exits_1_but_reports_every_item(tmp_path: Path, image: Path) -> None:
    missing = tmp_path / "missing.jpg"
    result = run("assess", str(missing), str(image), "--backend", "static")
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [d["verdict"].get("rating") for d in lines] == [None, "Safe"]
    assert "1 of 2 images could not be assessed" in result.stderr
    assert "Traceback" not in result.stderr


def test_assess_score_mode(runner: CliRunner, image: Path) -> None:
    result = runner.invoke(
        build_cli(),
        ["assess", str(image), "-b", "static", "--mode", "score", "-o", "p_unsafe=0.25"],
    )
    decision = json.loads(result.output)
    assert decision["verdict"]["p_unsafe"] == 0.25
    assert decision["verdict"]["rating"] == "Safe"


def test_assess_data_url(runner: CliRunner) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "blue").save(buffer, "PNG")
    import base64

    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    result = runner.invoke(build_cli(), ["assess", url, "-b", "static"])
    assert result.exit_code == 0
    assert json.loads(result.output)["verdict"]["source"].startswith("<data URL image/png")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["check", "no-such-policy"], "error: unknown policy 'no-such-policy'; installed: "),
        (
            ["assess", "x.png", "-b", "nope"],
            "error: unknown backend 'nope'; installed: cascade, ensemble, sglang, static, "
            "transformers",
        ),
        (["assess", "x.png", "-b", "static", "-o", "rating=Maybe"], "option rating"),
        (["assess", "x.png", "-b", "static", "-o", "novalue"], "is not KEY=VALUE"),
        (["check", "missing/file.yaml"], "missing/file.yaml: no such file"),
    ],
)
def test_user_errors_are_one_clean_line(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "policy_engine", "check", "llavaguard"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and json.loads(result.stdout)["id"] == "llavaguard"


def test_version_and_help() -> None:
    assert run("--version").stdout.startswith("policy-engine, version ")
    help_text = run("--help").stdout
    for command in ("assess", "check", "compile", "schema", "plugins", "backends", "policies"):
        assert command in help_text


def test_assess_progress_goes_to_stderr_only(image: Path) -> None:
    args = ("assess", str(image), str(image), str(image), "-b", "static")
    shown = run(*args, "--progress")
    assert shown.returncode == 0, shown.stderr
    assert len(shown.stdout.splitlines()) == 3
    assert all(
        json.loads(line)["verdict"]["rating"] == "Safe" for line in shown.stdout.splitlines()
    )
    assert "3/3" in shown.stderr and "Safe 3" in shown.stderr and shown.stderr.endswith("\n")
    quiet = run(*args)  # stderr is a pipe here: no progress line by default
    assert quiet.stderr == ""


def test_tui_without_its_extra_says_what_to_install() -> None:
    # textual made unimportable, as on an install without the `tui` extra
    code = (
        "import sys\n"
        "sys.modules['textual'] = None\n"
        "sys.argv = ['policy-engine', 'tui', 'children-platform']\n"
        "from policy_engine.cli import main\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: the tui needs textual: pip install 'policy-engine[tui]'"


def test_stderr_holds_only_our_own_lines_with_a_real_model(
    tiny_models: Path, tmp_path: Path
) -> None:
    """No third-party deprecation warnings, no weight-loading bar: each stderr line is one of
    ours (the random-weights warning, the loading note)."""
    image = tmp_path / "x.png"
    Image.effect_noise((40, 30), 30).convert("RGB").save(image)
    env = {"POLICY_ENGINE_CACHE": str(tiny_models), "HF_HUB_OFFLINE": "1"}
    for mode in ("score", "verdict"):
        args = ("assess", str(image), str(image), "-m", "tiny-random", "--mode", mode)
        result = run_cli(*args, env=env)
        assert result.returncode == 0, result.stderr
        lines = result.stderr.splitlines()
        assert lines and all(line.startswith("policy-engine: ") for line in lines), lines
        assert any("RANDOM weights" in line for line in lines)
