"""Erroneous-example SFT (interleaved): RL in rounds; between rounds, SFT on the turns the policy got wrong.

As in the paper's code: after a round of `error_sft_every` RL steps, the prompts that scored 0 in the round's
last 10 steps (every policy sample of the group failed) become SFT examples, then `error_sft_epochs` passes of
SFT over them run with an optimizer of their own (the paper's SFT phases are separate jobs), and RL resumes with
its optimizer as it was. The paper builds per-turn pairs from BFCL's per-turn ground truth; the embedded world's
ground truth is one call chain, so "the correct turn" is the oracle's next call (or its answer) after the turns
that matched.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from collapse_probe import world
from collapse_probe.train.rollout import POLICY, Trajectory

WINDOW = 10  # the round's last steps whose all-failed prompts become examples


@dataclass(frozen=True)
class Failure:
    """A failed conversation and where it first went wrong: `turns[first_wrong]` (0-based), or
    `first_wrong == len(turns)` when every turn was right but the conversation stopped short."""

    task: world.Task
    turns: tuple[str, ...]
    first_wrong: int
    harness: str = world.STRICT


def expected_turn(task: world.Task, k: int) -> str:
    """The oracle's turn `k` (0-based): the k-th call of the chain, or the answer after the last call."""
    calls = task.oracle_calls()
    return world.render_call(calls[k][0], calls[k][1]) if k < len(calls) else world.render_answer(task.answer)


def turn_is_right(task: world.Task, k: int, text: str) -> bool:
    """Whether turn `k` does what the oracle's turn k does: exactly its call, or (after the chain) an answer
    naming the right value."""
    calls, error = world.parse_calls(text)
    chain = task.oracle_calls()
    if k < len(chain):
        return error is None and [(c["name"], c["arguments"]) for c in calls] == [chain[k][:2]]
    return error is None and not calls and task.answer in text


def first_wrong_turn(task: world.Task, turns: list[str] | tuple[str, ...]) -> int:
    """The index of the first turn that is not the oracle's; len(turns) if there is none."""
    for k, text in enumerate(turns):
        if not turn_is_right(task, k, text):
            return k
    return len(turns)


def failure_of(traj: Trajectory, harness: str) -> Failure:
    turns = tuple(traj.episode.turns)
    k = min(first_wrong_turn(traj.task, turns), len(traj.task.chain))
    return Failure(traj.task, turns, k, harness)


def replay(failure: Failure, upto: int) -> list[tuple[str, str | None]]:
    """The failed conversation's turns [0, upto) with the observations the environment gave them."""
    ep = world.Episode(failure.task, max_turns=max(len(failure.turns), 1) + 1, harness=failure.harness)
    return [(text, ep.step(text)) for text in failure.turns[:upto]]


def encode_with_target(tokenizer, task: world.Task, context: list[tuple[str, str | None]],
                       target: str) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) for the prompt, the `context` turns (not in the loss), then the `target` assistant turn
    (in the loss, closed by end-of-turn)."""
    ids, _ = world.encode_conversation(tokenizer, world.prompt_text(task), context + [(target, None)])
    n = len(tokenizer.encode(target, add_special_tokens=False)) + 1
    return ids, [0] * (len(ids) - n) + [1] * n


def erroneous_example(tokenizer, failure: Failure) -> tuple[list[int], list[int]]:
    """The failed prefix up to its first wrong turn, then the correct turn."""
    return encode_with_target(tokenizer, failure.task, replay(failure, failure.first_wrong),
                              expected_turn(failure.task, failure.first_wrong))


class FailedPrompts:
    """The current round's recent steps, and the failures of prompts whose every policy sample scored 0."""

    def __init__(self, window: int = WINDOW):
        self.steps: deque[list[Trajectory]] = deque(maxlen=window)

    def add(self, trajs: list[Trajectory]) -> None:
        self.steps.append([t for t in trajs if t.source == POLICY])

    def failures(self, harness: str) -> list[Failure]:
        """One failure per distinct (prompt, first wrong turn) of the all-failed prompts in the window."""
        out: dict[tuple[int, int], Failure] = {}
        for trajs in self.steps:
            groups: dict[int, list[Trajectory]] = {}
            for t in trajs:
                groups.setdefault(t.group, []).append(t)
            for group in groups.values():
                if any(t.reward > 0 or t.success for t in group):
                    continue
                for t in group:
                    f = failure_of(t, harness)
                    out.setdefault((t.task.seed, f.first_wrong), f)
        return list(out.values())

    def clear(self) -> None:
        self.steps.clear()
