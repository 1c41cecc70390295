"""The colour-keyed test backend behaves as documented (other tests rely on its numbers)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from policy_engine import Engine
from policy_engine.cli import cli
from tests.colour_backend import colour_host, colour_score, red_image, redness


@pytest.mark.parametrize("value", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_red_image_has_the_redness_asked_for(value: float) -> None:
    assert redness(red_image(value)) == pytest.approx(value, abs=0.005)


@pytest.mark.parametrize("mode", ["full", "verdict", "score"])
def test_red_is_unsafe_and_grey_is_safe_in_every_mode(mode: str) -> None:
    with colour_host() as host, Engine("llavaguard", "colour", mode=mode, host=host) as engine:  # type: ignore[arg-type]
        red, grey = engine.assess_many([red_image(0.9), red_image(0.1)])
    assert (red.rating, red.category_id) == ("Unsafe", "O1")
    assert (grey.rating, grey.category_id) == ("Safe", "NA")
    assert red.verdict.p_unsafe == pytest.approx(colour_score(redness(red_image(0.9))))
    assert grey.verdict.p_unsafe == pytest.approx(colour_score(redness(red_image(0.1))))
    backend = engine.backend
    assert backend.images == 2  # type: ignore[attr-defined]


def test_the_cli_sees_the_colour_backend(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "red.png"
    red_image(1.0).save(path)
    with colour_host():
        result = CliRunner().invoke(cli, ["assess", str(path), "-b", "colour", "-o", "category=O3"])
    assert result.exit_code == 0, result.output
    decision = json.loads(result.stdout)
    assert (decision["rating"], decision["category_id"]) == ("Unsafe", "O3")
