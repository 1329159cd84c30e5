"""The one registry of call-syntax names, shared by `collapse-probe formats --format` and `recover --formats`.

    hermes        <tool_call>\\n{json}\\n</tool_call>   Qwen2.5/Qwen3/Hermes, the tool world's own (alias canonical, qwen)
    renamed_tags  <function_call>\\n{json}\\n</function_call>
    json          one bare JSON object per line                            (alias untagged_json)
    python_list   [find_user(name="alice")]                                 (BFCL python)
    xml           <invoke name=...><parameter name=...>v</parameter></invoke>
    markdown      ```json\\n{json}\\n```                                     (alias markdown_fence)
    llama3        <|python_tag|>{json} or bare JSON with "parameters"
    mistral       [TOOL_CALLS][{json}, ...]

`recover` adds two content perturbations of hermes (reworded, renamed_tools: `recover.grid`), which change the
tasks rather than the syntax. Aliases keep older commands working; results are keyed by the name above.
"""
from __future__ import annotations

from collections.abc import Iterable

from collapse_probe.errors import UserError
from collapse_probe.formats.spec import FormatSpec
from collapse_probe.formats.syntaxes import PrefixJson, PythonList, Syntax, TaggedJson, UntaggedJson, Xml

HERMES = "hermes"  # the syntax the embedded tool world trains on

SYNTAXES: dict[str, Syntax] = {s.name: s for s in (
    TaggedJson(HERMES, "<tool_call>\\n{json}\\n</tool_call> (Hermes/Qwen, what the model was trained on)"),
    TaggedJson("renamed_tags", "<function_call>\\n{json}\\n</function_call>", "<function_call>", "</function_call>"),
    UntaggedJson("json", "one bare JSON object per line"),
    PythonList("python_list", '[find_user(name="alice")] (BFCL python)'),
    Xml("xml", '<invoke name=...><parameter name=...>v</parameter></invoke>'),
    TaggedJson("markdown", "```json fenced JSON", "```json", "```",
               "Call a tool in a fenced JSON block: ```json\n" + '{"name": <function-name>, "arguments": '
               "<args-json-object>}\n```"),
    PrefixJson("llama3", "<|python_tag|>{json} (Llama 3.1)", "<|python_tag|>", False, FormatSpec.llama3),
    PrefixJson("mistral", "[TOOL_CALLS][{json}, ...] (Mistral)", "[TOOL_CALLS]", True, FormatSpec.mistral),
)}
ALIASES: dict[str, str] = {"canonical": HERMES, "qwen": HERMES, "untagged_json": "json", "markdown_fence": "markdown"}
SYNTAX_NAMES: tuple[str, ...] = tuple(SYNTAXES)


def canonical_name(name: str, extra: tuple[str, ...] = ()) -> str:
    """A registered name (or one of `extra`) for `name` or an alias; an unknown one raises UserError naming
    every choice."""
    key = str(name).strip()
    key = ALIASES.get(key, key)
    if key not in SYNTAXES and key not in extra:
        choices = ", ".join((*SYNTAX_NAMES, *extra))
        raise UserError(f"unknown format {name!r}: choose from {choices} (aliases: {', '.join(ALIASES)})")
    return key


def get_syntax(name: str) -> Syntax:
    return SYNTAXES[canonical_name(name)]


def format_spec(name: str, known_tools: Iterable[str] | None = None) -> FormatSpec:
    """The FormatSpec (tags, end-of-turn, body syntax) of a registered format name or alias; unknown names raise
    UserError."""
    return get_syntax(name).spec(known_tools)
