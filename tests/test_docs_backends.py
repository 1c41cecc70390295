"""docs/backends.md and docs/sglang.md document every option of their backends, and nothing
stale."""

from __future__ import annotations

import re
from pathlib import Path

from policy_engine.backends.chat_templates import TEMPLATES
from policy_engine.backends.sglang import SGLangOptions
from policy_engine.backends.transformers import DEFAULT_MODEL, TransformersOptions

DOCS = Path(__file__).resolve().parents[1] / "docs"
DOC = (DOCS / "backends.md").read_text(encoding="utf-8")
SGLANG_DOC = (DOCS / "sglang.md").read_text(encoding="utf-8")


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


def sglang_rows() -> dict[str, str]:
    """Option name -> its documented default, from docs/sglang.md's options table."""
    section = SGLANG_DOC[SGLANG_DOC.index("## Options") : SGLANG_DOC.index("## Testing")]
    rows: dict[str, str] = {}
    for names, default in re.findall(r"^\| (`[^|]+`) \| ([^|]+) \|", section, re.M):
        found = re.findall(r"`([a-z_]+)`", names)
        values = [v.strip() for v in default.split(",")]
        if len(values) != len(found):  # one default for several names (e.g. "launch", …)
            values = [default.strip()] * len(found)
        rows.update(zip(found, values, strict=True))
    return rows


def test_every_sglang_option_is_documented_with_its_default() -> None:
    rows = sglang_rows()
    assert set(rows) == set(SGLangOptions.model_fields)
    defaults = SGLangOptions().model_dump()
    for name, value in defaults.items():
        if isinstance(value, bool):
            assert rows[name] == str(value).lower(), name
        elif isinstance(value, int | float | str) and name != "launch_command":
            expected = f"{value:g}" if isinstance(value, float) else str(value)
            assert rows[name] == expected, name
    for name in TEMPLATES:
        assert f"`{name}`" in SGLANG_DOC
