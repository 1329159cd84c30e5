"""Multi-turn GRPO: group-normalised advantages, PPO-clipped token objective, optional KL to a reference.

Whole trajectories are scored; observation (tool response) tokens and the prompt are masked from the loss.
The control-token capture reads the log-softmax this loss computes anyway (no second vocabulary tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from collapse_probe import schema
from collapse_probe.capture.stats import decision_positions, position_stats
from collapse_probe.train.rollout import Trajectory
from collapse_probe.train.sft import collate


def group_advantages(trajs: list[Trajectory], *, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps), one value per trajectory."""
    rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
    groups = torch.tensor([t.group for t in trajs])
    adv = torch.zeros_like(rewards)
    for g in groups.unique():
        sel = groups == g
        r = rewards[sel]
        a = r - r.mean()
        adv[sel] = a / (r.std(unbiased=False) + eps) if scale else a
    return adv


@dataclass
class GRPOLossOut:
    loss: torch.Tensor
    metrics: dict[str, float]


def grpo_loss(model, trajs: list[Trajectory], advantages: torch.Tensor, *, pad_id: int, clip_eps: float = 0.2,
              kl_coef: float = 0.0, ref_model=None, temperature: float = 1.0,
              role_ids: dict[str, int] | None = None) -> GRPOLossOut:
    batch = collate([t.ids for t in trajs], [t.gen_mask for t in trajs], pad_id, extra=[t.old_logp for t in trajs])
    ids, attn = batch["input_ids"], batch["attention_mask"]
    mask = batch["loss_mask"][:, 1:].float()
    old_logp = batch["extra"][:, 1:]
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    target = ids[:, 1:]
    logp = logp_all.gather(-1, target[..., None]).squeeze(-1)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    obj = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    n_tok = mask.sum().clamp(min=1)
    pg_loss = -(obj * mask).sum() / n_tok
    metrics: dict[str, float] = {}
    loss = pg_loss
    if kl_coef > 0 and ref_model is not None:
        with torch.no_grad():
            ref_logits = ref_model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / temperature
            ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, target[..., None]).squeeze(-1)
        d = ref_logp - logp
        kl = (torch.exp(d) - d - 1)  # k3 estimator, >= 0
        kl_mean = (kl * mask).sum() / n_tok
        loss = loss + kl_coef * kl_mean
        metrics[schema.KL] = float(kl_mean.detach())
    with torch.no_grad():
        sel = mask.bool()
        rows = logp_all[sel]  # entropy of generated positions, a trainer metric like TRL's
        metrics["entropy"] = float(-(rows.exp() * rows).sum(-1).mean()) if rows.numel() else float("nan")
        metrics["clip_ratio"] = float((((ratio - 1).abs() > clip_eps).float() * mask).sum() / n_tok)
        metrics["sampling/logp_gap"] = float(((logp - old_logp).abs() * mask).sum() / n_tok)
        metrics["pg_loss"] = float(pg_loss.detach())
        if role_ids:
            pos = decision_positions(ids, batch["loss_mask"], role_ids)  # t predicts t+1, both in range
            metrics.update(position_stats(logp_all, ids, pos, role_ids, is_logp=True, source="rollout",
                                          advantages=advantages))
    return GRPOLossOut(loss, metrics)

