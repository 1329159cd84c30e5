"""One record per step from lines in file order, the way a restarted run means them (docs/DESIGN.md).

Each line is one of
* "new": a step after the last one;
* "duplicate": the same line again, or an older line read again (its `time` is not later than the newest record
  seen): ignored;
* "merged": more keys for the last step (e.g. eval metrics logged after the train metrics);
* "restart": an earlier step with new content (resumed from a checkpoint, or a truncated log): the steps from that
  step on are dropped and this one is kept.
`StepHistory` holds the surviving records (`watch` following a run); `StepIndex` applies the same rules to a file
holding only each surviving step's fingerprint and line offsets (24 bytes a step), and reads the records back in
step order, so `analyze` and `watch --once` never hold a run's records in memory.
"""
from __future__ import annotations

import hashlib
import json
from array import array
from bisect import bisect_left
from pathlib import Path
from typing import Iterator

from collapse_probe import schema
from collapse_probe.runs.lines import parse_line

__all__ = ["StepHistory", "StepIndex", "fingerprint"]


def fingerprint(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _record_fingerprint(rec: dict) -> int:
    return fingerprint(json.dumps(rec, sort_keys=True, default=str, allow_nan=True).encode())


def _time(rec: dict) -> float | None:
    t = rec.get(schema.TIME)
    return schema.finite_or_none(t)


class _Rules:
    """The classification shared by both stores; subclasses keep what they need per step."""

    def __init__(self) -> None:
        self.last_step: int | None = None
        self.max_time: float | None = None
        self.restarts = 0

    def _fp_at(self, step: int) -> int | None:
        raise NotImplementedError

    def _drop_from(self, step: int) -> None:
        raise NotImplementedError

    def _classify(self, step: int, fp: int, t: float | None) -> str:
        kind = "new"
        if self.last_step is not None and step <= self.last_step:
            if self._fp_at(step) == fp or (t is not None and self.max_time is not None and t <= self.max_time):
                return "duplicate"
            if step == self.last_step and self._fp_at(step) is not None:
                kind = "merged"
            else:
                kind = "restart"
                self.restarts += 1
                self._drop_from(step)
        self.last_step = step
        if t is not None:
            self.max_time = t if self.max_time is None else max(self.max_time, t)
        return kind


class StepHistory(_Rules):
    """The surviving records by step. `add(record)` says what the record is (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[int, dict] = {}
        self._fingerprints: dict[int, int] = {}

    def _fp_at(self, step: int) -> int | None:
        return self._fingerprints.get(step)

    def _drop_from(self, step: int) -> None:
        for s in [s for s in self.records if s >= step]:
            del self.records[s]
            self._fingerprints.pop(s, None)

    def add(self, rec: dict) -> str:
        step, fp = rec["step"], _record_fingerprint(rec)
        kind = self._classify(step, fp, _time(rec))
        if kind == "duplicate":
            return kind
        self.records[step] = {**self.records[step], **rec} if kind == "merged" else rec
        self._fingerprints[step] = fp
        return kind

    def sorted_records(self) -> list[dict]:
        return [self.records[s] for s in sorted(self.records)]


class StepIndex(_Rules):
    """The surviving steps of one file as offsets; `records()` re-reads and merges them in step order.
    Surviving steps always increase (a restart drops the tail), so they are a stack of parallel arrays."""

    def __init__(self, path: Path, keep: frozenset = frozenset()) -> None:
        super().__init__()
        self.path, self.keep = path, keep
        self.steps, self.fps, self.offsets = array("q"), array("Q"), array("q")
        self.extra: dict[int, list[int]] = {}  # stack position -> offsets of the lines merged into that step
        self.keys: set[str] = set()              # every key seen (to pick the capture source up front)

    def __len__(self) -> int:
        return len(self.steps)

    def _pos(self, step: int) -> int:
        return bisect_left(self.steps, step)

    def _fp_at(self, step: int) -> int | None:
        i = self._pos(step)
        return self.fps[i] if i < len(self.steps) and self.steps[i] == step else None

    def _drop_from(self, step: int) -> None:
        i = self._pos(step)
        del self.steps[i:], self.fps[i:], self.offsets[i:]
        for k in [k for k in self.extra if k >= i]:
            del self.extra[k]

    def add(self, rec: dict, raw: bytes, offset: int) -> str:
        self.keys.update(rec)
        kind = self._classify(rec["step"], fingerprint(raw.strip()), _time(rec))
        if kind == "duplicate":
            return kind
        fp = fingerprint(raw.strip())
        if kind == "merged":
            self.fps[-1] = fp
            self.extra.setdefault(len(self.steps) - 1, []).append(offset)
        else:
            self.steps.append(rec["step"])
            self.fps.append(fp)
            self.offsets.append(offset)
        return kind

    def records(self) -> Iterator[dict]:
        """The surviving records in step order, read back one at a time (a line gone since is skipped)."""
        with open(self.path, "rb") as f:
            def read(off: int) -> dict | None:
                f.seek(off)
                return parse_line(f.readline(), self.keep)[0]

            for i, off in enumerate(self.offsets):
                rec = read(off)
                if rec is None:
                    continue
                for more in self.extra.get(i, ()):
                    rec.update(read(more) or {})
                yield rec
