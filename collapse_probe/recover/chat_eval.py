"""Greedy evaluation of `tasks.ToolTask`s in one `ChatFormat`, and masked decoding, in the model's own template.

Numbers per format (kept apart, as in recover/evaluate.py):

    success           tasks whose every user turn passed the task's own check (BFCL: state + response checks)
                      and that were not force-terminated by the step limit
    content_accuracy  ground-truth calls the model made, by function name and arguments, per user turn, over all
                      ground-truth calls; calls are read in the asked syntax, else in any registered syntax
                      ("regardless of syntax": a model that ignores the asked syntax still gets its content counted)
    validity          assistant messages well-formed in the asked syntax (a clean answer counts as well-formed)
    turn_accuracy     user turns that passed their check, over all user turns
    seconds_per_task  wall time per task for this format on this machine

Masked decoding forbids the end-of-turn token (or the roles given) right after the opening tag and its newline,
however many tokens the tag is: `recover.masked.ForbidTokens` with the tag's sequence from `tokens.py`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

from collapse_probe.errors import UserError
from collapse_probe.recover.chat_episode import ChatFormat, PrefixDecoder, run_episode
from collapse_probe.recover.masked import AFTER_OPEN, ForbidTokens
from collapse_probe.tasks import ToolTask, match_count
from collapse_probe.tokens import ControlTokens

Progress = Callable[[str, int, int], None]


def stop_ids(roles: ControlTokens) -> list[int]:
    """The ids that end an assistant message: end_of_turn, end_of_message, eos (those the tokenizer has)."""
    return sorted({roles.ids[r] for r in ("end_of_turn", "end_of_message", "eos") if r in roles.ids})


def render_calls(fmt: ChatFormat, calls: Sequence[dict]) -> str:
    """One assistant message making all `calls` in the format's syntax (a python list holds them all)."""
    parts = [fmt.syntax.render(c["name"], c["arguments"]) for c in calls]
    if fmt.syntax.name == "python_list":
        return "[" + ", ".join(p[1:-1] for p in parts) + "]"
    return "\n".join(parts)


def max_new_tokens_for(tok: Any, fmt: ChatFormat, tasks: Sequence[ToolTask], *, floor: int = 48,
                       cap: int = 384) -> int:
    """Room for the longest ground-truth message of these tasks in this syntax (x1.5 + 16), within [floor, cap]."""
    longest = max((len(tok.encode(render_calls(fmt, calls), add_special_tokens=False))
                   for t in tasks for calls in t.gold if calls), default=0)
    return max(floor, min(cap, int(longest * 1.5) + 16))


def evaluate_chat(model: torch.nn.Module, tok: Any, fmt: ChatFormat, tasks: Sequence[ToolTask], roles: ControlTokens,
                  *, max_steps: int = 4, max_new_tokens: int | None = None, processor: Any = None,
                  keep_examples: int = 0, progress: Progress | None = None, phase: str = "formats") -> dict:
    """Greedy episodes of `tasks` in `fmt`; the numbers of the module docstring and their counts."""
    stops = stop_ids(roles)
    if not stops:
        raise UserError("the tokenizer has no end-of-turn or eos token: cannot tell where an answer ends")
    was_training = model.training
    model.eval()
    budget = max_new_tokens or max_new_tokens_for(tok, fmt, tasks)
    decoder = PrefixDecoder(model, stops)
    gold_calls = matched = steps = well = turns = turns_ok = wins = forced = 0
    examples, t0 = [], time.perf_counter()
    for i, task in enumerate(tasks):
        if progress:
            progress(phase, i, len(tasks))
        res = run_episode(decoder, tok, fmt, task, max_steps=max_steps, max_new_tokens=budget, processor=processor,
                          keep_text=i < keep_examples)
        for k, gold in enumerate(task.gold):
            gold_calls += len(gold)
            matched += match_count(gold, res.turn_calls[k]) if k < len(res.turn_calls) else 0
        steps, well = steps + res.steps, well + res.well_formed
        turns, turns_ok = turns + len(res.turn_valid), turns_ok + sum(res.turn_valid)
        wins, forced = wins + res.success, forced + res.force_terminated
        if i < keep_examples:
            examples.append({"task": task.id, "messages": res.texts[:8]})
    if progress:
        progress(phase, len(tasks), len(tasks))
    model.train(was_training)
    n = max(len(tasks), 1)
    out = {"format": fmt.name, "syntax": fmt.syntax.name, "n": len(tasks), "success": wins / n,
           "content_accuracy": matched / gold_calls if gold_calls else None,
           "validity": well / steps if steps else None, "turn_accuracy": turns_ok / turns if turns else None,
           "matched_calls": matched, "gold_calls": gold_calls, "messages": steps, "force_terminated": forced,
           "max_new_tokens": budget, "seconds_per_task": (time.perf_counter() - t0) / n}
    if keep_examples:
        out["examples"] = examples
    return out


def masked_chat(model: torch.nn.Module, tok: Any, fmt: ChatFormat, tasks: Sequence[ToolTask], roles: ControlTokens,
                mask_roles: Sequence[str] = ("end_of_turn",), *, max_steps: int = 4,
                max_new_tokens: int | None = None, progress: Progress | None = None) -> dict:
    """`evaluate_chat` with `mask_roles` forbidden right after the call tag (its newline included): the skill
    behind the spiking token, if any. Needs a tagged format whose tag resolves in `roles` (tool_open)."""
    if "tool_open" not in roles.ids:
        raise UserError(f"masked decoding needs the call tag as a control role "
                        f"({roles.unresolved.get('tool_open', 'tool_open not resolved')})")
    unknown = [r for r in mask_roles if r not in roles.ids]
    if unknown:
        raise UserError(f"cannot mask {', '.join(unknown)}: not a control role of this tokenizer "
                        f"(resolved: {', '.join(sorted(roles.ids))})")
    proc = ForbidTokens([roles.ids[r] for r in mask_roles], open_id=roles.sequence("tool_open"),
                        newline_id=roles.ids.get("newline"), close_id=roles.sequence("tool_close") or None,
                        position=AFTER_OPEN)
    res = evaluate_chat(model, tok, fmt, tasks, roles, max_steps=max_steps, max_new_tokens=max_new_tokens,
                        processor=proc, progress=progress, phase="masked")
    res.update({"masked_roles": list(mask_roles), "position": AFTER_OPEN, "mask_applied": proc.applied,
                "mask_changed": proc.changed, "tag": roles.strings.get("tool_open")})
    return res
