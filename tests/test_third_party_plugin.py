"""A third-party plugin written from docs/plugins.md alone (tests/data/brightness-plugin: a
backend with a CLI flag and a post-processor with an override and a custom action, by someone
who read only the guide) installs as a distribution, type-checks strictly, is listed, and runs
in the policy's order. If the plugin API breaks what the guide promises, this fails."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from support import run_cli

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "tests" / "data" / "brightness-plugin"
ENV = {"POLICY_ENGINE_PLUGINS": "brightness"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin installed by pip, as a user would (a copy: pip builds in place)."""
    build = tmp_path_factory.mktemp("source") / "brightness-plugin"
    shutil.copytree(PLUGIN, build)
    target = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    command += ["--no-build-isolation", "--no-index", "--target", str(target), str(build)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    assert (target / "pe_brightness" / "py.typed").is_file()
    return target


def test_it_type_checks_strictly_without_ignores(tmp_path: Path) -> None:
    source = "".join(p.read_text() for p in (PLUGIN / "pe_brightness").glob("*.py"))
    assert "type: ignore" not in source
    mypy = Path(sys.executable).with_name("mypy")
    result = subprocess.run(
        [str(mypy), "--strict", "--cache-dir", str(tmp_path), str(PLUGIN / "pe_brightness")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout


def test_it_is_listed_with_what_it_registered(site: Path, tmp_path: Path) -> None:
    result = run_cli("plugins", "--json", env=ENV, pythonpath=site, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = {i["name"]: i for i in json.loads(result.stdout)}["brightness"]
    assert info["distribution"] == "policy-engine-brightness"
    assert info["registered"] == {"backend": ["brightness"], "post-processor": ["night-review"]}
    assert info["unknown_hooks"] == []
    helped = run_cli("assess", "--help", env=ENV, pythonpath=site, cwd=tmp_path)
    assert "--dark-below" in helped.stdout  # its backend's own flag


def test_it_runs_in_policy_order(site: Path, tmp_path: Path) -> None:
    dark, bright = tmp_path / "dark.png", tmp_path / "bright.png"
    Image.new("RGB", (16, 16), (10, 10, 10)).save(dark)
    Image.new("RGB", (16, 16), (230, 230, 230)).save(bright)
    policy = PLUGIN / "example" / "night.yaml"
    args = ("assess", str(dark), str(bright), "-b", "brightness", "-p", str(policy))
    result = run_cli(*args, env=ENV, pythonpath=site, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert (first["rating"], first["category_id"]) == ("Unsafe", "O9")
    assert [(a["name"], a["by"]) for a in first["actions"]] == [
        ("block", "block-disasters"),
        ("night_review", "night"),
    ]
    assert first["verdict"]["severity"] == "medium"  # what the model (here: brightness) said
    assert first["severity"] == "high"  # raised by the step, with its reason
    assert first["overrides"][0]["step"] == "night"
    assert (second["rating"], second["actions"]) == ("Safe", [])
    brighter = ("assess", str(bright), *args[3:], "--dark-below", "250")
    flagged = run_cli(*brighter, env=ENV, pythonpath=site, cwd=tmp_path)
    assert json.loads(flagged.stdout)["rating"] == "Unsafe"  # the flag reached the option
