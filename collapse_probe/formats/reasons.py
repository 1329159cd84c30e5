"""The reason codes of the turn taxonomy: each maps to one of the four format states and a one-line meaning.

The four states are the output taxonomy of Hao et al. (arXiv 2606.26027); the reason codes are ours.
`formats.classify` applies them in this order to a turn whose trailing whitespace and end-of-turn tokens are
stripped and whose one leading, closed reasoning block (``<think>...</think>``) is dropped. "Tags" are the
spec's opening/closing call tags. First match wins:

 1. empty_turn (collapse): nothing is left: the turn is empty from its start.
 2. bare_open_tag (collapse): the turn is exactly one opening tag: it ends right after the tool-call tag,
    where the call body should start (the paper's collapse; the harness's "empty tool call").
 3. repeated_open_tag (collapse): only opening tags, two or more.
 4. empty_call (collapse): only opening and closing tags, nothing between them.
 5. degenerate_output (collapse): one character, short unit or word repeated over and over (``!!!!...``).
 6. speaks_as_role (pollution): the turn starts as another role would (``user``, ``USER:``, ``assistant``).
 7. echoed_user_message (pollution): the turn copies the user's message (only when it is given).
 8. hallucinated_tool_response (pollution): the tool-response tag appears in the turn.
 9. stray_role_header (pollution): a role marker (``<|im_start|>``...), a line that is only a role name
    (``assistant``), or a ``User:``-style prefix, later in the turn.
10. stray_special_token (pollution): an end-of-turn token with text after it, or another ``<|...|>`` token.
11. unclosed_think (pollution): a reasoning block is opened and never closed.
 With an opening tag in the turn:
12. an opening tag is never closed: unclosed_tag (collapse) when no well-formed call is anywhere in the
    turn; unclosed_call (pollution) when one is (the call skill is intact, only the structure broke).
13. the first of other_syntax_call, invalid_json, invalid_call, missing_name_or_arguments, unknown_tool that
    any tagged call fails (other_syntax_call here: a python-list/XML call inside JSON tags).
14. stray_close_tag: a closing tag outside a call.  15. extra_text_around_call: text before or between calls.
16. text_after_close: text after the last call only.  17. ok_call.
 Without an opening tag:
18. stray_close_tag.  19. a python-list spec: ok_call / extra_text_around_call / invalid_call for its list.
20. other_syntax_call: python-list ``[f(a=1)]``, ``<function=...>``/``<invoke name=...>``, another format's
    call marker, or a markdown-fenced JSON call.
21. untagged_json_call: a JSON object (or list) with "name" and "arguments" outside tags. Specs whose format
    is untagged JSON (Llama 3, json) give ok_call / extra_text_around_call / 13's codes instead.
22. ok_text.
A well-formed call is the one rule of `formats.calls`. Mistral takes a JSON list of such objects (or
``name[ARGS]{...}``). JSON is parsed with ``json`` only; nothing is evaluated. The classifier never raises.
"""

from __future__ import annotations

from collapse_probe.schema import FormatState, Position

_OK_CALL, _OK_TEXT = FormatState.HEALTHY_TOOL_CALL, FormatState.HEALTHY_RESPONSE
_POL, _COL = FormatState.TEXT_POLLUTION, FormatState.FULL_COLLAPSE

REASONS: dict[str, tuple[FormatState, str]] = {
    "ok_call": (_OK_CALL, "one or more well-formed tagged calls, nothing else but whitespace"),
    "ok_text": (_OK_TEXT, "plain text with no tool-call syntax and no stray markup"),
    "empty_turn": (_COL, "empty at the turn start: nothing but whitespace and end-of-turn tokens"),
    "bare_open_tag": (_COL, "the turn ends right after the tool-call opening tag: empty where the call starts"),
    "repeated_open_tag": (_COL, "only opening tags, two or more"),
    "empty_call": (_COL, "only opening and closing tags with nothing between them"),
    "degenerate_output": (_COL, "the same character, short unit or word repeated over and over"),
    "unclosed_tag": (_COL, "an opening tag never closed and no well-formed call in the turn"),
    "speaks_as_role": (_POL, "the turn starts as another role: 'user', 'USER:', 'assistant' as its first word"),
    "echoed_user_message": (_POL, "the turn copies the user's message"),
    "hallucinated_tool_response": (_POL, "the assistant wrote the tool-response tag itself"),
    "stray_role_header": (_POL, "a role marker, a role-name line or a 'User:' prefix inside the turn"),
    "stray_special_token": (_POL, "an end-of-turn token followed by text, or another <|...|> token"),
    "unclosed_think": (_POL, "a reasoning block opened and never closed"),
    "unclosed_call": (_POL, "an opening tag never closed, but a well-formed call is present"),
    "other_syntax_call": (_POL, "a call in another syntax: python list, XML, foreign marker, fenced JSON"),
    "invalid_json": (_POL, "the text inside the call tags is not JSON"),
    "invalid_call": (_POL, "a call in the format's own non-JSON syntax (python list, XML) that does not parse"),
    "missing_name_or_arguments": (_POL, "a call lacks a string 'name' or an object 'arguments'"),
    "unknown_tool": (_POL, "a call names a tool outside the known set (only with known_tools)"),
    "stray_close_tag": (_POL, "a closing tag with no opening tag before it"),
    "extra_text_around_call": (_POL, "well-formed calls with text before or between them"),
    "text_after_close": (_POL, "well-formed calls followed by text"),
    "untagged_json_call": (_POL, "a JSON call with name and arguments but no call tags"),
}

# Empty turns by where the emptiness happens: the summary of `collapse-probe formats` says which.
EMPTY_AT: dict[str, Position] = {"empty_turn": Position.TURN_START, "bare_open_tag": Position.AFTER_OPEN}
