"""Check the import contracts (pyproject.toml, [tool.importlinter]) with import-linter.

import-linter reads a package from its folder, but `policy_engine.backends`, `.plugins` and
`.tui` live in top-level folders that setuptools maps under the namespace at install time. So
this lays the package out as it is installed, in a temporary folder, and checks that copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"backends": "backends", "plugins": "plugins", "tui": "tui"}


def check(root: Path = ROOT, *, quiet: bool = False) -> int:
    """Run the contracts of `root`/pyproject.toml on `root`'s sources; the exit status."""
    with tempfile.TemporaryDirectory(prefix="policy-engine-imports-") as tmp:
        package = Path(tmp) / "policy_engine"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(root / "policy_engine", package, ignore=ignore)
        for folder, name in MAPPED.items():
            shutil.copytree(root / folder, package / name, ignore=ignore)
        env = {**os.environ, "PYTHONPATH": tmp}
        lint = Path(sys.executable).with_name("lint-imports")
        command = [str(lint), "--no-cache", str(root / "pyproject.toml")]
        output = subprocess.DEVNULL if quiet else None
        return subprocess.run(command, env=env, cwd=tmp, stdout=output, check=False).returncode


if __name__ == "__main__":
    sys.exit(check())
