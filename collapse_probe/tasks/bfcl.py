"""BFCL v4 multi-turn tasks from the installed `bfcl-eval` package (data files read from the package's path).

    bfcl:multi_turn_base        200 entries: user turns, initial_config, involved_classes
    bfcl:multi_turn_miss_param  the same scenarios, a parameter missing from one turn (its ground truth is empty)
    bfcl:multi_turn_miss_func   a function held back until a later turn (`missed_function`), whose user message
                                is BFCL's "I have updated some more functions you can choose from. What about now?"

Tools come from `data/multi_turn_func_doc/` converted to the OpenAI/HF JSON-schema form with BFCL's own type
map (`GORILLA_TO_OPENAPI`). Ground-truth call strings (`data/possible_answer/`) are read with the project's
literal-only python-list parser (formats/calls.py); the 120 positional arguments in them (`sort('a.pdf')`) are
first bound to their parameter names from the method's signature, with `ast` nodes moved, never evaluated.
Only the package's data files, constants, environment classes and pure checkers are used; its executor (which
`eval`s model output) never is.
"""

from __future__ import annotations

import ast
import copy
import json
from functools import lru_cache
from pathlib import Path

from collapse_probe.errors import UserError
from collapse_probe.formats.calls import PythonCallError, parse_python_calls
from collapse_probe.tasks.base import Call, TaskSource, ToolTask
from collapse_probe.tasks.bfcl_env import BfclEnvironment, make_instances, method_table, param_names

CATEGORIES = ("multi_turn_base", "multi_turn_miss_param", "multi_turn_miss_func")
PREFIX = "bfcl:"
ADDED_FUNCTIONS_MESSAGE = "I have updated some more functions you can choose from. What about now?"  # BFCL's


def data_dir() -> Path:
    """The installed package's data directory, or one UserError line when bfcl-eval is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("bfcl tasks need the bfcl-eval package, which is not installed: run `make setup` (it "
                        "installs bfcl-eval==2026.3.23 with --no-deps) or pip install --no-deps bfcl-eval==2026.3.23")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _cast(schema: dict, mapping: dict) -> dict:
    """A BFCL parameter schema with its types in JSON-schema spelling (nested properties and items too)."""
    out = dict(schema)
    if "type" in out:
        out["type"] = mapping.get(out["type"], "string")
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _cast(v, mapping) for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = _cast(out["items"], mapping)
    return out


def to_tool(doc: dict) -> dict:
    """One BFCL function doc -> {"type": "function", "function": {name, description, parameters}}."""
    from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI

    params = _cast(copy.deepcopy(doc.get("parameters") or {}), GORILLA_TO_OPENAPI)
    params["type"] = "object"
    params.setdefault("properties", {})
    return {"type": "function", "function": {"name": doc["name"], "description": doc.get("description", ""),
                                             "parameters": params}}


@lru_cache(maxsize=None)
def _class_docs(class_name: str) -> tuple[dict, ...]:
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

    return tuple(_read_lines(data_dir() / "multi_turn_func_doc" / MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name]))


def keywordize(source: str, order: dict[str, list[str]]) -> str:
    """`[f('a', b=1)]` -> `[f(file='a', b=1)]` with `order[f]` naming the positional slots. Only the syntax tree
    is rearranged (nothing is evaluated); a call without positional arguments is left as it is."""
    tree = ast.parse(source.strip(), mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Name):
            names = order.get(node.func.id, [])
            if len(node.args) > len(names) or any(isinstance(a, ast.Starred) for a in node.args):
                raise PythonCallError(f"{node.func.id}: more positional arguments than parameters")
            node.keywords = [ast.keyword(arg=n, value=a) for n, a in zip(names, node.args)] + node.keywords
            node.args = []
    return ast.unparse(tree)


def read_gold(strings: list[str], order: dict[str, list[str]]) -> list[Call]:
    """BFCL ground-truth call strings of one turn -> calls with keyword arguments (literal-only parsing)."""
    if not strings:
        return []
    return parse_python_calls(keywordize("[" + ", ".join(strings) + "]", order))


@lru_cache(maxsize=8)
def _entries(category: str) -> tuple[tuple[dict, dict], ...]:
    root = data_dir()
    name = f"BFCL_v4_{category}.json"
    questions, answers = _read_lines(root / name), {a["id"]: a for a in _read_lines(root / "possible_answer" / name)}
    return tuple((q, answers[q["id"]]) for q in questions)


def _order_for(involved: list[str], config: dict) -> dict[str, list[str]]:
    return param_names(method_table(make_instances(involved, config)))


def entry_task(entry: dict, answer: dict, order: dict[str, list[str]] | None = None) -> ToolTask:
    """One BFCL entry as a ToolTask with its executable environment."""
    involved, config = list(entry["involved_classes"]), entry.get("initial_config", {})
    order = order if order is not None else _order_for(involved, config)
    docs = [d for c in involved for d in _class_docs(c)]
    held = {int(k): list(v) for k, v in (entry.get("missed_function") or {}).items()}
    held_names = {n for names in held.values() for n in names}
    turns = []
    for k, msgs in enumerate(entry["question"]):
        turns.append(list(msgs) if msgs else [{"role": "user", "content": ADDED_FUNCTIONS_MESSAGE}])
    gold = [read_gold(t, order) for t in answer["ground_truth"]]
    by_name = {d["name"]: d for d in docs}
    task = ToolTask(
        id=entry["id"], turns=turns, tools=[to_tool(d) for d in docs if d["name"] not in held_names], gold=gold,
        added_tools={k: [to_tool(by_name[n]) for n in names if n in by_name] for k, names in held.items()},
        meta={"involved_classes": involved, "initial_config": config, "gold_text": answer["ground_truth"]})
    task.env_factory = lambda: BfclEnvironment(involved, config, gold)
    return task


def parse_spec(spec: str) -> str:
    """`bfcl:multi_turn_base` (or `bfcl:base`) -> the category; unknown ones raise one UserError line."""
    cat = spec[len(PREFIX):].strip() if spec.startswith(PREFIX) else spec.strip()
    if cat and not cat.startswith("multi_turn_"):
        cat = "multi_turn_" + cat
    if cat not in CATEGORIES:
        raise UserError(f"unknown BFCL category {spec!r}: choose from " + ", ".join(PREFIX + c for c in CATEGORIES))
    return cat


def load_bfcl(spec: str) -> TaskSource:
    """All entries of one multi-turn category as a TaskSource (order as in the package's file)."""
    cat = parse_spec(spec)
    data_dir()  # the install check, before anything else
    tasks = []
    orders: dict[tuple[str, ...], dict[str, list[str]]] = {}  # signatures do not depend on the scenario
    for entry, answer in _entries(cat):
        key = tuple(entry["involved_classes"])
        if key not in orders:
            orders[key] = _order_for(list(key), entry.get("initial_config", {}))
        tasks.append(entry_task(entry, answer, orders[key]))
    return TaskSource(PREFIX + cat, tasks, f"BFCL v4 {cat} (bfcl-eval), {len(tasks)} entries")
