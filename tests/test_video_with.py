"""Videos together with the other per-item features: a calibration applies to every frame
before the frames are aggregated, and a shadow policy judges the same video by its own rules.

The colour backend rates red frames Unsafe (tests/colour_backend.py); the videos are encoded
with PyAV (tests/video_files.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from policy_engine import Engine
from policy_engine.calibration import Calibration, FittedFor
from policy_engine.verdict import Decision
from tests.colour_backend import ColourBackend, colour_host
from tests.video_files import grey_video


@pytest.fixture
def host() -> Any:
    with colour_host() as colour:
        yield colour


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    """3 s at 10 frames/s, frame 20 (t = 2.0 s) red; sampled at 1 frame/s: 3 frames."""
    path = tmp_path / "clip.mp4"
    path.write_bytes(grey_video(seconds=3, fps=10, red={20}))
    return path


def policy(tmp_path: Path, name: str, **blocks: Any) -> Path:
    lines = ["extends: llavaguard", f"id: {name}"]
    lines += [f"{key}: {json.dumps(value)}" for key, value in blocks.items()]
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_frame_is_calibrated_before_the_frames_are_aggregated(host: Any, clip: Path) -> None:
    plain = Engine("llavaguard", "colour", mode="score", host=host)
    # isotonic: raw scores up to 0.95 map under 0.5, so the red frame (raw ~1) stays Unsafe
    # only if its calibrated score is read, and every other frame's score changes
    calibration = Calibration.make(
        "isotonic",
        {"x": [0.0, 0.95, 1.0], "y": [0.0, 0.4, 1.0]},
        FittedFor.of(plain.compiled, plain.mode, "colour"),
    )
    calibrated = Engine("llavaguard", "colour", mode="score", host=host, calibration=calibration)
    raw, decision = plain.assess(clip).verdict, calibrated.assess(clip).verdict
    assert raw.parts is not None and decision.parts is not None
    assert [p.index for p in decision.parts] == [p.index for p in raw.parts] == [0, 1, 2]
    for before, after in zip(raw.parts, decision.parts, strict=True):
        assert before.p_unsafe is not None
        assert after.p_unsafe == pytest.approx(calibration(before.p_unsafe))
        assert after.rating == ("Unsafe" if calibration(before.p_unsafe) >= 0.5 else "Safe")
    assert decision.deciding_part == 2 and decision.rating == "Unsafe"
    assert decision.calibration == {"name": calibration.name, "hash": calibration.hash}
    assert decision.p_unsafe_raw == pytest.approx(raw.parts[2].p_unsafe)


def test_a_shadow_policy_aggregates_the_same_frames_by_its_own_rule(
    host: Any, clip: Path, tmp_path: Path
) -> None:
    # same prompt, so the live answers are read again; its rule needs 2 Unsafe frames of 3
    strict = policy(tmp_path, "two-frames", aggregation={"rule": "k-of-n", "k": 2})
    engine = Engine("llavaguard", "colour", host=host, shadow=strict)
    decision = engine.assess(clip)
    assert decision.rating == "Unsafe" and decision.verdict.deciding_part == 2
    (shadow,) = decision.shadow or []
    assert (shadow.kind, shadow.source, shadow.reused_answer) == ("policy", "two-frames", True)
    assert shadow.rating == "Safe"
    assert ColourBackend.made[-1].images == 3  # no second call for the shadow


def answers(decisions: list[Decision]) -> list[tuple[Any, ...]]:
    rows = []
    for decision in decisions:
        (shadow,) = decision.shadow or []
        rows.append((decision.rating, decision.verdict.deciding_part, shadow.rating))
    return rows


def test_a_shadow_policy_with_its_own_prompt_judges_every_frame_itself(
    host: Any, clip: Path, tmp_path: Path
) -> None:
    grey = tmp_path / "grey.mp4"
    grey.write_bytes(grey_video(seconds=2, fps=10))
    items = [clip, grey, clip]  # 3 + 2 + 3 frames, over batches of 4
    engine = Engine("llavaguard", "colour", host=host, shadow="children-platform", batch_size=4)
    backend = ColourBackend.made[-1]
    decisions = list(engine.assess_many(items))
    assert backend.images == 2 * 8  # every frame twice: live, then the shadow's own call
    red, grey_answer = ("Unsafe", 2, "Unsafe"), ("Safe", 0, "Safe")
    assert answers(decisions) == [red, grey_answer, red]
    for decision in decisions:
        assert decision.shadow is not None and decision.shadow[0].reused_answer is False

    async def run() -> list[Decision]:
        return [d async for d in engine.aassess_many(items)]

    assert answers(asyncio.run(run())) == answers(decisions)
    assert backend.images == 4 * 8
