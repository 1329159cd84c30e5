"""The user's own tasks, one JSON object per line (`--tasks FILE`):

    {"id": "weather-1",                                   optional (default: line-N)
     "tools": [{"type": "function", "function": {"name": "get_weather", "description": "...",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}}],   the OpenAI/HF `tools` form (a bare function too)
     "turns": [{"user": "Weather in Paris?",              the user's message ("messages": [...] for several)
                "calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],   ground truth, may be []
                "results": ["{\"sky\": \"sunny\"}"]}]}    optional: what each ground-truth call returns

There is no executable environment: a call matching an unused ground-truth call of the turn (name and arguments)
gets that call's result (or {"status": "ok"}), any other call an error observation, and a turn passes when all
its ground-truth calls were made (`tasks.base.GoldCalls`). Every problem is one UserError line naming the file
and line: a missing file, a line that is not JSON, a missing or mistyped field.
"""

from __future__ import annotations

import json
from pathlib import Path

from collapse_probe.errors import UserError
from collapse_probe.tasks.base import TaskSource, ToolTask

SCHEMA_HINT = 'each line: {"tools": [...], "turns": [{"user": "...", "calls": [{"name": ..., "arguments": {...}}]}]}'


def _tool(raw: object, where: str) -> dict:
    fn = raw.get("function", raw) if isinstance(raw, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise UserError(f"{where}: a tool needs a string 'name' (OpenAI form: {{\"type\": \"function\", "
                        "\"function\": {\"name\": ..., \"parameters\": {...}}}); " + SCHEMA_HINT)
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise UserError(f"{where}: tool {fn['name']!r}: 'parameters' must be a JSON-schema object")
    return {"type": "function", "function": {"name": fn["name"], "description": str(fn.get("description", "")),
                                             "parameters": params}}


def _call(raw: object, where: str) -> dict:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not isinstance(raw.get("arguments", {}),
                                                                                           dict):
        raise UserError(f"{where}: a call needs a string 'name' and an object 'arguments'; " + SCHEMA_HINT)
    return {"name": raw["name"], "arguments": dict(raw.get("arguments", {}))}


def _turn(raw: object, where: str) -> tuple[list[dict], list[dict], list]:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a turn must be an object; " + SCHEMA_HINT)
    if "messages" in raw:
        msgs = raw["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in msgs):
            raise UserError(f"{where}: 'messages' must be a list of {{\"role\", \"content\"}} objects")
        msgs = [{"role": str(m.get("role", "user")), "content": m["content"]} for m in msgs]
    elif isinstance(raw.get("user"), str):
        msgs = [{"role": "user", "content": raw["user"]}]
    else:
        raise UserError(f"{where}: missing field 'user' (the user's message) or 'messages'; " + SCHEMA_HINT)
    if "calls" not in raw:
        raise UserError(f"{where}: missing field 'calls' (the ground-truth calls of the turn, [] for none); "
                        + SCHEMA_HINT)
    if not isinstance(raw["calls"], list):
        raise UserError(f"{where}: 'calls' must be a list")
    calls = [_call(c, where) for c in raw["calls"]]
    results = raw.get("results") or []
    if not isinstance(results, list):
        raise UserError(f"{where}: 'results' must be a list of strings, one per call")
    return msgs, calls, [r if r is None or isinstance(r, str) else json.dumps(r) for r in results]


def load_jsonl(path: str | Path) -> TaskSource:
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "no such task file"
        raise UserError(f"{path}: {what}; pass a JSONL file of tasks (--tasks FILE) or bfcl:CATEGORY")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({type(exc).__name__})") from None
    tasks = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{where}: not JSON ({exc.msg} at column {exc.colno}); {SCHEMA_HINT}") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object; {SCHEMA_HINT}")
        for key in ("tools", "turns"):
            if key not in obj:
                raise UserError(f"{where}: missing field {key!r}; {SCHEMA_HINT}")
            if not isinstance(obj[key], list) or (key == "turns" and not obj[key]):
                raise UserError(f"{where}: {key!r} must be a {'non-empty ' if key == 'turns' else ''}list")
        turns = [_turn(t, f"{where} turn {i}") for i, t in enumerate(obj["turns"])]
        tasks.append(ToolTask(id=str(obj.get("id", f"line-{n}")), turns=[t[0] for t in turns],
                              tools=[_tool(t, where) for t in obj["tools"]], gold=[t[1] for t in turns],
                              results=[t[2] for t in turns]))
    if not tasks:
        raise UserError(f"{path}: no task in it; {SCHEMA_HINT}")
    return TaskSource(str(path), tasks, f"{len(tasks)} task(s) from {p.name}")
