"""A grid of equivalent tool-call formats: if the tool skill survives a collapse, some of them should reveal it.

Two kinds of perturbation (after BFCL's format_sensitivity grid and FormatSpread's "spread", see
shared/REFERENCE.md):

    syntax   the call is written differently; the tools, questions and answers stay the same
             canonical       <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>   (Hermes/Qwen)
             renamed_tags    <function_call>\\n{json}\\n</function_call>
             untagged_json   one bare JSON object per line
             python_list     [find_user(name="alice")]                                  (BFCL style)
             xml             <invoke name="find_user"><parameter name="name">alice</parameter></invoke>
             markdown_fence  ```json\\n{json}\\n```
    content  the canonical syntax, other surface content
             reworded        the questions paraphrased
             renamed_tools   tool, argument and result names renamed consistently in the prompt, the parser
                             and the executor (names are mapped back before `Task.execute`)

Each format is a small object: `name`, `system_prompt(tools)`, `render(name, arguments)`, `parse(text) ->
(calls, error)`, `validity(text) -> bool`, plus `prepare(task)` (the task as this format poses it) and
`to_canonical(call)` (the call in the tool world's own names, for scoring against the oracle).

Model output is parsed with `json`, a regex or `ast.parse` + `ast.literal_eval` on literal nodes only: it is
never evaluated or executed.
"""

from __future__ import annotations

import ast
import dataclasses
import html
import json
import re
from dataclasses import dataclass, field

from collapse_probe.errors import UserError
from collapse_probe import world

Call = dict  # {"name": str, "arguments": dict}
ParseResult = tuple[list[Call], "str | None"]

MAX_PARSE_CHARS = 20_000  # longer turns are rejected before any parser sees them

# Markup that means "this turn tries to call a tool" in some syntax; a plain answer holds none of it.
_ANY_CALL_MARKUP = re.compile(r"<tool_call>|</tool_call>|<function_call>|</function_call>|<invoke\b|</invoke>|"
                              r"<parameter\b|```|<tool_response>|^\s*[\[{]|^\s*[A-Za-z_]\w*\(", re.M)


def looks_like_call(text: str) -> bool:
    return bool(_ANY_CALL_MARKUP.search(text))


def _call_obj(obj) -> Call | None:
    if isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments"), dict):
        return {"name": obj["name"], "arguments": obj["arguments"]}
    return None


def _json_call(body: str) -> tuple[Call | None, str | None]:
    if not body.strip():
        return None, "empty tool call"
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return None, "tool call is not valid JSON"
    call = _call_obj(obj)
    if call is None:
        return None, "tool call needs a string 'name' and an object 'arguments'"
    return call, None


def _replace_call_instruction(prompt: str, instruction: str) -> str:
    """The canonical prompt with its closing "Call a tool as ..." sentence swapped for `instruction`."""
    at = prompt.find("Call a tool")
    head = prompt[:at] if at >= 0 else prompt.rstrip() + "\n"
    return head + instruction


# ------------------------------------------------------------------------------------------------ base
@dataclass
class ToolFormat:
    """The canonical (Hermes) format. Subclasses change the syntax or the content."""

    name: str = "canonical"
    kind: str = "syntax"  # "syntax" | "content"
    description: str = "<tool_call>\\n{json}\\n</tool_call> (Hermes/Qwen, what the model was trained on)"

    # -- what the model sees
    def tools(self) -> list[dict]:
        return world.TOOLS

    def system_prompt(self, tools: list[dict] | None = None) -> str:
        return world.system_prompt(self.tools() if tools is None else tools)

    def prepare(self, task: world.Task) -> world.Task:
        """The task as this format poses it (question, executor)."""
        return task

    # -- how a call is written and read
    def render(self, name: str, arguments: dict) -> str:
        return world.render_call(name, arguments)

    def parse(self, text: str) -> ParseResult:
        if len(text) > MAX_PARSE_CHARS:
            return [], "turn too long to parse"
        return world.parse_calls(text)

    def _residue(self, text: str) -> str:
        """What is left of a turn once its calls (in this syntax) are cut out; a well-formed call turn leaves
        only whitespace."""
        return re.sub(re.escape(world.TOOL_OPEN) + r".*?" + re.escape(world.TOOL_CLOSE), "", text, flags=re.S)

    def validity(self, text: str) -> bool:
        """Was the turn well-formed in this syntax: only well-formed calls, or a clean plain answer."""
        calls, error = self.parse(text)
        if error is not None:
            return False
        if calls:
            return not self._residue(text).strip()
        return bool(text.strip()) and not looks_like_call(text)

    # -- scoring
    def to_canonical(self, call: Call) -> tuple[str, dict] | None:
        """(tool, arguments) in the tool world's own names, or None when the call names no tool of this format."""
        return call["name"], call["arguments"]

    def oracle_turns(self, task: world.Task) -> list[str]:
        """The expert's assistant turns in this format (calls then the answer)."""
        task = self.prepare(task)
        names = self._names()
        turns = []
        for name, args, _ in _plain(task).oracle_calls():
            new_name, arg_map = names.get(name, (name, {}))
            turns.append(self.render(new_name, {arg_map.get(k, k): v for k, v in args.items()}))
        turns.append(world.render_answer(task.answer))
        return turns

    def _names(self) -> dict[str, tuple[str, dict]]:
        return {}


# ------------------------------------------------------------------------------------------------ syntaxes
@dataclass
class TaggedJson(ToolFormat):
    """JSON body between an opening and a closing tag of our choosing."""

    open_tag: str = "<function_call>"
    close_tag: str = "</function_call>"

    def system_prompt(self, tools=None) -> str:
        return _replace_call_instruction(
            super().system_prompt(tools),
            f"Call a tool as {self.open_tag}\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
            f"{self.close_tag}")

    def render(self, name, arguments) -> str:
        return f"{self.open_tag}\n" + json.dumps({"name": name, "arguments": arguments}) + f"\n{self.close_tag}"

    def parse(self, text):
        if len(text) > MAX_PARSE_CHARS:
            return [], "turn too long to parse"
        if self.open_tag not in text:
            return [], None
        bodies = re.findall(re.escape(self.open_tag) + r"(.*?)" + re.escape(self.close_tag), text, re.S)
        if not bodies:
            return [], "tool call is not closed" if text.strip() != self.open_tag else "empty tool call"
        calls = []
        for body in bodies:
            call, error = _json_call(body)
            if error:
                return [], error
            calls.append(call)
        return calls, None

    def _residue(self, text):
        return re.sub(re.escape(self.open_tag) + r".*?" + re.escape(self.close_tag), "", text, flags=re.S)


@dataclass
class UntaggedJson(ToolFormat):
    """One bare JSON object per line; a line that starts with `{` is a call."""

    def system_prompt(self, tools=None) -> str:
        return _replace_call_instruction(
            super().system_prompt(tools),
            "Call a tool by writing one JSON object on its own line, with no tags: "
            "{\"name\": <function-name>, \"arguments\": <args-json-object>}")

    def render(self, name, arguments) -> str:
        return json.dumps({"name": name, "arguments": arguments})

    def parse(self, text):
        if len(text) > MAX_PARSE_CHARS:
            return [], "turn too long to parse"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("{")]
        calls = []
        for line in lines:
            call, error = _json_call(line)
            if error:
                return [], error
            calls.append(call)
        return calls, None

    def _residue(self, text):
        return "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("{"))


class _LiteralCallError(ValueError):
    pass


def _py_literal(value) -> str:
    """A Python literal for a JSON-like value (strings double-quoted, as BFCL writes them)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_py_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py_literal(k)}: {_py_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def parse_python_calls(source: str) -> list[Call]:
    """`[f(a=1), g(b="x")]` -> calls. Only a list of calls to plain names with literal keyword arguments is
    accepted; anything else (attribute access, positional args, nested calls, names as values) raises
    `_LiteralCallError`. Nothing is evaluated: `ast.parse` builds a tree and `ast.literal_eval` reads literal
    nodes only."""
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise _LiteralCallError(f"not a Python list of calls ({type(exc).__name__})") from None
    body = tree.body
    if not isinstance(body, ast.List):
        raise _LiteralCallError("python calls must be a list: [tool(arg=value), ...]")
    calls = []
    for node in body.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise _LiteralCallError("each list item must be a call to a plain tool name")
        if node.args:
            raise _LiteralCallError(f"{node.func.id}: pass arguments by keyword")
        args = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise _LiteralCallError(f"{node.func.id}: **kwargs is not allowed")
            try:
                args[kw.arg] = ast.literal_eval(kw.value)
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
                raise _LiteralCallError(f"{node.func.id}: argument {kw.arg!r} is not a literal") from None
        calls.append({"name": node.func.id, "arguments": args})
    return calls


@dataclass
class PythonList(ToolFormat):
    """BFCL's python format: `[find_user(name="alice")]`."""

    def system_prompt(self, tools=None) -> str:
        return _replace_call_instruction(
            super().system_prompt(tools),
            "Call tools as a Python list of function calls with keyword arguments: "
            "[<function-name>(<arg-name>=<value>)]")

    def render(self, name, arguments) -> str:
        return f"[{name}(" + ", ".join(f"{k}={_py_literal(v)}" for k, v in arguments.items()) + ")]"

    def _call_text(self, text: str) -> str | None:
        """The part of the turn that should be the call list: from the first line starting with `[` to the
        last `]`."""
        m = re.search(r"^\s*\[", text, re.M)
        if not m:  # a bare call without the list brackets is an attempt, and malformed
            bare = re.search(r"^\s*[A-Za-z_]\w*\(.*$", text, re.M)
            return bare.group(0) if bare else None
        end = text.rfind("]")
        return text[m.start():end + 1] if end > m.start() else text[m.start():]

    def parse(self, text):
        if len(text) > MAX_PARSE_CHARS:
            return [], "turn too long to parse"
        src = self._call_text(text)
        if src is None:
            return [], None
        try:
            calls = parse_python_calls(src)
        except _LiteralCallError as exc:
            return [], str(exc)
        if not calls:
            return [], "empty tool call"
        return calls, None

    def _residue(self, text):
        src = self._call_text(text)
        return text.replace(src, "", 1) if src else text


_INVOKE_RE = re.compile(r'<invoke\s+name="([^"<>]*)"\s*>(.*?)</invoke>', re.S)
_PARAM_RE = re.compile(r'<parameter\s+name="([^"<>]*)"\s*>(.*?)</parameter>', re.S)


@dataclass
class Xml(ToolFormat):
    """`<invoke name="find_user"><parameter name="name">alice</parameter></invoke>`; parameter values are
    strings (XML-escaped), read with a regex, never with an XML parser (no entity expansion)."""

    def system_prompt(self, tools=None) -> str:
        return _replace_call_instruction(
            super().system_prompt(tools),
            'Call a tool as <invoke name="<function-name>"><parameter name="<arg-name>"><value></parameter>'
            "</invoke>")

    def render(self, name, arguments) -> str:
        params = "".join(f'<parameter name="{html.escape(k)}">{html.escape(_xml_value(v), quote=False)}</parameter>'
                         for k, v in arguments.items())
        return f'<invoke name="{html.escape(name)}">{params}</invoke>'

    def parse(self, text):
        if len(text) > MAX_PARSE_CHARS:
            return [], "turn too long to parse"
        if "<invoke" not in text:
            return [], None
        blocks = _INVOKE_RE.findall(text)
        if not blocks:
            return [], "tool call is not closed or has no name"
        if text.count("<invoke") != len(blocks):
            return [], "a tool call is not closed"
        calls = []
        for name, body in blocks:
            params = _PARAM_RE.findall(body)
            if _PARAM_RE.sub("", body).strip():
                return [], f"{name}: only <parameter> elements may appear inside <invoke>"
            args = {}
            for key, value in params:
                key = html.unescape(key)
                if key in args:
                    return [], f"{name}: parameter {key!r} given twice"
                args[key] = html.unescape(value)
            calls.append({"name": html.unescape(name), "arguments": args})
        return calls, None

    def _residue(self, text):
        return _INVOKE_RE.sub("", text)


def _xml_value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


_FENCE_RE = re.compile(r"```(?:json)?[ \t]*\n(.*?)```", re.S)


@dataclass
class MarkdownFence(ToolFormat):
    """A fenced JSON block per call: ```json\\n{json}\\n```."""

    def system_prompt(self, tools=None) -> str:
        return _replace_call_instruction(
            super().system_prompt(tools),
            "Call a tool in a fenced JSON block: ```json\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n```")

    def render(self, name, arguments) -> str:
        return "```json\n" + json.dumps({"name": name, "arguments": arguments}) + "\n```"

    def parse(self, text):
        if len(text) > MAX_PARSE_CHARS:
            return [], "turn too long to parse"
        if "```" not in text:
            return [], None
        bodies = _FENCE_RE.findall(text)
        if not bodies or text.count("```") != 2 * len(bodies):
            return [], "code fence is not closed"
        calls = []
        for body in bodies:
            call, error = _json_call(body)
            if error:
                return [], error
            calls.append(call)
        return calls, None

    def _residue(self, text):
        return _FENCE_RE.sub("", text)


# ------------------------------------------------------------------------------------------------ content
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
class Reworded(ToolFormat):
    """Canonical syntax, paraphrased questions (a task kind without a paraphrase keeps its question)."""

    def prepare(self, task):
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
    back_args = {inv_args.get(k, f"?{k}"): v for k, v in arguments.items()}  # unknown names stay wrong
    return old, back_args


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
class RenamedTools(ToolFormat):
    """Canonical syntax; tool, argument and result names renamed consistently everywhere."""

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

    def prepare(self, task):
        if isinstance(task, RenamedTask):
            return task
        return RenamedTask(**{f.name: getattr(task, f.name) for f in dataclasses.fields(world.Task)},
                           renames=self.renames)

    def to_canonical(self, call):
        return _map_back(self.renames, call["name"], call["arguments"])

    def _names(self):
        return self.renames


# ------------------------------------------------------------------------------------------------ registry
def _registry() -> dict[str, ToolFormat]:
    return {f.name: f for f in (
        ToolFormat(),
        TaggedJson("renamed_tags", "syntax", "<function_call>\\n{json}\\n</function_call>"),
        UntaggedJson("untagged_json", "syntax", "one bare JSON object per line"),
        PythonList("python_list", "syntax", '[find_user(name="alice")] (BFCL python)'),
        Xml("xml", "syntax", '<invoke name=...><parameter name=...>v</parameter></invoke>'),
        MarkdownFence("markdown_fence", "syntax", "```json fenced JSON"),
        Reworded("reworded", "content", "canonical syntax, questions paraphrased"),
        RenamedTools("renamed_tools", "content", "canonical syntax, tools/arguments/results renamed"),
    )}


FORMATS: dict[str, ToolFormat] = _registry()
FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)


def get_format(name: str | ToolFormat) -> ToolFormat:
    if isinstance(name, ToolFormat):
        return name
    key = str(name).strip()
    if key not in FORMATS:
        raise UserError(f"unknown format {name!r}: choose from {', '.join(FORMAT_NAMES)}")
    return FORMATS[key]


def parse_format_list(spec: str | list[str] | tuple | None) -> list[ToolFormat]:
    """'a,b' or ['a', 'b'] -> formats (all of them for None/empty); unknown names raise UserError."""
    if spec is None:
        return list(FORMATS.values())
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names:
        return list(FORMATS.values())
    out, seen = [], set()
    for n in names:
        fmt = get_format(n)
        if fmt.name not in seen:
            seen.add(fmt.name)
            out.append(fmt)
    return out
