"""Helpers shared by tests that run the real console script or fake installed distributions."""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path


def write_dist_info(
    root: Path,
    name: str,
    version: str,
    entry_points: dict[str, dict[str, str]],
    requires: Iterable[str] = (),
) -> Path:
    """Write the dist-info an installer leaves behind (METADATA, entry_points.txt, RECORD)."""
    dist_info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    requirements = "".join(f"Requires-Dist: {dep}\n" for dep in requires)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{requirements}",
        encoding="utf-8",
    )
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in entries.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (dist_info / "RECORD").write_text("", encoding="utf-8")
    return dist_info


def run_cli(
    *args: str,
    env: dict[str, str | None] | None = None,
    pythonpath: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real `policy-engine` console script of this venv.

    `env` entries override the environment (None unsets); `pythonpath` is put first on
    PYTHONPATH, e.g. a directory holding a fake installed distribution.
    """
    script = Path(sys.executable).with_name("policy-engine")
    command = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "from policy_engine.cli import main; main()"]
    )
    environ = dict(os.environ)
    if pythonpath is not None:
        environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(pythonpath), os.environ.get("PYTHONPATH", "")) if p
        )
    for key, value in (env or {}).items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=environ, cwd=cwd, timeout=60
    )


def changed_lines(before: str, after: str) -> tuple[list[str], list[str]]:
    """(removed, added) lines between two texts."""
    removed, added = [], []
    for line in difflib.ndiff(before.splitlines(), after.splitlines()):
        if line.startswith("- "):
            removed.append(line[2:])
        elif line.startswith("+ "):
            added.append(line[2:])
    return removed, added
