"""docs/backends.md documents every option of the transformers backend, and nothing stale."""

from __future__ import annotations

import re
from pathlib import Path

from policy_engine.backends.transformers import DEFAULT_MODEL, TransformersOptions

DOC = (Path(__file__).resolve().parents[1] / "docs" / "backends.md").read_text(encoding="utf-8")


def documented_options() -> set[str]:
    section = DOC[DOC.index("### Options") : DOC.index("### Errors")]
    names: set[str] = set()
    for row in re.findall(r"^\| (`[^|]+`) \|", section, re.M):
        names.update(re.findall(r"`([a-z_]+)`", row))
    return names


def test_every_option_is_documented_and_no_other() -> None:
    assert documented_options() == set(TransformersOptions.model_fields)


def test_documented_defaults_match_the_code() -> None:
    defaults = TransformersOptions()
    assert DEFAULT_MODEL in DOC
    row = re.search(r"^\| `temperature`, `top_p`, `top_k` \| ([^|]+) \|", DOC, re.M)
    assert row is not None
    assert row.group(1).strip() == f"{defaults.temperature}, {defaults.top_p}, {defaults.top_k}"
