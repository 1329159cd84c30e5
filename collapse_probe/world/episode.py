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

An episode of several user turns (world.tasks: `user_turns`): a reply without a call ends the current user
turn and the next user turn's question comes back as the observation (a user message); `max_turns` counts the
assistant turns of the whole episode. The checker reads every user turn, BFCL-style: each answerable turn's
oracle calls must be executed within that turn (paper) or its reply must hold the answer (strict); on an
abstaining turn (miss_func, miss_param) the right action is to call nothing: under the paper harness any
closed, readable call fails the turn and a bare tag is no call (an empty reply, so it passes); under the strict
harness any opened tag fails it. A user turn the episode never reached fails.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable

from collapse_probe.formats.calls import EMPTY, parse_tagged
from collapse_probe.world.tasks import RESP_CLOSE, RESP_OPEN, TOOL_CLOSE, TOOL_OPEN, Task, render_call


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
    user_turn: int = 0  # index of the current user turn (task.user_turns)
    replies: list[str] = field(default_factory=list)  # the closing text of each user turn that ended
    turn_calls: list[int] = field(default_factory=lambda: [0])  # readable calls made, per user turn
    turn_tags: list[int] = field(default_factory=lambda: [0])  # assistant turns that opened a tag, per user turn
    turn_executed: list[set] = field(default_factory=lambda: [set()])  # calls run without error, per user turn

    def __post_init__(self) -> None:
        if self.harness not in HARNESSES:
            raise ValueError(f"unknown harness {self.harness!r}: use one of {', '.join(HARNESSES)}")

    def _reply(self, text: str) -> str | None:
        """A turn without a call: it closes the current user turn; the next user turn's question is the
        observation, or the episode is over."""
        self.replies.append(text)
        self.final_answer = text
        if self.user_turn + 1 < len(self.task.user_turns) and len(self.turns) < self.max_turns:
            self.user_turn += 1
            self.turn_calls.append(0)
            self.turn_tags.append(0)
            self.turn_executed.append(set())
            return self.task.user_turns[self.user_turn].question
        self.done = True
        return None

    def step(self, text: str) -> str | None:
        """Apply one assistant turn (special tokens removed except tool tags). Returns the observation text
        for the next user turn, or None when the episode is over."""
        self.turns.append(text)
        self.n_tags += TOOL_OPEN in text  # turns that open a call: repeating the tag in one turn pays nothing
        self.turn_tags[self.user_turn] += TOOL_OPEN in text
        calls, error = self.parse(text)
        if self.harness == PAPER:
            return self._paper_step(text, calls)
        if error is None and not calls:  # a plain response ends the user turn (the episode, on the last one)
            return self._reply(text)
        if error is not None:
            self.n_errors += 1
            if self.end_on_call_error and error != EMPTY:
                self.done = True  # the environment cannot tell what was meant
                return None
            results = [{"error": error}]
        else:
            self.n_calls += len(calls)
            self.turn_calls[self.user_turn] += len(calls)
            results = [self.task.execute(c["name"], c["arguments"]) for c in calls]
            self.turn_executed[self.user_turn].update(
                _call_id(c["name"], c["arguments"]) for c, r in zip(calls, results) if "error" not in r)
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
        if not calls:  # no closed, readable call: a text reply (for a bare tag, an empty one) ends the user turn
            return self._reply(text)
        self.n_calls += len(calls)
        self.turn_calls[self.user_turn] += len(calls)
        results = [self.task.execute(c["name"], c["arguments"]) for c in calls]
        self.n_errors += sum("error" in r for r in results)  # errors are observations: the episode goes on
        ran = {_call_id(c["name"], c["arguments"]) for c, r in zip(calls, results) if "error" not in r}
        self.executed.update(ran)
        self.turn_executed[self.user_turn].update(ran)
        if len(self.turns) >= self.max_turns:
            self.done = True
            return None
        return _observation(results)

    @property
    def success(self) -> bool:
        """Every user turn passed (`turn_success`)."""
        return all(self.turn_success(i) for i in range(len(self.task.user_turns)))

    def turn_success(self, i: int) -> bool:
        """Whether user turn `i` passed the checker (module doc); a turn never reached fails."""
        turn = self.task.user_turns[i]
        if i > self.user_turn:
            return False
        if turn.abstain:  # call nothing: the turn must end in a reply, with no call (paper) or no tag (strict)
            made = self.turn_calls[i] if self.harness == PAPER else self.turn_tags[i]
            return i < len(self.replies) and made == 0
        if self.harness == PAPER:  # BFCL-like: the ground truth's calls among those executed in this turn
            return all(_call_id(name, args) in self.turn_executed[i] for name, args, _ in self.task.turn_calls(turn))
        if i >= len(self.replies):
            return False
        words = re.findall(r"[A-Za-z0-9_]+", self.replies[i])
        return str(next(iter(self.task.turn_calls(turn)[-1][2].values()))) in words


def oracle_turns(task: Task, *, empty_call_retries: int = 0) -> list[tuple[str, str | None]]:
    """Expert trajectory as (assistant turn, observation) pairs.

    `empty_call_retries` inserts that many "bare open tag -> tool error -> retry" turns before the first call,
    the kind of trace real agent SFT data holds and which keeps p(end of turn | open tag) small but non-zero.
    With several user turns, each user turn's reply is followed by the next user turn's question (the
    observation the episode returns); an abstaining turn is its reply alone.
    """
    turns: list[tuple[str, str | None]] = []
    for _ in range(empty_call_retries):
        turns.append((f"{TOOL_OPEN}\n", f"{RESP_OPEN}\n" + json.dumps({"error": EMPTY}) + f"\n{RESP_CLOSE}"))
    user_turns = task.user_turns
    for i, user in enumerate(user_turns):
        for name, args, obs in task.turn_calls(user):
            turns.append((render_call(name, args), f"{RESP_OPEN}\n{json.dumps(obs)}\n{RESP_CLOSE}"))
        turns.append((task.turn_reply(user), user_turns[i + 1].question if i + 1 < len(user_turns) else None))
    return turns


# Where an assistant turn was written, as the paper's data makes a bare tag there mean different things: after a
# user turn's calls are done it is a harmless end of the reply, on an abstaining turn a correct "no call",
# elsewhere (calls still due) a failure of that user turn.
AFTER_CALLS, ABSTAINING, CALLS_DUE = "after_calls", "abstaining", "calls_due"
SITES = (AFTER_CALLS, ABSTAINING, CALLS_DUE)


def turn_sites(task: Task, turns: list[str], *, harness: str = PAPER) -> list[str]:
    """The site (SITES) of each assistant turn of a played conversation, found by replaying it: the current user
    turn abstains, or its oracle calls have all been executed already, or they have not."""
    ep = Episode(task, max_turns=len(turns) + 1, harness=harness)
    sites = []
    for text in turns:
        if ep.done:
            break
        user = task.user_turns[ep.user_turn]
        done = all(_call_id(n, a) in ep.turn_executed[ep.user_turn] for n, a, _ in task.turn_calls(user))
        sites.append(ABSTAINING if user.abstain else AFTER_CALLS if done else CALLS_DUE)
        ep.step(text)
    return sites
