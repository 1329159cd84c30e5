"""Format state of one assistant turn: healthy tool call, healthy response, text pollution or full collapse.

The rules and their order are documented with the reason codes in `formats.reasons`. Calls are read with the
shared reader of `formats.calls` (the one the tool world's harness uses), so a turn the harness cannot execute
is never a healthy tool call here: `TurnVerdict.error` is the harness's own answer for tagged JSON formats.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable

from collapse_probe.formats import calls as C
from collapse_probe.formats.mix import StateMix
from collapse_probe.formats.reasons import REASONS
from collapse_probe.formats.spec import FormatSpec
from collapse_probe.schema import FormatState

__all__ = ["TurnVerdict", "classify_turn", "state_mix", "FormatSpec", "StateMix", "REASONS"]


@dataclass(frozen=True)
class TurnVerdict:
    state: FormatState
    reason: str
    calls: list[dict] = field(default_factory=list)
    detail: str = ""
    error: str | None = None  # the harness's error for this turn (tagged JSON formats), None when it parses


_SPECIAL = re.compile(r"<\|[^|<>\s]{1,40}\|>")
_PY_LIST = re.compile(r"(?m)^[ \t]*\[[ \t]*[A-Za-z_][\w.]*[ \t]*\(.*\)[ \t]*\][ \t]*$")
_PY_START = re.compile(r"(?m)^[ \t]*\[")
_FENCE = re.compile(r"```[\w-]*[ \t]*\n?(.*?)```", re.S)
_ARGS_FORM = re.compile(r"\s*([A-Za-z_][\w.\-]*)\s*\[ARGS\](.*)", re.S)
_PREFIX = re.compile(r"(?mi)^[ \t]*(?:user|assistant|human|system)[ \t]*:")
# A turn that opens as another role: "USER: ...", "assistant\n...", or the lowercase template word and a space.
_ROLE_START = re.compile(r"(?i:(?:user|assistant|human|system)(?:[ \t]*:|[ \t]*(?:\n|$)))|(?:user|assistant) ")
_UNIT_REPEAT = re.compile(r"(.{1,4}?)\1{7,}", re.S)  # at least 8 copies of a 1-4 character unit
_XML_PARAM = re.compile(r'<parameter\s+name="([^"<>]*)"\s*>(.*?)</parameter>', re.S)
_XML_HEAD = re.compile(r'\s+name="([^"<>]*)"\s*>(.*)', re.S)
_SEVERITY = ("other_syntax_call", "invalid_json", "invalid_call", "missing_name_or_arguments", "unknown_tool")


@lru_cache(maxsize=32)
def _role_line(words: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"(?m)^[ \t]*(?:" + "|".join(map(re.escape, words)) + r")[ \t]*$")


def _v(reason: str, detail: str = "", calls: list | None = None, error: str | None = None) -> TurnVerdict:
    return TurnVerdict(REASONS[reason][0], reason, list(calls or []), detail, error)


def _check_calls(objs: list, spec: FormatSpec) -> tuple[list[dict], str, str]:
    calls = []
    for obj in objs or [None]:
        call, why = C.as_call(obj)
        if call is None:
            return [], "missing_name_or_arguments", why if objs else "empty list of calls"
        calls.append(call)
    unknown = [c["name"] for c in calls if spec.known_tools is not None and c["name"] not in spec.known_tools]
    if unknown:
        return calls, "unknown_tool", f"unknown tool {unknown[0]!r}"
    return calls, "", ""


def _other_syntax(s: str, spec: FormatSpec) -> str:
    for m in spec.other_call_markers:
        if m in s:
            return f"foreign call marker {m!r}"
    if spec.body != "python" and _PY_LIST.search(s):
        return "python-list call"
    for m in _FENCE.finditer(s):
        obj, ok = C.loads(m.group(1).strip())
        if ok and C.call_shaped(obj):
            return "markdown-fenced JSON call"
    return ""


def _xml_body(s: str, spec: FormatSpec) -> tuple[list[dict], str, str]:
    """The rest of an `<invoke` element: ` name="f"><parameter name="a">v</parameter>`."""
    m = _XML_HEAD.fullmatch(s)
    if not m or _XML_PARAM.sub("", m.group(2)).strip():
        return [], "invalid_call", "not an <invoke name=...> element of <parameter> elements"
    args = {html.unescape(k): html.unescape(v) for k, v in _XML_PARAM.findall(m.group(2))}
    return _check_calls([{"name": html.unescape(m.group(1)), "arguments": args}], spec)


def _parse_body(content: str, spec: FormatSpec) -> tuple[list[dict], str, str]:
    if spec.body == "xml":
        return _xml_body(content, spec)
    s = content.strip()
    if not s:
        return [], "invalid_json", "empty call body"
    m = _ARGS_FORM.fullmatch(s) if spec.call_list else None
    obj, ok = C.loads(m.group(2).strip() if m else s)
    if not ok:
        kind = _other_syntax(s, spec)
        return ([], "other_syntax_call", kind) if kind else ([], "invalid_json", f"not JSON: {s[:60]!r}")
    if m:
        obj = {"name": m.group(1), "arguments": obj}
    return _check_calls(obj if spec.call_list and isinstance(obj, list) else [obj], spec)


def _normalise(text: object, spec: FormatSpec) -> tuple[str, bool]:
    s = (text.decode("utf-8", "replace") if isinstance(text, bytes) else "" if text is None else str(text)).strip()
    end, eots = len(s), [e for e in spec.end_of_turn if e]
    while True:  # strip trailing end-of-turn tokens and whitespace by index: no quadratic copying
        e = next((e for e in eots if s.endswith(e, 0, end)), None)
        if e is None:
            break
        end -= len(e)
        while end and s[end - 1].isspace():
            end -= 1
    s, unclosed_think = s[:end], False
    if spec.think and s.startswith(spec.think[0]):
        j = s.find(spec.think[1])
        if j >= 0:
            s = s[j + len(spec.think[1]):].strip()
        else:
            unclosed_think = True
    return s, unclosed_think


def _degenerate(body: str) -> str:
    """Why the turn is one thing repeated (a character, a 1-4 character unit, a word), or ""."""
    words = body.split()
    if len(words) >= 6 and len(set(words)) == 1:
        return f"{words[0][:20]!r} repeated {len(words)} times"
    compact = "".join(words)
    m = _UNIT_REPEAT.fullmatch(compact) if len(compact) >= 8 else None
    return f"{m.group(1)!r} repeated {len(compact) // len(m.group(1))} times" if m else ""


def _squash(text: str) -> str:
    return " ".join(text.split()).casefold()


def _echoes(body: str, user_message: str | None) -> bool:
    """The turn holds the user's message (whitespace and case aside); short messages are too common to tell."""
    user = _squash(user_message) if isinstance(user_message, str) else ""
    return len(user) >= 12 and user in _squash(body)


def classify_turn(text: str, spec: FormatSpec | None = None, user_message: str | None = None) -> TurnVerdict:
    """Classify one assistant turn (decoded with special tokens kept). `user_message`, when given, is the
    user's message this turn answers (for echoed_user_message). Rules: `formats.reasons`. Never raises."""
    spec = spec or FormatSpec()
    body, unclosed_think = _normalise(text, spec)
    op, cl = spec.tool_open, spec.tool_close
    if not body:
        return _v("empty_turn")
    n_open = body.count(op) if op else 0
    tagged_json = bool(n_open and cl and spec.body == "json" and not spec.call_list)
    error = C.parse_tagged(body, op, cl)[1] if tagged_json else None
    if n_open:
        rest = body.replace(op, "")
        if not rest.strip():
            return _v("bare_open_tag", error=error) if n_open == 1 else \
                _v("repeated_open_tag", f"{n_open} opening tags", error=error)
        if cl and cl in rest and not rest.replace(cl, "").strip():
            return _v("empty_call", error=error)
    early = _early_pollution(body, spec, user_message, unclosed_think)
    if early is not None:
        return TurnVerdict(early.state, early.reason, [], early.detail, error)
    if n_open:
        return _classify_tagged(body, spec, error)
    if cl and cl in body:
        return _v("stray_close_tag", "closing tag without an opening tag")
    if spec.body == "python" and _PY_START.search(body):
        return _classify_python(body, spec)
    return _classify_untagged(body, spec)


def _early_pollution(body: str, spec: FormatSpec, user_message: str | None, unclosed_think: bool) -> TurnVerdict | None:
    """Checks 5-11 of `formats.reasons`: repetition, another role's voice, stray markup."""
    why = _degenerate(body)
    if why:
        return _v("degenerate_output", why)
    if _ROLE_START.match(body):
        return _v("speaks_as_role", f"starts with {body.split()[0][:20]!r}")
    if _echoes(body, user_message):
        return _v("echoed_user_message", "the user's message is repeated in the turn")
    if spec.response_open and spec.response_open in body:
        return _v("hallucinated_tool_response", f"contains {spec.response_open!r}")
    marker = next((m for m in spec.role_markers if m in body), "")
    if marker or _role_line(spec.role_words).search(body) or _PREFIX.search(body):
        return _v("stray_role_header", f"role marker {marker!r}" if marker else "role-name line or 'User:' prefix")
    eot = next((e for e in spec.end_of_turn if e and e in body), "")
    allowed = {spec.tool_open, spec.tool_close, *spec.other_call_markers}
    special = eot or next((t for t in _SPECIAL.findall(body) if t not in allowed), "")
    if special:
        return _v("stray_special_token", f"{special!r} inside the turn")
    return _v("unclosed_think") if unclosed_think else None


def _classify_untagged(body: str, spec: FormatSpec) -> TurnVerdict:
    kind = _other_syntax(body, spec)
    if kind:
        return _v("other_syntax_call", kind)
    objs, whole = C.find_json_calls(body)
    if objs and spec.untagged_calls_ok:
        calls, reason, detail = _check_calls(objs, spec)
        if reason:
            return _v(reason, detail, calls)
        return _v("ok_call", calls=calls) if whole else _v("extra_text_around_call", "text around the JSON call", calls)
    if objs:
        calls = [c for c in (C.as_call(o)[0] for o in objs) if c]
        return _v("untagged_json_call", "whole turn" if whole else "JSON call inside text", calls)
    return _v("ok_text")


def _classify_python(body: str, spec: FormatSpec) -> TurnVerdict:
    """A python-list spec: the call list runs from the first line starting with `[` to the last `]`."""
    start = _PY_START.search(body).start()
    end = body.rfind("]")
    src = body[start:end + 1] if end > start else body[start:]
    try:
        calls = C.parse_python_calls(src)
    except C.PythonCallError as exc:
        return _v("invalid_call", str(exc))
    calls, reason, detail = _check_calls(calls, spec)
    if reason:
        return _v(reason, detail, calls)
    if body.replace(src, "", 1).strip():
        return _v("extra_text_around_call", "text around the call list", calls)
    return _v("ok_call", calls=calls)


def _classify_tagged(body: str, spec: FormatSpec, error: str | None) -> TurnVerdict:
    split = C.split_tags(body, spec.tool_open, spec.tool_close)
    parsed = [_parse_body(seg.body, spec) for seg in split.segments]
    good = [c for calls, reason, _ in parsed if reason in ("", "unknown_tool") for c in calls]
    if any(not seg.closed for seg in split.segments):
        if good:
            return _v("unclosed_call", "opening tag never closed", good, error)
        return _v("unclosed_tag", "opening tag never closed, no well-formed call", error=error)
    for code in _SEVERITY:
        for _, reason, detail in parsed:
            if reason == code:
                return _v(code, detail, good, error)
    outside = split.outside
    if spec.tool_close and any(spec.tool_close in o for o in outside):
        return _v("stray_close_tag", "closing tag outside a call", good, error)
    if any(o.strip() for o in outside[:-1]):
        return _v("extra_text_around_call", "text before or between calls", good, error)
    if outside[-1].strip():
        return _v("text_after_close", f"text after the call: {outside[-1].strip()[:40]!r}", good, error)
    return _v("ok_call", calls=good, error=error)


def state_mix(texts: Iterable[str], spec: FormatSpec | None = None) -> StateMix:
    """The state/reason counts of many turns under one spec."""
    spec = spec or FormatSpec()
    mix = StateMix()
    for t in texts:
        mix.add(classify_turn(t, spec))
    return mix
