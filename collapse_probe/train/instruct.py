"""The "instruct" data: what the tiny model learns before any RL, the way an instruct model has seen tool use.

Qwen2.5-1.5B-Instruct, the paper's starting point, has seen tool calls in many syntaxes and follows whichever
the system prompt asks for. This mixture gives the tiny model the same kind of past: every tool-world
conversation is written in one call syntax, drawn per example, and the system prompt says which
(`world.system_prompt(call_instruction=...)`):

    hermes       <tool_call>\\n{json}\\n</tool_call>   the canonical syntax (the most common in SYNTAX_MIX)
    python_list  [find_user(name="alice")]            BFCL's python format
    json         one bare JSON object per line
    xml          <invoke name=...><parameter name=...>v</parameter></invoke>

plus plain question/answer turns with no tools (QA_FRAC), "wrong call(s) -> tool error -> corrected call"
traces (the model learns to go on after errors, as the paper harness lets it) and, in the canonical syntax,
a few "bare tag -> error -> retry" traces (so p(end-of-turn | `<tool_call>\\n`) is small but not 1e-6).
Trained briefly, it is competent but imperfect in the canonical syntax, as an instruct model is before RL.

The conversations follow the structure of the tasks they are given (world.tasks `user_turns`, `abstain_frac`,
set by the trainer from TrainConfig): with several user turns each user turn's calls, answer and the next
question follow in one conversation; an abstaining turn (a tool withheld from the list, or nobody named) is
answered in text without any call, in every syntax. Plain tasks give exactly the 0.1 mixture.
"""

from __future__ import annotations

import json
import random

from collapse_probe import world
from collapse_probe.formats.calls import EMPTY
from collapse_probe.formats.registry import HERMES, SYNTAXES

# json shares hermes' body and is learned almost for free; python and XML write values differently and need more
SYNTAX_MIX: tuple[tuple[str, float], ...] = (("hermes", 0.34), ("python_list", 0.28), ("json", 0.1), ("xml", 0.28))
QA_FRAC = 0.1  # plain question/answer conversations, no tools
ERROR_FRAC = 0.3  # tool conversations holding 1-3 wrong calls and their error observations, then the right call
PLAIN_SYSTEM = "You are a helpful assistant."

_FACTS = {"find_user": "the user id of {a} is {o}", "get_friend": "the best friend of {a} is {o}",
          "get_city": "{a} lives in {o}", "get_weather": "the weather in {a} is {o}"}


def _obs(result: dict) -> str:
    return f"{world.RESP_OPEN}\n{json.dumps(result)}\n{world.RESP_CLOSE}"


def _qa_example(task: world.Task) -> tuple[str, list[tuple[str, str | None]]]:
    """The task's facts stated in the question, answered without tools (the plain task of the same seed when
    the first user turn is one to abstain on)."""
    task = world.make_task(task.seed) if task.abstain else task
    facts = []
    for name, args, obs in task.oracle_calls():
        facts.append(_FACTS[name].format(a=f'"{next(iter(args.values()))}"', o=f'"{next(iter(obs.values()))}"'))
    user = "Facts: " + "; ".join(facts) + ". " + task.question
    prompt = (f"{world.IM_START}system\n{PLAIN_SYSTEM}{world.IM_END}\n{world.IM_START}user\n{user}{world.IM_END}\n"
              f"{world.IM_START}assistant\n")
    return prompt, [(world.render_answer(task.answer), None)]


def tool_turns(task: world.Task, syntax: str, rng: random.Random, *, error_frac: float = ERROR_FRAC,
               retry_frac: float = 0.0) -> list[tuple[str, str | None]]:
    """The oracle conversation in `syntax`: per user turn, (assistant turn, observation) pairs, then its reply
    (the answer, or an abstaining turn's text) with the next user turn's question as the observation; with
    probability `error_frac` one call is first made 1-3 times with a wrong value and corrected after the errors,
    and (hermes only) with probability `retry_frac` a bare tag and its "empty tool call" error come before one
    call of the first user turn. A plain task draws from `rng` exactly as the 0.1 mixture did."""
    syn = SYNTAXES[syntax]
    users = task.user_turns
    calls = [task.turn_calls(u) for u in users]
    segments = [[(syn.render(name, args), _obs(obs)) for name, args, obs in cs] for cs in calls]
    if rng.random() < error_frac:  # agents retry after an error: the paper harness lets failures loop
        spots = [(k, j) for k, cs in enumerate(calls) for j in range(len(cs))]
        if spots:
            k, at = spots[rng.randrange(len(spots))]
            name, args, _ = calls[k][at]
            key = next(iter(args))
            pool = [v for v in world.NAMES + world.CITIES + world.USER_IDS if "error" in task.execute(name, {key: v})]
            for _ in range(rng.randint(1, 3)):
                wrong = {key: rng.choice(pool)}  # a value the tool does not know: an error observation
                segments[k].insert(at, (syn.render(name, wrong), _obs(task.execute(name, wrong))))
    if syntax == HERMES and rng.random() < retry_frac:
        segments[0].insert(rng.randrange(len(segments[0]) + 1), (f"{world.TOOL_OPEN}\n", _obs({"error": EMPTY})))
    turns: list[tuple[str, str | None]] = []
    for k, seg in enumerate(segments):
        turns += seg
        turns.append((task.turn_reply(users[k]), users[k + 1].question if k + 1 < len(users) else None))
    return turns


def instruct_conversation(task: world.Task, rng: random.Random, *, retry_frac: float = 0.0
                          ) -> tuple[str, list[tuple[str, str | None]]]:
    """(prompt text, turns) of one mixture example: plain Q/A with probability QA_FRAC, else the task in a
    syntax drawn from SYNTAX_MIX with that syntax's call instruction in the system prompt."""
    if rng.random() < QA_FRAC:
        return _qa_example(task)
    names, weights = zip(*SYNTAX_MIX)
    syntax = rng.choices(names, weights)[0]
    system = world.system_prompt(task.tools, call_instruction=SYNTAXES[syntax].call_instruction())
    return world.prompt_text(task, system), tool_turns(task, syntax, rng, retry_frac=retry_frac)


def instruct_batch(tokenizer, tasks: list[world.Task], *, retry_frac: float = 0.0,
                   rng: random.Random | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Encoded mixture examples (ids, loss masks on assistant tokens), one per task."""
    rng = rng or random.Random(0)
    seqs, masks = [], []
    for task in tasks:
        prompt, turns = instruct_conversation(task, rng, retry_frac=retry_frac)
        ids, mask = world.encode_conversation(tokenizer, prompt, turns)
        seqs.append(ids)
        masks.append(mask)
    return seqs, masks


def instruct_corpus(n_tasks: int = 400) -> list[str]:
    """Text for the instruct tokenizer's BPE merges: mixture conversations, every syntax represented."""
    rng = random.Random(0)
    texts = []
    for task in world.task_split("tokenizer", n_tasks):
        prompt, turns = instruct_conversation(task, rng)
        parts = [prompt]
        for turn, obs in turns:
            parts.append(turn + world.IM_END)
            if obs:
                parts.append(world.observation_text(obs))
        texts.append("".join(parts))
    values = world.NAMES + world.CITIES + world.USER_IDS + world.SKIES
    texts += [" ".join(f'"{v}"' for v in values), " ".join(values)] * 8  # values quoted (JSON) and bare (XML)
    return texts
