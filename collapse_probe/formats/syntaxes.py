"""Call syntaxes: how one tool call is written, read back, and asked for in a system prompt.

Each syntax is a small object: `name`, `description`, `call_instruction()` (the system prompt's sentence that
says how to call a tool), `render(name, arguments)`, `parse(text) -> (calls, error)`, `validity(text)` and
`spec()` (the FormatSpec the turn classifier uses for it). All JSON goes through `formats.calls`; the python
list is read with `ast` literals only and XML with a regex (no XML parser, no entity expansion): model output
is never evaluated. The registry of names is `formats.registry`; the world-specific grid is `recover.grid`.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from typing import Callable, Iterable

from collapse_probe.formats import calls as C
from collapse_probe.formats.spec import FormatSpec

_JSON_SHAPE = '{"name": <function-name>, "arguments": <args-json-object>}'
# Markup that means "this turn tries to call a tool" in some syntax; a plain answer holds none of it.
_ANY_CALL_MARKUP = re.compile(r"<tool_call>|</tool_call>|<function_call>|</function_call>|<invoke\b|</invoke>|"
                              r"<parameter\b|```|<tool_response>|<\|python_tag\|>|\[TOOL_CALLS\]|^\s*[\[{]|"
                              r"^\s*[A-Za-z_]\w*\(", re.M)


def looks_like_call(text: str) -> bool:
    return bool(_ANY_CALL_MARKUP.search(text))


@dataclass(frozen=True)
class Syntax:
    """Base of the call syntaxes; subclasses implement `render`, `parse`, `residue` and `spec`."""

    name: str
    description: str

    def call_instruction(self) -> str:
        raise NotImplementedError

    def render(self, name: str, arguments: dict) -> str:
        raise NotImplementedError

    def parse(self, text: str) -> C.ParseResult:
        raise NotImplementedError

    def residue(self, text: str) -> str:
        """What is left of a turn once its calls are cut out; a well-formed call turn leaves only whitespace."""
        raise NotImplementedError

    def spec(self, known_tools: Iterable[str] | None = None) -> FormatSpec:
        raise NotImplementedError

    def validity(self, text: str) -> bool:
        """Was the turn well-formed in this syntax: only well-formed calls, or a clean plain answer."""
        calls, error = self.parse(text)
        if error is not None:
            return False
        if calls:
            return not self.residue(text).strip()
        return bool(text.strip()) and not looks_like_call(text)


@dataclass(frozen=True)
class TaggedJson(Syntax):
    """A JSON body between an opening and a closing tag: Hermes `<tool_call>`, renamed tags, a markdown fence."""

    open_tag: str = "<tool_call>"
    close_tag: str = "</tool_call>"
    instruction: str = ""  # empty: "Call a tool as <open>\n{json}\n<close>"

    def call_instruction(self) -> str:
        return self.instruction or f"Call a tool as {self.open_tag}\n{_JSON_SHAPE}\n{self.close_tag}"

    def render(self, name: str, arguments: dict) -> str:
        return f"{self.open_tag}\n" + json.dumps({"name": name, "arguments": arguments}) + f"\n{self.close_tag}"

    def parse(self, text: str) -> C.ParseResult:
        return C.parse_tagged(text, self.open_tag, self.close_tag)

    def residue(self, text: str) -> str:
        return "".join(C.split_tags(text, self.open_tag, self.close_tag).outside)

    def spec(self, known_tools: Iterable[str] | None = None) -> FormatSpec:
        return FormatSpec(name=self.name, tool_open=self.open_tag, tool_close=self.close_tag, known_tools=known_tools)


@dataclass(frozen=True)
class PrefixJson(Syntax):
    """A marker, then JSON to the end of the turn: Llama 3's `<|python_tag|>{...}` (one call per marker) or
    Mistral's `[TOOL_CALLS][{...}, ...]` (a list per marker)."""

    prefix: str = "<|python_tag|>"
    as_list: bool = False
    preset: Callable[..., FormatSpec] = FormatSpec.llama3

    def call_instruction(self) -> str:
        shape = f"[{_JSON_SHAPE}]" if self.as_list else _JSON_SHAPE
        return f"Call a tool as {self.prefix}{shape}"

    def render(self, name: str, arguments: dict) -> str:
        call = {"name": name, "arguments": arguments}
        return self.prefix + json.dumps([call] if self.as_list else call)

    def parse(self, text: str) -> C.ParseResult:
        if self.prefix not in text:
            return [], None
        calls: list = []
        for seg in C.split_tags(text, self.prefix, None).segments:
            if not seg.body.strip():
                return [], C.EMPTY
            obj, ok = C.loads(seg.body.strip())
            if not ok:
                return [], C.NOT_JSON
            for item in (obj if self.as_list and isinstance(obj, list) else [obj]):
                call, _ = C.as_call(item)
                if call is None:
                    return [], C.NOT_A_CALL
                calls.append(call)
        return calls, None

    def residue(self, text: str) -> str:
        return C.split_tags(text, self.prefix, None).outside[0]

    def spec(self, known_tools: Iterable[str] | None = None) -> FormatSpec:
        return self.preset(known_tools)


@dataclass(frozen=True)
class UntaggedJson(Syntax):
    """One bare JSON object per line; a line that starts with `{` is a call."""

    def call_instruction(self) -> str:
        return f"Call a tool by writing one JSON object on its own line, with no tags: {_JSON_SHAPE}"

    def render(self, name: str, arguments: dict) -> str:
        return json.dumps({"name": name, "arguments": arguments})

    def parse(self, text: str) -> C.ParseResult:
        if len(text) > C.MAX_TURN_CHARS:
            return [], C.TOO_LONG
        calls = []
        for line in (ln.strip() for ln in text.splitlines()):
            if line.startswith("{"):
                call, error = C.json_call(line)
                if error:
                    return [], error
                calls.append(call)
        return calls, None

    def residue(self, text: str) -> str:
        return "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("{"))

    def spec(self, known_tools: Iterable[str] | None = None) -> FormatSpec:
        return FormatSpec(name=self.name, tool_open="", tool_close=None, untagged_calls_ok=True,
                          known_tools=known_tools)


@dataclass(frozen=True)
class PythonList(Syntax):
    """BFCL's python format: `[find_user(name="alice")]`."""

    def call_instruction(self) -> str:
        return ("Call tools as a Python list of function calls with keyword arguments: "
                "[<function-name>(<arg-name>=<value>)]")

    def render(self, name: str, arguments: dict) -> str:
        return f"[{name}(" + ", ".join(f"{k}={C.python_literal(v)}" for k, v in arguments.items()) + ")]"

    def _call_text(self, text: str) -> str | None:
        """The part of the turn that should be the call list: from the first line starting with `[` to the
        last `]`; a bare call without the list brackets is an attempt, and malformed."""
        m = re.search(r"^\s*\[", text, re.M)
        if not m:
            bare = re.search(r"^\s*[A-Za-z_]\w*\(.*$", text, re.M)
            return bare.group(0) if bare else None
        end = text.rfind("]")
        return text[m.start():end + 1] if end > m.start() else text[m.start():]

    def parse(self, text: str) -> C.ParseResult:
        if len(text) > C.MAX_TURN_CHARS:
            return [], C.TOO_LONG
        src = self._call_text(text)
        if src is None:
            return [], None
        try:
            calls = C.parse_python_calls(src)
        except C.PythonCallError as exc:
            return [], str(exc)
        return (calls, None) if calls else ([], C.EMPTY)

    def residue(self, text: str) -> str:
        src = self._call_text(text)
        return text.replace(src, "", 1) if src else text

    def spec(self, known_tools: Iterable[str] | None = None) -> FormatSpec:
        return FormatSpec(name=self.name, tool_open="", tool_close=None, body="python", known_tools=known_tools)


_INVOKE_RE = re.compile(r'<invoke\s+name="([^"<>]*)"\s*>(.*?)</invoke>', re.S)
_PARAM_RE = re.compile(r'<parameter\s+name="([^"<>]*)"\s*>(.*?)</parameter>', re.S)


def _xml_value(v: object) -> str:
    return v if isinstance(v, str) else json.dumps(v)


@dataclass(frozen=True)
class Xml(Syntax):
    """`<invoke name="find_user"><parameter name="name">alice</parameter></invoke>`; parameter values are
    strings (XML-escaped)."""

    def call_instruction(self) -> str:
        return ('Call a tool as <invoke name="<function-name>"><parameter name="<arg-name>"><value></parameter>'
                "</invoke>")

    def render(self, name: str, arguments: dict) -> str:
        params = "".join(f'<parameter name="{html.escape(k)}">{html.escape(_xml_value(v), quote=False)}</parameter>'
                         for k, v in arguments.items())
        return f'<invoke name="{html.escape(name)}">{params}</invoke>'

    def parse(self, text: str) -> C.ParseResult:
        if len(text) > C.MAX_TURN_CHARS:
            return [], C.TOO_LONG
        if "<invoke" not in text:
            return [], None
        blocks = _INVOKE_RE.findall(text)
        if not blocks:
            return [], "tool call is not closed or has no name"
        if text.count("<invoke") != len(blocks):
            return [], "a tool call is not closed"
        calls = []
        for name, body in blocks:
            if _PARAM_RE.sub("", body).strip():
                return [], f"{name}: only <parameter> elements may appear inside <invoke>"
            args: dict = {}
            for key, value in _PARAM_RE.findall(body):
                key = html.unescape(key)
                if key in args:
                    return [], f"{name}: parameter {key!r} given twice"
                args[key] = html.unescape(value)
            calls.append({"name": html.unescape(name), "arguments": args})
        return calls, None

    def residue(self, text: str) -> str:
        return _INVOKE_RE.sub("", text)

    def spec(self, known_tools: Iterable[str] | None = None) -> FormatSpec:
        return FormatSpec(name=self.name, tool_open="<invoke", tool_close="</invoke>", body="xml",
                          known_tools=known_tools)
