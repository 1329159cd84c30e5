"""Episodes of `tasks.ToolTask`s in the model's own chat template: rendering, the template check, greedy decoding.

Rendering is always `tokenizer.apply_chat_template(messages, tools=...)`. A conversation is kept as plain messages:
user turns, assistant turns (the model's text as written), tool results. How they reach the template depends on
the `ChatFormat`:

    native        the template's own tool support: `tools=` passed, results in the template's `tool` role, calls
                  in the syntax the template itself writes for an assistant `tool_calls` message (found by
                  rendering one and reading it back with each registered syntax)
    hermes        the template ignores `tools` (SmolLM2's renders only role and content: detected by rendering with
                  and without tools), so the Hermes tool prompt Qwen2.5's template writes into the system turn is
                  written there instead, and results go back as Qwen's `<tool_response>` user turn
    python_list, json, xml   prompting mode: BFCL's system prompt with that syntax's call instruction and the tools
                  as JSON; results in the template's `tool` role when it renders one, else a `<tool_response>` user turn

Per user turn the model may make several calls, one assistant message after another, until it answers without a
call or writes a malformed one (the turn ends, as in BFCL), or the step limit ends it (force-terminated: the task
fails, as in BFCL). Calls are parsed by `formats.syntaxes` (json / literal-only python / regex XML); nothing the
model writes is evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from collapse_probe.errors import UserError
from collapse_probe.formats import calls as C
from collapse_probe.formats.registry import SYNTAXES
from collapse_probe.formats.syntaxes import Syntax
from collapse_probe.tasks import ToolTask

TEMPLATES = ("auto", "native", "hermes")
PROMPT_SYNTAXES = ("python_list", "json", "xml")  # prompting modes of the grid, besides the native syntax
# Qwen2.5's chat template, the part it writes into the system turn when given tools (verbatim).
HERMES_TOOLS_HEAD = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                     "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
HERMES_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                     "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                     "\"arguments\": <args-json-object>}\n</tool_call>")
HERMES_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# BFCL's default prompting-mode system prompt (constants/default_prompts.py), the call format sentence swapped.
BFCL_PROMPT = ("You are an expert in composing functions. You are given a question and a set of possible functions. "
               "Based on the question, you will need to make one or more function/tool calls to achieve the purpose."
               "\nIf none of the functions can be used, point it out. If the given question lacks the parameters "
               "required by the function, also point it out.\nYou should only return the function calls in your "
               "response.\n\nIf you decide to invoke any of the function(s), you MUST put it in the format of "
               "{fmt}\nYou SHOULD NOT include any other text in the response.\n\nAt each turn, you should try your "
               "best to complete the tasks requested by the user within the current turn. Continue to output "
               "functions to call until you have fulfilled the user's request to the best of your ability. Once "
               "you have no more functions to call, the system will consider the current turn complete and proceed "
               "to the next turn or task.\n\nHere is a list of functions in JSON format that you can invoke.\n"
               "{functions}\n")
BFCL_PYTHON_FORMAT = "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]"
_PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool", "description": "x", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}


def _render_text(tok: Any, messages: list[dict], tools: list[dict] | None, gen: bool) -> str:
    try:
        return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)
    except Exception as exc:  # noqa: BLE001 - jinja errors of any kind, from the user's template
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UserError(f"the chat template failed to render ({type(exc).__name__}: {first}); pass a tokenizer "
                        "with a working chat template, or --template hermes") from None


@dataclass(frozen=True)
class TemplateInfo:
    uses_tools: bool  # renders `tools` at all
    tool_role: bool  # renders a `tool` message's content
    native: str | None  # registered syntax name of the calls it writes for `tool_calls`, when it has one
    note: str


def inspect_template(tok: Any) -> TemplateInfo:
    """Render with and without tools, a tool message, and an assistant tool call; see what the template did."""
    if not getattr(tok, "chat_template", None):
        raise UserError("the tokenizer has no chat template: set tokenizer.chat_template (or pass a tokenizer "
                        "directory whose tokenizer_config.json/chat_template.jinja holds one)")
    user = [{"role": "user", "content": "hello"}]
    uses = _render_text(tok, user, [_PROBE_TOOL], False) != _render_text(tok, user, None, False)
    try:
        tool_role = "RESULT-7431" in tok.apply_chat_template(user + [{"role": "tool", "content": "RESULT-7431"}],
                                                             tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses the role
        tool_role = False
    native = None
    if uses:
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "probe_tool", "arguments": {"q": "zebra"}}}]}
        try:
            head = tok.apply_chat_template(user, tools=[_PROBE_TOOL], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(user + [call], tools=[_PROBE_TOOL], tokenize=False)
            span = full[len(head):] if full.startswith(head) else full
            for name, syn in SYNTAXES.items():
                got, err = syn.parse(span)
                if err is None and got and got[0]["name"] == "probe_tool":
                    native = name
                    break
        except Exception:  # noqa: BLE001
            native = None
    note = ("the chat template renders tools" + (f" and writes calls as {native}" if native else
                                                  " but no registered syntax reads its calls")
            if uses else "the chat template ignores `tools` (same text with and without them)")
    return TemplateInfo(uses, tool_role, native, note)


@dataclass(frozen=True)
class ChatFormat:
    """One way of posing the tasks: a call syntax plus how tools and results reach the template."""

    name: str  # "native", "hermes", or a prompting syntax
    syntax: Syntax
    native_tools: bool  # pass `tools=` to the template
    tool_role: bool  # results as role "tool" (else a `<tool_response>` user turn)

    def system_text(self, tools: list[dict], base: str | None) -> str | None:
        if self.native_tools:
            return base
        fns = [t.get("function", t) for t in tools]
        if self.name == "hermes":
            return (base or HERMES_DEFAULT_SYSTEM) + HERMES_TOOLS_HEAD + "".join(
                "\n" + json.dumps(t) for t in tools) + HERMES_TOOLS_TAIL
        fmt = BFCL_PYTHON_FORMAT if self.syntax.name == "python_list" else self.syntax.call_instruction()
        text = BFCL_PROMPT.format(fmt=fmt, functions=json.dumps(fns))
        return f"{base}\n\n{text}" if base else text

    def messages(self, conv: list[dict], tools: list[dict]) -> list[dict]:
        """The conversation as this format hands it to the template (system turn first, results in place)."""
        base = conv[0]["content"] if conv and conv[0]["role"] == "system" else None
        body = conv[1:] if base is not None else conv
        out: list[dict] = []
        system = self.system_text(tools, base)
        if system is not None:
            out.append({"role": "system", "content": system})
        for m in body:
            if m["role"] == "tool" and not self.tool_role:
                block = f"<tool_response>\n{m['content']}\n</tool_response>"
                if out and out[-1].get("_results"):
                    out[-1]["content"] += "\n" + block
                else:
                    out.append({"role": "user", "content": block, "_results": True})
            else:
                out.append({"role": m["role"], "content": m["content"]})
        return [{k: v for k, v in m.items() if k != "_results"} for m in out]

    def render(self, tok: Any, conv: list[dict], tools: list[dict], *, gen: bool = True) -> list[int]:
        text = _render_text(tok, self.messages(conv, tools), tools if self.native_tools else None, gen)
        return list(tok.encode(text, add_special_tokens=False))


def chat_formats(tok: Any, template: str = "auto", syntaxes: Sequence[str] = PROMPT_SYNTAXES
                 ) -> tuple[list[ChatFormat], TemplateInfo, str]:
    """The grid for this tokenizer: the native (or Hermes fallback) format first, then the prompting syntaxes.
    Returns (formats, what the template does, a sentence saying which was used and why)."""
    if template not in TEMPLATES:
        raise UserError(f"unknown --template {template!r}: choose native, hermes or auto")
    info = inspect_template(tok)
    native_ok = info.uses_tools and info.native is not None
    if template == "native" and not native_ok:
        raise UserError(f"--template native: {info.note}; use --template hermes (the Hermes tool prompt Qwen2.5 "
                        "writes into the system turn)")
    if template == "native" or (template == "auto" and native_ok):
        first = ChatFormat("native", SYNTAXES[info.native], True, info.tool_role)
        say = f"native template ({info.note})"
    else:
        first = ChatFormat("hermes", SYNTAXES["hermes"], False, False)
        say = (f"Hermes tool prompt in the system turn ({info.note}; fell back to the prompt Qwen2.5's template "
               "writes)" if template == "auto" else "Hermes tool prompt in the system turn (--template hermes)")
    rest = [ChatFormat(s, SYNTAXES[s], False, info.tool_role) for s in syntaxes if s != first.syntax.name]
    return [first] + rest, info, say


# ------------------------------------------------------------------------------------------------ decoding
class PrefixDecoder:
    """Greedy decoding for one conversation at a time; the KV cache is cropped to the longest common prefix of
    the last context and the new one, so each step prefills only what changed."""

    def __init__(self, model: torch.nn.Module, eos_ids: Sequence[int]):
        self.model, self.eos = model, set(int(i) for i in eos_ids)
        self.cache, self.ids = None, []

    def _feed(self, ids: list[int]) -> torch.Tensor:
        from transformers import DynamicCache

        from collapse_probe.train.rollout import model_forward

        same = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            same += 1
        same = min(same, len(ids) - 1)
        if self.cache is None or same == 0:
            self.cache, same = DynamicCache(), 0
        elif len(self.ids) > same:
            self.cache.crop(same - len(self.ids))  # drop the tokens after the common prefix
        dev = next(self.model.parameters()).device
        new = torch.tensor([ids[same:]], device=dev)
        pos = torch.arange(same, len(ids), device=dev)[None, :]
        logits, self.cache = model_forward(self.model, new, torch.ones((1, len(ids)), dtype=torch.long, device=dev),
                                           pos, self.cache)
        self.ids = list(ids)
        return logits[:, -1, :].float()

    @torch.no_grad()
    def generate(self, ids: list[int], max_new_tokens: int,
                 processor: Callable[[list[list[int]], torch.Tensor], torch.Tensor] | None = None) -> list[int]:
        logits = self._feed(ids)
        gen: list[int] = []
        for _ in range(max_new_tokens):
            if processor is not None:
                logits = processor([gen], logits)
            t = int(logits[0].argmax())
            gen.append(t)
            if t in self.eos:
                break
            logits = self._feed(self.ids + [t])
        return gen


def coerce(arguments: dict, tool: dict | None) -> dict:
    """String values for parameters the schema types otherwise (XML writes every value as text) read as JSON."""
    props = ((tool or {}).get("function", tool or {}).get("parameters") or {}).get("properties") or {}
    out = {}
    for k, v in arguments.items():
        kind = (props.get(k) or {}).get("type")
        if isinstance(v, str) and kind in ("integer", "number", "boolean", "array", "object"):
            val, ok = C.loads(v)
            v = val if ok else v
        out[k] = v
    return out


@dataclass
class EpisodeResult:
    task_id: str
    turn_valid: list[bool] = field(default_factory=list)
    turn_calls: list[list[dict]] = field(default_factory=list)  # calls read (in any syntax) per user turn
    steps: int = 0
    well_formed: int = 0  # assistant messages well-formed in the asked syntax
    force_terminated: bool = False
    texts: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return bool(self.turn_valid) and all(self.turn_valid) and not self.force_terminated


def any_syntax(fmt: ChatFormat, text: str) -> list[dict]:
    """Calls in the asked syntax, else in the first registered syntax that reads the message cleanly."""
    for syn in [fmt.syntax] + [s for n, s in SYNTAXES.items() if n != fmt.syntax.name]:
        got, err = syn.parse(text)
        if got and err is None:
            return got
    return []


def run_episode(decoder: PrefixDecoder, tok: Any, fmt: ChatFormat, task: ToolTask, *, max_steps: int = 4,
                max_new_tokens: int = 160, processor: Any = None, keep_text: bool = False) -> EpisodeResult:
    """One task, all its user turns, greedy; see the module docstring for the rules."""
    env = task.environment()
    res = EpisodeResult(task.id)
    conv: list[dict] = []
    for k, user_msgs in enumerate(task.turns):
        tools = task.tools_at(k)
        by_name = {t["function"]["name"]: t for t in tools}
        conv += [dict(m) for m in user_msgs]
        read: list[dict] = []
        for step in range(max_steps + 1):
            if step == max_steps:
                res.force_terminated = True
                break
            gen = decoder.generate(fmt.render(tok, conv, tools), max_new_tokens, processor)
            text = tok.decode([t for t in gen if t not in decoder.eos], skip_special_tokens=False)
            res.steps += 1
            res.well_formed += bool(fmt.syntax.validity(text))
            if keep_text:
                res.texts.append(text)
            conv.append({"role": "assistant", "content": text})
            read += [{"name": c["name"], "arguments": coerce(c["arguments"], by_name.get(c["name"]))}
                     for c in any_syntax(fmt, text)]
            calls, err = fmt.syntax.parse(text)
            if err is not None or not calls:
                break
            for c in calls:
                obs = env.call(c["name"], coerce(c["arguments"], by_name.get(c["name"])))
                conv.append({"role": "tool", "content": obs})
        res.turn_calls.append(read)
        res.turn_valid.append(env.end_turn().valid)
    return res
