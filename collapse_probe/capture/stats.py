"""Control-token statistics at decision positions, computed from logits or log-probs already in hand.

A decision position is a place in a sequence where the next token decides structure:

    after_open   right after the tool-call opening tag (and its newline, when the tokenizer has one)
    turn_start   the first token of each generated assistant turn
    after_close  right after the tool-call closing tag
    json_body    right after the JSON body opens (`{"` or `{`) inside a call

Position t "predicts" token t+1; only positions whose next token the policy generated count (`gen_mask`), so
tags in the system prompt are never measured. All statistics gather K control columns at M decision rows:
no second full-vocabulary tensor is built (the trainer's own log-softmax is reused when it exists).
"""

from __future__ import annotations

import math

import torch

POSITION_KINDS = ("after_open", "turn_start", "after_close", "json_body")


def decision_positions(ids: torch.Tensor, gen_mask: torch.Tensor, role_ids: dict[str, int]
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(row, col) indices of each position kind in a right-padded batch [N, T]."""
    return {k: torch.nonzero(v, as_tuple=True) for k, v in decision_masks(ids, gen_mask, role_ids).items()}


def decision_masks(ids: torch.Tensor, gen_mask: torch.Tensor, role_ids: dict[str, int]) -> dict[str, torch.Tensor]:
    """Boolean [N, T] mask of each position kind (no host sync: usable inside an asynchronous GPU step)."""
    n, t = ids.shape
    prev = torch.full_like(ids, -1)
    prev[:, 1:] = ids[:, :-1]
    nxt = torch.full_like(ids, -1)
    nxt[:, :-1] = ids[:, 1:]
    gen_next = torch.zeros_like(gen_mask, dtype=torch.bool)
    gen_next[:, :-1] = gen_mask[:, 1:].bool()
    gen_here = gen_mask.bool()
    opn, nl = role_ids.get("tool_open", -2), role_ids.get("newline", -2)
    out: dict[str, torch.Tensor] = {}
    # The tag opens a call; measure after its newline, or after the tag itself when no newline follows.
    after_tag = (ids == opn) & (nxt != nl)
    after_nl = (ids == nl) & (prev == opn)
    out["after_open"] = (after_tag | after_nl) & gen_next
    start = gen_next & ~gen_here
    start[:, 0] = False
    out["turn_start"] = start
    out["after_close"] = (ids == role_ids.get("tool_close", -2)) & gen_here & gen_next
    jo = role_ids.get("json_open", -2)
    prev2 = torch.full_like(ids, -1)
    prev2[:, 2:] = ids[:, :-2]
    in_call = ((prev == nl) & (prev2 == opn)) | (prev == opn)
    out["json_body"] = (ids == jo) & in_call & gen_here & gen_next
    return out


@torch.no_grad()
def position_stats(scores: torch.Tensor, ids: torch.Tensor, positions: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   role_ids: dict[str, int], *, is_logp: bool, source: str,
                   advantages: torch.Tensor | None = None) -> dict[str, float]:
    """Mean next-token probability of every role at every position kind, entropy there, and gradient pressure.

    `scores` is [N, T, V]: log-probs (`is_logp=True`, e.g. the loss's log_softmax) or raw logits. Only the
    M decision rows are read. `advantages` [N] adds the advantage-weighted push adv * (1[k=sampled] - p_k) on
    each role's logit, split into the part from samples that chose k and the part from those that did not.
    All values are gathered into one tensor and copied to the host once (one device sync per call).
    """
    roles = sorted(role_ids)
    cols = torch.tensor([role_ids[r] for r in roles], dtype=torch.long, device=scores.device)
    keys: list[str] = []
    vals: list[torch.Tensor] = []
    rec: dict[str, float] = {}
    for kind, (r, c) in positions.items():
        m = int(r.numel())
        rec[f"cp/{source}/{kind}/count"] = float(m)
        if m == 0:
            continue
        rows = scores[r, c].float()  # [M, V]: only decision rows, a small slice
        logp_rows = rows if is_logp else rows - torch.logsumexp(rows, dim=-1, keepdim=True)
        p = logp_rows.index_select(-1, cols).exp()  # [M, K]
        keys.append(f"cp/{source}/{kind}/entropy")
        vals.append(-(logp_rows.exp() * logp_rows).sum(-1).mean()[None])
        keys += [f"cp/{source}/{kind}/{role}" for role in roles]
        vals.append(p.mean(0))
        if advantages is not None:
            sampled = ids[r, c + 1]
            adv = advantages.to(scores.device)[r].float()[:, None]
            chose = (sampled[:, None] == cols[None, :]).float()
            push = adv * (chose - p)
            keys += [f"gp/{kind}/{role}/chosen" for role in roles] + [f"gp/{kind}/{role}/other" for role in roles]
            vals += [(push * chose).sum(0) / m, (push * (1 - chose)).sum(0) / m]
    if vals:
        rec.update(zip(keys, torch.cat(vals).tolist()))
    return rec


class DeferredStats:
    """Statistics still on the device: `resolve()` copies them to the host with one sync, when convenient
    (e.g. at logging time, after the optimizer step), so capture never stalls an asynchronous GPU step."""

    def __init__(self, keys: list[str], values: torch.Tensor, counts: dict[str, torch.Tensor]):
        self.keys, self.values, self.counts = keys, values, counts

    def resolve(self) -> dict[str, float]:
        names = list(self.counts)
        flat = torch.cat([self.values, torch.stack([self.counts[k] for k in names]).float()]).tolist()
        counts = dict(zip(names, flat[len(self.keys):]))
        rec = {k: v for k, v in zip(self.keys, flat) if counts.get(k.split("/")[2] if k.startswith("cp/")
                                                                     else k.split("/")[1], 1.0) > 0}
        source = self.keys[0].split("/")[1] if self.keys else "rollout"
        rec.update({f"cp/{source}/{kind}/count": c for kind, c in counts.items()})
        return rec


@torch.no_grad()
def position_stats_deferred(scores: torch.Tensor, ids: torch.Tensor, gen_mask: torch.Tensor,
                            role_ids: dict[str, int], *, is_logp: bool, source: str,
                            advantages: torch.Tensor | None = None, max_rows: int = 64) -> DeferredStats:
    """`position_stats` without a host sync. Reads at most `max_rows` decision rows per kind and micro-batch
    (the first ones; each row is a full vocabulary, so the cap bounds the cost)."""
    roles = sorted(role_ids)
    dev = scores.device
    cols = torch.tensor([role_ids[r] for r in roles], dtype=torch.long, device=dev)
    width = scores.shape[1]
    keys: list[str] = []
    vals: list[torch.Tensor] = []
    counts: dict[str, torch.Tensor] = {}
    for kind, mask in decision_masks(ids, gen_mask, role_ids).items():
        mask = mask[:, :width]
        flat = torch.nonzero_static(mask.reshape(-1), size=max_rows, fill_value=-1).squeeze(-1)
        valid = (flat >= 0).float()
        flat = flat.clamp(min=0)
        r, c = flat // width, flat % width
        m = valid.sum()
        counts[kind] = m
        denom = m.clamp(min=1)
        rows = scores[r, c].float()
        logp_rows = rows if is_logp else rows - torch.logsumexp(rows, dim=-1, keepdim=True)
        p = logp_rows.index_select(-1, cols).exp()
        keys.append(f"cp/{source}/{kind}/entropy")
        vals.append((-(logp_rows.exp() * logp_rows).sum(-1) * valid).sum()[None] / denom)
        keys += [f"cp/{source}/{kind}/{role}" for role in roles]
        vals.append((p * valid[:, None]).sum(0) / denom)
        if advantages is not None:
            sampled = ids[r, (c + 1).clamp(max=ids.shape[1] - 1)]
            adv = advantages.to(dev)[r].float()[:, None] * valid[:, None]
            chose = (sampled[:, None] == cols[None, :]).float()
            push = adv * (chose - p)
            keys += [f"gp/{kind}/{role}/chosen" for role in roles] + [f"gp/{kind}/{role}/other" for role in roles]
            vals += [(push * chose).sum(0) / denom, (push * (1 - chose)).sum(0) / denom]
    return DeferredStats(keys, torch.cat(vals) if vals else torch.zeros(0, device=dev), counts)


def safe_float(x: float) -> float:
    return x if math.isfinite(x) else float("nan")
