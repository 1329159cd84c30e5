"""The one record-line reader: JSONL files read in bounded chunks, each line parsed with bounded depth and size.

A line that cannot be read (torn, garbled, nested too deep, too long, no integer `step` in range) is skipped and
counted; `Skipped` turns the count into one warning per file (or, for a followed file, at most one every few
seconds), so a file of junk lines never floods the terminal. verl file-logger lines {"step": N, "data": {...}} are
flattened here, once (our verl integration's `actor/cp/...` keys back to `cp/...`, schema.from_verl_key). Float
NaN/inf stored as "NaN", "Infinity", "-Infinity" are decoded back. `iter_array` reads a file holding one JSON array
(the verl fork's step records) one element at a time.
"""
from __future__ import annotations

import codecs
import json
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from collapse_probe.schema import from_verl_key

__all__ = ["CHUNK", "MAX_DEPTH", "MAX_LINE_BYTES", "MAX_STEP", "Skipped", "iter_array", "iter_lines", "parse_line"]

MAX_LINE_BYTES = 64 << 20  # a longer line is skipped unread (rollout text lines are far shorter)
MAX_DEPTH = 32             # records are flat; a deeper value is junk, not data
MAX_STEP = 2 ** 53         # steps must fit an int64 index and a float exactly
CHUNK = 1 << 20            # bytes read at a time: memory never depends on the file's size
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class _TooDeep(ValueError):
    pass


def _decode(v: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise _TooDeep
    if isinstance(v, str):
        return _NONFINITE.get(v, v)
    if isinstance(v, list):
        return [_decode(x, depth + 1) for x in v]
    if isinstance(v, dict):
        return {k: _decode(x, depth + 1) for k, x in v.items()}
    return v


def _check_depth(v: Any, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise _TooDeep
    if isinstance(v, list):
        for x in v:
            _check_depth(x, depth + 1)
    elif isinstance(v, dict):
        for x in v.values():
            _check_depth(x, depth + 1)


def parse_line(raw: bytes, keep: frozenset = frozenset()) -> tuple[dict | None, str]:
    """(record, "") or (None, why it was skipped). Keys in `keep` are kept verbatim (rollout text)."""
    if len(raw) > MAX_LINE_BYTES:
        return None, f"is longer than {MAX_LINE_BYTES >> 20} MiB"
    try:
        obj = json.loads(raw)
    except RecursionError:  # the C scanner stops deep nesting itself; this is its signal
        return None, "is nested too deeply"
    except ValueError:
        return None, "is not a JSON object (torn or garbled line)"
    if not isinstance(obj, dict):
        return None, "is not a JSON object"
    if set(obj) == {"step", "data"} and isinstance(obj["data"], dict):  # verl file logger
        obj = {"step": obj["step"], **{from_verl_key(k): v for k, v in obj["data"].items() if k != "step"}}
    step = obj.get("step")
    if isinstance(step, float) and step.is_integer() and abs(step) <= MAX_STEP:
        step = int(step)
    if not isinstance(step, int) or isinstance(step, bool):
        return None, 'has no integer "step"'
    if abs(step) > MAX_STEP:
        return None, f'has a "step" out of range ({str(step)[:12]}...)'
    rec = {"step": step}
    try:
        for k, v in obj.items():
            t = type(v)
            if t is float or t is int:  # the usual value: nothing to decode (no call per key: analyze's hot loop)
                rec[k] = v
            elif k == "step":
                continue
            elif t is str and k not in keep:
                rec[k] = _NONFINITE.get(v, v)
            elif k in keep:
                _check_depth(v)
                rec[k] = v
            else:
                rec[k] = _decode(v)
        rec["step"] = step
    except _TooDeep:
        return None, "is nested too deeply"
    return rec, ""


def iter_lines(path: Path, start: int = 0) -> Iterator[tuple[int, int, bytes | None]]:
    """(line number, byte offset, line) for each non-blank line from byte `start`, read CHUNK bytes at a time
    (the last line may lack its newline); the line is None when it is longer than MAX_LINE_BYTES (its bytes are
    never held)."""
    with open(path, "rb") as f:
        f.seek(start)
        n, off, base, parts, size = 0, start, start, [], 0
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            i = 0
            while True:
                j = chunk.find(b"\n", i)
                piece = chunk[i:] if j < 0 else chunk[i:j]
                size += len(piece)
                if size <= MAX_LINE_BYTES:
                    parts.append(piece)
                else:
                    parts = []
                if j < 0:
                    break
                n += 1
                line = b"".join(parts) if size <= MAX_LINE_BYTES else None
                if line is None or line.strip():
                    yield n, off, line
                off, parts, size, i = base + j + 1, [], 0, j + 1
            base += len(chunk)
        if size:
            line = b"".join(parts) if size <= MAX_LINE_BYTES else None
            if line is None or line.strip():
                yield n + 1, off, line


_SPACE = " \t\r\n"


def iter_array(path: Path) -> Iterator[Any]:
    """The elements of a file holding one JSON array (`[{...}, {...}]`, pretty-printed or not), decoded one at a
    time from CHUNK-byte reads: memory holds one element, never the array. An element longer than MAX_LINE_BYTES,
    a file that is not one array, or one cut short raises ValueError saying which element."""
    dec, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof, started, sep, n = "", 0, False, False, False, 0
    with open(path, "rb") as f:
        def more() -> None:
            nonlocal buf, pos, eof
            if len(buf) - pos > MAX_LINE_BYTES:
                raise ValueError(f"element {n + 1} is longer than {MAX_LINE_BYTES >> 20} MiB")
            chunk = f.read(CHUNK)
            eof = not chunk
            try:
                buf, pos = buf[pos:] + utf8.decode(chunk, final=eof), 0
            except UnicodeDecodeError:
                raise ValueError(f"is not UTF-8 text (near element {n + 1})") from None

        while True:
            while pos < len(buf) and buf[pos] in _SPACE:
                pos += 1
            if pos >= len(buf):
                if eof:
                    raise ValueError("is empty" if not started else f"is cut short after element {n}")
                more()
                continue
            c = buf[pos]
            if not started:
                if c != "[":
                    raise ValueError("is not a JSON array (it does not start with '[')")
                started, pos = True, pos + 1
            elif c == "]":
                return
            elif sep:
                if c != ",":
                    raise ValueError(f"has no ',' after element {n}")
                sep, pos = False, pos + 1
            else:
                try:
                    obj, end = dec.raw_decode(buf, pos)
                except (ValueError, RecursionError):
                    obj, end = None, -1
                # an element ending where the text read so far ends may be incomplete (a number cut in two, or
                # a string): read on before deciding
                if (end < 0 or end == len(buf)) and not eof:
                    more()
                    continue
                if end < 0:
                    raise ValueError(f"element {n + 1} is not JSON (garbled or cut short)")
                n += 1
                yield obj
                pos, sep = end, True


class Skipped:
    """Counts unreadable lines of one file; `flush()` warns once with the count (rate-limited while following)."""

    def __init__(self, name: Path | str, every_s: float | None = None):
        self.name, self.every_s = name, every_s
        self.count = self.pending = 0
        self.first: tuple[int, str] | None = None
        self._last_warn = time.monotonic()

    def add(self, n: int | None, why: str) -> None:
        self.count += 1
        self.pending += 1
        if self.first is None:
            self.first = (n or 0, why)
        if self.every_s is not None and time.monotonic() - self._last_warn >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        n, why = self.first or (0, "is unreadable")
        where = f"line {n} of {self.name}" if n else f"a line of {self.name}"
        msg = f"skipped {where}: it {why}" if self.count == 1 else \
            f"skipped lines: {self.pending} unreadable lines of {self.name} (the first, {where}: it {why})"
        warnings.warn(msg, stacklevel=3)
        self.pending, self._last_warn = 0, time.monotonic()

