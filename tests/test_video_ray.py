"""`audit --executor ray` carries videos (as paths) and posts (a manifest row's list of paths):
the same rows, parts and deciding parts as a local audit."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from policy_engine import Engine, VideoLimits  # noqa: E402
from policy_engine.audit.ray_executor import RaySettings, run_ray_audit  # noqa: E402
from policy_engine.audit.runner import run_audit  # noqa: E402
from policy_engine.audit.sources import Source  # noqa: E402
from policy_engine.audit.store import ResultStore  # noqa: E402
from policy_engine.ray import LOCAL_SYSTEM_CONFIG  # noqa: E402
from tests.colour_backend import ColourBackend, red_image  # noqa: E402
from tests.video_files import grey_video  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    if ray.is_initialized():  # pragma: no cover - another module left one running
        ray.shutdown()
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[ColourBackend.__module__])
    context = ray.init(
        num_cpus=4,
        include_dashboard=False,
        logging_level="WARNING",
        _system_config=LOCAL_SYSTEM_CONFIG,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield str(context.address_info["gcs_address"])
    finally:
        ray.shutdown()


def verdicts(path: Path) -> dict[str, Any]:
    with ResultStore(path) as store:
        found = {}
        for row in store.rows():
            verdict = dict(row.decision["verdict"])
            verdict.pop("timings")
            found[row.id] = verdict
        return found


def test_ray_carries_videos_and_posts(ray_address: str, tmp_path: Path) -> None:
    red_image(1.0).save(tmp_path / "red.png")
    red_image(0.0).save(tmp_path / "grey.png")
    (tmp_path / "clip.mp4").write_bytes(grey_video(seconds=3, fps=10, red={20}))
    manifest = tmp_path / "items.jsonl"
    rows = [
        {"id": "post", "image": ["grey.png", "red.png"]},
        {"id": "clip", "image": "clip.mp4"},
        {"id": "one", "image": "grey.png"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    engine = Engine("llavaguard", ColourBackend())
    with ResultStore(tmp_path / "local.db", create=True) as store:
        run_audit(engine, Source.open(str(manifest)), store)
    ColourBackend.made.clear()  # its instances (with locks) would be shipped with the class
    with ResultStore(tmp_path / "ray.db", create=True) as store:
        settings = RaySettings(address=ray_address, workers=1, cpus_per_worker=0.5)
        run_ray_audit(engine, Source.open(str(manifest)), store, settings)
    local, distributed = verdicts(tmp_path / "local.db"), verdicts(tmp_path / "ray.db")
    assert distributed == local
    assert distributed["post"]["deciding_part"] == 1 and distributed["post"]["rating"] == "Unsafe"
    assert distributed["clip"]["deciding_part"] == 2
    assert distributed["one"].get("parts") is None


def test_ray_workers_keep_the_drivers_video_limits(ray_address: str, tmp_path: Path) -> None:
    (tmp_path / "clip.mp4").write_bytes(grey_video(seconds=3, fps=10, red={20}))
    engine = Engine("llavaguard", "static", video_limits=VideoLimits(max_seconds=2))
    with ResultStore(tmp_path / "ray.db", create=True) as store:
        settings = RaySettings(address=ray_address, workers=1, cpus_per_worker=0.5)
        run_ray_audit(engine, Source.open(str(tmp_path / "*.mp4")), store, settings)
        (row,) = store.rows()
    assert row.error is not None and "too long (3.0 s, limit 2 s)" in row.error
