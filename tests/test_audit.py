"""`policy-engine audit`, `merge` and `export`: sources, shards, resume after kills, results."""

from __future__ import annotations

import base64
import io
import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support import run_cli

from policy_engine import Engine
from policy_engine.audit.runner import run_audit
from policy_engine.audit.sources import Shard, Source, SourceError
from policy_engine.audit.store import ResultStore, StoreError
from policy_engine.progress import Progress

STATIC = ["-b", "static", "-o", "rating=Unsafe", "-o", "category=O2", "-o", "p_unsafe=0.8"]


def png(index: int, size: tuple[int, int] = (12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (index % 256, index // 256 % 256, 7)).save(buffer, "PNG")
    return buffer.getvalue()


def make_folder(root: Path, count: int, bad: tuple[int, ...] = ()) -> list[str]:
    """`count` images (a third in a subfolder), some deliberately not images; their ids."""
    ids = []
    for index in range(count):
        relative = f"{'sub/' if index % 3 == 0 else ''}{index:05d}.png"
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not an image" if index in bad else png(index))
        ids.append(relative)
    (root / "notes.txt").write_text("not an image suffix: skipped")
    (root / ".hidden.png").write_bytes(png(1))
    return sorted(ids)


def rows_of(path: Path) -> list[tuple[str, bool]]:
    with ResultStore(path) as store:
        return [(row.id, row.ok) for row in store.rows()]


# -- sources ---------------------------------------------------------------------------------
def test_a_folder_is_walked_recursively_in_order(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 7)
    items = list(Source.open(str(tmp_path / "imgs")).items())
    ids = [item.id for item in items]
    top = ["00001.png", "00002.png", "00004.png", "00005.png"]
    assert ids == [*top, "sub/00000.png", "sub/00003.png", "sub/00006.png"]
    assert [item.seq for item in items] == list(range(7))
    assert all(Path(str(item.image)).is_file() for item in items)
    assert list(Source.open(str(tmp_path / "imgs")).ids()) == ids


def test_a_glob_a_list_and_manifests(tmp_path: Path) -> None:
    make_folder(tmp_path, 4)
    globbed = {i.id for i in Source.open(str(tmp_path / "**" / "*.png")).items()}
    assert {Path(i).name for i in globbed} == {f"{n:05d}.png" for n in range(4)}

    (tmp_path / "list.txt").write_text("# a comment\n00001.png\n\nsub/00000.png\n")
    listed = list(Source.open(str(tmp_path / "list.txt")).items())
    assert [i.id for i in listed] == ["00001.png", "sub/00000.png"]
    assert listed[1].image == str(tmp_path / "sub/00000.png")

    data_url = "data:image/png;base64," + base64.b64encode(png(9)).decode()
    lines = [
        {"id": "a", "path": "00001.png", "audience": "minors"},
        {"image": data_url, "metadata": {"region": "eu"}},
        {"id": "c", "file": str(tmp_path / "00002.png")},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    items = list(Source.open(str(tmp_path / "m.jsonl")).items())
    assert [i.id for i in items] == ["a", data_url, "c"]
    assert items[0].metadata == {"audience": "minors"} and items[1].metadata == {"region": "eu"}
    assert items[1].source == "data:image/png;base64,…"
    assert items[2].image == str(tmp_path / "00002.png")

    (tmp_path / "m.csv").write_text("id,path,audience\nx,00001.png,adults\ny,00002.png,\n")
    items = list(Source.open(str(tmp_path / "m.csv")).items())
    assert [(i.id, i.metadata) for i in items] == [("x", {"audience": "adults"}), ("y", {})]


def test_bad_sources_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or directory"):
        Source.open(str(tmp_path / "missing"))
    (tmp_path / "m.jsonl").write_text('{"path": "a.png"}\n{oops\n')
    with pytest.raises(SourceError, match=r"m.jsonl:2: not JSON"):
        list(Source.open(str(tmp_path / "m.jsonl")).items())
    (tmp_path / "n.jsonl").write_text('{"name": "a.png"}\n')
    with pytest.raises(SourceError, match=r"n.jsonl:1: no image column"):
        list(Source.open(str(tmp_path / "n.jsonl")).items())
    (tmp_path / "x.docx").write_text("")
    with pytest.raises(SourceError, match="unknown kind"):
        Source.open(str(tmp_path / "x.docx"))
    with pytest.raises(SourceError, match="expected I/N"):
        Shard.parse("2of4")
    with pytest.raises(SourceError, match="between 1 and N"):
        Shard.parse("5/4")


def hf_table(count: int, start: int = 0) -> pa.Table:
    images = [{"bytes": png(start + i), "path": f"img{start + i}.png"} for i in range(count)]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table(
        {
            "image": pa.array(images, type=struct),
            "label": pa.array([i % 2 for i in range(count)], type=pa.int64()),
            "caption": pa.array([f"c{start + i}" for i in range(count)]),
        }
    )


def save_to_disk_layout(folder: Path, table: pa.Table) -> None:
    """What `datasets.Dataset.save_to_disk` writes: Arrow IPC stream files and json info."""
    folder.mkdir(parents=True)
    path = str(folder / "data-00000-of-00001.arrow")
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=3):
            writer.write_batch(batch)
    (folder / "dataset_info.json").write_text("{}")
    (folder / "state.json").write_text("{}")


def test_hugging_face_datasets_on_disk_and_parquet(tmp_path: Path) -> None:
    save_to_disk_layout(tmp_path / "ds", hf_table(7))
    items = list(Source.open(str(tmp_path / "ds")).items())
    assert [i.id for i in items] == [f"ds/{n}" for n in range(7)]
    assert items[3].image == png(3)
    assert items[3].metadata == {"label": 1, "caption": "c3"}

    root = tmp_path / "dd"
    save_to_disk_layout(root / "train", hf_table(4))
    save_to_disk_layout(root / "test", hf_table(2, start=4))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    ids = [i.id for i in Source.open(str(root)).items()]
    assert ids == ["train/0", "train/1", "train/2", "train/3", "test/0", "test/1"]

    (tmp_path / "pq").mkdir()
    pq.write_table(hf_table(5), tmp_path / "pq" / "part-0.parquet")
    pq.write_table(hf_table(3, start=5), tmp_path / "pq" / "part-1.parquet")
    items = list(Source.open(str(tmp_path / "pq")).items())
    assert [i.id for i in items][-1] == "part-1/2" and len(items) == 8
    assert items[-1].image == png(7)
    assert len(list(Source.open(str(tmp_path / "pq" / "*.parquet")).items())) == 8
    table = hf_table(2).append_column("id", pa.array(["k1", "k2"]))
    pq.write_table(table, tmp_path / "ided.parquet")
    assert [i.id for i in Source.open(str(tmp_path / "ided.parquet")).items()] == ["k1", "k2"]
    for spec in ("ds", "dd", "pq", "ided.parquet"):  # ids() reads no image, and agrees
        source = Source.open(str(tmp_path / spec))
        assert list(source.ids()) == [item.id for item in source.items()]
    with pytest.raises(SourceError, match="no column 'pixels'"):
        list(Source.open(str(tmp_path / "ided.parquet"), image_column="pixels").items())


def test_shards_cover_every_source_once(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 200)
    source = Source.open(str(tmp_path / "imgs"))
    ids = list(source.ids())
    for count in (1, 2, 3, 7):
        parts = [[i for i in ids if Shard(index, count).holds(i)] for index in range(1, count + 1)]
        assert sorted(i for part in parts for i in part) == sorted(ids)  # each id once
        if count > 1:
            assert all(len(part) < len(ids) for part in parts)
    assert str(Shard(2, 3)) == "2/3" and str(Shard()) == ""


# -- the audit -------------------------------------------------------------------------------
def test_an_audit_writes_every_input_once_with_errors_recorded(tmp_path: Path) -> None:
    ids = make_folder(tmp_path / "imgs", 40, bad=(5, 17))
    result = run_cli("audit", str(tmp_path / "imgs"), *STATIC, "--out", str(tmp_path / "r.db"))
    assert result.returncode == 1, result.stderr  # rows are errors: exit 1, like assess
    summary = json.loads(result.stdout)
    assert (summary["total"], summary["errors"]) == (40, 2)
    assert "error: 2 of 40 rows are errors" in result.stderr
    assert "--retry-errors" not in result.stderr  # an undecodable image stays undecodable
    rows = rows_of(tmp_path / "r.db")
    assert sorted(i for i, _ in rows) == sorted(ids)
    assert {i for i, ok in rows if not ok} == {"00005.png", "00017.png"}
    with ResultStore(tmp_path / "r.db") as store:
        row = store.get("00001.png")
        assert row is not None and row.rating == "Unsafe" and row.p_unsafe == 0.8
        assert row.decision["verdict"]["category_id"] == "O2"
        bad = store.get("00005.png")
        assert bad is not None and bad.error_kind == "image" and "00005.png" in (bad.error or "")
        meta = store.meta
    assert meta["policy_id"] == "llavaguard" and meta["backend"] == "static"
    assert meta["total"] == "40" and "finished" in meta
    assert [c["id"] for c in json.loads(meta["policy"])["categories"]][:2] == ["O1", "O2"]


def test_metadata_reaches_the_post_processors(tmp_path: Path) -> None:
    make_folder(tmp_path, 2)
    lines = [{"id": "kid", "path": "00001.png", "audience": "minors"}, {"path": "00002.png"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "extends: llavaguard\nid: p\npostprocess:\n  - name: rules\n    params:\n      rules:\n"
        "        - {when: {metadata: {audience: minors}}, then: block}\n"
    )
    engine = Engine(str(policy), "static")
    with ResultStore(tmp_path / "r.db", create=True) as store, engine:
        stats = run_audit(engine, Source.open(str(tmp_path / "m.jsonl")), store)
        actions = {row.id: row.actions for row in store.rows()}
    assert actions == {"kid": ["block"], "00002.png": []}
    assert stats.assessed == 2 and stats.skipped == 0


def committed(path: Path) -> int:
    try:
        with ResultStore(path) as store:
            return store.count()
    except (StoreError, sqlite3.Error):  # not created yet, or mid-creation
        return 0


def kill_and_resume(command: list[str], out: Path, total: int, *, seed: int) -> int:
    """Run `command`, SIGKILL it at random moments (once some random number of rows is
    committed, plus a random few milliseconds, so kills land anywhere in a batch), then let
    the last run finish. Returns the number of kills."""
    rng = random.Random(seed)
    kills = 0
    while True:
        done = committed(out)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < 4 and total - done > 200:
            target = rng.randint(done + 1, total - 100)
            while process.poll() is None and committed(out) < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.03))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
                continue
        _, stderr = process.communicate(timeout=120)
        assert process.returncode in (0, 1), stderr  # 1: some inputs are bad images
        assert b"Traceback" not in stderr
        return kills


def test_sigkill_at_random_moments_then_resume_gives_exact_results(tmp_path: Path) -> None:
    ids = make_folder(tmp_path / "imgs", 3000, bad=(10, 1500, 2999))
    script = Path(sys.executable).with_name("policy-engine")
    for seed in range(3):
        out = tmp_path / f"r{seed}.db"
        command = [str(script), "audit", str(tmp_path / "imgs"), *STATIC, "--out", str(out)]
        kills = kill_and_resume(command, out, len(ids), seed=seed)
        assert kills >= 2  # the test only means something if it really interrupted runs
        rows = rows_of(out)
        assert len(rows) == len(ids) and sorted(i for i, _ in rows) == sorted(ids)
        assert Counter(ok for _, ok in rows) == {True: 2997, False: 3}
        with ResultStore(out) as store:
            seqs = [row.seq for row in store.rows()]
            ratings = {row.rating for row in store.rows() if row.ok}
            assert store.meta["total"] == "3000"
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) == 3000
        assert ratings == {"Unsafe"}


def test_ctrl_c_commits_what_is_done_and_says_how_to_continue(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 3000)
    script = Path(sys.executable).with_name("policy-engine")
    out = tmp_path / "r.db"
    command = [str(script), "audit", str(tmp_path / "imgs"), *STATIC, "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Rows committed, not the file's size: in WAL mode the main file grows only at checkpoints,
    # so on a loaded machine its size could pass a bound only once the audit was over.
    while committed(out) < 50:
        time.sleep(0.01)
        if process.poll() is not None:
            pytest.skip("the audit finished before it could be interrupted")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.skip("the audit finished before the signal arrived")
    assert process.returncode == 130, stderr
    assert "run the same command to continue" in stderr and "Traceback" not in stderr
    done = json.loads(stdout)["total"]
    assert 0 < done < 3000 and len(rows_of(out)) == done
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert json.loads(again.stdout)["run"]["skipped"] == done
    assert len(rows_of(out)) == 3000


def test_retry_errors_reruns_only_the_errors(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 12, bad=(4, 7))
    out = tmp_path / "r.db"
    args = ["audit", str(tmp_path / "imgs"), *STATIC, "--out", str(out)]
    assert json.loads(run_cli(*args).stdout)["errors"] == 2
    (tmp_path / "imgs" / "00004.png").write_bytes(png(4))  # fixed; 00007 stays broken
    result = run_cli(*args, "--retry-errors")
    summary = json.loads(result.stdout)
    assert summary["run"]["assessed"] == 2 and summary["run"]["skipped"] == 10
    assert summary["errors"] == 1 and summary["total"] == 12
    assert dict(rows_of(out))["00004.png"] is True


def test_a_results_file_of_another_audit_is_not_continued(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 3)
    out = tmp_path / "r.db"
    assert run_cli("audit", str(tmp_path / "imgs"), *STATIC, "--out", str(out)).returncode == 0
    other = run_cli(
        "audit", str(tmp_path / "imgs"), *STATIC, "-p", "children-platform", "--out", str(out)
    )
    assert other.returncode == 2
    assert other.stderr.startswith(f"error: {out} holds an audit with another policy hash")
    assert other.stderr.count("\n") == 1
    sharded = run_cli("audit", str(tmp_path / "imgs"), *STATIC, "--shard", "1/2", "--out", str(out))
    assert "another shard" in sharded.stderr
    (tmp_path / "junk.db").write_text("this is not sqlite " * 100)
    junk = run_cli("audit", str(tmp_path / "imgs"), *STATIC, "--out", str(tmp_path / "junk.db"))
    assert junk.returncode == 2 and "not a results file" in junk.stderr


# -- shards and merge ------------------------------------------------------------------------
def test_shards_then_merge_cover_the_source_exactly(tmp_path: Path) -> None:
    ids = make_folder(tmp_path / "imgs", 90, bad=(3,))
    shards = []
    for index in (1, 2, 3):
        out = tmp_path / f"s{index}.db"
        result = run_cli(
            "audit", str(tmp_path / "imgs"), *STATIC, "--shard", f"{index}/3", "--out", str(out)
        )
        holds_bad = Shard(index, 3).holds("sub/00003.png")  # the shard with the bad image fails
        assert result.returncode == (1 if holds_bad else 0), result.stderr
        shards.append(out)
    sizes = [len(rows_of(s)) for s in shards]
    assert sum(sizes) == 90 and all(0 < size < 90 for size in sizes)
    merged = tmp_path / "all.db"
    result = run_cli(
        "merge", *map(str, shards), "--out", str(merged), "--source", str(tmp_path / "imgs")
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["coverage"] == {"inputs": 90, "missing": 0, "extra": 0}
    assert (report["rows"], report["errors"], report["shards"]) == (90, 1, 3)
    assert sorted(i for i, _ in rows_of(merged)) == sorted(ids)

    missing = run_cli("merge", *map(str, shards[:2]), "--out", str(tmp_path / "x.db"))
    assert missing.returncode == 2 and "missing shard(s) 3/3" in missing.stderr
    twice = run_cli("merge", str(shards[0]), str(shards[0]), "--out", str(tmp_path / "y.db"))
    assert "shard 1/3 twice" in twice.stderr
    (tmp_path / "imgs" / "new.png").write_bytes(png(1000))  # the source grew since
    stale = run_cli(
        "merge",
        *map(str, shards),
        "--out",
        str(tmp_path / "z.db"),
        "--source",
        str(tmp_path / "imgs"),
    )
    assert stale.returncode == 2 and "1 of 91 inputs missing (e.g. new.png)" in stale.stderr


def test_an_unfinished_shard_is_not_merged(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 10)
    engine = Engine("llavaguard", "static")
    paths = []
    for index in (1, 2):
        path = tmp_path / f"s{index}.db"
        with ResultStore(path, create=True) as store, engine:
            run_audit(engine, Source.open(str(tmp_path / "imgs")), store, shard=Shard(index, 2))
        paths.append(path)
    with ResultStore(paths[1], create=True) as store:
        store.db.execute("DELETE FROM meta WHERE key = 'finished'")
    result = run_cli("merge", *map(str, paths), "--out", str(tmp_path / "m.db"))
    assert result.returncode == 2 and "s2.db is unfinished" in result.stderr
    with pytest.raises(StoreError, match="no such results file"):
        ResultStore(tmp_path / "nothing.db")


# -- export ----------------------------------------------------------------------------------
def test_export_to_jsonl_and_parquet(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 8, bad=(2,))
    out = tmp_path / "r.db"
    assert run_cli("audit", str(tmp_path / "imgs"), *STATIC, "--out", str(out)).returncode == 1
    assert json.loads(run_cli("export", str(out), str(tmp_path / "r.jsonl")).stdout)["rows"] == 8
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    with ResultStore(out) as store:
        expected = [(r.id, r.ok, r.rating, r.decision) for r in store.rows()]
    assert [(x["id"], x["ok"], x["rating"], x["decision"]) for x in lines] == expected
    result = run_cli("export", str(out), str(tmp_path / "r.parquet"))
    assert result.returncode == 0, result.stderr
    table = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert [(x["id"], x["ok"], x["rating"], json.loads(x["decision"])) for x in table] == expected
    assert table[0]["actions"] == [] and table[0]["p_unsafe"] == 0.8
    errors = run_cli("export", str(out), str(tmp_path / "e.jsonl"), "--errors-only")
    assert json.loads(errors.stdout)["rows"] == 1
    assert not list(tmp_path.glob("*.partial"))


# -- progress --------------------------------------------------------------------------------
def test_the_progress_bar_shows_counts_rate_and_total() -> None:
    stream = io.StringIO()
    decisions = list(
        Engine(
            "llavaguard", "static", backend_options={"rating": "Unsafe", "category": "O2"}
        ).assess_many([png(1), png(2), b"not an image"])
    )
    with Progress(None, enabled=True, stream=stream) as bar:
        for decision in decisions:
            bar.update(decision)
        bar.set_total(3)
    assert bar.summary() == "Unsafe 2 errors 1 | O2:2"
    assert "3/3" in stream.getvalue() and "Unsafe 2 errors 1 | O2:2" in stream.getvalue()
    off = Progress(3, enabled=False, stream=stream)
    off.update(decisions[0])
    assert off.summary() == "Unsafe 1 | O2:1"  # counted, never shown


def test_an_audit_through_an_sglang_server_absorbs_its_faults(tmp_path: Path) -> None:
    from sglang_server import FakeSGLang, Fault

    make_folder(tmp_path / "imgs", 150)
    with FakeSGLang(service_time=0.01) as server:
        server.inject(Fault("503", path="/generate"), Fault("drop", path="/generate"), times=3)
        options = {"url": server.url, "transport": "native", "backoff": 0.01, "backoff_max": 0.05}
        engine = Engine("llavaguard", "sglang", mode="verdict", backend_options=options)
        with ResultStore(tmp_path / "r.db", create=True) as store, engine:
            stats = run_audit(engine, Source.open(str(tmp_path / "imgs")), store)
        faulted = [r.fault for r in server.received if r.fault]
        assert sorted(faulted) == ["503"] * 3 + ["drop"] * 3
        assert server.counts["/generate"] == 150 + 6  # each fault cost one retry, no more
    assert stats.assessed == 150 and stats.errors == 0
    rows = rows_of(tmp_path / "r.db")
    assert len(rows) == 150 and all(ok for _, ok in rows)


def test_inputs_sharing_an_id_are_counted_and_said(tmp_path: Path) -> None:
    make_folder(tmp_path, 3)
    lines = [{"id": "same", "path": "00001.png"}, {"id": "same", "path": "00002.png"}]
    lines += [{"id": f"n{n}", "path": "00001.png"} for n in range(300)]  # past one chunk
    lines.append({"id": "n5", "path": "00002.png"})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    result = run_cli("audit", str(tmp_path / "m.jsonl"), *STATIC, "--out", str(tmp_path / "r.db"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["total"] == 301 and summary["run"]["duplicates"] == 2
    assert "note: 2 inputs share their id with another input" in result.stderr


def test_a_start_that_fails_leaves_no_empty_results_file(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 3)
    out = tmp_path / "r.db"
    result = run_cli(
        "audit", str(tmp_path / "imgs"), "-m", str(tmp_path / "no-model"), "--out", str(out)
    )
    assert result.returncode == 2, result.stderr  # the model folder does not exist
    assert "Traceback" not in result.stderr
    assert not out.exists() and list(tmp_path.glob("r.db*")) == []


def test_two_runs_of_the_same_audit_give_identical_results(
    tiny_models: Path, tmp_path: Path
) -> None:
    """Greedy decoding by default: a real (tiny, random) model gives the same verdicts twice."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for index in range(4):
        Image.effect_noise((40 + 9 * index, 32), 20 + 10 * index).convert("RGB").save(
            folder / f"{index}.png"
        )
    env = {"POLICY_ENGINE_CACHE": str(tiny_models), "HF_HUB_OFFLINE": "1"}
    verdicts = []
    for run in ("one", "two"):
        out = tmp_path / f"{run}.db"
        result = run_cli("audit", str(folder), "-m", "tiny-random", "--out", str(out), env=env)
        assert result.returncode == 0, result.stderr
        with ResultStore(out) as store:
            verdicts.append(
                [
                    (r.id, r.rating, r.category_id, r.decision["verdict"].get("rationale"))
                    for r in store.rows()
                ]
            )
            decoding = {json.dumps(r.decision["verdict"]["decoding"]) for r in store.rows()}
    assert len(verdicts[0]) == 4 and verdicts[0] == verdicts[1]
    assert decoding == {'{"method": "greedy"}'}


def test_executor_ray_without_ray_installed_is_a_one_line_error(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 2)
    fake = tmp_path / "site" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('ray is not installed here')\n")
    out = tmp_path / "r.db"
    args = ("audit", str(tmp_path / "imgs"), *STATIC, "--out", str(out))
    result = run_cli(*args, "--executor", "ray", pythonpath=tmp_path / "site")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --executor ray needs ray: pip install 'policy-engine[ray]'"
    )
    assert not out.exists()
    misplaced = run_cli(*args, "--workers", "2")
    assert misplaced.returncode == 2
    assert misplaced.stderr.strip() == "error: --workers applies to --executor ray only"
    zero = run_cli(*args, "--executor", "ray", "--workers", "0")
    assert zero.returncode == 2 and "Traceback" not in zero.stderr
