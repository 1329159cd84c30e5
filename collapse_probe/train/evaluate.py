"""Greedy success of a model on held-out tasks of the tool world: what the trainer logs as eval/success, and what
`analyze --checkpoints` and `recover` measure, without importing the trainer."""
from __future__ import annotations

import torch

from collapse_probe import world
from collapse_probe.train.rollout import rollout


@torch.no_grad()
def evaluate(model, tok, *, n: int = 64, max_turns: int = 8, max_new_tokens: int = 40, offset: int = 0,
             system: str | None = None, parse=None, logits_processor=None, harness: str = world.STRICT,
             user_turns: int = 1, abstain_frac: float = 0.0) -> float:
    """Greedy success on held-out tasks (the eval split never overlaps training seeds), with the task structure
    of world.make_task (`user_turns`, `abstain_frac`)."""
    tasks = world.task_split("eval", n, offset=offset, user_turns=user_turns, abstain_frac=abstain_frac)
    trajs = rollout(model, tok, tasks, group_size=1, max_turns=max_turns, max_new_tokens=max_new_tokens,
                    greedy=True, system=system, parse=parse, logits_processor=logits_processor, harness=harness)
    return sum(t.success for t in trajs) / len(trajs)
