"""`audit --executor ray` and `policy_engine.ray.assess_dataset` on one local Ray per module.

The driver-kill test runs its driver as a subprocess joined to this module's Ray (so Ray's own
processes are the fixture's, shut down at the end); a killed driver's actors are Ray's to end.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from PIL import Image  # noqa: E402
from ray_helpers import CrashOnceBackend, register_by_value  # noqa: E402
from support import run_cli  # noqa: E402

from policy_engine import Engine  # noqa: E402
from policy_engine.audit.ray_executor import RaySettings, run_ray_audit  # noqa: E402
from policy_engine.audit.sources import Source  # noqa: E402
from policy_engine.audit.store import ResultStore, StoreError  # noqa: E402
from policy_engine.ray import LOCAL_SYSTEM_CONFIG, assess_dataset  # noqa: E402

# Ray's own DataContext warns about its deprecated fields whenever it is copied to a worker
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
TESTS = Path(__file__).resolve().parent
STATIC = ["-b", "static", "-o", "rating=Unsafe", "-o", "category=O2", "-o", "p_unsafe=0.8"]


@pytest.fixture(scope="module")
def ray_address(tiny_cache: Path) -> Iterator[str]:
    """A local Ray with 4 logical CPUs (on 2 cores: room for actors and Ray Data's read
    tasks), started after the tiny-model cache is in the environment its workers inherit."""
    if ray.is_initialized():  # pragma: no cover - another module left one running
        ray.shutdown()
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


def png(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (index * 37 % 256, index * 91 % 256, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def make_folder(root: Path, count: int, *, bad: tuple[int, ...] = (), gate: int | None = None):
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        name = f"{index:04d}{'-gate' if index == gate else ''}.png"
        (root / name).write_bytes(b"not an image" if index in bad else png(index))
    return root


def rows(path: Path) -> dict[str, dict[str, Any]]:
    with ResultStore(path) as store:
        found = list(store.rows())
        assert len(found) == store.count() == len({row.id for row in found})
        return {row.id: {"ok": row.ok, "decision": row.decision} for row in found}


def what_the_model_said(row: dict[str, Any]) -> tuple[Any, ...]:
    verdict = row["decision"]["verdict"]
    return (row["ok"], verdict.get("rating"), verdict.get("category"), verdict.get("rationale"))


def committed(path: Path) -> int:
    try:
        with ResultStore(path) as store:
            return store.count()
    except (StoreError, Exception):  # not created yet, or mid-creation
        return 0


def test_ray_audit_gives_the_local_verdicts_and_error_rows(
    ray_address: str, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path / "imgs", 7, bad=(3,))
    common = ["audit", str(folder), "-m", "tiny-random", "--no-progress"]
    local = run_cli(*common, "--out", str(tmp_path / "local.db"))
    distributed = run_cli(
        *common,
        "--out",
        str(tmp_path / "ray.db"),
        "--executor",
        "ray",
        "--ray-address",
        ray_address,
        "--workers",
        "2",
        "--cpus-per-worker",
        "0.5",
    )
    assert local.returncode == distributed.returncode == 1, distributed.stderr  # an error row
    assert "1 of 7 rows are errors" in distributed.stderr
    assert "Traceback" not in distributed.stderr
    want, got = rows(tmp_path / "local.db"), rows(tmp_path / "ray.db")
    assert set(got) == set(want) == {f"{i:04d}.png" for i in range(7)}
    assert {i: what_the_model_said(r) for i, r in got.items()} == {
        i: what_the_model_said(r) for i, r in want.items()
    }
    assert not got["0003.png"]["ok"]
    assert "not a recognised image" in got["0003.png"]["decision"]["verdict"]["error"]["message"]
    with ResultStore(tmp_path / "ray.db") as store:
        meta = store.meta
    assert meta["executor"] == "ray" and meta["total"] == "7" and "finished" in meta
    report = run_cli("report", str(tmp_path / "ray.db"))
    assert report.returncode == 0, report.stderr


DRIVER = """
import sys
sys.path[:0] = [{tests!r}]
from ray_helpers import GatedBackend, register_by_value
from policy_engine import Engine
from policy_engine.audit.ray_executor import RaySettings, run_ray_audit
from policy_engine.audit.sources import Source
from policy_engine.audit.store import ResultStore
register_by_value()
engine = Engine("llavaguard", GatedBackend(gate={gate!r}))
with ResultStore({out!r}, create=True) as store:
    stats = run_ray_audit(engine, Source.open({folder!r}), store,
                          RaySettings(address={address!r}, workers=2, cpus_per_worker=0.5))
print(stats.assessed)
"""


def test_a_driver_killed_with_sigkill_resumes_with_every_input_once(
    ray_address: str, tmp_path: Path
) -> None:
    total = 100
    folder = make_folder(tmp_path / "imgs", total, gate=total - 1)
    gate, out = tmp_path / "gate", tmp_path / "r.db"
    gate.touch()  # the batch holding the last image waits while this exists
    script = DRIVER.format(
        tests=str(TESTS), gate=str(gate), out=str(out), folder=str(folder), address=ray_address
    )
    driver = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        while committed(out) < 1:
            assert driver.poll() is None, driver.communicate()[1].decode()[-2000:]
            time.sleep(0.05)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    before = committed(out)
    assert 1 <= before < total  # the gated image cannot have been judged
    gate.unlink()
    again = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert int(again.stdout.split()[-1]) == total - before  # only the missing ones
    assert set(rows(out)) == {p.name for p in folder.iterdir()}


def test_a_worker_that_dies_mid_batch_is_retried_with_nothing_lost_or_doubled(
    ray_address: str, tmp_path: Path
) -> None:
    register_by_value()
    folder = make_folder(tmp_path / "imgs", 40)
    marker = tmp_path / "crashed"
    engine = Engine("llavaguard", CrashOnceBackend(marker=str(marker)))
    with ResultStore(tmp_path / "r.db", create=True) as store:
        stats = run_ray_audit(
            engine, Source.open(str(folder)), store, RaySettings(workers=2, cpus_per_worker=0.5)
        )
    assert marker.exists()  # a worker did die
    assert stats.assessed == 40 and stats.errors == 0 and not stats.interrupted
    assert set(rows(tmp_path / "r.db")) == {p.name for p in folder.iterdir()}


def test_a_backend_that_cannot_load_in_the_workers_is_one_user_error(
    ray_address: str, tmp_path: Path
) -> None:
    from policy_engine.errors import PolicyEngineError

    folder = make_folder(tmp_path / "imgs", 2)
    engine = Engine("llavaguard", "transformers", backend_options={"model": str(tmp_path)})
    with ResultStore(tmp_path / "r.db", create=True) as store:
        with pytest.raises(PolicyEngineError, match="a Ray worker failed: model ") as caught:
            run_ray_audit(engine, Source.open(str(folder)), store, RaySettings(cpus_per_worker=0.5))
        assert store.count() == 0
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)


def test_assess_dataset_adds_verdict_columns_and_error_rows(ray_address: str) -> None:
    items = [{"key": f"k{i}", "image": png(i)} for i in range(4)]
    items.append({"key": "broken", "image": b"not an image"})
    ds = ray.data.from_items(items)
    judged = assess_dataset(
        ds,
        "llavaguard",
        "static",
        backend_options={"rating": "Unsafe", "category": "O2", "p_unsafe": 0.8},
        workers=2,
        cpus_per_worker=0.5,
    )
    found = {row["key"]: row for row in judged.take_all()}
    assert set(found) == {"k0", "k1", "k2", "k3", "broken"}
    hashes = {row["policy_hash"] for row in found.values()}
    assert len(hashes) == 1 and Engine("llavaguard", "static").compiled.hash in hashes
    for key in ("k0", "k1", "k2", "k3"):
        row = found[key]
        assert (row["rating"], row["category"], row["p_unsafe"], row["error"]) == (
            "Unsafe",
            "O2",
            0.8,
            "",
        )
        assert row["model"] == "static" and row["image"] == png(int(key[1:]))
        assert (row["policy_id"], row["policy_version"]) == ("llavaguard", "1.2")
    broken = found["broken"]
    assert broken["rating"] == "" and broken["error"].startswith("image: cannot load image")


def test_assess_dataset_refuses_a_bad_backend_option_in_the_caller(ray_address: str) -> None:
    from policy_engine.errors import PolicyEngineError

    with pytest.raises(PolicyEngineError, match="rating"):
        assess_dataset(
            ray.data.from_items([{"image": png(1)}]),
            "llavaguard",
            "static",
            backend_options={"rating": "Maybe"},
        )


def test_results_meta_of_a_ray_audit_match_a_local_audits_identity(
    ray_address: str, tmp_path: Path
) -> None:
    """A local audit's results file can be continued with --executor ray and back."""
    folder = make_folder(tmp_path / "imgs", 3)
    out = tmp_path / "r.db"
    first = run_cli("audit", str(folder), *STATIC, "--out", str(out))
    assert first.returncode == 0, first.stderr
    (folder / "0003.png").write_bytes(png(3))
    second = run_cli(
        "audit", str(folder), *STATIC, "--out", str(out), "--executor", "ray",
        "--ray-address", ray_address, "--cpus-per-worker", "0.5",
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["run"]["assessed"] == 1
    assert set(rows(out)) == {f"{i:04d}.png" for i in range(4)}


def test_retry_errors_and_merge_work_on_ray_results(ray_address: str, tmp_path: Path) -> None:
    """Shards may run on different executors; merge and --retry-errors read one ledger."""
    folder = make_folder(tmp_path / "imgs", 6, bad=(2, 5))
    ray_args = ["--executor", "ray", "--ray-address", ray_address, "--cpus-per-worker", "0.5"]
    shards = [tmp_path / "s1.db", tmp_path / "s2.db"]
    first = run_cli("audit", str(folder), *STATIC, "--shard", "1/2", "--out", str(shards[0]))
    second = run_cli(
        "audit", str(folder), *STATIC, "--shard", "2/2", "--out", str(shards[1]), *ray_args
    )
    assert "Traceback" not in first.stderr + second.stderr, second.stderr
    assert sum(json.loads(r.stdout)["errors"] for r in (first, second)) == 2  # the bad files
    for index in (2, 5):  # the bad files, fixed
        (folder / f"{index:04d}.png").write_bytes(png(index))
    for shard, number in zip(shards, ("1/2", "2/2"), strict=True):
        retried = run_cli(
            "audit", str(folder), *STATIC, "--shard", number, "--out", str(shard),
            "--retry-errors", *ray_args,
        )  # fmt: skip
        assert retried.returncode == 0, retried.stderr
    merged = run_cli(
        "merge", *map(str, shards), "--out", str(tmp_path / "all.db"), "--source", str(folder)
    )
    assert merged.returncode == 0, merged.stderr
    found = rows(tmp_path / "all.db")
    assert set(found) == {f"{i:04d}.png" for i in range(6)}
    assert all(row["ok"] for row in found.values())


def test_a_small_job_is_cut_into_a_block_per_worker_and_a_large_one_per_call() -> None:
    from policy_engine.audit.ray_executor import MAX_BLOCKS, ROWS_PER_CALL, block_count

    assert block_count(12, 2) == 2  # was 1: one of two actors stayed idle
    assert block_count(1, 4) == 1
    assert block_count(10 * ROWS_PER_CALL, 2) == 10
    assert block_count(10 * ROWS_PER_CALL + 1, 2) == 11
    assert block_count(ROWS_PER_CALL * (MAX_BLOCKS + 5), 8) == MAX_BLOCKS


def test_a_local_ray_we_start_runs_its_workers_at_normal_priority(tmp_path: Path) -> None:
    """Ray starts workers at niceness 15: beside other work they starved (5 min for 12 photos)."""
    script = (
        "import os\n"
        "from policy_engine.ray import ray_session\n"
        "with ray_session(None, num_cpus=1) as ray:\n"
        "    print(ray.get(ray.remote(lambda: os.nice(0)).remote()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(os.nice(0))]
