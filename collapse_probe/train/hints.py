"""Hint-guided sampling (synchronous): some samples of each group see the answer's plan while they are drawn.

As in the paper: h of the G samples get a hint, a short summary of the ground-truth calls, appended to the
system prompt while sampling only. The loss sees the same turns after the hint-free prompt (`strip_hint`).

The ratio: those turns were drawn from pi(. | prompt + hint), but the loss is about pi(. | prompt). We recompute
the "old" log-probs on the hint-free context with the pre-update policy (`grpo.sequence_logp`), so the PPO ratio
starts at 1 and the clip is measured from there, and the behaviour/target mismatch pi(a | no hint) /
pi(a | hint) is not corrected for. This is what verl, on which the paper's code runs, does by construction: it
recomputes `old_log_prob` with the actor on the batch the loss sees. The hinted samples are thus treated as if
the hint-free policy had drawn them: a biased but bounded push toward the hinted behaviour.
"""

from __future__ import annotations

from collapse_probe import world
from collapse_probe.train.rollout import HINTED, Trajectory

SOURCE = HINTED


def hint_text(task: world.Task) -> str:
    """The ground truth's plan in one line: which tools, in order, and the first argument (the later ones come
    from observations, as in the paper's summaries of the ground-truth calls)."""
    calls = task.oracle_calls()
    name, args, _ = calls[0]
    first = ", ".join(f"{k}={v!r}" for k, v in args.items())
    rest = " then ".join(c[0] for c in calls[1:])
    return f"Hint: call {name}({first})" + (f" then {rest}" if rest else "") + ", then answer."


def hinted_system(task: world.Task) -> str:
    """The system prompt a hinted sample sees: the usual one, then the hint on its own line."""
    return world.system_prompt() + "\n" + hint_text(task)


def strip_hint(traj: Trajectory, tokenizer) -> Trajectory:
    """`traj` with its hinted prompt replaced by the hint-free one (ids, masks and the per-token lists shift);
    its old log-probs must be recomputed afterwards (module docstring)."""
    hinted = tokenizer.encode(world.prompt_text(traj.task, hinted_system(traj.task)), add_special_tokens=False)
    plain = tokenizer.encode(world.prompt_text(traj.task), add_special_tokens=False)
    if traj.ids[:len(hinted)] != hinted:
        raise ValueError("trajectory does not start with its hinted prompt")
    n = len(hinted)
    traj.ids = plain + traj.ids[n:]
    traj.gen_mask = [0] * len(plain) + traj.gen_mask[n:]
    traj.old_logp = [0.0] * len(plain) + traj.old_logp[n:]
    return traj
