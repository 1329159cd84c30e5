"""One tool-call reader: split a turn on the call tags, parse each body with `json`, validate the call.

Every path that reads a call uses these functions: the tool world's harness (`world.parse_calls`), the turn
classifier (`formats.classify`) and the format grid (`formats.syntaxes`, `recover.grid`). One rule for a
well-formed call everywhere: a JSON object with a non-empty string "name" and an object "arguments";
"parameters" (the Llama 3.1 spelling) is accepted when "arguments" is absent.

Bounded: a body longer than `MAX_BODY_CHARS` or nested deeper than `MAX_DEPTH` is invalid before `json` sees
it, so hostile model output can neither raise RecursionError nor stall a parser. Python-list calls are read with
`ast.parse` plus `ast.literal_eval` on literal nodes only; nothing is ever evaluated.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

Call = dict  # {"name": str, "arguments": dict}
ParseResult = tuple[list[Call], "str | None"]  # (calls, error); error None means well-formed (or no call)

MAX_BODY_CHARS = 20_000  # a longer call body is reported as invalid JSON
MAX_DEPTH = 64  # deeper nesting is reported as invalid JSON (json's C scanner recurses)
MAX_TURN_CHARS = 20_000  # the python-list and XML readers reject longer turns before parsing

# The harness's error strings: observations the model sees, so they are part of the world's contract.
EMPTY = "empty tool call"
NOT_CLOSED = "tool call is not closed"
NOT_JSON = "tool call is not valid JSON"
NOT_A_CALL = "tool call needs a string 'name' and an object 'arguments'"
TOO_LONG = "turn too long to parse"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def too_deep(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether brackets outside JSON strings nest deeper than `limit` (linear; unbalanced text is fine)."""
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        depth = depth + 1 if m.group() in "[{" else max(depth - 1, 0)
        if depth > limit:
            return True
    return False


def loads(text: str) -> tuple[object, bool]:
    """`json.loads` within the size and depth bounds: (value, ok); never raises."""
    if len(text) > MAX_BODY_CHARS or too_deep(text):
        return None, False
    try:
        return json.loads(text), True
    except (ValueError, RecursionError):
        return None, False


def as_call(obj: object) -> tuple[Call | None, str]:
    """The one validator: (normalised call, "") or (None, why it is not a call)."""
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    name = obj.get("name")
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    if not isinstance(name, str) or not name.strip():
        return None, "no non-empty string 'name'"
    if not isinstance(args, dict):
        got = type(args).__name__ if "arguments" in obj or "parameters" in obj else "missing"
        return None, f"'arguments' is {got}, expected an object"
    return {"name": name, "arguments": args}, ""


def call_shaped(obj: object) -> bool:
    """Looks like an attempt at a call (or a list of them), well-formed or not."""
    if isinstance(obj, list):
        return bool(obj) and all(isinstance(o, dict) and call_shaped(o) for o in obj)
    return isinstance(obj, dict) and "name" in obj and ("arguments" in obj or "parameters" in obj)


def json_call(body: str) -> tuple[Call | None, str | None]:
    """One call body -> (call, None) or (None, harness error)."""
    if not body.strip():
        return None, EMPTY
    obj, ok = loads(body)
    if not ok:
        return None, NOT_JSON
    call, _ = as_call(obj)
    return (call, None) if call else (None, NOT_A_CALL)


@dataclass(frozen=True)
class Segment:
    body: str     # the text after an opening tag, up to its closing tag (or the next opening tag / the end)
    closed: bool  # False when another opening tag or the end of the turn came first


@dataclass(frozen=True)
class TagSplit:
    segments: list[Segment]
    outside: list[str]  # text before, between and after the segments; len(segments) + 1 pieces


def split_tags(text: str, open_tag: str, close_tag: str | None) -> TagSplit:
    """Cut a turn at its call tags in one linear pass. Without a closing tag a segment runs to the next opening
    tag or the end (Llama 3's `<|python_tag|>`, Mistral's `[TOOL_CALLS]`) and counts as closed."""
    segs: list[Segment] = []
    outside: list[str] = []
    pos, close_at = 0, -2  # close_at: the next closing tag, searched for again only once passed
    while True:
        i = text.find(open_tag, pos)
        if i < 0:
            outside.append(text[pos:])
            return TagSplit(segs, outside)
        outside.append(text[pos:i])
        start = i + len(open_tag)
        nxt = text.find(open_tag, start)
        if close_tag and close_at != -1 and close_at < start:
            close_at = text.find(close_tag, start)
        if close_tag and 0 <= close_at and not 0 <= nxt < close_at:
            segs.append(Segment(text[start:close_at], True))
            pos = close_at + len(close_tag)
        else:
            end = nxt if nxt >= 0 else len(text)
            segs.append(Segment(text[start:end], not close_tag))
            pos = end


def parse_tagged(text: str, open_tag: str, close_tag: str) -> ParseResult:
    """Tagged JSON calls (Hermes `<tool_call>\\n{json}\\n</tool_call>` and its renamings) -> (calls, error).
    No opening tag: ([], None), a plain answer. The bare tag alone is the harness's "empty tool call"; the
    first segment that is unclosed, empty, not JSON or not a call gives the error. Text around calls is allowed
    here (the classifier reports it)."""
    if open_tag not in text:
        return [], None
    if text.strip() == open_tag:
        return [], EMPTY
    calls = []
    for seg in split_tags(text, open_tag, close_tag).segments:
        if not seg.closed:
            return [], NOT_CLOSED
        call, error = json_call(seg.body)
        if error:
            return [], error
        calls.append(call)
    return calls, None


def find_json_calls(text: str, limit: int = 64) -> tuple[list, bool]:
    """Call-shaped JSON in untagged text: (objects, whether they make up the whole text). At most `limit`
    decode attempts; nothing is found in text beyond the size or depth bounds."""
    obj, ok = loads(text)
    if ok:
        return ((obj if isinstance(obj, list) else [obj]), True) if call_shaped(obj) else ([], False)
    if len(text) > MAX_TURN_CHARS or too_deep(text):
        return [], False
    dec, found, pos = json.JSONDecoder(), [], 0
    for _ in range(limit):
        i = text.find("{", pos)
        if i < 0:
            break
        try:
            obj, end = dec.raw_decode(text, i)
        except (ValueError, RecursionError):
            pos = i + 1
            continue
        if call_shaped(obj):
            found.append(obj)
        pos = end
    return found, False


# ------------------------------------------------------------------------------------------------ python list
class PythonCallError(ValueError):
    """A python-list call that is not a list of plain-name calls with literal keyword arguments."""


def parse_python_calls(source: str) -> list[Call]:
    """`[f(a=1), g(b="x")]` -> calls. Anything else (attribute access, positional args, nested calls, names as
    values) raises `PythonCallError`. `ast.parse` builds a tree; `ast.literal_eval` reads literal nodes only."""
    if len(source) > MAX_TURN_CHARS or too_deep(source):
        raise PythonCallError("not a Python list of calls (too long or too deeply nested)")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise PythonCallError(f"not a Python list of calls ({type(exc).__name__})") from None
    if not isinstance(tree.body, ast.List):
        raise PythonCallError("python calls must be a list: [tool(arg=value), ...]")
    calls = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise PythonCallError("each list item must be a call to a plain tool name")
        if node.args:
            raise PythonCallError(f"{node.func.id}: pass arguments by keyword")
        args = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise PythonCallError(f"{node.func.id}: **kwargs is not allowed")
            try:
                args[kw.arg] = ast.literal_eval(kw.value)
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
                raise PythonCallError(f"{node.func.id}: argument {kw.arg!r} is not a literal") from None
        calls.append({"name": node.func.id, "arguments": args})
    return calls


def python_literal(value: object) -> str:
    """A Python literal for a JSON-like value (strings double-quoted, as BFCL writes them)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{python_literal(k)}: {python_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)
