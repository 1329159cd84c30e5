"""Read assistant turns from rollout files, classify them, and summarise the format-state mix.

Accepted inputs (auto-detected per file; a directory is scanned for ``*.jsonl`` and ``*.parquet``):

- JSONL, one object per line, with the first of these fields that is usable:
  ``turns`` (our ``rollouts/step_*.jsonl``: a list of assistant turns), ``text`` (one assistant turn),
  ``output`` (verl ``rollout_data_dir/{step}.jsonl`` from ``RayPPOTrainer._dump_generations``: the decoded
  response; a multi-turn trajectory is split into assistant turns at the tool-response blocks),
  ``completion`` (a TRL completion, as below). Optional ``group`` (default "all") and ``step``.
- Parquet written by TRL's GRPOTrainer with ``log_completions=True`` (``completions/completions_{step:05d}.parquet``,
  columns ``step``, ``prompt``, ``completion``, one column per reward function, ``advantage``). A completion is a
  string or a list of chat messages; each assistant message is one turn, its parsed ``tool_calls`` written back
  in the spec's tag syntax after its content.
The step comes from the row's ``step`` or else the file name (``completions_00010``, ``step_000010``, ``10``).
A directory holding ``rollouts/``, ``completions/`` or ``collapse_probe/rollouts/`` is read from there;
``metrics.jsonl`` is never read as rollouts.
"""
from __future__ import annotations

import json
import re
from bisect import bisect_right
from numbers import Integral, Real
from pathlib import Path
from typing import Iterable

from collapse_probe.formats.classify import STATES, FormatSpec, StateMix, classify_turn
from collapse_probe.errors import UserError

_WHAT = ("pass a JSONL of {\"text\": <one assistant turn>} lines, our rollouts/step_*.jsonl, a verl "
         "rollout_data_dir, or TRL completions/*.parquet (or a directory of them)")
_STEP_NAME = re.compile(r"^(?:completions_|step_|global_step_)?(\d+)$")
_SKIP_NAMES = {"metrics.jsonl"}


def load_turns(path: str | Path, spec: FormatSpec | None = None) -> list[dict]:
    """Every assistant turn found under ``path`` as ``{"text": str, "group": str, "step": int | None}``."""
    spec = spec or FormatSpec()
    turns: list[dict] = []
    for f in _rollout_files(Path(path)):
        turns.extend(_load_file(f, spec))
    return turns


def _rollout_files(path: Path) -> list[Path]:
    if not path.exists():
        raise UserError(f"{path}: no such file or directory; {_WHAT}")
    if path.is_file():
        return [path]
    for sub in ("rollouts", "completions", "collapse_probe/rollouts"):
        if (path / sub).is_dir():
            path = path / sub
            break

    def ok(p: Path) -> bool:
        return p.is_file() and p.suffix in (".jsonl", ".parquet") and p.name not in _SKIP_NAMES \
            and not p.name.startswith(".")

    files = [p for p in path.iterdir() if ok(p)] or [p for p in path.rglob("*") if ok(p)]
    if not files:
        raise UserError(f"{path}: no .jsonl or .parquet rollout files in this directory; {_WHAT}")
    return sorted(files, key=lambda p: (_step_from_name(p) is None, _step_from_name(p) or 0, str(p)))


def _step_from_name(p: Path) -> int | None:
    m = _STEP_NAME.match(p.stem)
    return int(m.group(1)) if m else None


def _as_step(v: object) -> int | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, Integral):
        return int(v)
    if isinstance(v, Real) and float(v).is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().isdigit():
        return int(v)
    return None


def _group(v: object) -> str:
    return "all" if v is None or (isinstance(v, float) and v != v) or str(v) == "" else str(v)


def _load_file(p: Path, spec: FormatSpec) -> list[dict]:
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror}); check the path and its permissions") from None
    if not raw.strip():
        raise UserError(f"{p}: file is empty; {_WHAT}")
    if raw[:4] == b"PAR1":
        return _load_parquet(p, spec)
    if p.suffix == ".parquet":
        raise UserError(f"{p}: not a parquet file (no PAR1 header); pass a parquet file written by TRL or a JSONL")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{p}: neither UTF-8 JSONL nor parquet; {_WHAT}") from None
    file_step = _step_from_name(p)
    out: list[dict] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise UserError(f"{p}:{n}: not a JSON object (expected JSONL, one object per line); {_WHAT}") from None
        if not isinstance(row, dict):
            raise UserError(f"{p}:{n}: a JSON {type(row).__name__}, expected an object per line; {_WHAT}")
        texts = _row_texts(row, spec)
        if texts is None:
            keys = ", ".join(list(row)[:8]) or "none"
            raise UserError(f"{p}:{n}: no usable text field (looked for 'turns', 'text', 'output', 'completion'; "
                            f"found {keys}); give each line a \"text\" string holding one assistant turn")
        step = _as_step(row.get("step"))
        group = _group(row.get("group"))
        out.extend({"text": t, "group": group, "step": step if step is not None else file_step} for t in texts)
    return out


def _row_texts(row: dict, spec: FormatSpec) -> list[str] | None:
    turns = row.get("turns")
    if isinstance(turns, list) and all(isinstance(t, (str, dict)) for t in turns):
        return [r for t in turns for r in ([t] if isinstance(t, str) else _completion_texts(t, spec))]
    if isinstance(row.get("text"), str):
        return [row["text"]]
    if isinstance(row.get("output"), str):
        return split_trajectory(row["output"], spec)
    if row.get("completion") is not None:
        return _completion_texts(row["completion"], spec)
    return None


def split_trajectory(text: str, spec: FormatSpec | None = None) -> list[str]:
    """Split a decoded multi-turn response (assistant turns with tool responses between them, special tokens
    kept or skipped) into assistant turns, using ``spec.turn_split``. A trajectory cut off after a tool response
    gives no empty last turn; an assistant header followed by nothing gives an empty turn."""
    spec = spec or FormatSpec()
    if not spec.turn_split:
        return [text]
    turns, pos = [], 0
    for m in re.finditer(spec.turn_split, text, re.S):
        if m.end() == m.start():
            continue
        piece = text[pos:m.start()]
        turns.append(piece[:-1] if piece.endswith("\n") else piece)  # the template's newline after end-of-turn
        pos = m.end()
        if m.group("next") is None:
            return turns
    turns.append(text[pos:])
    return turns


def _jsonable(o: object) -> object:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _message_text(msg: dict, spec: FormatSpec) -> str:
    content = msg.get("content")
    if isinstance(content, str):
        text = content
    elif content is None:
        text = ""
    else:  # a list of content blocks
        text = "".join(b.get("text") or "" for b in _seq(content) if isinstance(b, dict))
    calls = []
    for tc in _seq(msg.get("tool_calls")):
        fn = tc.get("function") if isinstance(tc, dict) and isinstance(tc.get("function"), dict) else tc
        if not isinstance(fn, dict):
            continue
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                pass
        calls.append({"name": fn.get("name"), "arguments": args})
    if not calls:
        return text
    dump = lambda o: json.dumps(o, ensure_ascii=False, default=_jsonable)  # noqa: E731
    if spec.call_list:
        rendered = spec.tool_open + dump(calls)
    else:
        close = f"\n{spec.tool_close}" if spec.tool_close else ""
        rendered = "\n".join(f"{spec.tool_open}\n{dump(c)}{close}" for c in calls)
    return f"{text}\n{rendered}" if text.strip() else rendered


def _seq(v: object) -> list:
    if v is None or isinstance(v, (str, bytes, dict)):
        return []
    try:
        return list(v)
    except TypeError:
        return []


def _completion_texts(value: object, spec: FormatSpec) -> list[str]:
    if isinstance(value, str):
        return [value]
    msgs = [value] if isinstance(value, dict) else _seq(value)
    return [_message_text(m, spec) for m in msgs
            if isinstance(m, dict) and (m.get("role") in (None, "assistant"))]


def _load_parquet(p: Path, spec: FormatSpec) -> list[dict]:
    try:
        import pandas as pd

        df = pd.read_parquet(p)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise UserError(f"{p}: cannot read parquet ({type(e).__name__}: {str(e)[:120]}); "
                        "pass a completions_*.parquet written by TRL") from None
    col = next((c for c in ("completion", "completions", "text", "output") if c in df.columns), None)
    if col is None:
        raise UserError(f"{p}: no 'completion' column (found {', '.join(map(str, df.columns[:8]))}); pass a "
                        "completions_*.parquet written by TRL's GRPOTrainer with log_completions=True")
    file_step = _step_from_name(p)
    steps = df["step"].tolist() if "step" in df.columns else [None] * len(df)
    groups = df["group"].tolist() if "group" in df.columns else [None] * len(df)
    out: list[dict] = []
    for value, step, group in zip(df[col].tolist(), steps, groups):
        s = _as_step(step)
        texts = split_trajectory(value, spec) if col == "output" and isinstance(value, str) \
            else _completion_texts(value, spec)
        out.extend({"text": t, "group": _group(group), "step": s if s is not None else file_step} for t in texts)
    return out


def summarise_turns(turns: Iterable[dict], spec: FormatSpec | None = None, *,
                    step_bins: int | None = None) -> dict:
    """Counts per group: ``{"groups": {GROUP: {"turns", <4 states>, "reasons": {code: n}}}}``. With ``step_bins``
    and at least one turn with a step, also ``"step_ranges": [{"first_step", "last_step", "groups": {...}}]``:
    the step span cut into ``step_bins`` equal integer ranges (fewer when the span is shorter)."""
    spec = spec or FormatSpec()
    rows = [(_group(t.get("group")), _as_step(t.get("step")), classify_turn(t.get("text", ""), spec)) for t in turns]
    groups: dict[str, StateMix] = {}
    for g, _, v in rows:
        groups.setdefault(g, StateMix()).add(v)
    out: dict = {"groups": {g: groups[g].to_dict() for g in sorted(groups)}}
    steps = [s for _, s, _ in rows if s is not None]
    if step_bins and step_bins > 0 and steps:
        lo, hi = min(steps), max(steps)
        k = min(step_bins, hi - lo + 1)
        edges = [lo + round(i * (hi - lo + 1) / k) for i in range(k + 1)]
        bins: list[dict[str, StateMix]] = [{} for _ in range(k)]
        for g, s, v in rows:
            if s is not None:
                bins[min(k - 1, bisect_right(edges, s) - 1)].setdefault(g, StateMix()).add(v)
        out["step_ranges"] = [{"first_step": edges[i], "last_step": edges[i + 1] - 1,
                               "groups": {g: b[g].to_dict() for g in sorted(b)}} for i, b in enumerate(bins)]
    return out


_LABELS = {"healthy_tool_call": "tool call", "healthy_response": "answer", "text_pollution": "pollution",
           "full_collapse": "collapse"}


def render_summary(summary: dict, top_reasons: int = 3):
    """One rich Table: a row per group, then a row per step range and group when the summary has ranges."""
    from rich.table import Table

    table = Table(title="Assistant-turn format states")
    table.add_column("group")
    table.add_column("steps")
    table.add_column("turns", justify="right")
    for s in STATES:
        table.add_column(_LABELS[s], justify="right")
    table.add_column("top reasons")

    def row(group: str, steps: str, d: dict) -> None:
        n = d.get("turns", 0)
        pct = [f"{100 * d.get(s, 0) / n:.0f}%" if n else "-" for s in STATES]
        if n and d.get("full_collapse", 0) / n >= 0.5:
            pct[3] = f"[bold red]{pct[3]}[/]"
        reasons = ", ".join(f"{r} {c}" for r, c in list(d.get("reasons", {}).items())[:top_reasons])
        table.add_row(group, steps, str(n), *pct, reasons)

    for g, d in summary.get("groups", {}).items():
        row(g, "all", d)
    for rng in summary.get("step_ranges", []):
        for g, d in rng["groups"].items():
            row(g, f"{rng['first_step']}-{rng['last_step']}", d)
    return table
