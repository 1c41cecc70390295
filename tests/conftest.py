"""Test isolation: never load the developer's stray plugins; only our own built-ins."""

from __future__ import annotations

import os

# Must be set before the first PluginHost is created: an empty allowlist loads no third-party
# entry points (built-ins from this distribution still load).
os.environ["POLICY_ENGINE_PLUGINS"] = ""
os.environ.pop("POLICY_ENGINE_DISABLE_PLUGINS", None)
os.environ.pop("POLICY_ENGINE_TRACE_HOOKS", None)
# Model tests load checkpoints from local directories only; never let them reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
# Golden copies of ../shared/reference/llavaguard (tests/test_reference_copies.py keeps them equal).
GOLDEN = DATA / "llavaguard"


@pytest.fixture
def golden() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding both tiny random-weight checkpoints, built once per run.

    Use it as `tiny_model_path(name, cache_dir=tiny_models)`. Skips without transformers.
    """
    pytest.importorskip("transformers")
    from policy_engine.backends.tiny import TINY_MODELS, tiny_model_path

    cache = tmp_path_factory.mktemp("tiny-models")
    for name in TINY_MODELS:
        tiny_model_path(name, cache_dir=cache)
    return cache


@pytest.fixture(scope="module")
def tiny_cache(tiny_models: Path) -> Iterator[Path]:
    """POLICY_ENGINE_CACHE pointing at the per-run tiny models, so `-m tiny-random` (and the
    other tiny names) find them, and the hub switched off; for one test module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("POLICY_ENGINE_CACHE", str(tiny_models))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield tiny_models
    mp.undo()


@pytest.fixture(scope="module")
def loaded_backend(tiny_cache: Path) -> Iterator[Callable[..., Any]]:
    """A factory of loaded transformers backends (`loaded_backend(model=..., greedy=True)`),
    closed at the end of the module."""
    from policy_engine.backends.transformers import TransformersBackend

    made: list[TransformersBackend] = []

    def make(**options: Any) -> TransformersBackend:
        instance = TransformersBackend(**options)
        instance.ensure_loaded()
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.close()
