"""Training-inference mismatch at the decision positions: the sampler's probabilities beside the trainer's.

The rollout engine (a vLLM server, a bf16 copy, stale weights, a top-p sampler) is not the trainer: it assigns its
own probability q to each token it samples, and the trainer's p differs. Every framework that logs this gives one
number for the whole batch (a k3 KL, IS-ratio statistics). Here the same two log-probs are read at the named
control tokens' decision positions (`stats.decision_positions`), so the record says *which* decision drifts:

    mm/{position}/{role}/p_train|p_rollout|log_ratio|k3|count   over positions where `role` was sampled
                                                                 (role "any": every sampled token there)
    mm/{position}/{role}/q|pressure, mm/{position}/q_count      where the sampler's log-probs of the control
                                                                 columns were kept (our trainer's rollout engine)
    mm/k3_kl, mm/kl, mm/abs_log_ratio, mm/tokens                over every token with a sampler log-prob

`pressure` is the mismatch part of the gradient pressure: at a position visited with advantage A, the push on
logit k is A(1[k sampled] - p_k); under the sampler its expectation is A(q_k - p_k), zero on-policy (q = p). The
rest of `gp/.../chosen + other` is sampling noise around it.

Inputs are aligned like the loss's token log-probs: entry [r, c] belongs to the token at c + 1, predicted at c.
Only the M decision rows of a full-vocabulary tensor are read (a `RowReader` works too); one host sync.
"""

from __future__ import annotations

from typing import Mapping

import torch

from collapse_probe.capture.stats import RowReader
from collapse_probe.schema import (ANY_TOKEN, MM_ABS_LOG_RATIO, MM_K3_KL, MM_KL, MM_TOKENS, MismatchStat, mm_key,
                                   mm_q_count_key, mm_weight_key)


def watch_roles(role_ids: Mapping[str, int]) -> tuple[list[str], list[int]]:
    """(roles, ids) of the control columns whose sampler log-probs a rollout keeps, in capture's order (sorted
    roles, as `stats._gather` reads them); a multi-token role's column is its first piece."""
    roles = sorted(role_ids)
    return roles, [int(role_ids[r]) for r in roles]


def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(r) - r - 1 >= 0 with r = log p_train - log p_rollout: verl's k3 estimate of KL(rollout || train)."""
    r = log_ratio.clamp(-20, 20)
    return (torch.exp(r) - r - 1).clamp(min=0)  # >= 0 in exact arithmetic; float rounding aside


@torch.no_grad()
def mismatch_stats(ids: torch.Tensor, positions: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                   role_ids: Mapping[str, int], *, logp_rollout: torch.Tensor, known: torch.Tensor,
                   logp_train: torch.Tensor | None = None, scores: torch.Tensor | RowReader | None = None,
                   is_logp: bool = True, rollout_roles: torch.Tensor | None = None,
                   advantages: torch.Tensor | None = None, tis_cap: float | None = None) -> dict[str, float]:
    """The `mm/` keys of one batch (see the module doc).

    ids [N, T]; positions: kind -> (rows, cols) of decision positions (col c predicts c + 1); logp_rollout [N, W]
    the sampler's log-prob of the token at c + 1, `known` [N, W] where it exists (other positions are left out);
    logp_train [N, W] the trainer's, or None: read from `scores` at the decision rows (then no whole-batch totals).
    `scores` are the trainer's [N, W, V] log-probs (`is_logp`) or logits, or a RowReader. With `rollout_roles`
    [N, W, K] (the sampler's log-probs of the `watch_roles` columns) also the sampler's probability of every
    role and, with `advantages` [N], the mismatch pressure: A(q_k - p_k), or under token TIS (`tis_cap` C, the
    loss weighting each sampled token by w = min(p/q, C)) A(q_k w_k - p_k w_s), w_s the sampled token's weight (an
    unbiased one-sample estimate of E_q[w]): zero where q covers p and no weight is cut, -A p_k w_s where q_k = 0."""
    if logp_train is None and scores is None:
        raise ValueError("mismatch_stats needs the trainer's token log-probs or its scores")
    roles, cols_list = watch_roles(role_ids)
    dev = ids.device
    cols = torch.tensor(cols_list, dtype=torch.long, device=dev)
    names: list[str] = []
    vals: list[torch.Tensor] = []
    read = (lambda r, c: scores[r, c]) if isinstance(scores, torch.Tensor) else scores
    for kind, (r, c) in positions.items():
        keep = known[r, c].bool()
        r, c = r[keep], c[keep]
        sampled = ids[r, (c + 1).clamp(max=ids.shape[1] - 1)]
        logp = None
        if read is not None and (logp_train is None or rollout_roles is not None):
            got = read(r, c).float() if r.numel() else torch.zeros(0, max(cols_list) + 1, device=dev)
            logp = got if is_logp else got - torch.logsumexp(got, dim=-1, keepdim=True)  # [M, V]: rows only
        lp = logp_train[r, c].float() if logp_train is not None else \
            logp.gather(-1, sampled[:, None]).squeeze(-1)
        lq = logp_rollout[r, c].float()
        lr = lp - lq
        per_row = torch.stack([lp.exp(), lq.exp(), lr, k3(lr)], dim=-1)  # [M, 4] in SAMPLED_STATS order
        groups = [(ANY_TOKEN, torch.ones_like(sampled, dtype=torch.bool))]
        groups += [(role, sampled == cols[i]) for i, role in enumerate(roles)]
        for role, sel in groups:
            w = sel.float()
            n = w.sum()
            names.append(mm_key(kind, role, MismatchStat.COUNT))
            vals.append(n[None])
            names += [mm_key(kind, role, s) for s in (MismatchStat.P_TRAIN, MismatchStat.P_ROLLOUT,
                                                      MismatchStat.LOG_RATIO, MismatchStat.K3)]
            vals.append((per_row * w[:, None]).sum(0) / n.clamp(min=1))
        if rollout_roles is not None and logp is not None:
            q = rollout_roles[r, c].float().exp()  # [M, K]; 0 where a truncated sampler could not draw the role
            p = logp.index_select(-1, cols).exp()
            m = max(int(r.numel()), 1)
            names.append(mm_q_count_key(kind))
            vals.append(torch.tensor([float(r.numel())], device=dev))
            names += [mm_key(kind, role, MismatchStat.Q) for role in roles]
            vals.append(q.sum(0) / m)
            if advantages is not None:
                adv = advantages.to(dev).float()[r][:, None]
                expected = q - p
                if tis_cap is not None:  # the loss's expected push under the sampler, with the TIS weights
                    w_k = torch.where(q > 0, p / q.clamp(min=1e-30), torch.zeros_like(q)).clamp(max=tis_cap)
                    w_s = lr.clamp(-20, 20).exp().clamp(max=tis_cap)[:, None]
                    expected = q * w_k - p * w_s
                names += [mm_key(kind, role, MismatchStat.PRESSURE) for role in roles]
                vals.append((adv * expected).sum(0) / m)
    flat = torch.cat(vals).tolist() if vals else []
    rec = dict(zip(names, flat))
    # a mean over no position is no number: keep the counts (0), drop the means
    out = {k: v for k, v in rec.items() if mm_weight_key(k)[0] or rec.get(mm_weight_key(k)[1], 0.0) > 0}
    if logp_train is not None:
        out.update(mismatch_totals(logp_train, logp_rollout, known))
    return out


@torch.no_grad()
def mismatch_totals(logp_train: torch.Tensor, logp_rollout: torch.Tensor, known: torch.Tensor) -> dict[str, float]:
    """Over every token with a sampler log-prob: the token count, the mean k3 and k1 (log q - log p) estimates of
    KL(rollout || train), and the mean |log p - log q| (what verl, TRL, slime log for the whole batch)."""
    m = known.float()
    n = m.sum()
    lr = (logp_train.float() - logp_rollout.float()) * m
    vals = torch.stack([n, (k3(lr) * m).sum(), (-lr).sum(), lr.abs().sum()]).tolist()
    if vals[0] <= 0:
        return {MM_TOKENS: 0.0}
    return {MM_TOKENS: vals[0], MM_K3_KL: vals[1] / vals[0], MM_KL: vals[2] / vals[0],
            MM_ABS_LOG_RATIO: vals[3] / vals[0]}
