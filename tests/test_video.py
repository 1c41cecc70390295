"""Videos and posts: one item in, one Verdict out, naming the frame (or image) that decided.

The videos are encoded here with PyAV (grey, red frames at known indices) and judged by the
colour backend, which rates exactly the red frames Unsafe.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from policy_engine import Engine, Post, VideoLimits
from policy_engine.cli import cli
from policy_engine.errors import PolicyError
from policy_engine.host import get_host
from policy_engine.loader import load_policy
from policy_engine.video import is_video, load_video, sniff_video
from tests.colour_backend import ColourBackend, colour_host, red_image
from tests.video_files import grey_video, huge_declared_avi


def policy_file(tmp_path: Path, **blocks: dict[str, Any]) -> Path:
    """A policy extending llavaguard with the given blocks (video:, aggregation:)."""
    lines = ["extends: llavaguard", "id: video-test"]
    for key, block in blocks.items():
        lines.append(f"{key}: {json.dumps(block)}")
    path = tmp_path / "video-policy.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def engine(policy: Any = "llavaguard", **kwargs: Any) -> Engine:
    return Engine(policy, "colour", host=get_host(), **kwargs)


@pytest.fixture(autouse=True)
def colour() -> Any:
    with colour_host() as host:
        yield host


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    """3 s at 10 frames/s, frame 20 (t = 2.0 s) red."""
    path = tmp_path / "clip.mp4"
    path.write_bytes(grey_video(seconds=3, fps=10, red={20}))
    return path


# -- the deciding frame -------------------------------------------------------------------------


def test_default_sampling_finds_the_red_frame_and_its_time(clip: Path) -> None:
    with engine() as e:
        decision = e.assess(clip)
    verdict = decision.verdict
    assert decision.rating == "Unsafe" and decision.category_id == "O1"
    assert verdict.aggregation == "any-unsafe"
    assert verdict.source == str(clip)
    assert verdict.parts is not None
    # default: 1 frame per second -> t = 0, 1, 2
    assert [p.timestamp for p in verdict.parts] == pytest.approx([0.0, 1.0, 2.0])
    assert [p.rating for p in verdict.parts] == ["Safe", "Safe", "Unsafe"]
    assert verdict.deciding_part == 2
    assert verdict.parts[2].source == f"{clip}#t=2.000"
    assert verdict.rationale is not None and verdict.rationale.startswith("redness")
    assert verdict.p_unsafe == verdict.parts[2].p_unsafe


def test_every_frame_sampled_names_the_first_red_frame(tmp_path: Path) -> None:
    path = tmp_path / "two-red.mp4"
    path.write_bytes(grey_video(seconds=3, fps=10, red={12, 25}))
    with engine(policy_file(tmp_path, video={"fps": 10, "max_frames": 100})) as e:
        verdict = e.assess(path).verdict
    assert verdict.parts is not None and len(verdict.parts) == 30
    unsafe = [p.index for p in verdict.parts if p.rating == "Unsafe"]
    assert unsafe == [12, 25]
    assert verdict.deciding_part == 12
    assert verdict.parts[12].timestamp == pytest.approx(1.2)


def test_a_grey_video_is_safe_and_names_no_unsafe_frame(tmp_path: Path) -> None:
    path = tmp_path / "grey.mkv"
    path.write_bytes(grey_video(seconds=2, fps=5, container="matroska"))
    with engine() as e:
        decision = e.assess(path)
    assert decision.rating == "Safe" and decision.category_id == "NA"
    assert decision.verdict.parts is not None
    assert {p.rating for p in decision.verdict.parts} == {"Safe"}


def test_max_frames_spreads_the_samples_over_the_whole_video(tmp_path: Path) -> None:
    path = tmp_path / "long.mp4"
    path.write_bytes(grey_video(seconds=4, fps=10, red={38}))  # red at 3.8 s
    with engine(policy_file(tmp_path, video={"fps": 10, "max_frames": 4})) as e:
        verdict = e.assess(path).verdict
    assert verdict.parts is not None
    assert [p.timestamp for p in verdict.parts] == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert verdict.rating == "Safe"  # 3.8 s falls between samples: sampling is a trade-off


def test_scene_change_sampling_catches_a_red_frame_between_samples(tmp_path: Path) -> None:
    path = tmp_path / "flash.mp4"
    path.write_bytes(grey_video(seconds=3, fps=10, red={15}))  # 1.5 s: between 1 s samples
    with engine(policy_file(tmp_path, video={"fps": 1})) as e:
        assert e.assess(path).rating == "Safe"
    with engine(policy_file(tmp_path, video={"fps": 1, "scene_change": 0.1})) as e:
        verdict = e.assess(path).verdict
    assert verdict.rating == "Unsafe"
    assert verdict.parts is not None and verdict.deciding_part is not None
    assert verdict.parts[verdict.deciding_part].timestamp == pytest.approx(1.5)


def test_video_bytes_and_data_urls_are_recognised_by_content(tmp_path: Path) -> None:
    data = grey_video(seconds=1, fps=5, red={0})
    disguised = tmp_path / "clip.bin"
    disguised.write_bytes(data)
    assert sniff_video(data[:512]) == "mov"
    assert is_video(data) and is_video(disguised)
    with engine() as e:
        decisions = list(e.assess_many([data, disguised]))
    assert [d.rating for d in decisions] == ["Unsafe", "Unsafe"]
    assert all(d.verdict.deciding_part == 0 for d in decisions)


# -- aggregation rules --------------------------------------------------------------------------


@pytest.fixture
def two_red(tmp_path: Path) -> Path:
    path = tmp_path / "two.mp4"
    path.write_bytes(grey_video(seconds=2, fps=5, red={3, 7}))  # 10 frames, 2 red
    return path


@pytest.mark.parametrize(
    ("k", "rating", "deciding"), [(2, "Unsafe", 3), (3, "Safe", None)], ids=["2-of-10", "3-of-10"]
)
def test_k_of_n(tmp_path: Path, two_red: Path, k: int, rating: str, deciding: int | None) -> None:
    blocks = {"video": {"fps": 5}, "aggregation": {"rule": "k-of-n", "k": k, "threshold": 0.7}}
    with engine(policy_file(tmp_path, **blocks)) as e:
        verdict = e.assess(two_red).verdict
    assert verdict.rating == rating
    assert verdict.aggregation == f"k-of-n:{k}/10@0.7"
    if deciding is not None:
        assert verdict.deciding_part == deciding
    else:  # Safe: names the likeliest frame, a red one, and takes the none-applying category
        assert verdict.deciding_part in (3, 7)
        assert verdict.category_id == "NA"


def test_max_score_flags_a_frame_the_model_rated_safe(tmp_path: Path) -> None:
    path = tmp_path / "pinkish.mp4"
    # redness ~0.4: P(Unsafe) ~0.23, rated Safe by the model
    path.write_bytes(grey_video(seconds=2, fps=5, red={4}, redness=0.4))
    with engine(policy_file(tmp_path, video={"fps": 5})) as e:
        assert e.assess(path).rating == "Safe"  # any-unsafe: no frame rated Unsafe
    blocks = {"video": {"fps": 5}, "aggregation": {"rule": "max-score", "threshold": 0.1}}
    with engine(policy_file(tmp_path, **blocks)) as e:
        decision = e.assess(path)
    verdict = decision.verdict
    assert verdict.parts is not None
    assert verdict.parts[4].rating == "Safe" and (verdict.parts[4].p_unsafe or 0) > 0.1
    assert (decision.rating, decision.category_id, verdict.deciding_part) == ("Unsafe", "O1", 4)
    assert verdict.aggregation == "max-score@0.1"
    assert verdict.severity is not None


# -- posts --------------------------------------------------------------------------------------


def test_a_post_is_one_verdict_naming_its_unsafe_image() -> None:
    grey, red = red_image(0.0), red_image(1.0)
    with engine() as e:
        unsafe, safe = list(e.assess_many([Post([grey, red, grey]), Post([grey, grey])]))
    assert unsafe.rating == "Unsafe" and unsafe.verdict.deciding_part == 1
    assert unsafe.verdict.parts is not None
    assert [p.rating for p in unsafe.verdict.parts] == ["Safe", "Unsafe", "Safe"]
    assert all(p.timestamp is None for p in unsafe.verdict.parts)
    assert safe.rating == "Safe" and safe.verdict.parts is not None
    assert len(safe.verdict.parts) == 2


def test_a_post_with_an_unreadable_image_is_an_error_unless_another_is_unsafe() -> None:
    grey, red = red_image(0.0), red_image(1.0)
    with engine() as e:
        failed, flagged = list(e.assess_many([Post([grey, b"not an image"]), Post([red, b"x"])]))
    assert failed.rating is None and failed.verdict.error is not None  # never a silent Safe
    assert "1 of 2 parts could not be judged" in failed.verdict.error.message
    assert failed.verdict.parts is not None and failed.verdict.parts[1].error is not None
    assert flagged.rating == "Unsafe" and flagged.verdict.deciding_part == 0


def test_a_post_over_the_limit_is_an_error() -> None:
    with engine(max_post_images=2) as e:
        decision = e.assess(Post([red_image(0.0)] * 3, source="post-7"))
    assert decision.verdict.error is not None
    assert "3 images is over the limit of 2" in decision.verdict.error.message
    assert decision.verdict.source == "post-7"


def test_single_images_are_judged_as_before() -> None:
    with engine() as e:
        decision = e.assess(red_image(1.0))
    assert decision.verdict.parts is None
    assert decision.verdict.aggregation is None and decision.verdict.deciding_part is None
    assert "parts" not in decision.model_dump(exclude_none=True)["verdict"]


# -- batching -----------------------------------------------------------------------------------


def test_frames_fill_backend_batches_with_other_items(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(grey_video(seconds=3, fps=10, red={29}))
    items = [red_image(1.0), path, Post([red_image(0.0), red_image(0.0)]), red_image(0.0)]
    with engine(policy_file(tmp_path, video={"fps": 10, "max_frames": 100}), batch_size=8) as e:
        decisions = list(e.assess_many(items))
        backend = e.backend
    assert isinstance(backend, ColourBackend)
    assert backend.images == 1 + 30 + 2 + 1
    assert backend.calls == 5  # ceil(34 / 8): frames share calls with the images around them
    assert [d.rating for d in decisions] == ["Unsafe", "Unsafe", "Safe", "Safe"]
    assert decisions[1].verdict.deciding_part == 29


def test_the_async_path_gives_the_same_verdicts(clip: Path) -> None:
    async def run(e: Engine) -> list[Any]:
        return [d async for d in e.aassess_many([clip, Post([red_image(1.0)]), red_image(0.0)])]

    with engine(batch_size=2) as e:
        sync = list(e.assess_many([clip, Post([red_image(1.0)]), red_image(0.0)]))
        found = asyncio.run(run(e))
    strip = {"timings"}
    assert [d.verdict.model_dump(exclude=strip) for d in found] == [
        d.verdict.model_dump(exclude=strip) for d in sync
    ]


# -- hostile input ------------------------------------------------------------------------------


def error_of(source: Any, **kwargs: Any) -> str:
    with engine(**kwargs) as e:
        decision = e.assess(source)
    assert decision.rating is None
    assert decision.verdict.error is not None
    assert decision.verdict.error.kind == "image"
    return decision.verdict.error.message


def test_a_zero_byte_video_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    assert error_of(path) == f"cannot load video {path}: empty file"


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.1], ids=["half", "most", "the-head"])
def test_a_truncated_video_is_an_error(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "cut.mp4"
    data = grey_video(seconds=4, fps=10)
    path.write_bytes(data[: int(len(data) * keep)])
    assert "truncated" in error_of(path)


def test_a_text_file_named_mp4_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 20)
    message = error_of(path)
    assert message.startswith(f"cannot load video {path}: not a video")


def test_huge_declared_dimensions_are_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "huge.avi"
    path.write_bytes(huge_declared_avi(12000, 12000))
    assert "frames too large (12000x12000" in error_of(path)


def test_a_video_over_the_duration_limit_is_an_error(clip: Path) -> None:
    assert "too long (3.0 s, limit 2 s)" in error_of(clip, video_limits=VideoLimits(max_seconds=2))


def test_other_limits(clip: Path) -> None:
    assert "too large" in error_of(clip, video_limits=VideoLimits(max_bytes=100))
    assert "frames too large" in error_of(clip, video_limits=VideoLimits(max_pixels=1000))
    assert "too many frames" in error_of(clip, video_limits=VideoLimits(max_decoded_frames=5))


def test_a_bad_video_is_one_item_error_among_good_ones(tmp_path: Path, clip: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64)  # a header and nothing else
    with engine() as e:
        decisions = list(e.assess_many([clip, bad, red_image(1.0)]))
    assert [d.rating for d in decisions] == ["Unsafe", None, "Unsafe"]


def test_load_video_never_trusts_the_extension_alone(tmp_path: Path) -> None:
    from policy_engine.policy import VideoOptions

    path = tmp_path / "fake.mkv"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + b"\x00" * 100)
    with pytest.raises(Exception, match="not a video"):
        load_video(path, VideoOptions(), VideoLimits(), max_pixels=10**6)


# -- policy blocks and the CLI ------------------------------------------------------------------


def test_the_blocks_change_the_hash_only_when_present(tmp_path: Path) -> None:
    from policy_engine.compiler import _policy_data

    plain = load_policy(policy_file(tmp_path))
    with_video = load_policy(policy_file(tmp_path, video={"fps": 2}))
    assert not {"video", "aggregation"} & set(_policy_data(plain))
    assert get_host().compile(plain).hash != get_host().compile(with_video).hash


def test_a_bad_video_block_is_a_located_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="video"):
        load_policy(policy_file(tmp_path, video={"fps": 0}))
    with pytest.raises(PolicyError, match="aggregation"):
        load_policy(policy_file(tmp_path, aggregation={"rule": "most"}))


def test_cli_assess_a_clip_names_the_deciding_frame(clip: Path) -> None:
    result = CliRunner().invoke(cli, ["assess", str(clip), "-b", "colour"])
    assert result.exit_code == 0, result.output
    decision = json.loads(result.stdout)
    verdict = decision["verdict"]
    assert decision["rating"] == "Unsafe"
    assert verdict["deciding_part"] == 2
    assert verdict["parts"][2]["timestamp"] == pytest.approx(2.0)
    table = CliRunner().invoke(cli, ["assess", str(clip), "-b", "colour", "--format", "table"])
    assert "deciding part 2 at 2.00 s" in table.stdout


def test_cli_assess_a_text_file_named_mp4_exits_1_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("hello")
    result = CliRunner().invoke(cli, ["assess", str(path), "-b", "colour"])
    assert result.exit_code == 1
    assert "not a video" in json.loads(result.stdout)["verdict"]["error"]["message"]


def test_a_child_policy_overlays_the_parents_video_block_key_by_key(tmp_path: Path) -> None:
    parent = tmp_path / "parent.yaml"
    parent.write_text("extends: llavaguard\nid: parent\nvideo: {fps: 2, max_frames: 5}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\nid: child\nvideo: {fps: 4}\n")
    video = load_policy(child).video
    assert video is not None and (video.fps, video.max_frames) == (4, 5)


def test_cli_video_limits(clip: Path) -> None:
    over = CliRunner().invoke(
        cli, ["assess", str(clip), "-b", "colour", "--video-limit", "max_seconds=2"]
    )
    assert over.exit_code == 1
    assert "too long (3.0 s, limit 2 s)" in json.loads(over.stdout)["verdict"]["error"]["message"]
    unknown = CliRunner().invoke(
        cli, ["assess", str(clip), "-b", "colour", "--video-limit", "fps=2"]
    )
    assert unknown.exit_code == 2
    assert "unknown limit 'fps'; limits: max_bytes, max_seconds" in unknown.output


# -- the rules on their own ---------------------------------------------------------------------


def _verdicts(*parts: tuple[str | None, float | None]) -> list[Any]:
    from policy_engine.verdict import Verdict, VerdictError

    compiled = get_host().compile(load_policy("llavaguard"))
    made = []
    for rating, p in parts:
        common = {
            "policy_id": "llavaguard",
            "policy_version": "1",
            "policy_hash": compiled.hash,
            "p_unsafe": p,
        }
        if rating is None:
            error = VerdictError(kind="backend", message="timed out", retryable=True)
            made.append(Verdict(error=error, **common))
        else:
            category = "O1" if rating == "Unsafe" else "NA"
            made.append(Verdict(rating=rating, category_id=category, **common))  # type: ignore[arg-type]
    return made


def _aggregate(rule: dict[str, Any], verdicts: list[Any]) -> Any:
    from policy_engine.aggregate import PartInfo, aggregate
    from policy_engine.policy import AggregationOptions

    compiled = get_host().compile(load_policy("llavaguard"))
    infos = [PartInfo(i, float(i), f"v#t={i}") for i in range(len(verdicts))]
    return aggregate(compiled, AggregationOptions(**rule), infos, verdicts, source="v")


def test_k_of_n_with_a_failed_part_and_too_few_over_the_threshold_is_an_error() -> None:
    verdicts = _verdicts(("Unsafe", 0.9), (None, None), ("Safe", 0.1))
    result = _aggregate({"rule": "k-of-n", "k": 2, "threshold": 0.5}, verdicts)
    assert result.rating is None and result.error is not None
    assert result.error.kind == "backend" and result.error.retryable
    assert result.error.message.startswith("1 of 3 parts could not be judged")
    assert result.aggregation == "k-of-n:2/3@0.5"
    assert [p.error for p in result.parts] == [None, "timed out", None]
    enough = _aggregate({"rule": "k-of-n", "k": 1, "threshold": 0.5}, verdicts)
    assert (enough.rating, enough.deciding_part) == ("Unsafe", 0)  # a finding stands


def test_parts_without_scores_count_by_their_rating() -> None:
    verdicts = _verdicts(("Safe", None), ("Unsafe", None), ("Safe", None))
    result = _aggregate({"rule": "max-score", "threshold": 0.9}, verdicts)
    assert (result.rating, result.deciding_part, result.category_id) == ("Unsafe", 1, "O1")
    safe = _aggregate({"rule": "max-score"}, _verdicts(("Safe", None), ("Safe", None)))
    assert (safe.rating, safe.deciding_part) == ("Safe", 0)
