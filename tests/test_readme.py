"""The README's front door tells the truth: its commands match .ci/run, its policy loads."""

from __future__ import annotations

import re
from pathlib import Path

from policy_engine import compile_policy, load_policy

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_ci_runs_the_readme_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block is not None
    commands = [
        line for line in first_block.group(1).splitlines() if line and not line.startswith("#")
    ]
    setup, _main, test = commands
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert setup in ci and test in ci
    assert ci.index(setup) < ci.index(test)


def test_readme_policy_example_loads(tmp_path: Path) -> None:
    block = re.search(r"```yaml\n(extends: llavaguard.*?)```", README, re.S)
    assert block is not None
    path = tmp_path / "art-school.yaml"
    path.write_text(block.group(1), encoding="utf-8")
    policy = load_policy(path)
    assert policy.id == "art-school"
    assert "O9" not in [c.id for c in policy.categories]
    assert policy.category("O6").severity == "high"
    assert "Category O4 is declared as non-violating" in compile_policy(policy).prompt
