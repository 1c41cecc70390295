"""The README's front door tells the truth: its commands match .ci/run, its policy loads."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from PIL import Image
from support import run_cli

from policy_engine import get_host, load_policy

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def front_commands() -> list[str]:
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block is not None
    return [line for line in first_block.group(1).splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_commands() -> None:
    setup, *main_job, test = front_commands()
    assert [line for line in main_job if " assess " in line] == main_job and main_job
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert setup in ci and test in ci
    assert ci.index(setup) < ci.index(test)


def test_readme_main_job_names_the_default_checkpoint_and_an_offline_line() -> None:
    _, *main_job, _ = front_commands()
    assert any("AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf" in line for line in main_job)
    assert any("tiny-random" in line for line in main_job)


def test_readme_offline_main_job_runs(tiny_models: Path, tmp_path: Path) -> None:
    """The offline line, run as written (with this venv's script), on a real image file."""
    (line,) = [c for c in front_commands() if "tiny-random" in c]
    args = shlex.split(line)
    assert args[0] == ".venv/bin/policy-engine"
    Image.effect_noise((96, 64), 40).convert("RGB").save(tmp_path / "photo.jpg")
    env = {"POLICY_ENGINE_CACHE": str(tiny_models), "HF_HUB_OFFLINE": "1"}
    result = run_cli(*args[1:], "--mode", "verdict", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    assert decision["verdict"]["rating"] in ("Safe", "Unsafe")
    assert decision["verdict"]["policy_id"] == "llavaguard"


def test_readme_policy_example_loads(tmp_path: Path) -> None:
    block = re.search(r"```yaml\n(extends: llavaguard.*?)```", README, re.S)
    assert block is not None
    path = tmp_path / "art-school.yaml"
    path.write_text(block.group(1), encoding="utf-8")
    policy = load_policy(path)
    assert policy.id == "art-school"
    assert "O9" not in [c.id for c in policy.categories]
    assert policy.category("O6").severity == "high"
    assert "Category O4 is declared as non-violating" in get_host().compile(policy).prompt


def test_the_one_minute_tour_runs_as_written(tiny_models: Path, tmp_path: Path) -> None:
    """Every line of the tour but the long-running ones (serve, tui), as a shell script in a
    folder holding what the lines name (my-policy.yaml, a.jpg, b.png, photos/, labels.jsonl)."""
    tour = re.search(r"## One-minute tour\n\n```bash\n(.*?)```", README, re.S)
    assert tour is not None
    lines = [line for line in tour.group(1).splitlines() if line.strip()]
    runnable = [line for line in lines if not re.search(r"policy-engine (serve|tui) ", line)]
    assert len(runnable) == len(lines) - 2
    policy = re.search(r"```yaml\n(extends: llavaguard.*?)```", README, re.S)
    assert policy is not None
    (tmp_path / "my-policy.yaml").write_text(policy.group(1), encoding="utf-8")
    (tmp_path / "photos").mkdir()
    for name, colour in (("a.jpg", (200, 40, 40)), ("b.png", (40, 40, 200))):
        Image.new("RGB", (48, 32), colour).save(tmp_path / name)
        Image.new("RGB", (48, 32), colour).save(tmp_path / "photos" / name)
    labels = [
        '{"id": "a.jpg", "image": "photos/a.jpg", "rating": "Unsafe", "category": "O2"}',
        '{"id": "b.png", "image": "photos/b.png", "rating": "Safe"}',
    ]
    (tmp_path / "labels.jsonl").write_text("\n".join(labels) + "\n", encoding="utf-8")
    script = "set -e\n" + "\n".join(runnable) + "\n"
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "POLICY_ENGINE_CACHE": str(tiny_models),
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "photos.html").is_file() and (tmp_path / "policy.schema.json").is_file()
    assert "5 of 5 cases passed" in result.stderr  # the shipped policy's own tests
