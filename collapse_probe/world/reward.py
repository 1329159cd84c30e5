"""The episode reward: outcome plus an optional per-tag format bonus."""

from __future__ import annotations

from dataclasses import dataclass, field

from collapse_probe.world.episode import Episode


@dataclass(frozen=True)
class RewardSpec:
    """Outcome reward plus an optional per-tag format bonus.

    `tag_bonus > 0` pays for every assistant turn that opens a `<tool_call>`, whether or not a call follows: a
    format reward of the kind used in practice, and the lever that lets GRPO find the bare-tag shortcut (a
    turn that is only `<tool_call>` then end-of-turn is the cheapest way to collect it).

    Field metadata gives each range (`ge`: >=); the trainer's config (train/config.py) checks it.
    """

    correct: float = 1.0
    wrong: float = 0.0  # a final answer that is wrong
    no_answer: float = 0.0  # ran out of turns
    tag_bonus: float = 0.0
    max_bonus_tags: int = field(default=8, metadata={"ge": 0})  # bonus paid for at most this many turns

    def __call__(self, ep: Episode) -> float:
        if ep.success:  # strict: the answer was right; paper: the checker passed, a closing answer or not (its reward)
            base = self.correct
        else:
            base = self.no_answer if ep.final_answer is None else self.wrong
        return base + self.tag_bonus * min(ep.n_tags, self.max_bonus_tags)
