"""The world as ChatML text and tokens: the prompt, observation turns, and the oracle trajectory encoded.

SFT, rollouts and probe sets build sequences with these functions, so every consumer sees identical tokens.
"""

from __future__ import annotations

from collapse_probe.world.episode import oracle_turns
from collapse_probe.world.tasks import IM_END, IM_START, Task, system_prompt


def prompt_text(task: Task, system: str | None = None) -> str:
    """The ChatML prompt up to the first assistant header; the default system prompt lists the task's tools
    (all of them unless one is withheld: world.tasks miss_func)."""
    system = system_prompt(task.tools) if system is None else system
    return (f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{task.question}{IM_END}\n"
            f"{IM_START}assistant\n")


def observation_text(obs: str) -> str:
    return f"\n{IM_START}user\n{obs}{IM_END}\n{IM_START}assistant\n"


def encode_trajectory(tokenizer, task: Task, *, empty_call_retries: int = 0,
                      retry_at: int = 0, system: str | None = None) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) for the oracle solution of `task`; loss_mask marks assistant tokens."""
    turns = oracle_turns(task)
    if empty_call_retries:  # "bare open tag -> tool error -> retry" inserted before call `retry_at`
        retry = oracle_turns(task, empty_call_retries=empty_call_retries)[:empty_call_retries]
        turns = turns[:retry_at] + retry + turns[retry_at:]
    return encode_conversation(tokenizer, prompt_text(task, system), turns)


def encode_conversation(tokenizer, prompt: str, turns: list[tuple[str, str | None]]) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) for a prompt then (assistant turn, observation or None) pairs; loss_mask marks the
    assistant tokens, each turn closed by the end-of-turn token."""
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    mask = [0] * len(ids)
    for turn, obs in turns:
        seg = tokenizer.encode(turn, add_special_tokens=False) + [eos]
        ids += seg
        mask += [1] * len(seg)
        if obs is not None:
            seg = tokenizer.encode(observation_text(obs), add_special_tokens=False)
            ids += seg
            mask += [0] * len(seg)
    return ids, mask
