"""Format state of one assistant turn: healthy_tool_call, healthy_response, text_pollution or full_collapse.

The four states are the output taxonomy of Hao et al. (arXiv 2606.26027); the reason codes are ours.
Before the checks, trailing whitespace and end-of-turn tokens are stripped and one leading, closed reasoning
block (``<think>...</think>``) is dropped. "Tags" are the spec's opening/closing call tags. Rules, first match wins:

 1. empty_turn (collapse): nothing is left.
 2. bare_open_tag (collapse): the turn is exactly one opening tag.
 3. repeated_open_tag (collapse): only opening tags, two or more.
 4. empty_call (collapse): only opening and closing tags, nothing between them.
 5. hallucinated_tool_response (pollution): the tool-response tag appears in the turn.
 6. stray_role_header (pollution): a role marker (``<|im_start|>``...), a line that is only a role name
    (``assistant``), or a ``User:``-style prefix.
 7. stray_special_token (pollution): an end-of-turn token with text after it, or another ``<|...|>`` token.
 8. unclosed_think (pollution): a reasoning block is opened and never closed.
 With an opening tag in the turn:
 9. an opening tag is never closed: unclosed_tag (collapse) when no well-formed call JSON is anywhere in the
    turn; unclosed_call (pollution) when one is (the JSON skill is intact, only the structure broke).
10. the first of other_syntax_call, invalid_json, missing_name_or_arguments, unknown_tool that any tagged
    call fails (other_syntax_call here: a python-list/XML call inside the tags).
11. stray_close_tag: a closing tag outside a call.  12. extra_text_around_call: text before or between calls.
13. text_after_close: text after the last call only.  14. ok_call.
 Without an opening tag:
15. stray_close_tag.  16. other_syntax_call: python-list ``[f(a=1)]``, ``<function=...>``/``<invoke name=...>``,
    another format's call marker, or a markdown-fenced JSON call.
17. untagged_json_call: a JSON object (or list) with "name" and "arguments" outside tags. Presets whose
    format is untagged JSON (Llama 3) give ok_call / extra_text_around_call / 10's codes instead.
18. ok_text.
A well-formed call is a JSON object with a non-empty string "name" and an object "arguments"; "parameters"
(the Llama 3.1 spelling) is accepted when "arguments" is absent. Mistral takes a JSON list of such objects
(or ``name[ARGS]{...}``). JSON is parsed with ``json`` only; nothing is evaluated. Never raises.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable

from collapse_probe.schema import STATES, FormatState


_OK_CALL, _OK_TEXT = FormatState.HEALTHY_TOOL_CALL, FormatState.HEALTHY_RESPONSE
_POL, _COL = FormatState.TEXT_POLLUTION, FormatState.FULL_COLLAPSE

REASONS: dict[str, tuple[FormatState, str]] = {
    "ok_call": (_OK_CALL, "one or more well-formed tagged calls, nothing else but whitespace"),
    "ok_text": (_OK_TEXT, "plain text with no tool-call syntax and no stray markup"),
    "empty_turn": (_COL, "nothing but whitespace and end-of-turn tokens"),
    "bare_open_tag": (_COL, "exactly one opening tag and nothing else"),
    "repeated_open_tag": (_COL, "only opening tags, two or more"),
    "empty_call": (_COL, "only opening and closing tags with nothing between them"),
    "unclosed_tag": (_COL, "an opening tag never closed and no well-formed call JSON in the turn"),
    "hallucinated_tool_response": (_POL, "the assistant wrote the tool-response tag itself"),
    "stray_role_header": (_POL, "a role marker, a role-name line or a 'User:' prefix inside the turn"),
    "stray_special_token": (_POL, "an end-of-turn token followed by text, or another <|...|> token"),
    "unclosed_think": (_POL, "a reasoning block opened and never closed"),
    "unclosed_call": (_POL, "an opening tag never closed, but a well-formed call JSON is present"),
    "other_syntax_call": (_POL, "a call in another syntax: python list, XML, foreign marker, fenced JSON"),
    "invalid_json": (_POL, "the text inside the call tags is not JSON"),
    "missing_name_or_arguments": (_POL, "call JSON lacks a string 'name' or an object 'arguments'"),
    "unknown_tool": (_POL, "a call names a tool outside the known set (only with known_tools)"),
    "stray_close_tag": (_POL, "a closing tag with no opening tag before it"),
    "extra_text_around_call": (_POL, "well-formed calls with text before or between them"),
    "text_after_close": (_POL, "well-formed calls followed by text"),
    "untagged_json_call": (_POL, "a JSON call with name and arguments but no call tags"),
}

_OTHER_MARKERS = ("<tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "<function=", "<function name=",
                  "<invoke name=", "<function_calls>", "<tool_use>")
# Text between two assistant turns of a decoded trajectory; group "next" is set when another assistant turn follows.
_HERMES_SPLIT = (r"(?:<\|im_end\|>\s*)?(?<![^\n>])(?:<\|im_start\|>)?(?:user|tool)\n\s*"
                 r"(?:<tool_response>(?:(?!</?tool_response>).)*</tool_response>\s*)+"
                 r"(?:<\|im_end\|>\s*)?(?:(?P<next>(?:<\|im_start\|>)?assistant\n)|\Z)")
_LLAMA_SPLIT = (r"(?:(?:<\|eot_id\|>|<\|eom_id\|>)\s*)?(?:<\|start_header_id\|>)?ipython(?:<\|end_header_id\|>)?\n\n"
                r"(?:(?!ipython\n\n).)*?(?:<\|eot_id\|>)?"
                r"(?:(?P<next>(?:<\|start_header_id\|>)?assistant(?:<\|end_header_id\|>)?\n\n)|\Z)")
_MISTRAL_SPLIT = r"(?:</s>\s*)?(?:\[TOOL_RESULTS\](?:(?!\[/?TOOL_RESULTS\]).)*\[/TOOL_RESULTS\]\s*)+(?:(?P<next>)(?=.)|\Z)"


@dataclass(frozen=True)
class TurnVerdict:
    state: FormatState
    reason: str
    calls: list[dict] = field(default_factory=list)
    detail: str = ""


@dataclass
class FormatSpec:
    """The strings that make up one tool-call format. ``turn_split`` is a regex for the text between two
    assistant turns in a decoded multi-turn trajectory (group ``next`` set when another assistant turn follows)."""
    name: str = "hermes"
    tool_open: str = "<tool_call>"
    tool_close: str | None = "</tool_call>"
    end_of_turn: tuple[str, ...] = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>")
    response_open: str | None = "<tool_response>"
    role_markers: tuple[str, ...] = ("<|im_start|>", "<|start_header_id|>", "<|end_header_id|>")
    role_words: tuple[str, ...] = ("system", "user", "assistant", "tool", "ipython")
    think: tuple[str, str] | None = ("<think>", "</think>")
    call_list: bool = False
    untagged_calls_ok: bool = False
    other_call_markers: tuple[str, ...] = _OTHER_MARKERS
    known_tools: frozenset[str] | None = None
    turn_split: str | None = _HERMES_SPLIT

    def __post_init__(self) -> None:
        if self.known_tools is not None and not isinstance(self.known_tools, frozenset):
            self.known_tools = frozenset(self.known_tools)
        self.other_call_markers = tuple(m for m in self.other_call_markers if m and m != self.tool_open)

    @classmethod
    def hermes(cls, known_tools: Iterable[str] | None = None) -> FormatSpec:
        """Qwen2.5/Qwen3/Hermes: ``<tool_call>\\n{json}\\n</tool_call>``, ChatML roles."""
        return cls(known_tools=known_tools)

    @classmethod
    def llama3(cls, known_tools: Iterable[str] | None = None) -> FormatSpec:
        """Llama 3.1+: ``<|python_tag|>{json}`` or bare JSON with "parameters", ended by <|eom_id|>/<|eot_id|>."""
        return cls(name="llama3", tool_open="<|python_tag|>", tool_close=None,
                   end_of_turn=("<|eom_id|>", "<|eot_id|>", "<|end_of_text|>"), response_open=None,
                   role_markers=("<|start_header_id|>", "<|end_header_id|>", "<|begin_of_text|>"), think=None,
                   untagged_calls_ok=True, known_tools=known_tools,
                   turn_split=_LLAMA_SPLIT)

    @classmethod
    def mistral(cls, known_tools: Iterable[str] | None = None) -> FormatSpec:
        """Mistral: ``[TOOL_CALLS][{json}, ...]`` (or ``[TOOL_CALLS]name[ARGS]{json}``), ended by ``</s>``."""
        return cls(name="mistral", tool_open="[TOOL_CALLS]", tool_close=None, end_of_turn=("</s>",),
                   response_open="[TOOL_RESULTS]", role_markers=("[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                   "[AVAILABLE_TOOLS]"), think=None, call_list=True, known_tools=known_tools,
                   turn_split=_MISTRAL_SPLIT)

    @classmethod
    def preset(cls, name: str, known_tools: Iterable[str] | None = None) -> FormatSpec:
        """A preset by name: hermes (alias qwen), llama3, mistral. Unknown names raise ValueError."""
        makers = {"hermes": cls.hermes, "qwen": cls.hermes, "llama3": cls.llama3, "mistral": cls.mistral}
        if name not in makers:
            raise ValueError(f"unknown format {name!r}; choose one of {', '.join(makers)}")
        return makers[name](known_tools)


_SPECIAL = re.compile(r"<\|[^|<>\s]{1,40}\|>")
_PY_LIST = re.compile(r"(?m)^[ \t]*\[[ \t]*[A-Za-z_][\w.]*[ \t]*\(.*\)[ \t]*\][ \t]*$")
_FENCE = re.compile(r"```[\w-]*[ \t]*\n?(.*?)```", re.S)
_ARGS_FORM = re.compile(r"\s*([A-Za-z_][\w.\-]*)\s*\[ARGS\](.*)", re.S)
_PREFIX = re.compile(r"(?mi)^[ \t]*(?:user|assistant|human|system)[ \t]*:")


@lru_cache(maxsize=32)
def _role_line(words: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"(?m)^[ \t]*(?:" + "|".join(map(re.escape, words)) + r")[ \t]*$")


def _loads(s: str) -> tuple[object, bool]:
    try:
        return json.loads(s), True
    except (ValueError, RecursionError):  # RecursionError: deeply nested input
        return None, False


def _as_call(obj: object) -> tuple[dict | None, str]:
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


def _check_calls(objs: list, spec: FormatSpec) -> tuple[list[dict], str, str]:
    calls = []
    for obj in objs or [None]:
        call, why = _as_call(obj)
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
    if _PY_LIST.search(s):
        return "python-list call"
    for m in _FENCE.finditer(s):
        obj, ok = _loads(m.group(1).strip())
        if ok and _call_shaped(obj):
            return "markdown-fenced JSON call"
    return ""


def _call_shaped(obj: object) -> bool:
    if isinstance(obj, list):
        return bool(obj) and all(isinstance(o, dict) and _call_shaped(o) for o in obj)
    return isinstance(obj, dict) and "name" in obj and ("arguments" in obj or "parameters" in obj)


def _parse_body(content: str, spec: FormatSpec) -> tuple[list[dict], str, str]:
    s = content.strip()
    if not s:
        return [], "invalid_json", "empty call body"
    m = _ARGS_FORM.fullmatch(s) if spec.call_list else None
    obj, ok = _loads(m.group(2).strip() if m else s)
    if not ok:
        kind = _other_syntax(s, spec)
        return ([], "other_syntax_call", kind) if kind else ([], "invalid_json", f"not JSON: {s[:60]!r}")
    if m:
        obj = {"name": m.group(1), "arguments": obj}
    return _check_calls(obj if spec.call_list and isinstance(obj, list) else [obj], spec)


def _json_calls(s: str) -> tuple[list, bool]:
    """Call-shaped JSON in untagged text: (objects, whether they make up the whole text)."""
    obj, ok = _loads(s)
    if ok:
        return ((obj if isinstance(obj, list) else [obj]), True) if _call_shaped(obj) else ([], False)
    dec, found, pos, tries = json.JSONDecoder(), [], 0, 0
    while tries < 64:
        i = s.find("{", pos)
        if i < 0:
            break
        tries += 1
        try:
            obj, end = dec.raw_decode(s, i)
        except (ValueError, RecursionError):
            pos = i + 1
            continue
        if _call_shaped(obj):
            found.append(obj)
        pos = end
    return found, False


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


def _v(reason: str, detail: str = "", calls: list | None = None) -> TurnVerdict:
    return TurnVerdict(REASONS[reason][0], reason, list(calls or []), detail)


def classify_turn(text: str, spec: FormatSpec | None = None) -> TurnVerdict:
    """Classify one assistant turn (decoded with special tokens kept). See the module docstring for the rules."""
    spec = spec or FormatSpec()
    body, unclosed_think = _normalise(text, spec)
    op, cl = spec.tool_open, spec.tool_close
    if not body:
        return _v("empty_turn")
    n_open = body.count(op) if op else 0
    if n_open:
        rest = body.replace(op, "")
        if not rest.strip():
            return _v("bare_open_tag") if n_open == 1 else _v("repeated_open_tag", f"{n_open} opening tags")
        if cl and cl in rest and not rest.replace(cl, "").strip():
            return _v("empty_call")
    if spec.response_open and spec.response_open in body:
        return _v("hallucinated_tool_response", f"contains {spec.response_open!r}")
    marker = next((m for m in spec.role_markers if m in body), "")
    if marker or _role_line(spec.role_words).search(body) or _PREFIX.search(body):
        return _v("stray_role_header", f"role marker {marker!r}" if marker else "role-name line or 'User:' prefix")
    eot = next((e for e in spec.end_of_turn if e and e in body), "")
    allowed = {op, cl, *spec.other_call_markers}
    special = eot or next((t for t in _SPECIAL.findall(body) if t not in allowed), "")
    if special:
        return _v("stray_special_token", f"{special!r} inside the turn")
    if unclosed_think:
        return _v("unclosed_think")
    if n_open:
        return _classify_tagged(body, spec)
    if cl and cl in body:
        return _v("stray_close_tag", "closing tag without an opening tag")
    kind = _other_syntax(body, spec)
    if kind:
        return _v("other_syntax_call", kind)
    objs, whole = _json_calls(body)
    if objs and spec.untagged_calls_ok:
        calls, reason, detail = _check_calls(objs, spec)
        if reason:
            return _v(reason, detail, calls)
        return _v("ok_call", calls=calls) if whole else _v("extra_text_around_call", "text around the JSON call", calls)
    if objs:
        calls = [c for c in (_as_call(o)[0] for o in objs) if c]
        return _v("untagged_json_call", "whole turn" if whole else "JSON call inside text", calls)
    return _v("ok_text")


_SEVERITY = ("other_syntax_call", "invalid_json", "missing_name_or_arguments", "unknown_tool")


def _classify_tagged(body: str, spec: FormatSpec) -> TurnVerdict:
    op, cl = spec.tool_open, spec.tool_close
    segs: list[tuple[str, bool]] = []
    outside: list[str] = []
    pos, c = 0, -2
    while True:
        i = body.find(op, pos)
        if i < 0:
            outside.append(body[pos:])
            break
        outside.append(body[pos:i])
        start = i + len(op)
        nxt = body.find(op, start)
        if cl and c != -1 and c < start:  # the next closing tag, searched for again only once passed
            c = body.find(cl, start)
        if cl and (c < 0 or 0 <= nxt < c):
            end = nxt if nxt >= 0 else len(body)
            segs.append((body[start:end], False))
            pos = end
        elif not cl:
            end = nxt if nxt >= 0 else len(body)
            segs.append((body[start:end], True))
            pos = end
        else:
            segs.append((body[start:c], True))
            pos = c + len(cl)
    parsed = [_parse_body(content, spec) for content, _ in segs]
    good = [c for calls, reason, _ in parsed if reason in ("", "unknown_tool") for c in calls]
    if any(not closed for _, closed in segs):
        if good:
            return _v("unclosed_call", "opening tag never closed", good)
        return _v("unclosed_tag", "opening tag never closed, no call JSON")
    for code in _SEVERITY:
        for calls, reason, detail in parsed:
            if reason == code:
                return _v(code, detail, good)
    if cl and any(cl in o for o in outside):
        return _v("stray_close_tag", "closing tag outside a call", good)
    if any(o.strip() for o in outside[:-1]):
        return _v("extra_text_around_call", "text before or between calls", good)
    if outside[-1].strip():
        return _v("text_after_close", f"text after the call: {outside[-1].strip()[:40]!r}", good)
    return _v("ok_call", calls=good)


class StateMix:
    """Counts of turns per state and per reason; ``to_dict()`` is the summary shape used by rollout_files."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {s: 0 for s in STATES}
        self.reasons: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, verdict: TurnVerdict) -> StateMix:
        self.counts[FormatState(verdict.state).value] += 1
        self.reasons[verdict.reason] = self.reasons.get(verdict.reason, 0) + 1
        return self

    def merge(self, other: StateMix) -> StateMix:
        """Add another mix's counts into this one (in place); returns self."""
        for k, n in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + n
        for k, n in other.reasons.items():
            self.reasons[k] = self.reasons.get(k, 0) + n
        return self

    def fractions(self) -> dict:
        """{state: fraction, ..., "reasons": {code: fraction}}; states sum to 1 (NaN when there are no turns)."""
        n = self.total
        out: dict = {s: (c / n if n else float("nan")) for s, c in self.counts.items()}
        out["reasons"] = {r: c / n for r, c in self._sorted_reasons()} if n else {}
        return out

    def metrics(self, prefix: str = "fmt/") -> dict[str, float]:
        """Flat record keys of DESIGN.md: fmt/{state} and fmt/reason/{code}."""
        f = self.fractions()
        out = {f"{prefix}{s}": f[s] for s in STATES}
        out.update({f"{prefix}reason/{r}": v for r, v in f["reasons"].items()})
        return out

    def healthy_fraction(self) -> float:
        n = self.total
        return (self.counts["healthy_tool_call"] + self.counts["healthy_response"]) / n if n else float("nan")

    def _sorted_reasons(self) -> list[tuple[str, int]]:
        return sorted(((r, c) for r, c in self.reasons.items() if c), key=lambda rc: (-rc[1], rc[0]))

    def to_dict(self) -> dict:
        return {"turns": self.total, **self.counts, "reasons": dict(self._sorted_reasons())}

    @classmethod
    def from_dict(cls, d: dict) -> StateMix:
        mix = cls()
        for s in STATES:
            mix.counts[s] = int(d.get(s, 0))
        mix.reasons = {r: int(c) for r, c in d.get("reasons", {}).items()}
        return mix


def state_mix(texts: Iterable[str], spec: FormatSpec | None = None) -> StateMix:
    spec = spec or FormatSpec()
    mix = StateMix()
    for t in texts:
        mix.add(classify_turn(t, spec))
    return mix
