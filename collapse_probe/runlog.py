"""Crash-safe, append-only run log: RUN_DIR/metrics.jsonl and RUN_DIR/rollouts/step_NNNNNN.jsonl (docs/DESIGN.md).

Writing: each record is one JSON line written by one os.write on an O_APPEND descriptor, so a killed writer loses at
most the line it was writing; reopening an existing log appends (a restarted run never truncates its history).
Only rank 0 writes (rank= argument, else env RANK); on other ranks writers are no-ops and create no files.
Float NaN/inf are stored as the strings "NaN", "Infinity", "-Infinity" (strict JSON) and decoded back on read.
Reading: steps are sorted and de-duplicated (the last occurrence in the file wins), a torn or garbled line is skipped
with a warning, and verl file-logger lines {"step": N, "data": {...}} are flattened.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from collapse_probe.errors import UserError
from collapse_probe.rundir import RunDir

_HINT = "pass a run directory written by collapse-probe or a JSONL metrics file"
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
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


def _decode(v: Any) -> Any:
    if isinstance(v, str):
        return _NONFINITE.get(v, v)
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if isinstance(v, dict):
        return {k: _decode(x) for k, x in v.items()}
    return v


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


class RunLog:
    """Append-only metrics log. `append` on a rank other than 0 is a no-op (no file is created there)."""

    def __init__(self, run_dir: str | os.PathLike, filename: str = "metrics.jsonl", *, rank: int | None = None,
                 fsync: bool = False):
        self.path = Path(run_dir) / filename
        self.rank = _resolve_rank(rank)
        self._out = _Appender(self.path, fsync) if self.rank == 0 else None
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

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(raw: bytes, keep: frozenset = frozenset()) -> tuple[dict | None, str]:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None, "is not a JSON object (torn or garbled line)"
    if not isinstance(obj, dict):
        return None, "is not a JSON object"
    if set(obj) == {"step", "data"} and isinstance(obj["data"], dict):  # verl file logger
        obj = {"step": obj["step"], **{k: v for k, v in obj["data"].items() if k != "step"}}
    step = obj.get("step")
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if not isinstance(step, int) or isinstance(step, bool):
        return None, 'has no integer "step"'
    rec = {"step": step}
    rec.update((k, v if k in keep else _decode(v)) for k, v in obj.items() if k != "step")
    return rec, ""


def _read_lines(f: Path, warn: bool, keep: frozenset = frozenset()) -> list[dict]:
    good, first_bad = [], None
    for n, raw in enumerate(f.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        rec, why = _parse(raw, keep)
        if rec is None:
            first_bad = first_bad or (n, why)
            if warn:
                warnings.warn(f"skipped line {n} of {f}: it {why}", stacklevel=3)
        else:
            good.append(rec)
    if first_bad and not good:
        raise UserError(f"{f} is not JSONL: line {first_bad[0]} {first_bad[1]}: {_HINT}")
    return good


class StepHistory:
    """One record per step from records in file order, the way a restarted run means them.

    `add(record)` says what a record is and updates `records` accordingly:
    * "new": a step after the last one;
    * "duplicate": the same line again, or an older line read again (its `time` is not later than the newest
      record seen): ignored;
    * "merged": more keys for the last step (e.g. eval metrics logged after the train metrics);
    * "restart": an earlier step with new content (resumed from a checkpoint, or a truncated log): the records
      from that step on are dropped and this one is kept.
    `read_records` and `watch` both use it, so they agree on what a file holds.
    """

    def __init__(self) -> None:
        self.records: dict[int, dict] = {}
        self._fingerprints: dict[int, str] = {}
        self.last_step: int | None = None
        self.max_time: float | None = None
        self.restarts = 0

    def add(self, rec: dict) -> str:
        step = rec["step"]
        fp = _fingerprint(rec)
        t = rec.get("time")
        t = float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) else None
        kind = "new"
        if self.last_step is not None and step <= self.last_step:
            if self._fingerprints.get(step) == fp or (t is not None and self.max_time is not None
                                                       and t <= self.max_time):
                return "duplicate"
            if step == self.last_step and step in self.records:
                rec, kind = {**self.records[step], **rec}, "merged"
            else:
                kind = "restart"
                self.restarts += 1
                for s in [s for s in self.records if s >= step]:
                    del self.records[s]
                    self._fingerprints.pop(s, None)
        self.records[step] = rec
        self._fingerprints[step] = fp
        self.last_step = step
        if t is not None:
            self.max_time = t if self.max_time is None else max(self.max_time, t)
        return kind

    def sorted_records(self) -> list[dict]:
        return [self.records[s] for s in sorted(self.records)]


def _fingerprint(rec: dict) -> str:
    raw = json.dumps(rec, sort_keys=True, default=str, allow_nan=True)
    return hashlib.blake2b(raw.encode(), digest_size=12).hexdigest()


def read_records(path: str | os.PathLike, *, warn: bool = True) -> list[dict]:
    """All records of a run (a run dir, an HF output dir or a metrics file), one per step, sorted by step
    (see `StepHistory` for restarted runs and repeated steps)."""
    hist = StepHistory()
    for rec in _read_lines(RunDir(path).require_metrics(), warn):
        hist.add(rec)
    return hist.sorted_records()


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


def tail_records(path: str | os.PathLike, *, poll_s: float = 0.2, from_start: bool = True,
                 stop: Callable[[], bool] | None = None, idle_timeout_s: float | None = None) -> Iterator[dict]:
    """Follow a growing metrics file like `tail -F`, yielding each record once its line is complete (in file order,
    not de-duplicated). Waits for the file to appear; starts again from the top when it is truncated or replaced.
    Ends when `stop()` is true or no record arrived for `idle_timeout_s` seconds."""
    p = Path(path)
    cands = RunDir(p).metrics_candidates()
    fd, ident, name, pos, buf, head, first = None, None, p, 0, b"", b"", True
    last = time.monotonic()
    try:
        while True:
            opened = _open_new(cands, ident)
            if opened is not None:  # the first open, or the file was replaced (a new inode)
                if fd is not None:
                    os.close(fd)
                fd, ident, name, size = opened
                buf, head = b"", b""
                # from_start=False: skip the complete lines already there (only in the file found first)
                pos = 0 if from_start or not first else os.pread(fd, size, 0).rfind(b"\n") + 1
                first = False
            if fd is not None:
                # truncated, or rewritten in place (its first bytes changed): start again from the top
                size = os.fstat(fd).st_size
                if size < pos or (head and os.pread(fd, len(head), 0) != head):
                    pos, buf, head = 0, b"", b""
                if size > pos:
                    chunk = os.pread(fd, size - pos, pos)
                    pos, buf = pos + len(chunk), buf + chunk
                if len(head) < 256 and pos > len(head):
                    head = os.pread(fd, min(pos, 256), 0)
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    if not raw.strip():
                        continue
                    rec, why = _parse(raw)
                    if rec is None:
                        warnings.warn(f"skipped a line of {name}: it {why}", stacklevel=2)
                        continue
                    last = time.monotonic()
                    yield rec
            if stop is not None and stop():
                return
            if idle_timeout_s is not None and time.monotonic() - last > idle_timeout_s:
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
    A row re-written for the same (group, sample) of a step (a restarted run) replaces the earlier one."""
    d = RunDir(run_dir).require_rollouts()
    rows: list[dict] = []
    for s in rollout_steps(d) if steps is None else sorted({int(s) for s in steps}):
        f = d / f"step_{s:06d}.jsonl"
        if not f.is_file():
            continue
        keyed: dict[Any, dict] = {}
        for i, r in enumerate(_read_lines(f, warn, _TEXT_KEYS)):
            key = (r["group"], r["sample"]) if "group" in r and "sample" in r else i
            keyed.pop(key, None)
            keyed[key] = r
        rows.extend(keyed.values())
    return rows
