"""The format-perturbation grid: the tool world's tasks posed in equivalent formats. If the tool skill survives
a collapse, some of them should reveal it (after BFCL's format_sensitivity grid and FormatSpread's "spread").

    syntax   a call syntax of `formats.registry` (hermes, renamed_tags, json, python_list, xml, markdown;
             llama3 and mistral when asked for): the tools, questions and answers stay the same
    content  hermes syntax, other surface content
             reworded        the questions paraphrased
             renamed_tools   tool, argument and result names renamed consistently in the prompt, the parser
                             and the executor (names are mapped back before `Task.execute`)

A `GridFormat` is a syntax plus what needs the world: `tools()`, `system_prompt()` (the world's prompt with the
syntax's call instruction), `prepare(task)` (the task as this format poses it), `oracle_turns(task)` and
`to_canonical(call)` (the call in the tool world's own names, for scoring against the oracle).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Sequence

from collapse_probe import world
from collapse_probe.formats.calls import Call, ParseResult
from collapse_probe.formats.registry import HERMES, SYNTAXES, canonical_name
from collapse_probe.formats.syntaxes import Syntax


@dataclass
class GridFormat:
    """A call syntax posed in the tool world. Subclasses change the content (questions, tool names)."""

    syntax: Syntax
    name: str = ""
    kind: str = "syntax"  # "syntax" | "content"
    description: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.syntax.name
        self.description = self.description or self.syntax.description

    def tools(self) -> list[dict]:
        return world.TOOLS

    def system_prompt(self, tools: list[dict] | None = None) -> str:
        """The world's prompt with this syntax's "how to call a tool" sentence."""
        return world.system_prompt(self.tools() if tools is None else tools, self.syntax.call_instruction())

    def prepare(self, task: world.Task) -> world.Task:
        return task

    def render(self, name: str, arguments: dict) -> str:
        return self.syntax.render(name, arguments)

    def parse(self, text: str) -> ParseResult:
        return self.syntax.parse(text)

    def validity(self, text: str) -> bool:
        return self.syntax.validity(text)

    def to_canonical(self, call: Call) -> tuple[str, dict] | None:
        """(tool, arguments) in the tool world's own names, or None when the call names no tool of this format."""
        return call["name"], call["arguments"]

    def oracle_turns(self, task: world.Task) -> list[str]:
        """The expert's assistant turns in this format (calls then the answer)."""
        names = self._names()
        turns = []
        for name, args, _ in _plain(self.prepare(task)).oracle_calls():
            new_name, arg_map = names.get(name, (name, {}))
            turns.append(self.render(new_name, {arg_map.get(k, k): v for k, v in args.items()}))
        turns.append(world.render_answer(task.answer))
        return turns

    def _names(self) -> dict[str, tuple[str, dict]]:
        return {}


# Paraphrases of world.TASK_KINDS' questions; `{name}` is the quoted subject, as in the originals.
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "city": ("Tell me the city that {name} lives in.", "In which city is the home of {name}?"),
    "weather": ("How is the weather in the city of {name} right now?",
                "Tell me the current weather in the home city of {name}."),
    "friend_city": ("Where does the best friend of {name} live? Name the city.",
                    "Tell me the home city of the best friend of {name}."),
    "friend_weather": ("How is the weather in the home city of the best friend of {name}?",
                       "Tell me the current weather where the best friend of {name} lives."),
}


@dataclass
class Reworded(GridFormat):
    """Hermes syntax, paraphrased questions (a task kind without a paraphrase keeps its question)."""

    def prepare(self, task: world.Task) -> world.Task:
        options = PARAPHRASES.get(task.kind)
        if not options:
            return task
        question = options[task.seed % len(options)].format(name=f'"{task.subject}"')
        return dataclasses.replace(task, question=question)


# tool -> (new tool name, {argument: new argument name}); observation keys renamed too
TOOL_RENAMES: dict[str, tuple[str, dict[str, str]]] = {
    "find_user": ("lookup_person", {"name": "person"}),
    "get_friend": ("best_friend_of", {"user_id": "uid"}),
    "get_city": ("home_town", {"user_id": "uid"}),
    "get_weather": ("forecast", {"city": "town"}),
}
RESULT_RENAMES = {"user_id": "uid", "friend_id": "friend_uid", "city": "town", "weather": "conditions"}


@dataclass
class RenamedTask(world.Task):
    """A task whose executor speaks the renamed tool names: calls are mapped back before `Task.execute`,
    results and errors are renamed on the way out. The oracle and the answer stay the world's own."""

    renames: dict = field(default_factory=dict)

    def execute(self, name: str, arguments: dict) -> dict:
        back = _map_back(self.renames, name, arguments)
        if back is None:
            return {"error": f"unknown tool {name!r}"}
        obs = world.Task.execute(_plain(self), *back)
        if "error" in obs:
            return {"error": _rename_text(str(obs["error"]), self.renames)}
        return {RESULT_RENAMES.get(k, k): v for k, v in obs.items()}

    def oracle_calls(self):
        return _plain(self).oracle_calls()

    @property
    def answer(self) -> str:
        return _plain(self).answer


def _plain(task: world.Task) -> world.Task:
    """The world's own Task holding the same data (drops format wrappers)."""
    if type(task) is world.Task:
        return task
    return world.Task(**{f.name: getattr(task, f.name) for f in dataclasses.fields(world.Task)})


def _map_back(renames: dict, name: str, arguments: dict) -> tuple[str, dict] | None:
    inverse = {new: (old, args) for old, (new, args) in renames.items()}
    if name not in inverse:
        return None
    old, arg_map = inverse[name]
    inv_args = {new: old for old, new in arg_map.items()}
    return old, {inv_args.get(k, f"?{k}"): v for k, v in arguments.items()}  # unknown names stay wrong


def _rename_text(msg: str, renames: dict) -> str:
    """The world's error messages in the renamed vocabulary (the two shapes Task.execute writes; anything
    else passes through)."""
    args = {a: b for _, (_, m) in renames.items() for a, b in m.items()}
    m = re.fullmatch(r"(\w+) takes one string argument '(\w+)'", msg)
    if m and m.group(1) in renames:
        return f"{renames[m.group(1)][0]} takes one string argument {args.get(m.group(2), m.group(2))!r}"
    m = re.fullmatch(r"no result for (\w+) (.*)", msg, re.S)
    if m:
        return f"no result for {args.get(m.group(1), m.group(1))} {m.group(2)}"
    return msg


@dataclass
class RenamedTools(GridFormat):
    """Hermes syntax; tool, argument and result names renamed consistently everywhere."""

    renames: dict = field(default_factory=lambda: dict(TOOL_RENAMES))

    def tools(self) -> list[dict]:
        out = []
        for tool in world.TOOLS:
            new, arg_map = self.renames.get(tool["name"], (tool["name"], {}))
            params = dict(tool["parameters"])
            params["properties"] = {arg_map.get(k, k): v for k, v in params.get("properties", {}).items()}
            params["required"] = [arg_map.get(k, k) for k in params.get("required", [])]
            out.append({**tool, "name": new, "parameters": params})
        return out

    def prepare(self, task: world.Task) -> world.Task:
        if isinstance(task, RenamedTask):
            return task
        return RenamedTask(**{f.name: getattr(task, f.name) for f in dataclasses.fields(world.Task)},
                           renames=self.renames)

    def to_canonical(self, call: Call) -> tuple[str, dict] | None:
        return _map_back(self.renames, call["name"], call["arguments"])

    def _names(self) -> dict[str, tuple[str, dict]]:
        return self.renames


# ------------------------------------------------------------------------------------------------ the grid
_OPT_IN = ("llama3", "mistral")  # registered syntaxes the default grid leaves out (not what the world trains on)
FORMATS: dict[str, GridFormat] = {f.name: f for f in (
    *(GridFormat(s) for name, s in SYNTAXES.items()),
    Reworded(SYNTAXES[HERMES], "reworded", "content", "hermes syntax, questions paraphrased"),
    RenamedTools(SYNTAXES[HERMES], "renamed_tools", "content", "hermes syntax, tools/arguments/results renamed"),
)}
CONTENT_NAMES: tuple[str, ...] = tuple(n for n, f in FORMATS.items() if f.kind == "content")
FORMAT_NAMES: tuple[str, ...] = tuple(n for n in FORMATS if n not in _OPT_IN)  # the default grid


def get_format(name: str | GridFormat) -> GridFormat:
    """A grid format by registry name or alias (`formats.registry`) or content perturbation; UserError else."""
    if isinstance(name, GridFormat):
        return name
    return FORMATS[canonical_name(name, CONTENT_NAMES)]


def parse_format_list(spec: str | Sequence[str] | None) -> list[GridFormat]:
    """'a,b' or ['a', 'b'] -> formats (the default grid for None/empty); unknown names raise UserError."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec or ()]
    names = [n for n in names if n]
    if not names:
        return [FORMATS[n] for n in FORMAT_NAMES]
    out: dict[str, GridFormat] = {}
    for n in names:
        fmt = get_format(n)
        out.setdefault(fmt.name, fmt)
    return list(out.values())
