"""Rollout correction: how the loss accounts for a sampler that is not the trainer, as verl defines it.

verl's `algorithm.rollout_correction` (verl/trainer/ppo/rollout_corr_helper.py) works on the log-ratio
r_t = log p_train(y_t) - log q_rollout(y_t) of each response token, p_train the trainer's log-probs before the
update (verl's recomputed `old_log_prob`), q the rollout engine's (`rollout_log_probs`). One field picks a form:

    none        nothing (with old_logp=recompute nothing accounts for the sampler: verl 0.4, the paper's setup)
    token_tis   per-token truncated IS weight min(exp(r_t), C)              verl rollout_is=token, threshold C
    seq_tis     per-sequence weight min(exp(sum_t r_t), C) on every token    verl rollout_is=sequence
    seq_mis     the sequence ratio exp(sum_t r_t) as its weight where it lies in [1/C, C], else the sequence is
                masked                                 verl decoupled_seq_is_rs(C, "1/C_C"): IS + seq_sum_k1 RS
    geo_mis     sequences whose geometric-mean ratio exp(mean_t r_t) leaves [1/C, C] are masked, no weights
                                                       verl decoupled_geo_rs("1/C_C"): seq_mean_k1 RS

Weights are detached (they change the measure, not the objective) and multiply the per-token PPO loss; masked
sequences leave the loss and its token count. Log-ratios are clamped to +-20 before exp (verl's SAFETY_BOUND).
Defaults of C follow verl's presets: 2.0, and 1.001 for geo_mis (verl's 0.999_1.001).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from collapse_probe import schema
from collapse_probe.errors import UserError
from collapse_probe.train.config import CORRECTIONS

SAFETY_BOUND = 20.0
DEFAULT_THRESHOLD = {"token_tis": 2.0, "seq_tis": 2.0, "seq_mis": 2.0, "geo_mis": 1.001}


@dataclass
class Correction:
    """Per-token weights [N, T] (detached; 1 where nothing is weighted) and the kept sequences [N] (0/1)."""

    weights: torch.Tensor
    keep: torch.Tensor
    metrics: dict[str, float]


def threshold_of(kind: str, threshold: float | None) -> float:
    return DEFAULT_THRESHOLD[kind] if threshold is None else float(threshold)


@torch.no_grad()
def rollout_correction(logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor, *, kind: str,
                       threshold: float | None = None) -> Correction:
    """The correction `kind` for token log-probs [N, T] of the trainer (before the update) and of the sampler, over
    `mask` [N, T] (1 on the tokens the loss reads). Metrics (schema `mm/corr/...`): the weights' mean, min and max
    over those tokens and the share of sequences masked."""
    if kind not in CORRECTIONS:
        raise UserError(f"rollout_correction must be one of {', '.join(CORRECTIONS)}, got {kind!r}")
    m = mask.float()
    n, width = m.shape
    ones = torch.ones_like(m)
    if kind == "none":
        return Correction(ones, torch.ones(n, device=m.device), {})
    c = threshold_of(kind, threshold)
    lr = (logp_train.float() - logp_rollout.float()) * m
    seq_sum = lr.sum(-1)
    keep = torch.ones(n, device=m.device)
    weights = ones
    if kind == "token_tis":
        weights = lr.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp().clamp(max=c)
    elif kind in ("seq_tis", "seq_mis"):
        ratio = seq_sum.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp()
        if kind == "seq_tis":
            weights = ratio.clamp(max=c)[:, None].expand(n, width)
        else:
            keep = ((ratio >= 1 / c) & (ratio <= c)).float()
            weights = (ratio * keep)[:, None].expand(n, width)
    else:  # geo_mis: the per-token geometric mean of the ratio, in log space
        geo = seq_sum / m.sum(-1).clamp(min=1)
        keep = ((geo >= -torch.log(torch.tensor(c))) & (geo <= torch.log(torch.tensor(c)))).float()
    weights = torch.where(m > 0, weights, ones).detach()
    has = m.sum(-1) > 0
    on = m.bool() & (keep[:, None] > 0)
    w_on = weights[on]
    metrics = {schema.MM_SEQ_MASKED: float(((1 - keep) * has).sum() / has.sum().clamp(min=1))}
    if w_on.numel():
        metrics.update({schema.MM_IS_MEAN: float(w_on.mean()), schema.MM_IS_MIN: float(w_on.min()),
                        schema.MM_IS_MAX: float(w_on.max())})
    return Correction(weights, keep.detach(), metrics)
