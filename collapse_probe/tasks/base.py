"""One interface for the tasks forensics runs on: user turns, tools, ground-truth calls per turn, an environment.

A `ToolTask` is one multi-turn conversation to solve:

    turns        the user's messages, one list per user turn ({"role", "content"} dicts)
    tools        the tools available from the first turn, in the OpenAI/HF `tools` JSON-schema form
                 ({"type": "function", "function": {"name", "description", "parameters"}})
    added_tools  {turn: tools} made available from that turn on (BFCL's miss_func holds functions back)
    gold         the ground-truth calls per user turn, {"name", "arguments"} (arguments by keyword)

`ToolTask.environment()` opens a fresh `Environment` for one episode: `call(name, arguments)` executes one
call and returns the observation the model sees (errors included, as text); `end_turn()` scores the user turn
just finished. Without an environment factory, calls are checked by name and arguments against the turn's
ground truth (`GoldCalls`). A `TaskSource` holds a named list of tasks and splits it into two disjoint halves:
`eval` (even positions) and `repair` (odd positions), so SFT repair never trains on an evaluated task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Protocol

from collapse_probe.errors import UserError

Call = dict  # {"name": str, "arguments": dict}
SPLITS = ("eval", "repair", "all")


@dataclass(frozen=True)
class TurnCheck:
    """The verdict on one user turn: `valid`, and why not (BFCL's error types where the check is BFCL's)."""

    valid: bool
    reason: str = ""


class Environment(Protocol):
    def call(self, name: str, arguments: dict) -> str:
        """Execute one call; the observation text (an error is an observation, never an exception)."""

    def end_turn(self) -> TurnCheck:
        """Score the user turn whose calls came since the last `end_turn`, and move to the next turn."""


def same_call(a: Call, b: Call) -> bool:
    """Same function name and the same arguments (JSON values compared as Python values: 2 == 2.0)."""
    return a.get("name") == b.get("name") and a.get("arguments") == b.get("arguments")


def match_count(gold: list[Call], got: list[Call]) -> int:
    """How many gold calls appear among `got`, each `got` call used at most once (order ignored)."""
    left = list(got)
    hits = 0
    for g in gold:
        for i, c in enumerate(left):
            if same_call(g, c):
                hits += 1
                del left[i]
                break
    return hits


class GoldCalls:
    """The environment of a task without an executable one: a call that matches an unused ground-truth call of
    the current turn gets that call's result (or {"status": "ok"}); any other call gets an error observation. A
    turn passes when every ground-truth call of the turn was made (order ignored)."""

    def __init__(self, task: "ToolTask"):
        self.task, self.turn = task, 0
        self.made: list[Call] = []
        self.used: set[int] = set()  # ground-truth calls of this turn already made

    def call(self, name: str, arguments: dict) -> str:
        gold = self.task.gold[self.turn] if self.turn < len(self.task.gold) else []
        results = self.task.results[self.turn] if self.turn < len(self.task.results) else []
        made = {"name": name, "arguments": arguments}
        self.made.append(made)
        for i, g in enumerate(gold):
            if i not in self.used and same_call(g, made):
                self.used.add(i)
                return results[i] if i < len(results) and results[i] is not None else json.dumps({"status": "ok"})
        return json.dumps({"error": f"{name}: not a call this task expects here"})

    def end_turn(self) -> TurnCheck:
        gold = self.task.gold[self.turn] if self.turn < len(self.task.gold) else []
        made, self.made, self.used, self.turn = self.made, [], set(), self.turn + 1
        if match_count(gold, made) == len(gold):
            return TurnCheck(True)
        return TurnCheck(False, "missing ground-truth calls")


@dataclass
class ToolTask:
    id: str
    turns: list[list[dict]]
    tools: list[dict]
    gold: list[list[Call]]
    added_tools: dict[int, list[dict]] = field(default_factory=dict)
    results: list[list[str | None]] = field(default_factory=list)  # GoldCalls' observations (optional)
    env_factory: Callable[[], Environment] | None = None
    meta: dict = field(default_factory=dict)

    def tools_at(self, turn: int) -> list[dict]:
        """The tools the model may call in user turn `turn` (the first ones plus any added up to it)."""
        out = list(self.tools)
        for k in sorted(self.added_tools):
            if k <= turn:
                out += self.added_tools[k]
        return out

    def environment(self) -> Environment:
        return self.env_factory() if self.env_factory is not None else GoldCalls(self)

    def param_order(self) -> dict[str, list[str]]:
        """Tool name -> its parameter names in schema order (binds positional python-list arguments)."""
        out: dict[str, list[str]] = {}
        for tool in self.tools_at(len(self.turns)):
            fn = tool.get("function", tool)
            out[fn["name"]] = list((fn.get("parameters") or {}).get("properties") or {})
        return out


@dataclass
class TaskSource:
    """A named list of tasks (`bfcl:multi_turn_base`, a JSONL file, ...)."""

    name: str
    tasks: list[ToolTask]
    description: str = ""

    def split(self, part: str = "eval", n: int | None = None, offset: int = 0) -> list[ToolTask]:
        """`eval` (even positions) or `repair` (odd positions), disjoint; `all`. The first `n` after `offset`."""
        if part not in SPLITS:
            raise UserError(f"unknown task split {part!r}: use one of {', '.join(SPLITS)}")
        pool = self.tasks if part == "all" else self.tasks[(0 if part == "eval" else 1)::2]
        out = pool[offset:] if n is None else pool[offset:offset + n]
        if not out:
            raise UserError(f"{self.name}: no task in the {part!r} split (it has {len(self.tasks)} task(s) in all; "
                            "the eval and repair splits take every other one)")
        return out
