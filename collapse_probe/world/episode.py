"""One conversation with the tool world: parse each assistant turn, execute its calls, answer or end.

Two harnesses (`Episode.harness`):

    strict  (default) a call it cannot execute (broken JSON, an unclosed tag, an unknown tool, a bad argument)
            ends the episode, as does running out of turns. Only an empty call (`<tool_call>` and nothing in it)
            gets an error observation and the episode goes on; `end_on_call_error=False` answers every error.
    paper   what the paper's BFCL harness does (Tool-RL-Box): a turn without a closed, readable call is a text
            reply and ends the episode (a bare `<tool_call>` is an empty reply the checker fails; closed calls
            with bad JSON are dropped); an execution error is an observation and the episode goes on; the
            episode ends at the answer or at `max_turns` (the paper allows 30). The checker reads the executed
            calls, as BFCL's multi-turn checker does (the ground truth's results must be among the model's):
            success is every oracle call executed; the closing text is not graded, so once the calls are made
            an empty reply costs nothing, while a bare tag before them fails the task.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable

from collapse_probe.formats.calls import EMPTY, parse_tagged
from collapse_probe.world.tasks import RESP_CLOSE, RESP_OPEN, TOOL_CLOSE, TOOL_OPEN, Task, render_answer, render_call


def parse_calls(text: str) -> tuple[list[dict], str | None]:
    """Parse Hermes tool calls from one assistant turn with the shared reader (`formats.calls`, `json` only).
    Returns (calls, error); the error strings are observations the model sees ("empty tool call", "tool call
    is not closed", "tool call is not valid JSON", "tool call needs a string 'name' and an object 'arguments'")."""
    return parse_tagged(text, TOOL_OPEN, TOOL_CLOSE)


STRICT, PAPER = "strict", "paper"
HARNESSES = (STRICT, PAPER)


def _call_id(name: str, arguments: dict) -> str:
    return json.dumps([name, arguments], sort_keys=True)


def _observation(results: list[dict]) -> str:
    return "\n".join(f"{RESP_OPEN}\n{json.dumps(r)}\n{RESP_CLOSE}" for r in results)


@dataclass
class Episode:
    """Environment state of one conversation. `step(text)` consumes one assistant turn."""

    task: Task
    max_turns: int = 8
    turns: list[str] = field(default_factory=list)
    done: bool = False
    final_answer: str | None = None
    n_calls: int = 0
    n_tags: int = 0
    n_errors: int = 0
    parse: Callable[[str], tuple[list[dict], str | None]] = parse_calls  # swap for other call syntaxes
    end_on_call_error: bool = True  # a call that cannot be executed ends the episode; an empty call does not
    harness: str = STRICT  # STRICT or PAPER (module docstring)
    executed: set = field(default_factory=set)  # calls that ran without error (the PAPER checker reads them)

    def __post_init__(self) -> None:
        if self.harness not in HARNESSES:
            raise ValueError(f"unknown harness {self.harness!r}: use one of {', '.join(HARNESSES)}")

    def step(self, text: str) -> str | None:
        """Apply one assistant turn (special tokens removed except tool tags). Returns the observation text
        for the next user turn, or None when the episode is over."""
        self.turns.append(text)
        self.n_tags += TOOL_OPEN in text  # turns that open a call: repeating the tag in one turn pays nothing
        calls, error = self.parse(text)
        if self.harness == PAPER:
            return self._paper_step(text, calls)
        if error is None and not calls:  # a plain response ends the episode
            self.done, self.final_answer = True, text
            return None
        if error is not None:
            self.n_errors += 1
            if self.end_on_call_error and error != EMPTY:
                self.done = True  # the environment cannot tell what was meant
                return None
            results = [{"error": error}]
        else:
            self.n_calls += len(calls)
            results = [self.task.execute(c["name"], c["arguments"]) for c in calls]
            failed = sum("error" in r for r in results)
            self.n_errors += failed
            if failed and self.end_on_call_error:
                self.done = True  # a failed API call ends the episode in a strict harness
                return None
        if len(self.turns) >= self.max_turns:
            self.done = True
            return None
        return _observation(results)

    def _paper_step(self, text: str, calls: list[dict]) -> str | None:
        if not calls:  # no closed, readable call: a text reply (for a bare tag, an empty one) ends the episode
            self.done, self.final_answer = True, text
            return None
        self.n_calls += len(calls)
        results = [self.task.execute(c["name"], c["arguments"]) for c in calls]
        self.n_errors += sum("error" in r for r in results)  # errors are observations: the episode goes on
        self.executed.update(_call_id(c["name"], c["arguments"]) for c, r in zip(calls, results) if "error" not in r)
        if len(self.turns) >= self.max_turns:
            self.done = True
            return None
        return _observation(results)

    @property
    def success(self) -> bool:
        if self.harness == PAPER:  # BFCL-like: the ground truth's calls among the executed ones
            return all(_call_id(name, args) in self.executed for name, args, _ in self.task.oracle_calls())
        if self.final_answer is None:
            return False
        words = re.findall(r"[A-Za-z0-9_]+", self.final_answer)
        return self.task.answer in words


def oracle_turns(task: Task, *, empty_call_retries: int = 0) -> list[tuple[str, str | None]]:
    """Expert trajectory as (assistant turn, observation) pairs.

    `empty_call_retries` inserts that many "bare open tag -> tool error -> retry" turns before the first call,
    the kind of trace real agent SFT data holds and which keeps p(end of turn | open tag) small but non-zero.
    """
    turns: list[tuple[str, str | None]] = []
    for _ in range(empty_call_retries):
        turns.append((f"{TOOL_OPEN}\n", f"{RESP_OPEN}\n" + json.dumps({"error": EMPTY}) + f"\n{RESP_CLOSE}"))
    for name, args, obs in task.oracle_calls():
        turns.append((render_call(name, args), f"{RESP_OPEN}\n{json.dumps(obs)}\n{RESP_CLOSE}"))
    turns.append((render_answer(task.answer), None))
    return turns
