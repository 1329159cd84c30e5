"""One GRPO training step's updates: old log-probs, the rollout correction, PPO mini-batches.

`ppo_update` takes one step's trajectories (sampled by the rollout engine, train/engine.py) and their advantages:

* `old_logp="rollout"` (the default, today's path): the sampler's log-probs are the PPO old log-probs, so the
  clipped ratio p/q already accounts for the sampler; `"recompute"`: the trainer's own log-probs before the
  update (one no-grad forward, as verl computes `old_log_prob`), so nothing accounts for the sampler unless a
  `rollout_correction` (train/correction.py) weighs or masks by p_train / q.
* `mini_batches` m: the batch is cut into m equal, contiguous mini-batches (whole groups when m divides the
  prompts), each one backward and one clipped optimizer step (verl's ppo_mini_batch_size); m = 1 is one step.

Metrics: each mini-batch's, merged (capture and mismatch means weighted by their counts, others averaged), the
summed loss, the mean grad norm, and the correction's statistics over the whole batch.
"""

from __future__ import annotations

import torch

from collapse_probe import schema
from collapse_probe.capture.stats import RecordMeans
from collapse_probe.train import grpo
from collapse_probe.train.correction import rollout_correction, threshold_of
from collapse_probe.train.rollout import POLICY, Trajectory
from collapse_probe.train.sft import collate


def ppo_update(model, opt: torch.optim.Optimizer, trajs: list[Trajectory], advantages: torch.Tensor, *,
               pad_id: int, grad_clip: float, clip_eps: float = 0.2, kl_coef: float = 0.0, ref_model=None,
               temperature: float = 1.0, role_ids: dict[str, int] | None = None, mini_batches: int = 1,
               old_logp: str = "rollout", correction: str = "none",
               correction_threshold: float | None = None) -> dict[str, float]:
    """Run the step's optimizer updates on `trajs`; returns the step's metrics (loss, grad norm, capture keys)."""
    n = len(trajs)
    if n % mini_batches:
        raise ValueError(f"{mini_batches} mini-batches do not divide {n} trajectories")
    train_logp = None
    if old_logp == "recompute" or correction != "none":
        train_logp = grpo.sequence_logp(model, trajs, pad_id=pad_id, temperature=temperature)
    metrics: dict[str, float] = {}
    if correction != "none" and train_logp is not None:
        metrics.update(_correction_metrics(trajs, train_logp, pad_id, correction, correction_threshold))
    size = n // mini_batches
    means = RecordMeans()
    loss, norms = 0.0, []
    for start in range(0, n, size):
        part = list(range(start, start + size))
        opt.zero_grad(set_to_none=True)
        # backward per micro-batch inside the loss: one micro-batch's activations at a time, no recomputation
        out = grpo.grpo_loss(model, [trajs[i] for i in part], advantages[part], pad_id=pad_id, clip_eps=clip_eps,
                             kl_coef=kl_coef, ref_model=ref_model, temperature=temperature, role_ids=role_ids,
                             backward=True, train_logp=None if train_logp is None else [train_logp[i] for i in part],
                             old_logp=old_logp, correction=correction, correction_threshold=correction_threshold)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)))
        opt.step()
        loss += float(out.loss.detach())
        means.add(out.metrics, schema.Source.ROLLOUT.value)
    metrics.update(out.metrics if mini_batches == 1 else means.pop())
    metrics.update({schema.LOSS: loss, schema.GRAD_NORM: sum(norms) / len(norms)})
    return metrics


def _correction_metrics(trajs: list[Trajectory], train_logp: list[list[float]], pad_id: int, kind: str,
                        threshold: float | None) -> dict[str, float]:
    """The correction's weight statistics and masked share over the whole batch (its policy samples)."""
    batch = collate([t.ids for t in trajs], [t.gen_mask for t in trajs], pad_id, extra=[t.old_logp for t in trajs])
    own = torch.tensor([t.source == POLICY for t in trajs])
    mask = batch["loss_mask"][:, 1:].float() * own[:, None]
    train = collate([t.ids for t in trajs], [t.gen_mask for t in trajs], pad_id, extra=train_logp)["extra"][:, 1:]
    out = rollout_correction(train, batch["extra"][:, 1:], mask, kind=kind, threshold=threshold_of(kind, threshold))
    return out.metrics
