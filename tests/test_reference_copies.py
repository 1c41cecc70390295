"""tests/data/llavaguard/ holds copies of ../shared/reference/llavaguard/: keep them equal."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "llavaguard"

SHARED = REPO.parent / "shared" / "reference" / "llavaguard"


@pytest.mark.parametrize(
    "name", ["prompt_v1.2.txt", "prompt_v1.0.txt", "policy_exception_texts_v2.txt"]
)
def test_golden_copy_matches_shared_reference(name: str) -> None:
    if not SHARED.is_dir():
        pytest.skip("../shared/reference is not beside this checkout")
    assert (GOLDEN / name).read_bytes() == (SHARED / name).read_bytes()
    assert Path(GOLDEN / name).stat().st_size > 1000
