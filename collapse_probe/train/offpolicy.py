"""Off-policy supervision (synchronous): the ground-truth trajectory as one sample of each GRPO group.

As in the paper's code (Tool-RL-Box, after LUFFY): in each group, r of the G samples are the oracle's turns played
through the environment (so their observations are the world's and their reward is scored like any sample's),
and their tokens enter the policy loss weighted p / (p + `GAMMA`), with p the current probability of the token,
detached. The weight shrinks the push on tokens the policy finds very unlikely (p << 0.1), which would otherwise
dominate an off-policy gradient. No PPO clipping applies to these tokens: they were never sampled, so the ratio
is taken against the current policy itself (value 1, gradient of log p) rather than a behaviour probability.
"""

from __future__ import annotations

import torch

from collapse_probe import world
from collapse_probe.train.rollout import ORACLE, Trajectory

GAMMA = 0.1  # the paper's shaping constant in p / (p + 0.1)
SOURCE = ORACLE


def oracle_sample(tokenizer, task: world.Task, *, group: int, max_turns: int, harness: str,
                  system: str | None = None) -> Trajectory:
    """The oracle's trajectory for `task` as a Trajectory of group `group`: prompt, oracle turns (in the loss),
    the environment's observations (not in the loss); its episode has run every turn, so `success` is the world's."""
    ep = world.Episode(task, max_turns=max_turns, harness=harness)
    turns = []
    for turn, _ in world.oracle_turns(task):
        obs = ep.step(turn)
        turns.append((turn, obs))
        if obs is None:
            break
    ids, mask = world.encode_conversation(tokenizer, world.prompt_text(task, system), turns)
    return Trajectory(task, ep, ids, mask, [0.0] * len(ids), group=group, source=SOURCE)


def add_oracle_samples(trajs: list[Trajectory], tokenizer, tasks: list[world.Task], *, per_group: int,
                       max_turns: int, harness: str, reward: world.RewardSpec) -> list[Trajectory]:
    """`trajs` plus `per_group` oracle samples for each task (group i is tasks[i]), rewarded by `reward`."""
    out = list(trajs)
    for g, task in enumerate(tasks):
        for _ in range(per_group):
            t = oracle_sample(tokenizer, task, group=g, max_turns=max_turns, harness=harness)
            t.reward = reward(t.episode)
            out.append(t)
    return out


def off_policy_weight(logp: torch.Tensor) -> torch.Tensor:
    """p / (p + GAMMA) of each token, from its log-probability; detached (a weight, not a path for gradients)."""
    p = logp.detach().exp()
    return p / (p + GAMMA)
