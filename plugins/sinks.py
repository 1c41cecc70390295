"""The built-in decision log: every final Decision appended to a JSONL file, one line each.

Turned on by environment variables (nothing is written when the path is unset or empty):

- `POLICY_ENGINE_DECISION_LOG`: the log file; parent directories are created.
- `POLICY_ENGINE_DECISION_LOG_MAX_BYTES`: rotate before the file would grow past this size
  (bytes, or with a K/M/G suffix: powers of 1024); `0` never rotates. Default 100 MiB.
- `POLICY_ENGINE_DECISION_LOG_BACKUPS`: rotated files kept (`log.1` newest … `log.N`); default 5.

Each line is `decision.model_dump_json(exclude_none=True)`, exactly what `policy-engine assess`
prints. `JsonlSink` is usable on its own; several threads and several processes may append to
one log (and rotate it) at once: lines are never torn or interleaved. See docs/sinks.md.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

from policy_engine import Decision, PolicyEngineError, hookimpl

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX (Windows)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
ENV_PATH = "POLICY_ENGINE_DECISION_LOG"
ENV_MAX_BYTES = "POLICY_ENGINE_DECISION_LOG_MAX_BYTES"
ENV_BACKUPS = "POLICY_ENGINE_DECISION_LOG_BACKUPS"

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_BACKUPS = 5

_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


def _reason(err: OSError, path: str) -> str:
    """`Not a directory`, plus the file it is about when that is not the log itself."""
    reason = err.strerror or str(err)
    filename = err.filename
    if filename is not None and os.fspath(filename) != path:
        reason += f" ({os.fsdecode(filename)})"
    return reason


def _make_parents(directory: str) -> None:
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(errno.ENOTDIR, f"{existing} is not a directory")
    os.makedirs(directory, exist_ok=True)


class JsonlSink:
    """An append-only JSONL file of Decisions, rotated by size; thread- and process-safe.

    Every `write` appends one whole line with one `os.write` on an `O_APPEND` descriptor (no
    buffering in this process), while holding `fcntl.flock` on the sidecar `<log>.lock`. Under
    that lock the sink checks that its descriptor still names `<log>` (another process may have
    rotated it), rotates when the line would take the file past `max_bytes`, and appends.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
    ) -> None:
        if max_bytes is not None and (isinstance(max_bytes, bool) or max_bytes < 1):
            raise ValueError(f"max_bytes must be a positive int or None, not {max_bytes!r}")
        if isinstance(backups, bool) or backups < 0:
            raise ValueError(f"backups must be an int >= 0, not {backups!r}")
        self.path = os.path.abspath(os.fspath(path))
        self.lock_path = self.path + ".lock"
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._fd = -1
        self._lock_fd = -1
        self._pid = os.getpid()
        self._closed = False
        if fcntl is None:  # pragma: no cover - not POSIX
            raise PolicyEngineError(
                f"cannot write decision log {self.path}: needs fcntl.flock (a POSIX system)"
            )
        try:
            _make_parents(os.path.dirname(self.path))
            self._open_lock()
            self._open_log()
        except OSError as err:
            self._close_fds()
            raise PolicyEngineError(
                f"cannot write decision log {self.path}: {_reason(err, self.path)}"
            ) from None
        _instances.add(self)

    # -- public ------------------------------------------------------------------------------
    def write(self, decision: Decision) -> None:
        """Append `decision` as one line; rotate first if the line would pass `max_bytes`."""
        data = (decision.model_dump_json(exclude_none=True) + "\n").encode("utf-8")
        with self._lock:
            if self._closed:
                raise ValueError(f"decision log {self.path} is closed")
            try:
                if self._pid != os.getpid():  # forked: never share a lock with the parent
                    self._close_fds()
                    self._pid = os.getpid()
                if self._lock_fd < 0:  # after a fork, or a failed reopen
                    self._open_lock()
                if self._fd < 0:
                    self._open_log()
                self._locked_append(data)
            except OSError as err:
                raise PolicyEngineError(
                    f"cannot write decision log {self.path}: {_reason(err, self.path)}"
                ) from None

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._close_fds()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"JsonlSink({self.path!r}, max_bytes={self.max_bytes}, backups={self.backups})"

    # -- internals (self._lock held) -------------------------------------------------------
    def _open_lock(self) -> None:
        self._lock_fd = os.open(self.lock_path, _LOCK_FLAGS, 0o666)

    def _open_log(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._fd = os.open(self.path, _OPEN_FLAGS, 0o666)

    def _close_fds(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = -1

    def _acquire(self) -> None:
        """flock the sidecar; if it was deleted or replaced meanwhile, lock the new one."""
        assert fcntl is not None
        while True:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                on_disk = os.stat(self.lock_path)
            except FileNotFoundError:
                on_disk = None
            held = os.fstat(self._lock_fd)
            if on_disk is not None and (on_disk.st_dev, on_disk.st_ino) == (
                held.st_dev,
                held.st_ino,
            ):
                return
            os.close(self._lock_fd)  # closing our only descriptor releases the flock
            self._lock_fd = -1
            self._open_lock()

    def _locked_append(self, data: bytes) -> None:
        assert fcntl is not None
        self._acquire()
        try:
            size = self._follow()
            if self.max_bytes is not None and size > 0 and size + len(data) > self.max_bytes:
                self._rotate()
                self._open_log()
                size = os.fstat(self._fd).st_size
            self._append(data, size)
        finally:
            if self._lock_fd >= 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _follow(self) -> int:
        """Reopen when `path` no longer names our file (rotated or removed); its size."""
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            on_disk = None
        held = os.fstat(self._fd)
        if on_disk is None or (on_disk.st_dev, on_disk.st_ino) != (held.st_dev, held.st_ino):
            self._open_log()
            held = os.fstat(self._fd)
        return held.st_size

    def _rotate(self) -> None:
        """log -> log.1 -> log.2 … -> log.<backups>; the oldest is dropped."""
        if self.backups == 0:
            os.unlink(self.path)
            return
        free = 1  # the first missing backup, or the oldest one (overwritten: dropped)
        while free < self.backups and os.path.exists(f"{self.path}.{free}"):
            free += 1
        for index in range(free - 1, 0, -1):
            os.replace(f"{self.path}.{index}", f"{self.path}.{index + 1}")
        os.replace(self.path, f"{self.path}.1")

    def _append(self, data: bytes, size: int) -> None:
        """One os.write; a short write (disk full) is finished or rolled back, never left torn."""
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError:
            if len(view) != len(data):
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, size)
            raise


# Every live sink, so that a forked child gets fresh thread locks (the parent's may be held).
_instances: weakref.WeakSet[JsonlSink] = weakref.WeakSet()


# -- configuration through the environment ---------------------------------------------------


@dataclass(frozen=True)
class SinkConfig:
    path: str
    max_bytes: int | None = DEFAULT_MAX_BYTES
    backups: int = DEFAULT_BACKUPS


_SIZE = re.compile(r"^\s*(\d+)\s*(?:([kmg])(?:i?b)?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _max_bytes(value: str) -> int | None:
    match = _SIZE.match(value.replace("_", ""))
    if match is None:
        raise PolicyEngineError(
            f"{ENV_MAX_BYTES} must be a size in bytes such as 104857600 or 100M "
            f"(0: never rotate), not {value!r}"
        )
    number = int(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    return number or None


def _backups(value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        number = -1
    if number < 0:
        raise PolicyEngineError(
            f"{ENV_BACKUPS} must be a whole number of rotated files to keep (0 or more), "
            f"not {value!r}"
        )
    return number


def config_from_env(environ: Mapping[str, str] | None = None) -> SinkConfig | None:
    """The decision log the environment asks for; None when `POLICY_ENGINE_DECISION_LOG` is
    unset or empty. Raises PolicyEngineError for an invalid size or backup count."""
    env = os.environ if environ is None else environ
    path = env.get(ENV_PATH, "").strip()
    if not path:
        return None
    raw_max = env.get(ENV_MAX_BYTES, "").strip()
    raw_backups = env.get(ENV_BACKUPS, "").strip()
    return SinkConfig(
        path=os.path.abspath(os.path.expanduser(path)),
        max_bytes=_max_bytes(raw_max) if raw_max else DEFAULT_MAX_BYTES,
        backups=_backups(raw_backups) if raw_backups else DEFAULT_BACKUPS,
    )


_sinks: dict[str, JsonlSink] = {}
_sinks_lock = threading.Lock()


def configured_sink(environ: Mapping[str, str] | None = None) -> JsonlSink | None:
    """The process's sink for the configured path, opened on first use (one per path)."""
    config = config_from_env(environ)
    if config is None:
        return None
    with _sinks_lock:
        sink = _sinks.get(config.path)
        if sink is None or sink.closed:
            sink = JsonlSink(config.path, max_bytes=config.max_bytes, backups=config.backups)
            _sinks[config.path] = sink
        return sink


def close_configured_sinks() -> None:
    """Close and forget the sinks opened from the environment (tests; end of a service)."""
    with _sinks_lock:
        sinks = list(_sinks.values())
        _sinks.clear()
    for sink in sinks:
        sink.close()


def _after_fork_in_child() -> None:
    global _sinks_lock
    _sinks_lock = threading.Lock()
    for sink in list(_instances):
        sink._lock = threading.Lock()  # its descriptors are reopened on the next write


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- hooks -----------------------------------------------------------------------------------


@hookimpl
def startup() -> None:
    """A bad decision-log setting is a user error at start-up.

    Opening the log here makes an invalid `POLICY_ENGINE_DECISION_LOG*` variable or an
    unwritable path a one-line `error:` with exit status 2 before any image is assessed, instead
    of a warning per Decision from `observe_decision`.
    """
    configured_sink()


@hookimpl
def observe_decision(decision: Decision) -> None:
    # Never raise: an exception here would keep observers that pluggy calls later from seeing
    # this Decision. A failure is a warning; the engine keeps and returns the Decision anyway.
    try:
        sink = configured_sink()
        if sink is not None:
            sink.write(decision)
    except Exception as err:
        reason = str(err) if isinstance(err, PolicyEngineError) else f"{type(err).__name__}: {err}"
        log.warning("decision log: %s", reason)
