"""Test isolation: never load the developer's stray plugins; only our own built-ins."""

from __future__ import annotations

import os

# Must be set before the first PluginHost is created: an empty allowlist loads no third-party
# entry points (built-ins from this distribution still load).
os.environ["POLICY_ENGINE_PLUGINS"] = ""
os.environ.pop("POLICY_ENGINE_DISABLE_PLUGINS", None)
os.environ.pop("POLICY_ENGINE_TRACE_HOOKS", None)

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
# Golden copies of ../shared/reference/llavaguard (tests/test_reference_copies.py keeps them equal).
GOLDEN = DATA / "llavaguard"


@pytest.fixture
def golden() -> Path:
    return GOLDEN
