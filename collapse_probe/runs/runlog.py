"""Crash-safe, append-only run log: RUN_DIR/metrics.jsonl and RUN_DIR/rollouts/step_NNNNNN.jsonl (docs/DESIGN.md).

Writing: each record is one JSON line written by one os.write on an O_APPEND descriptor, so a killed writer loses at
most the line it was writing; reopening an existing log appends (a restarted run never truncates its history).
Only rank 0 writes (rank= argument, else env RANK); on other ranks writers are no-ops and create no files.
Float NaN/inf are stored as the strings "NaN", "Infinity", "-Infinity" (strict JSON) and decoded back on read.
Reading (bounded memory, never the whole file at once): lines are parsed by `lines.parse_line` (bounded depth and
size; verl lines flattened), an unreadable line is skipped and counted in one warning, and steps follow
`history.StepHistory` / `StepIndex`.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from collapse_probe.errors import UserError
from collapse_probe.runs.history import StepIndex
from collapse_probe.runs.lines import CHUNK, MAX_LINE_BYTES, Skipped, iter_lines, parse_line
from collapse_probe.runs.rundir import RunDir

__all__ = ["lock_run_dir", "unlock_run_dir", "RunLog", "RolloutLog", "index_file", "read_rollouts", "rollout_steps",
           "tail_records"]

_HINT = "pass a run directory written by collapse-probe or a JSONL metrics file"
_TEXT_KEYS = frozenset({"text", "turns"})  # rollout text is kept verbatim, even if it reads "NaN"


def _encode(v: Any, key: str) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return float(v) if math.isfinite(v) else "NaN" if math.isnan(v) else "Infinity" if v > 0 else "-Infinity"
    if isinstance(v, dict):
        return {str(k): _encode(x, key) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_encode(x, key) for x in v]
    if hasattr(v, "tolist"):  # numpy scalars/arrays, torch tensors (0-d -> a Python number)
        return _encode(v.tolist(), key)
    raise TypeError(f"run log value for {key!r} has unsupported type {type(v).__name__}: log a number or a string")


def _record_line(record: dict, stamp: bool = True) -> bytes:
    if not isinstance(record, dict):
        raise TypeError(f"a run log record must be a dict, got {type(record).__name__}")
    step = _encode(record.get("step"), "step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise TypeError(f"a run log record needs an int 'step', got {record.get('step')!r}")
    out: dict[str, Any] = {"step": step}
    if stamp:
        out["time"] = record.get("time", time.time())
    out.update((str(k), v) for k, v in record.items() if k not in ("step", "time"))
    enc = {k: _encode(v, k) for k, v in out.items()}
    return (json.dumps(enc, allow_nan=False, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _resolve_rank(rank: int | None) -> int:
    if rank is not None:
        return int(rank)
    env = os.environ.get("RANK", "").strip() or "0"
    try:
        return int(env)
    except ValueError:
        raise UserError(f"environment variable RANK={env!r} is not an integer: unset it or set it to this "
                        "process's rank") from None


class _Appender:
    """An O_APPEND file: one os.write per call; a torn last line (killed writer) is ended before the first write."""

    def __init__(self, path: Path, fsync: bool):
        self.path, self.fsync, self.checked, self._lock = path, fsync, False, threading.Lock()
        self.fd: int | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror}: pass a writable run directory") from None

    def write(self, data: bytes) -> None:
        with self._lock:
            if self.fd is None:
                raise ValueError(f"run log {self.path} is closed")
            if not self.checked:
                size = os.fstat(self.fd).st_size
                if size and os.pread(self.fd, 1, size - 1) != b"\n":
                    data = b"\n" + data
                self.checked = True
            view = memoryview(data)
            while view:  # a regular file takes the whole buffer in one call; loop only for a short write
                view = view[os.write(self.fd, view):]
            if self.fsync:
                os.fsync(self.fd)

    def close(self) -> None:
        with self._lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    __del__ = close  # a log that is never closed (a crash, a forgotten close) does not leak its descriptor


_HELD: dict[str, list] = {}  # lock file -> [fd, holders]: writers of one process share its lock


def lock_run_dir(d: Path) -> str:
    """Hold RUN_DIR/.lock (flock, released by the kernel when the process dies, even by SIGKILL) so a second
    writer process is refused instead of interleaving two runs in one log."""
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {d}: {e.strerror}: pass a writable run directory") from None
    key = os.path.realpath(d / ".lock")
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    while True:
        try:
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write {key}: {e.strerror}: pass a writable run directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{d} is being written by another process (pid {holder} holds its .lock): stop that "
                            "run or pass another run directory") from None
        try:  # the holder before us may have removed the file after we opened it: lock the one on disk
            if os.stat(key).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = [fd, 1]
    return key


def unlock_run_dir(key: str) -> None:
    held = _HELD.get(key)
    if held is not None:
        held[1] -= 1
        if held[1] <= 0:
            del _HELD[key]
            try:  # a clean close leaves the run dir as the run wrote it; a killed writer leaves a stale, unlocked file
                os.unlink(key)
            except OSError:
                pass
            os.close(held[0])  # closing the descriptor releases the flock


class RunLog:
    """Append-only metrics log. `append` on a rank other than 0 is a no-op (no file is created there).
    Rank 0 holds RUN_DIR/.lock while open: a second process writing the same run is refused with a UserError."""

    def __init__(self, run_dir: str | os.PathLike, filename: str = "metrics.jsonl", *, rank: int | None = None,
                 fsync: bool = False):
        self.path = Path(run_dir) / filename
        self.rank = _resolve_rank(rank)
        self._lock = lock_run_dir(self.path.parent) if self.rank == 0 else None  # before any file is created
        try:
            self._out = _Appender(self.path, fsync) if self.rank == 0 else None
        except UserError:
            unlock_run_dir(self._lock) if self._lock else None
            raise
        self._closed = False

    def append(self, record: dict) -> None:
        """Write one record (needs an int `step`; `time` is added if missing) as one flushed line."""
        if self._closed:
            raise ValueError(f"run log {self.path} is closed")
        if self._out is not None:
            self._out.write(_record_line(record))

    def close(self) -> None:
        self._closed = True
        if self._out is not None:
            self._out.close()
        if self._lock is not None:
            unlock_run_dir(self._lock)
            self._lock = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def index_file(f: Path, *, warn: bool = True, keep: frozenset = frozenset()) -> tuple[StepIndex, Skipped]:
    """Read `f` once, line by line (bounded memory), into a StepIndex; unreadable lines are counted and, with
    `warn`, reported in one warning. A file with unreadable lines only is a UserError."""
    index, skipped = StepIndex(f, keep), Skipped(f)
    try:
        for n, off, raw in iter_lines(f):
            rec, why = parse_line(raw, keep) if raw is not None else (None, "is too long")
            if rec is None:
                skipped.add(n, why)
            else:
                index.add(rec, raw, off)
    except OSError as e:
        raise UserError(f"cannot read {f}: {e.strerror}: check the path and its permissions") from None
    if skipped.count and not len(index) and index.last_step is None:
        n, why = skipped.first
        raise UserError(f"{f} is not JSONL: line {n} {why}: {_HINT}")
    if warn:
        skipped.flush()
    return index, skipped


def _open_new(cands: list[Path], ident: tuple | None) -> tuple[int, tuple, Path, int] | None:
    """Open the first existing candidate unless it is the file already open (same inode)."""
    for c in cands:
        try:
            fd = os.open(c, os.O_RDONLY)
        except OSError:
            continue
        st = os.fstat(fd)
        if (st.st_ino, st.st_dev) != ident:
            return fd, (st.st_ino, st.st_dev), c, st.st_size
        os.close(fd)
        return None
    return None


def _last_newline_end(fd: int, size: int) -> int:
    """The offset just after the last newline in the first `size` bytes, scanning back CHUNK bytes at a time."""
    end = size
    while end > 0:
        start = max(0, end - CHUNK)
        i = os.pread(fd, end - start, start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        end = start
    return 0


def tail_records(path: str | os.PathLike, *, poll_s: float = 0.2, from_start: bool = True,
                 stop: Callable[[], bool] | None = None, idle_timeout_s: float | None = None,
                 warn_every_s: float = 5.0) -> Iterator[dict]:
    """Follow a growing metrics file like `tail -F`, yielding each record once its line is complete (in file order,
    not de-duplicated). Waits for the file to appear; starts again from the top when it is truncated or replaced.
    Ends when `stop()` is true or no record arrived for `idle_timeout_s` seconds. Reads CHUNK bytes at a time;
    unreadable lines are counted and reported at most once every `warn_every_s` seconds and when it ends."""
    p = Path(path)
    cands = RunDir(p).metrics_candidates()
    fd, ident, name, pos, buf, head, first, drop = None, None, p, 0, b"", b"", True, False
    skipped = Skipped(p, every_s=warn_every_s)
    last = time.monotonic()
    try:
        while True:
            opened = _open_new(cands, ident)
            if opened is not None:  # the first open, or the file was replaced (a new inode)
                if fd is not None:
                    os.close(fd)
                fd, ident, name, size = opened
                buf, head, drop = b"", b"", False
                skipped.name = name
                # from_start=False: skip the complete lines already there (only in the file found first)
                pos = 0 if from_start or not first else _last_newline_end(fd, size)
                first = False
            more = fd is not None
            while more:
                # truncated, or rewritten in place (its first bytes changed): start again from the top
                size = os.fstat(fd).st_size
                if size < pos or (head and os.pread(fd, len(head), 0) != head):
                    pos, buf, head, drop = 0, b"", b"", False
                chunk = os.pread(fd, min(size - pos, CHUNK), pos) if size > pos else b""
                pos, buf = pos + len(chunk), buf + chunk
                more = size > pos
                if len(head) < 256 and pos > len(head):
                    head = os.pread(fd, min(pos, 256), 0)
                *lines, buf = buf.split(b"\n")
                if drop and lines:  # the rest of an over-long line
                    lines, drop = lines[1:], False
                if len(buf) > MAX_LINE_BYTES:
                    buf, drop = b"", True
                    skipped.add(None, "is too long")
                for raw in lines:
                    if not raw.strip():
                        continue
                    rec, why = parse_line(raw)
                    if rec is None:
                        skipped.add(None, why)
                        continue
                    last = time.monotonic()
                    yield rec
            if (stop is not None and stop()) or (idle_timeout_s is not None
                                                 and time.monotonic() - last > idle_timeout_s):
                skipped.flush()
                return
            time.sleep(poll_s)
    finally:
        if fd is not None:
            os.close(fd)


class RolloutLog:
    """Append-only sampled rollouts, RUN_DIR/rollouts/step_NNNNNN.jsonl. `write` on a rank other than 0 is a no-op."""

    def __init__(self, run_dir: str | os.PathLike, *, rank: int | None = None, fsync: bool = False):
        self.dir, self.fsync = Path(run_dir) / "rollouts", fsync
        self.enabled = _resolve_rank(rank) == 0

    def path(self, step: int) -> Path:
        return self.dir / f"step_{int(step):06d}.jsonl"

    def write(self, step: int, rows: list[dict]) -> None:
        """Append rows (each gets `step`) to the step's file in one os.write."""
        if not self.enabled or not rows:
            return
        data = b"".join(_record_line({**row, "step": step}, stamp=False) for row in rows)
        out = _Appender(self.path(step), self.fsync)
        try:
            out.write(data)
        finally:
            out.close()


def rollout_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps that have a rollouts file, sorted."""
    names = (f.stem[len("step_"):] for f in RunDir(run_dir).require_rollouts().glob("step_*.jsonl"))
    return sorted(int(s) for s in names if s.isdigit())


def read_rollouts(run_dir: str | os.PathLike, steps: Iterable[int] | None = None, *, warn: bool = True) -> list[dict]:
    """Rollout rows of the given steps (all if None; steps without a file are skipped), ordered by step.
    A row re-written for the same (group, sample) of a step (a restarted run) replaces the earlier one.
    Files are read line by line; unreadable lines are skipped with one warning per file."""
    d = RunDir(run_dir).require_rollouts()
    rows: list[dict] = []
    for s in rollout_steps(d) if steps is None else sorted({int(s) for s in steps}):
        f = d / f"step_{s:06d}.jsonl"
        if not f.is_file():
            continue
        keyed: dict[Any, dict] = {}
        skipped = Skipped(f)
        for i, off, raw in iter_lines(f):
            r, why = parse_line(raw, _TEXT_KEYS) if raw is not None else (None, "is too long")
            if r is None:
                skipped.add(i, why)
                continue
            key = (r["group"], r["sample"]) if "group" in r and "sample" in r else i
            keyed.pop(key, None)
            keyed[key] = r
        if skipped.count and not keyed:
            raise UserError(f"{f} is not JSONL: line {skipped.first[0]} {skipped.first[1]}: {_HINT}")
        if warn:
            skipped.flush()
        rows.extend(keyed.values())
    return rows
