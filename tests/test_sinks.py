"""The built-in JSONL decision log (plugins/sinks.py): format, rotation, concurrency, env config."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from policy_engine.plugins import sinks
from policy_engine.plugins.sinks import (
    DEFAULT_BACKUPS,
    DEFAULT_MAX_BYTES,
    ENV_BACKUPS,
    ENV_MAX_BYTES,
    ENV_PATH,
    JsonlSink,
    config_from_env,
)
from support import run_cli

from policy_engine import Decision, PluginHost, PolicyEngineError, Verdict
from policy_engine.engine import Engine
from policy_engine.verdict import VerdictError

NO_LOG_ENV: dict[str, str | None] = {ENV_PATH: None, ENV_MAX_BYTES: None, ENV_BACKUPS: None}


def decision(source: str, rationale: str = "Static answer: no model was consulted.") -> Decision:
    return Decision(
        verdict=Verdict(
            rating="Unsafe",
            category_id="O7",
            category_name="Self-Harm",
            rationale=rationale,
            p_unsafe=0.875,
            policy_id="llavaguard",
            policy_version="1.2",
            policy_hash="0" * 64,
            model="static",
            source=source,
            timings={"generate": 0.25},
        ),
        metadata={"audience": "adults"},
    )


def log_files(path: Path) -> list[Path]:
    """The log and its backups, oldest first (log.N … log.1, log)."""
    backups = sorted(
        (p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()),
        key=lambda p: int(p.suffix[1:]),
        reverse=True,
    )
    return [*backups, path] if path.exists() else backups


def read_lines(path: Path) -> list[str]:
    """Every line across the log and its backups, oldest first; each must end in a newline."""
    lines: list[str] = []
    for file in log_files(path):
        data = file.read_bytes()
        assert data == b"" or data.endswith(b"\n"), f"{file.name} ends in a torn line"
        lines += data.decode("utf-8").splitlines()
    return lines


def sources(path: Path) -> list[str]:
    return [Decision.model_validate_json(line).verdict.source or "" for line in read_lines(path)]


@pytest.fixture(autouse=True)
def no_env_sink(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in (ENV_PATH, ENV_MAX_BYTES, ENV_BACKUPS):
        monkeypatch.delenv(name, raising=False)
    yield
    sinks.close_configured_sinks()


@pytest.fixture
def png(tmp_path: Path) -> Path:
    path = tmp_path / "img.png"
    Image.new("RGB", (8, 8), (90, 90, 90)).save(path)
    return path


# --- format ----------------------------------------------------------------------------------


def test_one_line_per_decision_that_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "nested" / "decisions.jsonl"  # parents are created
    written = [decision("a.png"), decision("b.png", "two\nlines, ünïcode ✓"), decision("c.png")]
    with JsonlSink(path) as sink:
        for item in written:
            sink.write(item)
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # every line ends in a newline, nothing after the last
    assert lines[:-1] == [d.model_dump_json(exclude_none=True) for d in written]
    assert [Decision.model_validate_json(line) for line in lines[:-1]] == written
    assert (tmp_path / "logs" / "nested" / "decisions.jsonl.lock").exists()


def test_error_decisions_are_logged(tmp_path: Path) -> None:
    failed = Decision(
        verdict=Verdict(
            rating=None,
            error=VerdictError(kind="image", message="not an image"),
            policy_id="llavaguard",
            policy_version="1.2",
            policy_hash="0" * 64,
            source="broken.png",
        )
    )
    with JsonlSink(tmp_path / "log.jsonl") as sink:
        sink.write(failed)
    (line,) = (tmp_path / "log.jsonl").read_text(encoding="utf-8").splitlines()
    assert line == failed.model_dump_json(exclude_none=True)
    assert json.loads(line)["verdict"]["error"]["message"] == "not an image"


def test_error_decisions_round_trip(tmp_path: Path) -> None:
    failed = Decision(
        verdict=Verdict(
            rating=None,
            error=VerdictError(kind="backend", message="down", retryable=True),
            policy_id="p",
            policy_version="1",
            policy_hash="h",
        )
    )
    with JsonlSink(tmp_path / "log.jsonl") as sink:
        sink.write(failed)
    line = (tmp_path / "log.jsonl").read_text(encoding="utf-8")
    assert Decision.model_validate_json(line) == failed


def test_write_after_close_is_an_error(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "log.jsonl")
    sink.close()
    assert sink.closed
    with pytest.raises(ValueError, match="closed"):
        sink.write(decision("a.png"))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        JsonlSink("/nonexistent/x.jsonl", max_bytes=0)
    with pytest.raises(ValueError, match="backups"):
        JsonlSink("/nonexistent/x.jsonl", backups=-1)


# --- unwritable paths ------------------------------------------------------------------------


def test_path_under_a_regular_file_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    for path in (blocker / "log.jsonl", blocker / "sub" / "log.jsonl"):
        with pytest.raises(PolicyEngineError) as caught:
            JsonlSink(path)
        assert str(caught.value) == (
            f"cannot write decision log {path}: {blocker} is not a directory"
        )


def test_path_that_is_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyEngineError, match=r"cannot write decision log .*: Is a directory"):
        JsonlSink(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_directory_is_a_clear_error(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PolicyEngineError, match="Permission denied"):
            JsonlSink(locked / "log.jsonl")
    finally:
        locked.chmod(0o700)


# --- rotation --------------------------------------------------------------------------------


def fixed_size_line() -> int:
    return len(decision("img-00").model_dump_json(exclude_none=True)) + 1


def test_rotation_by_size_keeps_backups_and_drops_the_oldest(tmp_path: Path) -> None:
    line = fixed_size_line()
    path = tmp_path / "log.jsonl"
    with JsonlSink(path, max_bytes=3 * line + line // 2, backups=3) as sink:
        for i in range(20):
            sink.write(decision(f"img-{i:02d}"))
    files = log_files(path)
    assert [f.name for f in files] == ["log.jsonl.3", "log.jsonl.2", "log.jsonl.1", "log.jsonl"]
    assert [f.stat().st_size for f in files] == [3 * line, 3 * line, 3 * line, 2 * line]
    # 3 lines per file: 1-9 were in files rotated past log.3 and are dropped, 10-20 are kept.
    assert sources(path) == [f"img-{i:02d}" for i in range(9, 20)]
    assert not (tmp_path / "log.jsonl.4").exists()


def test_rotation_loses_no_line_when_backups_suffice(tmp_path: Path) -> None:
    line = fixed_size_line()
    path = tmp_path / "log.jsonl"
    with JsonlSink(path, max_bytes=2 * line, backups=100) as sink:
        for i in range(25):
            sink.write(decision(f"img-{i:02d}"))
    assert len(log_files(path)) == 13
    assert all(f.stat().st_size <= 2 * line for f in log_files(path))
    assert sources(path) == [f"img-{i:02d}" for i in range(25)]


def test_no_backups_keeps_only_the_current_file(tmp_path: Path) -> None:
    line = fixed_size_line()
    path = tmp_path / "log.jsonl"
    with JsonlSink(path, max_bytes=2 * line, backups=0) as sink:
        for i in range(5):
            sink.write(decision(f"img-{i:02d}"))
    assert log_files(path) == [path]
    assert sources(path) == ["img-04"]


def test_a_line_longer_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with JsonlSink(path, max_bytes=100, backups=5) as sink:
        sink.write(decision("a"))
        sink.write(decision("b"))
    assert sources(path) == ["a", "b"]
    assert [len(f.read_text().splitlines()) for f in log_files(path)] == [1, 1]


def test_no_rotation_without_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with JsonlSink(path, max_bytes=None) as sink:
        for i in range(30):
            sink.write(decision(f"img-{i:02d}"))
    assert log_files(path) == [path]
    assert len(sources(path)) == 30


def test_follows_a_log_removed_or_rotated_by_someone_else(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with JsonlSink(path) as sink:
        sink.write(decision("a"))
        path.rename(tmp_path / "elsewhere.jsonl")  # e.g. logrotate
        sink.write(decision("b"))
        path.unlink()
        (tmp_path / "log.jsonl.lock").unlink()
        sink.write(decision("c"))
    assert sources(path) == ["c"]
    assert sources(tmp_path / "elsewhere.jsonl") == ["a"]
    assert (tmp_path / "log.jsonl.lock").exists()


def test_a_failed_write_leaves_no_torn_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "log.jsonl"
    sink = JsonlSink(path)
    sink.write(decision("a"))
    real_write = os.write
    calls = []

    def half_then_full(fd: int, data: bytes | memoryview) -> int:
        if fd != sink._fd:
            return real_write(fd, data)
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sinks.os, "write", half_then_full)
    with pytest.raises(PolicyEngineError, match="No space left on device"):
        sink.write(decision("b"))
    monkeypatch.undo()
    sink.write(decision("c"))
    sink.close()
    assert sources(path) == ["a", "c"]


# --- concurrency -----------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False], ids=["one-sink", "sink-per-thread"])
def test_concurrent_threads(tmp_path: Path, shared: bool) -> None:
    path = tmp_path / "log.jsonl"
    threads, per_thread, max_bytes = 8, 200, 16 * 1024
    common = JsonlSink(path, max_bytes=max_bytes, backups=1000)
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        own = common if shared else JsonlSink(path, max_bytes=max_bytes, backups=1000)
        try:
            start.wait()
            for i in range(per_thread):
                own.write(decision(f"t{t}-{i:03d}", "x" * (i % 37)))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)
        finally:
            if own is not common:
                own.close()

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    common.close()
    assert errors == []
    assert_complete(path, [f"t{t}" for t in range(threads)], per_thread, max_bytes)


def assert_complete(path: Path, writers: list[str], per_writer: int, max_bytes: int) -> None:
    """Exactly every decision once, each line whole; each writer's lines in its own order."""
    files = log_files(path)
    assert len(files) > 5, "the test should have forced several rotations"
    assert all(f.stat().st_size <= max_bytes for f in files)
    seen = sources(path)  # every line parses as a Decision
    assert len(seen) == len(writers) * per_writer
    for writer in writers:
        mine = [s for s in seen if s.startswith(writer + "-")]
        assert mine == [f"{writer}-{i:03d}" for i in range(per_writer)]


WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from policy_engine import Decision, Verdict
    from policy_engine.plugins.sinks import JsonlSink

    path, name, count, max_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    go = Path(path).with_name("go")
    sink = JsonlSink(path, max_bytes=max_bytes, backups=1000)
    Path(path).with_name("ready-" + name).touch()
    deadline = time.monotonic() + 30
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    for i in range(count):
        verdict = Verdict(
            rating="Unsafe", category_id="O7", rationale="y" * (i % 53), policy_id="p",
            policy_version="1", policy_hash="h", source=f"{name}-{i:03d}",
        )
        sink.write(Decision(verdict=verdict))
    sink.close()
    """
)


def test_concurrent_processes(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    processes, per_process, max_bytes = 4, 200, 8 * 1024
    names = [f"p{k}" for k in range(processes)]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), name, str(per_process), str(max_bytes)]
        )
        for name in names
    ]
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{n}").exists() for n in names):
            assert all(c.poll() is None for c in children), "a writer died while starting"
            assert time.monotonic() < deadline, "writers did not start"
            time.sleep(0.01)
        (tmp_path / "go").touch()  # all four start appending at once
        assert [c.wait(timeout=60) for c in children] == [0] * processes
    finally:
        for child in children:
            if child.poll() is None:  # pragma: no cover
                child.kill()
    assert_complete(path, names, per_process, max_bytes)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_share_the_parents_lock(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    sink = JsonlSink(path, max_bytes=4 * 1024, backups=1000)
    sink.write(decision("parent-start"))
    children = []
    for k in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 0
            try:
                for i in range(100):
                    sink.write(decision(f"c{k}-{i:03d}"))
            except BaseException:
                code = 1
            os._exit(code)
        children.append(pid)
    for i in range(100):
        sink.write(decision(f"pa-{i:03d}"))
    for pid in children:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    sink.close()
    seen = sources(path)
    assert seen[0] == "parent-start"
    assert len(seen) == 301
    for writer in ("c0", "c1", "pa"):
        mine = [s for s in seen if s.startswith(writer + "-")]
        assert mine == [f"{writer}-{i:03d}" for i in range(100)]


# --- configuration through the environment ---------------------------------------------------


def test_config_from_env(tmp_path: Path) -> None:
    log = str(tmp_path / "d.jsonl")
    assert config_from_env({}) is None
    assert config_from_env({ENV_PATH: "  "}) is None
    default = config_from_env({ENV_PATH: log})
    assert default is not None
    assert (default.path, default.max_bytes, default.backups) == (
        log,
        DEFAULT_MAX_BYTES,
        DEFAULT_BACKUPS,
    )
    sizes = {"1000": 1000, "1_000": 1000, "64k": 65536, "100M": 100 * 2**20, "2GiB": 2 * 2**30}
    for raw, expected in {**sizes, "0": None, "": DEFAULT_MAX_BYTES}.items():
        config = config_from_env({ENV_PATH: log, ENV_MAX_BYTES: raw})
        assert config is not None and config.max_bytes == expected, raw
    config = config_from_env({ENV_PATH: log, ENV_BACKUPS: "0"})
    assert config is not None and config.backups == 0
    relative = config_from_env({ENV_PATH: "rel.jsonl"})
    assert relative is not None and relative.path == os.path.abspath("rel.jsonl")


@pytest.mark.parametrize("raw", ["lots", "-5", "1.5", "10 MB extra", "0x10"])
def test_invalid_max_bytes(raw: str) -> None:
    with pytest.raises(PolicyEngineError) as caught:
        config_from_env({ENV_PATH: "/tmp/x.jsonl", ENV_MAX_BYTES: raw})
    assert str(caught.value) == (
        f"{ENV_MAX_BYTES} must be a size in bytes such as 104857600 or 100M "
        f"(0: never rotate), not {raw!r}"
    )


@pytest.mark.parametrize("raw", ["many", "-1", "2.0"])
def test_invalid_backups(raw: str) -> None:
    with pytest.raises(PolicyEngineError, match=f"^{ENV_BACKUPS} must be a whole number"):
        config_from_env({ENV_PATH: "/tmp/x.jsonl", ENV_BACKUPS: raw})


def test_one_sink_per_path_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sinks.configured_sink() is None
    monkeypatch.setenv(ENV_PATH, str(tmp_path / "a.jsonl"))
    first = sinks.configured_sink()
    assert first is not None and sinks.configured_sink() is first
    monkeypatch.setenv(ENV_PATH, str(tmp_path / "b.jsonl"))
    other = sinks.configured_sink()
    assert other is not None and other is not first and other.path.endswith("b.jsonl")
    sinks.close_configured_sinks()
    assert first.closed and other.closed


def test_engine_observer_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, png: Path
) -> None:
    log = tmp_path / "engine.jsonl"
    monkeypatch.setenv(ENV_PATH, str(log))
    engine = Engine("llavaguard", "static", host=PluginHost())  # built-ins, sinks included
    decisions = list(engine.assess_many([png, tmp_path / "missing.png", png]))
    lines = log.read_text(encoding="utf-8").splitlines()
    assert sorted(lines) == sorted(d.model_dump_json(exclude_none=True) for d in decisions)


def test_a_log_that_cannot_be_written_at_start_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file.txt").write_text("")
    monkeypatch.setenv(ENV_PATH, str(tmp_path / "file.txt" / "log.jsonl"))
    with pytest.raises(PolicyEngineError, match="is not a directory"):
        Engine("llavaguard", "static", host=PluginHost())  # the sinks plugin's startup hook


def test_a_failing_log_is_a_warning_and_keeps_the_decision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, png: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(ENV_PATH, str(tmp_path / "fine.jsonl"))
    engine = Engine("llavaguard", "static", host=PluginHost())
    (tmp_path / "file.txt").write_text("")
    monkeypatch.setenv(ENV_PATH, str(tmp_path / "file.txt" / "log.jsonl"))  # breaks later
    assert engine.assess(png).rating == "Safe"
    warning = (
        f"decision log: cannot write decision log "
        f"{tmp_path / 'file.txt' / 'log.jsonl'}: {tmp_path / 'file.txt'} is not a directory"
    )
    assert [r.getMessage() for r in caplog.records].count(warning) == 1


# --- the real CLI ----------------------------------------------------------------------------

STATIC = ("-b", "static", "-o", "rating=Unsafe", "-o", "category=O7")


def test_cli_writes_one_line_per_decision(tmp_path: Path, png: Path) -> None:
    log = tmp_path / "audit" / "decisions.jsonl"
    result = run_cli("assess", str(png), str(png), *STATIC, env={**NO_LOG_ENV, ENV_PATH: str(log)})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    printed = result.stdout.splitlines()
    assert len(printed) == 2
    assert log.read_text(encoding="utf-8").splitlines() == printed
    for line in printed:
        assert Decision.model_validate_json(line).verdict.category_id == "O7"


def test_cli_invalid_max_bytes_is_a_user_error(tmp_path: Path, png: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    env = {**NO_LOG_ENV, ENV_PATH: str(log), ENV_MAX_BYTES: "lots"}
    result = run_cli("assess", str(png), *STATIC, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"error: {ENV_MAX_BYTES} must be a size in bytes such as 104857600 or 100M "
        "(0: never rotate), not 'lots'\n"
    )
    assert not log.exists()


def test_cli_unwritable_log_is_a_user_error(tmp_path: Path, png: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    log = blocker / "decisions.jsonl"
    result = run_cli("assess", str(png), *STATIC, env={**NO_LOG_ENV, ENV_PATH: str(log)})
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"error: cannot write decision log {log}: {blocker} is not a directory\n"
    )
