"""Read assistant turns from rollout files (classified by the caller: `runs.turn_summary`, `runs.joined`).

Accepted inputs (auto-detected per file), read line by line or element by element (one row in memory):
- JSONL, one object per line, with the first usable field of ``turns`` (our ``rollouts/step_*.jsonl``), ``text``
  (one assistant turn), ``output`` (verl's ``rollout_data_dir`` / ``validation_data_dir`` ``{step}.jsonl`` from
  ``RayPPOTrainer._dump_generations``, decoded with skip_special_tokens: a multi-turn response is split into
  assistant turns at the tool-response blocks), ``completion`` (TRL, as below). Optional ``group``, ``step``.
- The verl-tool fork's ``verl_step_records/{run_id}/{name}-step-[val-]N.json``: one JSON array of
  ``{"prompt", "response", "score", "reward", "tool_interact_info": [{"action", ...}]}``, special tokens kept
  (``response`` split into turns, else each ``action`` a turn); ``-step-val-`` files are group "val".
- TRL's ``completions/completions_{step:05d}.parquet`` (``log_completions=True``): each assistant message of a
  completion is one turn, its parsed ``tool_calls`` written back in the spec's tag syntax after its content.
The step comes from the row's ``step`` or else the file name. A directory is read from its ``rollouts/``,
``completions/`` or ``collapse_probe/rollouts/``, else its own files, else verl's dumps and records below it (a
run's parent: several dump directories are one group each, named after the directory). ``metrics.jsonl`` and
verl's file-logger logs are never read as rollouts.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator
from numbers import Integral, Real
from pathlib import Path

from collapse_probe.runs import verl_files
from collapse_probe.errors import UserError
from collapse_probe.formats.classify import FormatSpec
from collapse_probe.runs.lines import iter_array, iter_lines

_WHAT = ("pass a JSONL of {\"text\": <one assistant turn>} lines, our rollouts/step_*.jsonl, a verl "
         "rollout_data_dir or verl_step_records/<run>/, or TRL completions/*.parquet (or a directory of them)")
_STEP_NAME = re.compile(r"^(?:completions_|step_|global_step_)?(\d+)$")
_SKIP_NAMES = {"metrics.jsonl"}


def load_turns(path: str | Path, spec: FormatSpec | None = None) -> list[dict]:
    """Every assistant turn found under ``path`` as ``{"text": str, "group": str, "step": int | None}``, plus
    ``"user": str`` (the user's message the turn answers) when the row holds its prompt."""
    return [_turn(t, row["group"], row["step"], row.get("user")) for row in iter_rows(path, spec)
            for t in row["texts"]]


def iter_rows(path: str | Path, spec: FormatSpec | None = None) -> Iterator[dict]:
    """One dict per sampled trajectory: ``{"texts": [assistant turns], "group", "step", "user", "score",
    "success"}`` (``score``: the row's reward, ``success``: its 0/1 accuracy, each None when the row has none)."""
    spec = spec or FormatSpec()
    for f, group in rollout_files(Path(path)):
        yield from _iter_file(f, spec, group)


def rollout_files(path: Path) -> list[tuple[Path, str | None]]:
    """(file, group for its rows or None) of every rollout file under ``path``, by step."""
    if not path.exists():
        raise UserError(f"{path}: no such file or directory; {_WHAT}")
    if path.is_file():
        return [(path, None)]
    for sub in ("rollouts", "completions", "collapse_probe/rollouts"):
        if (path / sub).is_dir():
            path = path / sub
            break
    files = [(p, None) for p in _own_files(path)]
    if not files:
        lay = verl_files.scan(path)
        dirs = lay.dumps + lay.records
        named = len(dirs) > 1  # several dump/record directories (train and validation): one group each
        files = [(p, d.name if named else None) for d in dirs for p in _own_files(d)]
    if not files:
        files = [(p, None) for p in sorted(path.rglob("*")) if _ok(p)]
    if not files:
        raise UserError(f"{path}: no .jsonl or .parquet rollout files in this directory; {_WHAT}")
    return sorted(files, key=lambda fg: (_step_from_name(fg[0]) is None, _step_from_name(fg[0]) or 0, str(fg[0])))


def _ok(p: Path) -> bool:
    if not p.is_file() or p.name in _SKIP_NAMES or p.name.startswith("."):
        return False
    if p.suffix == ".json":
        return verl_files.records_step(p) is not None
    return p.suffix == ".parquet" or (p.suffix == ".jsonl" and not verl_files.is_log(p))


def _own_files(d: Path) -> list[Path]:
    return [p for p in sorted(d.iterdir()) if _ok(p)]


def _step_from_name(p: Path) -> int | None:
    rec = verl_files.records_step(p)
    if rec is not None:
        return rec[0]
    m = _STEP_NAME.match(p.stem)
    return int(m.group(1)) if m else None


def as_step(v: object) -> int | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, Integral):
        return int(v)
    if isinstance(v, Real) and float(v).is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().isdigit():
        return int(v)
    return None


def group_name(v: object) -> str:
    return "all" if v is None or (isinstance(v, float) and math.isnan(v)) or str(v) == "" else str(v)


def _iter_file(p: Path, spec: FormatSpec, group: str | None) -> Iterator[dict]:
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror}); check the path and its permissions") from None
    if head == b"PAR1":
        yield from _load_parquet(p, spec, group)
        return
    if p.suffix == ".parquet":
        raise UserError(f"{p}: not a parquet file (no PAR1 header); pass a parquet file written by TRL or a JSONL")
    if verl_files.is_log(p):
        raise UserError(f"{p} is verl's file-logger log (metrics, no turns): pass the trainer.rollout_data_dir "
                        "dumps, or run `collapse-probe analyze` on this file")
    rec = verl_files.records_step(p) if p.suffix == ".json" else None
    if rec is not None:
        yield from _iter_records(p, spec, rec, group)
        return
    file_step = _step_from_name(p)
    seen = False
    bad: list[tuple[int, str]] = []  # torn or garbled lines: skipped with one warning, as the run log reader does
    try:
        for n, _, line in iter_lines(p):
            if line is None:
                bad.append((n, "longer than 64 MiB"))
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                bad.append((n, "not a JSON object (expected JSONL, one object per line)"))
                continue
            if not isinstance(row, dict):
                bad.append((n, f"a JSON {type(row).__name__}, expected an object per line"))
                continue
            texts = _row_texts(row, spec)
            if texts is None:
                keys = ", ".join(list(row)[:8]) or "none"
                raise UserError(f"{p}:{n}: no usable text field (looked for 'turns', 'text', 'output', 'completion';"
                                f" found {keys}); give each line a \"text\" string holding one assistant turn")
            seen = True
            step = as_step(row.get("step"))
            yield _row(texts, row, group, step if step is not None else file_step, row.get("prompt", row.get("input")))
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror}); check the path and its permissions") from None
    if bad and not seen:
        raise UserError(f"{p}:{bad[0][0]}: {bad[0][1]}; {_WHAT}")
    if not bad and not seen:
        raise UserError(f"{p}: file is empty; {_WHAT}")
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable line(s) of {p} (the first, line {bad[0][0]}: {bad[0][1]})",
                      stacklevel=2)


def _iter_records(p: Path, spec: FormatSpec, rec: tuple[int, bool], group: str | None) -> Iterator[dict]:
    """The fork's step records: one JSON array, element by element."""
    step, val = rec
    n = 0
    try:
        for n, row in enumerate(iter_array(p), 1):
            if not isinstance(row, dict):
                raise UserError(f"{p}: element {n} is a JSON {type(row).__name__}, expected an object per record; "
                                f"{_WHAT}")
            texts = verl_files.record_texts(row, lambda text: split_trajectory(text, spec))
            if texts is None:
                keys = ", ".join(list(row)[:8]) or "none"
                raise UserError(f"{p}: element {n} has no 'response' or 'tool_interact_info' actions (found "
                                f"{keys}); pass the step records written by the verl-tool reward manager")
            yield _row(texts, row, group or ("val" if val else None), step, row.get("prompt"))
    except ValueError as e:
        raise UserError(f"{p}: {e}; pass a step-records file holding one JSON array of records") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror}); check the path and its permissions") from None


def _row(texts: list[str], row: dict, group: str | None, step: int | None, prompt: object) -> dict:
    score, success = verl_files.row_outcome(row)
    return {"texts": texts, "group": group_name(group if group is not None else row.get("group")), "step": step,
            "user": _user_message(prompt), "score": score, "success": success}


def _turn(text: str, group: object, step: int | None, user: str | None) -> dict:
    turn = {"text": text, "group": group_name(group), "step": step}
    if user:
        turn["user"] = user
    return turn


_LAST_USER = re.compile(r"(?:<\|im_start\|>|<\|start_header_id\|>|^|\n)user(?:<\|end_header_id\|>)?\n+"
                        r"((?:(?!<\|im_start\|>|<\|start_header_id\|>|\nassistant\n).)*)", re.DOTALL)


def _user_message(prompt: object) -> str | None:
    """The last user message of a prompt: TRL's list of chat messages or plain string, or a decoded ChatML /
    Llama 3 prompt (verl's ``input``); None when there is none. Used to spot turns that echo the user."""
    if isinstance(prompt, str):
        found = _LAST_USER.findall(prompt)
        text = found[-1] if found else prompt
        for eot in ("<|im_end|>", "<|eot_id|>"):
            text = text.split(eot, 1)[0]
        return text.strip() or None
    users = [m.get("content") for m in _seq(prompt) if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(users[-1], str):
        return None
    return users[-1].strip() or None


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
    for m in re.finditer(spec.turn_split, text, re.DOTALL):
        if m.end() == m.start():
            continue
        piece = text[pos:m.start()]
        turns.append(piece.removesuffix("\n"))  # the template's newline after end-of-turn
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
    dump = lambda o: json.dumps(o, ensure_ascii=False, default=_jsonable)
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


def _load_parquet(p: Path, spec: FormatSpec, group: str | None) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(p)
        names = pf.schema_arrow.names
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
        raise UserError(f"{p}: cannot read parquet ({type(e).__name__}: {str(e)[:120]}); "
                        "pass a completions_*.parquet written by TRL") from None
    col = next((c for c in ("completion", "completions", "text", "output") if c in names), None)
    if col is None:
        raise UserError(f"{p}: no 'completion' column (found {', '.join(map(str, names[:8]))}); pass a "
                        "completions_*.parquet written by TRL's GRPOTrainer with log_completions=True")
    file_step = _step_from_name(p)
    cols = [c for c in (col, "step", "group", "prompt") if c in names]
    try:
        batches = pf.iter_batches(batch_size=256, columns=cols)  # a row group at a time, not the whole table
        for batch in batches:
            d = batch.to_pydict()
            none = [None] * batch.num_rows
            for value, step, grp, prompt in zip(d[col], d.get("step", none), d.get("group", none),
                                                 d.get("prompt", none)):
                s = as_step(step)
                texts = split_trajectory(value, spec) if col == "output" and isinstance(value, str) \
                    else _completion_texts(value, spec)
                yield _row(texts, {"group": grp}, group, s if s is not None else file_step, prompt)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt row group
        raise UserError(f"{p}: cannot read parquet ({type(e).__name__}: {str(e)[:120]}); "
                        "pass a completions_*.parquet written by TRL") from None
