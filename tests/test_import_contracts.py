"""The import contracts (pyproject.toml [tool.importlinter], checked by scripts/check) cover the
whole core, and a broken contract is caught."""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from lint_imports import check  # noqa: E402


def contracts() -> dict[str, dict[str, object]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


INTEGRATIONS = "policy_engine.integrations"
"""Drop-ins for other libraries: under their own contract, since they import torch (lazily)."""


def core_modules() -> set[str]:
    found = set()
    for path in (REPO / "policy_engine").iterdir():
        if path.name.startswith(("_", ".")) and path.name != "__main__.py":
            continue
        if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()):
            found.add(f"policy_engine.{path.stem}")
    return found - {INTEGRATIONS}


def test_the_core_contract_lists_every_core_module() -> None:
    """A new core module is under the contracts from its first commit."""
    listed = set(contracts()["core"]["source_modules"])  # type: ignore[call-overload]
    assert listed == core_modules()
    private = set(contracts()["public-api"]["forbidden_modules"])  # type: ignore[call-overload]
    public = {"policy_engine.cli", "policy_engine.__main__"}
    assert private == core_modules() - public | {INTEGRATIONS}


def test_the_integrations_have_their_own_contract() -> None:
    """The core never imports an integration; an integration never reaches the backends,
    the plugins or the TUI (it may import its library and torch: inside functions)."""
    assert (REPO / "policy_engine" / "integrations" / "__init__.py").exists()
    assert INTEGRATIONS in contracts()["core"]["forbidden_modules"]  # type: ignore[operator]
    integrations = contracts()["integrations"]
    assert integrations["source_modules"] == [INTEGRATIONS]
    forbidden = set(integrations["forbidden_modules"])  # type: ignore[call-overload]
    assert {"policy_engine.backends", "policy_engine.plugins", "policy_engine.tui"} <= forbidden


def copy_sources(target: Path) -> None:
    for folder in ("policy_engine", "backends", "plugins", "tui"):
        shutil.copytree(REPO / folder, target / folder, ignore=shutil.ignore_patterns("__py*"))
    shutil.copy(REPO / "pyproject.toml", target / "pyproject.toml")


def test_the_contracts_hold() -> None:
    assert check(quiet=True) == 0


@pytest.mark.parametrize(
    ("where", "line"),
    [
        ("policy_engine/engine.py", "import policy_engine.backends.static"),  # core -> backend
        ("plugins/severity.py", "from policy_engine.tui import document"),  # plugin -> tui
        ("backends/static.py", "from policy_engine.engine import Engine"),  # past the API
        ("policy_engine/verdict.py", "import torch"),  # the model stack in the core
        ("policy_engine/engine.py", "import policy_engine.integrations.diffusers"),  # drop-in
        ("policy_engine/integrations/diffusers.py", "import policy_engine.backends.static"),
    ],
)
def test_a_broken_contract_is_caught(tmp_path: Path, where: str, line: str) -> None:
    copy_sources(tmp_path)
    path = tmp_path / where
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}\n", encoding="utf-8")
    assert check(tmp_path, quiet=True) != 0
