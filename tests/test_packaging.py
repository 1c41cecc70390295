"""Files the code loads at run time (shipped policies, the TUI stylesheet) must be declared as
package data, or a regular (non-editable) install starts without them."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_data_file_in_a_package_folder_is_package_data() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders: dict[str, str] = config["package-dir"]
    data: dict[str, list[str]] = config.get("package-data", {})
    missing = []
    for package in config["packages"]:
        root = package.split(".")[0]
        folder = folders.get(package) or str(Path(folders.get(root, root), *package.split(".")[1:]))
        for path in sorted((REPO / folder).iterdir()):
            if path.is_dir() or path.suffix in (".py", ".pyc") or path.name.startswith("."):
                continue
            if not any(fnmatch.fnmatch(path.name, glob) for glob in data.get(package, [])):
                missing.append(f"{package}: {path.name}")
    assert missing == []
