"""Audits over videos and posts: one row per video or post, keeping its parts; the report shows
the flagged frames (with a thumbnail of the deciding one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from policy_engine.audit.sources import Source
from policy_engine.audit.store import ResultStore
from policy_engine.cli import cli
from tests.colour_backend import colour_host, red_image
from tests.video_files import grey_video


@pytest.fixture(autouse=True)
def colour() -> Any:
    with colour_host() as host:
        yield host


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    root.mkdir()
    (root / "a-red.mp4").write_bytes(grey_video(seconds=3, fps=10, red={20}))
    (root / "b-grey.webm").write_bytes(grey_video(seconds=2, fps=10, container="matroska"))
    (root / "c-notes.mp4").write_text("not a video")
    red_image(0.0).save(root / "d.png")
    return root


def audit(source: Path, out: Path) -> Any:
    return CliRunner().invoke(cli, ["audit", str(source), "-b", "colour", "--out", str(out)])


def test_a_folder_of_videos_gives_one_row_per_video_naming_the_frame(
    folder: Path, tmp_path: Path
) -> None:
    assert [item.id for item in Source.open(str(folder)).items()] == [
        "a-red.mp4",
        "b-grey.webm",
        "c-notes.mp4",
        "d.png",
    ]
    out = tmp_path / "r.db"
    result = audit(folder, out)
    assert result.exit_code == 1, result.output  # c-notes.mp4 is an error row
    with ResultStore(out) as store:
        rows = {row.id: row for row in store.rows()}
    red = rows["a-red.mp4"]
    assert (red.rating, red.category_id) == ("Unsafe", "O1")
    verdict = red.decision["verdict"]
    assert verdict["deciding_part"] == 2
    assert verdict["parts"][2]["timestamp"] == pytest.approx(2.0)
    assert [p["rating"] for p in verdict["parts"]] == ["Safe", "Safe", "Unsafe"]
    assert rows["b-grey.webm"].rating == "Safe"
    assert rows["c-notes.mp4"].error is not None and "not a video" in rows["c-notes.mp4"].error
    assert rows["d.png"].decision["verdict"].get("parts") is None


def test_a_manifest_row_with_a_list_of_images_is_one_post(tmp_path: Path) -> None:
    red_image(1.0).save(tmp_path / "red.png")
    red_image(0.0).save(tmp_path / "grey.png")
    manifest = tmp_path / "posts.jsonl"
    rows = [
        {"id": "post-1", "image": ["grey.png", "red.png"], "audience": "adults"},
        {"id": "post-2", "image": ["grey.png", "grey.png"]},
        {"id": "single", "image": "grey.png"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.db"
    result = audit(manifest, out)
    assert result.exit_code == 0, result.output
    with ResultStore(out) as store:
        found = {row.id: row for row in store.rows()}
    assert set(found) == {"post-1", "post-2", "single"}
    post = found["post-1"]
    assert post.rating == "Unsafe" and post.source == "post post-1 (2 images)"
    assert post.decision["verdict"]["deciding_part"] == 1
    assert post.decision["verdict"]["parts"][1]["source"] == str(tmp_path / "red.png")
    assert post.decision["metadata"] == {"audience": "adults"}
    assert found["post-2"].rating == "Safe"


def test_a_manifest_list_must_hold_paths(tmp_path: Path) -> None:
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(json.dumps({"image": ["a.png", 3]}) + "\n")
    result = audit(manifest, tmp_path / "r.db")
    assert result.exit_code == 2
    assert "non-empty list of non-empty strings" in result.output


def test_the_report_shows_the_flagged_frames(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.db"
    audit(folder, out)
    html = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["report", str(out), "--html", str(html)])
    assert result.exit_code == 0, result.output
    assert "Flagged videos and posts" in result.stdout
    assert "frame 2 at 2.00 s" in result.stdout
    page = html.read_text()
    assert "frame 2 at 2.00 s" in page
    # the deciding frame's thumbnail, decoded from the video (not a placeholder)
    end = page.index("<code>a-red.mp4</code>")
    figure = page[page.rindex("<figure", 0, end) : end]
    assert "data:image/jpeg;base64," in figure
    summary = json.loads(CliRunner().invoke(cli, ["report", str(out), "--json"]).stdout)
    examples = [e for c in summary["categories"].values() for e in c["examples"]]
    (flagged,) = [e for e in examples if e["id"] == "a-red.mp4"]
    assert flagged["parts"][0] == {
        "index": 2,
        "timestamp": pytest.approx(2.0),
        "source": f"{folder / 'a-red.mp4'}#t=2.000",
        "p_unsafe": pytest.approx(flagged["p_unsafe"]),
        "deciding": True,
    }
