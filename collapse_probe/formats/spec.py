"""FormatSpec: the strings that make up one tool-call format, as the turn classifier sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

_OTHER_MARKERS = ("<tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "<function=", "<function name=",
                  "<invoke name=", "<function_calls>", "<tool_use>")
# Text between two assistant turns of a decoded trajectory; group "next" is set when another assistant turn follows.
HERMES_SPLIT = (r"(?:<\|im_end\|>\s*)?(?<![^\n>])(?:<\|im_start\|>)?(?:user|tool)\n\s*"
                r"(?:<tool_response>(?:(?!</?tool_response>).)*</tool_response>\s*)+"
                r"(?:<\|im_end\|>\s*)?(?:(?P<next>(?:<\|im_start\|>)?assistant\n)|\Z)")
_LLAMA_SPLIT = (r"(?:(?:<\|eot_id\|>|<\|eom_id\|>)\s*)?(?:<\|start_header_id\|>)?ipython(?:<\|end_header_id\|>)?\n\n"
                r"(?:(?!ipython\n\n).)*?(?:<\|eot_id\|>)?"
                r"(?:(?P<next>(?:<\|start_header_id\|>)?assistant(?:<\|end_header_id\|>)?\n\n)|\Z)")
_MISTRAL_SPLIT = r"(?:</s>\s*)?(?:\[TOOL_RESULTS\](?:(?!\[/?TOOL_RESULTS\]).)*\[/TOOL_RESULTS\]\s*)+(?:(?P<next>)(?=.)|\Z)"


@dataclass
class FormatSpec:
    """The strings of one tool-call format. ``turn_split`` is a regex for the text between two assistant turns
    in a decoded multi-turn trajectory (group ``next`` set when another assistant turn follows). ``body`` is
    how a call is written: "json" (tagged or untagged JSON), "python" (a python list ``[f(a=1)]``, no tags) or
    "xml" (``<invoke name=...><parameter name=...>v</parameter></invoke>``, the tags being ``<invoke``)."""
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
    turn_split: str | None = HERMES_SPLIT
    body: str = "json"

    def __post_init__(self) -> None:
        if self.known_tools is not None and not isinstance(self.known_tools, frozenset):
            self.known_tools = frozenset(self.known_tools)
        own = (self.tool_open, '<invoke name=') if self.body == "xml" else (self.tool_open,)
        self.other_call_markers = tuple(m for m in self.other_call_markers if m and m not in own)

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
