"""Resolve named control-token roles (tool_open, end_of_turn, json_open, ...) to their token ids.

Most roles are one token (`<|im_end|>`, Qwen2.5's `<tool_call>`). Where a model has no tool tokens, the tool
world writes its tags as plain text (SmolLM2: `<tool_call>` is the 5 pieces '<' 'tool' '_' 'call' '>'): such a
role resolves to its pieces, `ids[role]` is the FIRST piece (the token capture gathers and masked decoding
forbids) and `sequences[role]` all of them (decision positions are found after the whole sequence; capture
adds the chained probability of the sequence where it follows). Auto-detection never guesses: a tag is a
single added/template token, or, when the tokenizer has no tool-call token at all, the Hermes tags as text
(source "text"); anything else is reported in `unresolved` with the reason, and `--token role=string` accepts
any string (one token or several).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from collapse_probe.errors import UserError

if TYPE_CHECKING:  # transformers is slow to import; only needed for annotations
    from transformers import PreTrainedTokenizerBase

# Canonical role order; role_of() returns the first matching role in this order.
ROLES: tuple[str, ...] = (
    "tool_open", "tool_close", "end_of_turn", "end_of_message", "eos", "turn_open",
    "tool_response_open", "tool_response_close", "json_open", "json_close", "newline",
)
# Candidate strings per tag role, most specific first (Qwen/Hermes, Llama-3.1, Mistral, Gemma, Phi-3).
CANDIDATES: dict[str, tuple[str, ...]] = {
    "tool_open": ("<tool_call>", "<|python_tag|>", "[TOOL_CALLS]"),
    "tool_close": ("</tool_call>",),
    "end_of_turn": ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>"),
    "end_of_message": ("<|eom_id|>",),
    "turn_open": ("<|im_start|>", "<|start_header_id|>", "[INST]", "<start_of_turn>"),
    "tool_response_open": ("<tool_response>", "[TOOL_RESULTS]"),
    "tool_response_close": ("</tool_response>", "[/TOOL_RESULTS]"),
}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r", "\\\\": "\\"}


# Hermes tags written as plain text, for tokenizers without any tool-call token (the tool world's own tags)
TEXT_TAGS: dict[str, str] = {"tool_open": "<tool_call>", "tool_close": "</tool_call>",
                             "tool_response_open": "<tool_response>", "tool_response_close": "</tool_response>"}


class RoleIds(dict):
    """role -> the id capture gathers (a multi-token role's first piece), as a plain dict; `sequences` holds the
    full ids of the roles that are several tokens. It travels with the ids through every capture entry point
    (`decision_masks` reads it), so a trainer passing `roles.distinct_ids()` along needs no change; a plain
    `Mapping[str, int]` means every role is one token. `braces`: token id -> (opening, closing) curly braces in
    its text, for the ids that have any (where a call's JSON body closes: capture/stats.py `body_closed`)."""

    def __init__(self, ids: Mapping[str, int] | None = None,
                 sequences: Mapping[str, Sequence[int]] | None = None,
                 braces: Mapping[int, tuple[int, int]] | None = None) -> None:
        super().__init__(ids or {})
        self.sequences: dict[str, tuple[int, ...]] = {
            r: tuple(int(i) for i in s) for r, s in (sequences or {}).items() if r in self and len(s) > 1}
        self.braces: dict[int, tuple[int, int]] = dict(braces or {})


def role_sequence(role_ids: Mapping[str, int], role: str) -> tuple[int, ...]:
    """All token ids of `role` (one id for a single-token role, () when the role is absent)."""
    seqs = getattr(role_ids, "sequences", None) or {}
    if role in seqs:
        return tuple(seqs[role])
    return (int(role_ids[role]),) if role in role_ids else ()


@dataclass
class ControlTokens:
    """Role -> token id (the first piece of a multi-token role), the full ids of multi-token roles, the string,
    where it came from, and why other roles did not resolve."""

    ids: dict[str, int] = field(default_factory=dict)
    strings: dict[str, str] = field(default_factory=dict)
    unresolved: dict[str, str] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)  # "auto" | "override" | "chat_template" | "text"
    sequences: dict[str, tuple[int, ...]] = field(default_factory=dict)  # only roles of 2+ tokens
    # id -> ({ count, } count) for ids with any: a cache of the tokenizer's vocabulary (resolve_control_tokens fills
    # it), so not part of what the roles are (equality, to_dict)
    braces: dict[int, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)

    def __contains__(self, role: object) -> bool:
        return role in self.ids

    def sequence(self, role: str) -> tuple[int, ...]:
        """Every token id of `role`, in order."""
        return self.sequences.get(role) or ((self.ids[role],) if role in self.ids else ())

    def _order(self) -> list[str]:
        return [r for r in ROLES if r in self.ids] + [r for r in self.ids if r not in ROLES]

    def all_ids(self) -> RoleIds:
        """Every resolved role (roles may share an id), with the sequences of multi-token roles."""
        return RoleIds(self.ids, self.sequences, self.braces)

    def distinct_ids(self) -> RoleIds:
        """role -> id with each id once (first role in canonical order wins: `eos` is dropped where it is the
        end-of-turn token, and `tool_response_open` where it starts with the same piece '<' as a plain-text
        `tool_open`), so records and figures carry no duplicate series."""
        out: dict[str, int] = {}
        for role in self._order():
            if self.ids[role] not in out.values():
                out[role] = self.ids[role]
        return RoleIds(out, self.sequences, self.braces)

    def role_of(self, token_id: int) -> str | None:
        """First role (canonical order, then custom roles) whose id is token_id; roles may share an id."""
        return next((r for r in self._order() if self.ids[r] == token_id), None)

    def report(self, tokenizer: Any = None) -> str:
        """Readable table: resolved roles with id(s), string and source, then unresolved roles with reasons.
        With the tokenizer, each role's pieces as the tokenizer writes them."""
        order = list(ROLES) + [r for r in {**self.ids, **self.unresolved} if r not in ROLES]
        shown = {r: " ".join(str(i) for i in self.sequence(r)) for r in self.ids}
        w = max([8] + [len(v) for v in shown.values()])
        lines = [f"{'role':<20} {'id':>{w}}  {'string':<22} {'source':<14}" + (" pieces" if tokenizer else "")]
        for r in order:
            if r in self.ids:
                seq = self.sequence(r)
                line = f"{r:<20} {shown[r]:>{w}}  {self.strings[r]!r:<22} {self.source.get(r, ''):<14}"
                if tokenizer is not None:
                    line += f" {len(seq)}: " + " ".join(repr(p) for p in self.pieces(tokenizer)[r])
                lines.append(line.rstrip())
        missing = [r for r in order if r in self.unresolved]
        if missing:
            lines.append("unresolved:")
            lines += [f"  {r:<20} {self.unresolved[r]}" for r in missing]
        return "\n".join(lines)

    def pieces(self, tokenizer: Any) -> dict[str, list[str]]:
        """role -> its tokens, each decoded alone."""
        return {r: [tokenizer.decode([i]) for i in self.sequence(r)] for r in self._order()}

    def to_dict(self, tokenizer: Any = None) -> dict[str, Any]:
        """JSON-able; `sequences` only when a role has several tokens, `pieces` only with a tokenizer."""
        out: dict[str, Any] = {"ids": dict(self.ids), "strings": dict(self.strings),
                               "unresolved": dict(self.unresolved), "source": dict(self.source)}
        if self.sequences:
            out["sequences"] = {r: list(s) for r, s in self.sequences.items()}
        if tokenizer is not None:
            out["pieces"] = self.pieces(tokenizer)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ControlTokens":
        return cls(ids={k: int(v) for k, v in d.get("ids", {}).items()}, strings=dict(d.get("strings", {})),
                   unresolved=dict(d.get("unresolved", {})), source=dict(d.get("source", {})),
                   sequences={k: tuple(int(i) for i in v) for k, v in d.get("sequences", {}).items() if len(v) > 1})

    def set(self, role: str, s: str, ids: Sequence[int], source: str) -> None:
        """Record `role` as the string `s` whose tokens are `ids`."""
        self.ids[role], self.strings[role], self.source[role] = int(ids[0]), s, source
        if len(ids) > 1:
            self.sequences[role] = tuple(int(i) for i in ids)
        else:
            self.sequences.pop(role, None)
        self.unresolved.pop(role, None)


def _encode(tokenizer: Any, s: str) -> list[int]:
    return list(tokenizer.encode(s, add_special_tokens=False))


def _pieces(tokenizer: Any, s: str) -> list[int]:
    """Ids s becomes in the middle of text. SentencePiece-style tokenizers prepend a word marker to the
    start of a string ('{' -> '▁{'), which is not the token a model emits after a tag or newline, so
    encode after a neutral prefix and keep the tail, when the prefix's own tokens stay unchanged."""
    for prefix in ("\n", "x"):
        pre, full = _encode(tokenizer, prefix), _encode(tokenizer, prefix + s)
        if pre and full[: len(pre)] == pre and len(full) > len(pre):
            return full[len(pre):]
    return _encode(tokenizer, s)


def _added(tokenizer: Any) -> dict[str, int]:
    try:
        return dict(tokenizer.get_added_vocab())
    except Exception:  # slow or exotic tokenizers may not implement it
        return {}


def single_token_id(tokenizer: PreTrainedTokenizerBase, s: str) -> int | None:
    """The one id that s is (added/special token, or a single ordinary vocab piece), else None."""
    if not s:
        return None
    added = _added(tokenizer)
    if s in added:
        return int(added[s])
    ids = _pieces(tokenizer, s)
    return int(ids[0]) if len(ids) == 1 else None


def token_ids(tokenizer: PreTrainedTokenizerBase, s: str) -> list[int]:
    """The ids s is in the middle of text: the one added/special token it names, or its ordinary pieces."""
    if not s:
        return []
    added = _added(tokenizer)
    return [int(added[s])] if s in added else [int(i) for i in _pieces(tokenizer, s)]


def _describe(tokenizer: Any, s: str) -> str:
    ids = _pieces(tokenizer, s)
    shown = ", ".join(repr(tokenizer.decode([i])) for i in ids)
    return f"{s!r} splits into {len(ids)} tokens {ids} ({shown})"


def parse_token_overrides(items: list[str]) -> dict[str, str]:
    """Parse CLI `role=string` items. `\\n`, `\\t`, `\\r`, `\\\\` in the string are unescaped so a newline
    can be given on a command line. Custom role names are allowed if they are identifiers."""
    out: dict[str, str] = {}
    for item in items:
        role, sep, raw = item.partition("=")
        role = role.strip()
        if not sep:
            raise UserError(f"--token {item!r}: expected ROLE=STRING, e.g. end_of_turn=<|im_end|>")
        if not _IDENT.match(role):
            raise UserError(f"--token {item!r}: role name {role!r} is not an identifier; known roles: {', '.join(ROLES)}")
        value = re.sub(r"\\[ntr\\]", lambda m: _ESCAPES[m.group(0)], raw)
        if not value:
            raise UserError(f"--token {item!r}: the string for role {role!r} is empty")
        if role in out:
            raise UserError(f"--token: role {role!r} given twice")
        out[role] = value
    return out


def _template_text(tokenizer: Any, chat_template: str | None) -> str:
    t = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):  # several named templates: search them all
        return "\n".join(str(v) for v in t.values())
    if isinstance(t, list):
        return "\n".join(str(x.get("template", "")) for x in t if isinstance(x, dict))
    return t or ""


def _resolve_tag(tokenizer: Any, role: str, template: str, added: dict[str, int]) -> tuple[str, int, str] | str:
    """(string, id, source) for a tag role, or the reason it did not resolve. A candidate counts if the
    chat template uses it and it is one token, or if it is an added/special token (an ordinary vocab
    piece that merely happens to spell '[INST]' is text, not a control token)."""
    cands = CANDIDATES[role]
    in_tpl = [c for c in cands if template and c in template]
    for c in in_tpl:
        tid = single_token_id(tokenizer, c)
        if tid is not None:
            return c, tid, "chat_template"
    for c in cands:
        if c in added:
            return c, int(added[c]), "auto"
    first = (in_tpl or list(cands))[0]
    where = " (used by the chat template)" if in_tpl else ""
    if single_token_id(tokenizer, first) is not None:
        return f"{first!r}{where} is an ordinary vocabulary piece, not an added control token"
    return f"{_describe(tokenizer, first)}{where}: not a single control token"


def _json_roles(tokenizer: Any, ct: ControlTokens) -> None:
    """json_open/json_close as the tokenizer actually splits a tool call in its own format (Qwen:
    '<tool_call>\\n{"name": ...}}\\n</tool_call>'), found through character offsets."""
    body = '{"name": "f", "arguments": {"a": 1}}'
    prefix = ct.strings.get("tool_open", "") + ("\n" if "tool_close" in ct.ids else "")
    suffix = "\n" + ct.strings["tool_close"] if "tool_close" in ct.ids else ct.strings.get("end_of_turn", "")
    start, last = len(prefix), len(prefix) + len(body) - 1
    found: dict[str, int] = {}
    try:
        enc = tokenizer(prefix + body + suffix, add_special_tokens=False, return_offsets_mapping=True)
        for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if a <= start < b and "json_open" not in found:
                found["json_open"] = int(tid)
            if a <= last < b:
                found["json_close"] = int(tid)
    except Exception:  # slow tokenizers have no offsets: fall back to the bare strings below
        pass
    ok = {"json_open": lambda t: t in ('{"', "{"), "json_close": lambda t: t.startswith("}") and not t.strip("}\n ")}
    bare = {"json_open": ('{"', "{"), "json_close": ("}",)}
    for role in ("json_open", "json_close"):
        if role in ct.ids:  # overridden
            continue
        text = tokenizer.decode([found[role]]) if role in found else None
        if text is not None and ok[role](text.strip(" ")):
            ct.ids[role], ct.strings[role], ct.source[role] = found[role], text.strip(" "), "auto"
            continue
        for s in bare[role]:  # e.g. the body's brace merged with a neighbour: use the lone brace
            if (tid := single_token_id(tokenizer, s)) is not None:
                ct.ids[role], ct.strings[role], ct.source[role] = tid, s, "auto"
                break
        else:
            ct.unresolved[role] = f"none of {list(bare[role])} is a single token in this vocabulary"


def _text_tags(tokenizer: Any, ct: ControlTokens) -> None:
    """No tool-call token at all (SmolLM2, most base models): the tool world writes the Hermes tags as plain
    text, so each tag role is its sequence of pieces, when those pieces spell the tag exactly."""
    for role, s in TEXT_TAGS.items():
        if role in ct.ids:
            continue
        ids = token_ids(tokenizer, s)
        if ids and tokenizer.decode(ids) == s:
            ct.set(role, s, ids, "text")
        else:
            ct.unresolved[role] = f"{_describe(tokenizer, s)}: its pieces do not decode back to the tag"


def resolve_control_tokens(tokenizer: PreTrainedTokenizerBase, overrides: dict[str, str] | None = None, *,
                           chat_template: str | None = None) -> ControlTokens:
    """Resolve all roles for an HF tokenizer; `overrides` (role -> string, one token or several) win.
    `chat_template` replaces tokenizer.chat_template when given."""
    ct, added = ControlTokens(), _added(tokenizer)
    # Overrides first: a user's tool_open/tool_close also shape the context json_open/json_close are read in.
    for role, s in (overrides or {}).items():
        ids = token_ids(tokenizer, s)
        if not ids:
            raise UserError(f"--token {role}={s!r}: the tokenizer encodes it to no token at all")
        ct.set(role, s, ids, "override")
    template = _template_text(tokenizer, chat_template)
    for role in (r for r in CANDIDATES if r not in ct.ids):
        got = _resolve_tag(tokenizer, role, template, added)
        if isinstance(got, str):
            ct.unresolved[role] = got
        else:
            ct.set(role, got[0], [got[1]], got[2])
    if "tool_open" not in ct.ids:
        _text_tags(tokenizer, ct)
    # Formats without a closing tag or tool-result tags: say why instead of only "splits into N tokens".
    if ct.strings.get("tool_open") in ("<|python_tag|>", "[TOOL_CALLS]") and "tool_close" in ct.unresolved:
        ct.unresolved["tool_close"] = (f"no closing tag in this format (tool_open is {ct.strings['tool_open']!r}); "
                                       "the call ends at end_of_message/end_of_turn")
    if ct.strings.get("turn_open") == "<|start_header_id|>" or "ipython" in template:
        for role in ("tool_response_open", "tool_response_close"):
            if role in ct.unresolved:
                ct.unresolved[role] = "Llama-3 returns tool results in an 'ipython' role header, not a tag"
    if "end_of_message" in ct.unresolved:
        ct.unresolved["end_of_message"] = "optional role (Llama-3.1 only): " + ct.unresolved["end_of_message"]
    eos = getattr(tokenizer, "eos_token", None)
    if "eos" not in ct.ids:
        if eos and (eos_id := single_token_id(tokenizer, eos)) is not None:
            ct.ids["eos"], ct.strings["eos"], ct.source["eos"] = eos_id, eos, "auto"
        else:
            ct.unresolved["eos"] = _describe(tokenizer, eos) if eos else "tokenizer has no eos_token"
    if "newline" not in ct.ids:
        if (nl := single_token_id(tokenizer, "\n")) is not None:
            ct.ids["newline"], ct.strings["newline"], ct.source["newline"] = nl, "\n", "auto"
        else:
            ct.unresolved["newline"] = f"{_describe(tokenizer, chr(10))}: no single newline token"
    _json_roles(tokenizer, ct)
    ct.braces = brace_counts(tokenizer)
    return ct


def brace_counts(tokenizer: Any) -> dict[int, tuple[int, int]]:
    """Token id -> (opening, closing) curly braces in its text, for every vocabulary piece that has any (BPE
    merges such as '"}}\n' close two): how capture follows a JSON body's depth without decoding."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a vocabulary listing: body_closed falls back to json_close
        return {}
    return {int(i): (t.count("{"), t.count("}")) for t, i in vocab.items() if "{" in t or "}" in t}
