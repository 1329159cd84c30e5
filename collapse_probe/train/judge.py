"""Process reflection (interleaved): a judge explains a failed trajectory; SFT on its analysis and the fix.

The paper's judge is a large model that writes a turn-by-turn analysis of a failed trajectory, the root cause
at the first wrong turn, and the corrected action. In the embedded world the judge is a program (`RuleJudge`):
it compares each turn with the oracle's and writes that analysis deterministically; a stand-in, since no judge
model is at hand offline. `ModelJudge(PATH)` lets any local HF causal LM write the analysis instead (the
corrected action always comes from the oracle).

A reflection example: the failed conversation up to and including its first wrong turn (and that turn's
observation, if it got one), a user turn asking for a review, then one assistant turn with the analysis and
the corrected call: the only tokens in the loss. These are mixed with the erroneous examples (error_sft.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from collapse_probe import world
from collapse_probe.errors import UserError
from collapse_probe.train.config import check_judge_path
from collapse_probe.train.error_sft import Failure, encode_with_target, expected_turn, replay, turn_is_right

REVIEW_REQUEST = "That went wrong. Review your turns, then make the right call."


class Judge(Protocol):
    def analyse(self, failure: Failure) -> str: ...


def _what_went_wrong(task: world.Task, k: int, text: str) -> str:
    calls, error = world.parse_calls(text)
    if text.strip() == world.TOOL_OPEN:
        return "it opened a tool call and ended the turn without writing one"
    if error is not None:
        return f"its call could not be read ({error})"
    if not calls:
        return "it replied in text before the calls were made" if k < len(task.chain) else "its answer was wrong"
    got = "; ".join(f"{c['name']}({c['arguments']})" for c in calls)
    return f"it called {got}"


class RuleJudge:
    """The deterministic judge: each turn against the oracle's, the root cause, the corrected action."""

    def analyse(self, failure: Failure) -> str:
        task, k = failure.task, failure.first_wrong
        lines = [f"Turn {i + 1} was right." for i in range(k)]
        if k < len(failure.turns):
            lines.append(f"Turn {k + 1} was wrong: {_what_went_wrong(task, k, failure.turns[k])}.")
        else:
            lines.append(f"Turn {k + 1} never came: the conversation stopped before it.")
        right = sum(turn_is_right(task, i, t) for i, t in enumerate(failure.turns) if i > k)
        if right:
            lines.append(f"{right} later turn(s) were right again, too late.")
        lines.append(f"Root cause: turn {k + 1}. Corrected action follows.")
        return " ".join(lines)


class ModelJudge:
    """A local HF causal LM as the judge: it is shown the turns and the oracle's plan and writes the analysis
    (greedy, at most `max_new_tokens`). Loaded with safetensors, no remote code."""

    def __init__(self, path: str | Path, *, max_new_tokens: int = 96):
        from collapse_probe.models.load import load_pretrained

        p = Path(path)
        check_judge_path(p)
        try:
            self.model, self.tok = load_pretrained(p)
        except UserError as exc:
            raise UserError(f"--judge {exc}") from None
        self.model.eval()
        self.max_new_tokens = max_new_tokens

    def analyse(self, failure: Failure) -> str:
        task = failure.task
        turns = "\n".join(f"Turn {i + 1}: {t}" for i, t in enumerate(failure.turns)) or "(no turns)"
        plan = "\n".join(expected_turn(task, i) for i in range(len(task.chain) + 1))
        prompt = (f"A tool-using assistant failed this task: {task.question}\n{turns}\nThe right turns were:\n"
                  f"{plan}\nSay turn by turn what went wrong and the root cause.\n")
        ids = self.tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = self.model.generate(ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id)
        text = self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        return text or RuleJudge().analyse(failure)  # an empty analysis would teach nothing


def make_judge(path: str | None) -> Judge:
    return ModelJudge(path) if path else RuleJudge()


def reflection_example(tokenizer, failure: Failure, judge: Judge) -> tuple[list[int], list[int]]:
    """(ids, loss_mask): the failed prefix through its first wrong turn, the review request, then the judge's
    analysis and the corrected turn as one assistant turn."""
    k = failure.first_wrong
    context = replay(failure, min(k + 1, len(failure.turns)))
    if k < len(failure.turns):  # the review request joins the wrong turn's observation (or starts a user turn)
        text, obs = context[-1]
        context[-1] = (text, (obs + "\n" if obs else "") + REVIEW_REQUEST)
    target = judge.analyse(failure) + "\n" + expected_turn(failure.task, k)
    return encode_with_target(tokenizer, failure.task, context, target)
