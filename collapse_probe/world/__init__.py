"""The embedded tool world: tasks, one conversation's episode, its reward, and its ChatML encoding.

A leaf package: capture, detect, recover and train import it; it imports only the call-syntax layer (formats).
`from collapse_probe import world` then `world.make_task(...)`, `world.Episode(...)`, `world.encode_trajectory(...)`.
"""

from collapse_probe.world.chat import encode_conversation, encode_trajectory, observation_text, prompt_text
from collapse_probe.world.episode import (
    ABSTAINING, AFTER_CALLS, CALLS_DUE, HARNESSES, PAPER, SITES, STRICT, Episode, oracle_turns, parse_calls, turn_sites,
)
from collapse_probe.world.reward import RewardSpec
from collapse_probe.world.tasks import (
    CITIES, ENDOFTEXT, IM_END, IM_START, NAMES, RESP_CLOSE, RESP_OPEN, SKIES, SPECIAL_TOKENS, TASK_KINDS,
    TOOL_CLOSE, TOOL_NAMES, TOOL_OPEN, TOOLS, USER_IDS, HERMES_INSTRUCTION, Task, make_task, render_answer, render_call, system_prompt,
    task_split, ABSTAIN_KINDS, ABSTAIN_REPLY, MISS_FUNC, MISS_PARAM, UserTurn,
)

__all__ = [
    "CITIES", "ENDOFTEXT", "IM_END", "IM_START", "NAMES", "RESP_CLOSE", "RESP_OPEN", "SKIES", "SPECIAL_TOKENS",
    "TASK_KINDS", "TOOL_CLOSE", "TOOL_NAMES", "TOOL_OPEN", "TOOLS", "USER_IDS", "Task", "make_task",
    "render_answer", "render_call", "system_prompt", "task_split", "Episode", "oracle_turns", "parse_calls",
    "RewardSpec", "encode_trajectory", "observation_text", "prompt_text", "encode_conversation", "HARNESSES",
    "PAPER", "STRICT", "HERMES_INSTRUCTION", "ABSTAIN_KINDS", "ABSTAIN_REPLY", "MISS_FUNC", "MISS_PARAM", "UserTurn",
    "ABSTAINING", "AFTER_CALLS", "CALLS_DUE", "SITES", "turn_sites",
]
