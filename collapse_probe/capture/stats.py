"""Control-token statistics at decision positions, computed from logits or log-probs already in hand.

A decision position is a place in a sequence where the next token decides structure (`schema.Position`):

    after_open   right after the tool-call opening tag (and its newline, when the tokenizer has one)
    turn_start   the first token of each generated assistant turn
    after_close  right after the tool-call closing tag
    json_body    right after the JSON body opens (`{"` or `{`) inside a call
    body_closed  the JSON body has closed (and its newline): `</tool_call>` must follow; end-of-turn is premature

Position t "predicts" token t+1; only positions whose next token the policy generated count (`gen_mask`), so
tags in the system prompt are never measured. `decision_masks` is the one definition of these positions; token
lists (a LogitsProcessor's view) go through it too, via `prefix_decisions`.

Tags of several tokens (SmolLM2 writes `<tool_call>` as '<' 'tool' '_' 'call' '>', `tokens.RoleIds.sequences`):
a position counts after the whole sequence (after_open follows the last piece and its newline). The number
recorded for such a role, `cp/{source}/{position}/{role}`, is the probability of its FIRST piece there (what a
sampler decides first, and what masked decoding forbids); where the whole sequence actually follows in the batch,
the same forward also gives its chained probability, the product of the pieces' teacher-forced probabilities:
`cp/{source}/{position}/{role}/chain`, the mean over those `.../chain_count` positions (turn_start: the chance the
turn opens with the whole tag). Single-token roles (Qwen2.5, the tiny model) add no chain keys.

All statistics gather K control columns at M decision rows: no second full-vocabulary tensor is built (the
trainer's own log-softmax is reused when it exists). One math (`_gather`) serves both entry points:
`position_stats` reads every decision row and syncs once; `position_stats_deferred` reads a fixed number of rows
and never syncs until `DeferredStats.resolve()`.

Training-inference mismatch (`capture/mismatch.py`, schema `mm/` keys): where the sampler's log-prob of each sampled
token is known, the trainer's and the sampler's probability of it at each decision position, per sampled role,
and, where the sampler's distribution over the control columns was kept (our trainer), its probability of every
role and the mismatch part adv * (q_k - p_k) of the gradient pressure. Decision rows only, like the rest.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, Sequence

import torch

from collapse_probe.schema import (POSITIONS, Part, Position, Source, cp_chain_count_key, cp_chain_key, cp_count_key,
                                   cp_entropy_key, cp_key, gp_key, mm_weight_key, parse_chain_key, parse_cp_key,
                                   parse_gp_key, parse_sequence_key, sequence_tokens_key)
from collapse_probe.capture.masks import body_closed, ends_at as _ends_at, shift as _shift
from collapse_probe.tokens import role_sequence

# (row, col) indices of one position kind, and a 0/1 weight per row (None: every row is a real position)
Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
# (rows, cols) -> the [M, V] scores of those positions, for callers that never hold [N, T, V]
RowReader = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def decision_positions(ids: torch.Tensor, gen_mask: torch.Tensor, role_ids: Mapping[str, int]
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(row, col) indices of each position kind in a right-padded batch [N, T]."""
    return {k: torch.nonzero(v, as_tuple=True) for k, v in decision_masks(ids, gen_mask, role_ids).items()}


def decision_masks(ids: torch.Tensor, gen_mask: torch.Tensor, role_ids: Mapping[str, int]
                   ) -> dict[str, torch.Tensor]:
    """Boolean [N, T] mask of each position kind (no host sync: usable inside an asynchronous GPU step).

    Tags of several tokens (`role_ids.sequences`, tokens.RoleIds) count where their whole sequence ends: the
    position after the last piece of `<tool_call>` (and its newline) is `after_open`."""
    nxt = torch.full_like(ids, -1)
    nxt[:, :-1] = ids[:, 1:]
    gen_next = torch.zeros_like(gen_mask, dtype=torch.bool)
    gen_next[:, :-1] = gen_mask[:, 1:].bool()
    gen_here = gen_mask.bool()
    nl = role_ids.get("newline", -2)
    opened = _ends_at(ids, role_sequence(role_ids, "tool_open"))
    out: dict[str, torch.Tensor] = {}
    # The tag opens a call; measure after its newline, or after the tag itself when no newline follows.
    after_nl = (ids == nl) & _shift(opened, 1)
    out[Position.AFTER_OPEN.value] = ((opened & (nxt != nl)) | after_nl) & gen_next
    start = gen_next & ~gen_here
    start[:, 0] = False
    out[Position.TURN_START.value] = start
    out[Position.AFTER_CLOSE.value] = _ends_at(ids, role_sequence(role_ids, "tool_close")) & gen_here & gen_next
    jo = role_sequence(role_ids, "json_open")
    in_call = _shift(after_nl | opened, max(len(jo), 1))  # the body's opening right after the tag (+ newline)
    out[Position.JSON_BODY.value] = _ends_at(ids, jo) & in_call & gen_here & gen_next
    out[Position.BODY_CLOSED.value] = body_closed(ids, gen_here, gen_next, nxt, nl, role_ids)
    return out


def _lookback(role_ids: Mapping[str, int]) -> int:
    """How many ids before a position `decision_masks` reads, plus the position itself (3 for one-token tags)."""
    opn = len(role_sequence(role_ids, "tool_open")) or 1
    jo = len(role_sequence(role_ids, "json_open")) or 1
    return max(3, opn + 1 + jo, len(role_sequence(role_ids, "tool_close")),
               len(role_sequence(role_ids, "json_close")) + 2)


def prefix_decisions(prefixes: Sequence[Sequence[int]], role_ids: Mapping[str, int],
                     next_id: int | None = None) -> dict[str, list[bool]]:
    """For each list of generated ids, whether the token after its last id is decided at each position kind.

    `decision_masks` itself applied to the last ids (treated as generated, after a prompt), so token lists follow
    the same rule. `next_id` is the token that follows when known; None (a LogitsProcessor, the token is being
    decided): a list ending in the bare opening tag counts as `after_open`, which it is unless that next token is
    the newline. An empty list is the start of a generated turn (`turn_start`)."""
    if not prefixes:
        return {k: [] for k in POSITIONS}
    # the whole turn when it is longer than the look-back: body_closed needs the open tag that began the call
    back = max(_lookback(role_ids), max(len(p) for p in prefixes))
    ids, gen = [], []
    for p in prefixes:
        tail = [int(t) for t in p[len(p) - back:]] if len(p) > back else [int(t) for t in p]
        pad = back - len(tail)  # the prompt before the turn: unknown ids, not generated
        ids.append([-1] * pad + tail + [-1 if next_id is None else int(next_id)])
        gen.append([0] * pad + [1] * (len(tail) + 1))
    masks = decision_masks(torch.tensor(ids), torch.tensor(gen), role_ids)
    return {k: m[:, back - 1].tolist() for k, m in masks.items()}


class DeferredStats:
    """Statistics still on the device: `resolve()` copies them to the host with one sync, when convenient
    (e.g. at logging time, after the optimizer step), so capture never stalls an asynchronous GPU step."""

    def __init__(self, keys: list[str], weights: list[str], values: torch.Tensor,
                 counts: dict[str, torch.Tensor | float], optional: frozenset[str] = frozenset()):
        # keys[i] is reported only where its count key weights[i] (a key of `counts`) is above 0; the counts in
        # `optional` (chained probabilities) only where above 0 too, so a sequence that never followed adds no key
        self.keys, self.weights, self.values, self.counts, self.optional = keys, weights, values, counts, optional

    def resolve(self) -> dict[str, float]:
        """Host floats: every count, the other keys only where their count is above 0."""
        on_device = [k for k, v in self.counts.items() if isinstance(v, torch.Tensor)]
        parts = [self.values] + [self.counts[k].reshape(1).float() for k in on_device]
        flat = torch.cat(parts).tolist()  # the one host sync
        counts = {k: float(v) for k, v in self.counts.items() if not isinstance(v, torch.Tensor)}
        counts.update(zip(on_device, flat[len(self.keys):]))
        rec = {k: counts[k] for k in self.counts if counts[k] > 0 or k not in self.optional}
        rec.update((k, v) for k, w, v in zip(self.keys, self.weights, flat) if counts[w] > 0)
        return rec


@functools.lru_cache(maxsize=256)
def _key_names(source: str, kind: str, roles: tuple[str, ...], pressure: bool) -> tuple[str, ...]:
    """The record keys of one position kind, in `_gather`'s value order (built once, not every step)."""
    if pressure:
        return tuple(gp_key(kind, role, part) for part in (Part.CHOSEN, Part.OTHER) for role in roles)
    return (cp_entropy_key(source, kind),) + tuple(cp_key(source, kind, role) for role in roles)


def _mean_rows(x: torch.Tensor, valid: torch.Tensor | None, denom: torch.Tensor | float) -> torch.Tensor:
    """Mean over rows (dim 0); padding rows of a fixed-size selection have weight 0 in `valid`."""
    return x.mean(0) if valid is None else (x * (valid if x.dim() == 1 else valid[:, None])).sum(0) / denom


def _chain(read: RowReader, ids: torch.Tensor, r: torch.Tensor, c: torch.Tensor, valid: torch.Tensor | None,
           seq: tuple[int, ...], first: torch.Tensor, is_logp: bool) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(summed probability of the whole `seq`, positions) over the rows where `seq` follows in `ids`: the first
    piece's log-prob `first` [M] is in hand; rows c+1 .. c+k-1 of the same forward give the others. Only those
    rows are read (all M of them, weighted, when `valid` is given: a fixed size, no host sync)."""
    t, dev = ids.shape[1], ids.device
    at = c[:, None] + 1 + torch.arange(len(seq), device=dev)  # where the pieces would be
    follow = (at < t).all(-1) & (ids[r[:, None], at.clamp(max=t - 1)] ==
                                 torch.tensor(seq, device=dev)[None, :]).all(-1)
    if valid is None:
        sel = torch.nonzero(follow).squeeze(-1)
        r, c, first, w = r[sel], c[sel], first[sel], None
        if not sel.numel():
            return first.new_zeros(()), 0.0
    else:
        w = follow.float() * valid
        c = torch.where(follow, c, torch.zeros_like(c))  # rows that do not follow: any in-range row, weight 0
    total = first.clone()
    for j in range(1, len(seq)):
        got = read(r, c + j).float()
        total += got[:, seq[j]] - (0 if is_logp else torch.logsumexp(got, dim=-1))
    p = total.exp()
    return (p.sum(), float(p.numel())) if w is None else ((p * w).sum(), w.sum())


def _gather(scores: torch.Tensor | RowReader, ids: torch.Tensor, rows: Mapping[str, Rows],
            role_ids: Mapping[str, int], *, is_logp: bool, source: str, advantages: torch.Tensor | None,
            device: torch.device | None = None) -> DeferredStats:
    """The capture math, shared by every entry point: per position kind, read the M decision rows of `scores`
    (a [N, T, V] tensor, or a `RowReader` that builds only those rows, e.g. hidden states x LM head), gather the
    K control columns, and average with the rows' weights. A multi-token role's column is its first piece; its
    whole sequence's probability is chained from the following rows where it follows. Nothing leaves the device."""
    roles = sorted(role_ids)
    dev = scores.device if isinstance(scores, torch.Tensor) else device
    read = (lambda r, c: scores[r, c]) if isinstance(scores, torch.Tensor) else scores
    cols = torch.tensor([role_ids[r] for r in roles], dtype=torch.long, device=dev)
    multi = [(i, r, role_sequence(role_ids, r)) for i, r in enumerate(roles) if len(role_sequence(role_ids, r)) > 1]
    adv_all = advantages.to(dev).float() if advantages is not None else None
    keys: list[str] = []
    weights: list[str] = []
    vals: list[torch.Tensor] = []
    counts: dict[str, torch.Tensor | float] = {}
    for kind, (r, c, valid) in rows.items():
        count = cp_count_key(source, kind)
        if valid is None:
            counts[count] = denom = float(r.numel())
            if not r.numel():
                continue
        else:
            counts[count] = valid.sum()
            denom = counts[count].clamp(min=1)
        got = read(r, c).float()  # [M, V]: only decision rows, a small slice
        logp = got if is_logp else got - torch.logsumexp(got, dim=-1, keepdim=True)
        lp = logp.index_select(-1, cols)  # [M, K]
        p = lp.exp()
        names = list(_key_names(source, kind, tuple(roles), False))
        parts = [_mean_rows(-(logp.exp() * logp).sum(-1), valid, denom)[None], _mean_rows(p, valid, denom)]
        if adv_all is not None:
            # adv * (1[k = sampled] - p_k): the push on logit k, split by whether the sample chose k
            sampled = ids[r, (c + 1).clamp(max=ids.shape[1] - 1)]
            adv = adv_all[r][:, None] if valid is None else adv_all[r][:, None] * valid[:, None]
            chose = (sampled[:, None] == cols[None, :]).float()
            push = adv * (chose - p)
            names += _key_names(source, kind, tuple(roles), True)
            parts += [(push * chose).sum(0) / denom, (push * (1 - chose)).sum(0) / denom]
        keys += names
        weights += [count] * len(names)
        vals += parts
        for i, role, seq in multi:
            total, n = _chain(read, ids, r, c, valid, seq, lp[:, i], is_logp)
            n_key = cp_chain_count_key(source, kind, role)
            counts[n_key] = n
            keys.append(cp_chain_key(source, kind, role))
            weights.append(n_key)
            vals.append((total / (n.clamp(min=1) if isinstance(n, torch.Tensor) else max(n, 1.0)))[None])
    values = torch.cat(vals) if vals else torch.zeros(0, device=dev)
    optional = frozenset(cp_chain_count_key(source, kind, role) for kind in rows for _, role, _ in multi)
    return DeferredStats(keys, weights, values, counts, optional)


@torch.no_grad()
def position_stats(scores: torch.Tensor, ids: torch.Tensor,
                   positions: Mapping[str, tuple[torch.Tensor, torch.Tensor]], role_ids: Mapping[str, int], *,
                   is_logp: bool, source: str, advantages: torch.Tensor | None = None) -> dict[str, float]:
    """Mean next-token probability of every role at every position kind, entropy there, and gradient pressure.

    `scores` is [N, T, V]: log-probs (`is_logp=True`, e.g. the loss's log_softmax) or raw logits. Only the
    M decision rows (all of them) are read. `advantages` [N] adds the advantage-weighted push
    adv * (1[k=sampled] - p_k) on each role's logit, split into the part from samples that chose k and the part
    from those that did not. All values are gathered into one tensor and copied to the host once."""
    rows = {kind: (r, c, None) for kind, (r, c) in positions.items()}
    return _gather(scores, ids, rows, role_ids, is_logp=is_logp, source=source, advantages=advantages).resolve()


@torch.no_grad()
def position_stats_rows(read_rows: RowReader, ids: torch.Tensor,
                        positions: Mapping[str, tuple[torch.Tensor, torch.Tensor]], role_ids: Mapping[str, int], *,
                        device: torch.device, source: str, advantages: torch.Tensor | None = None,
                        is_logp: bool = False) -> dict[str, float]:
    """`position_stats` when the full scores never exist: `read_rows(rows, cols)` returns the [M, V] logits of
    just those positions (TRL's fused LM head: last hidden state rows x head weight / temperature)."""
    rows = {kind: (r, c, None) for kind, (r, c) in positions.items()}
    return _gather(read_rows, ids, rows, role_ids, is_logp=is_logp, source=source, advantages=advantages,
                   device=device).resolve()


@torch.no_grad()
def position_stats_deferred(scores: torch.Tensor, ids: torch.Tensor, gen_mask: torch.Tensor,
                            role_ids: Mapping[str, int], *, is_logp: bool, source: str,
                            advantages: torch.Tensor | None = None, max_rows: int = 64) -> DeferredStats:
    """`position_stats` without a host sync. Reads at most `max_rows` decision rows per kind and micro-batch
    (the first ones; a fixed size needs no sync to know it, and each row is a full vocabulary, so the cap also
    bounds the cost)."""
    width = scores.shape[1]
    rows: dict[str, Rows] = {}
    for kind, mask in decision_masks(ids, gen_mask, role_ids).items():
        flat = torch.nonzero_static(mask[:, :width].reshape(-1), size=max_rows, fill_value=-1).squeeze(-1)
        valid = (flat >= 0).float()
        flat = flat.clamp(min=0)
        rows[kind] = (flat // width, flat % width, valid)
    return _gather(scores, ids, rows, role_ids, is_logp=is_logp, source=source, advantages=advantages)


@functools.lru_cache(maxsize=4096)
def _weight_key(key: str, source: str) -> tuple[bool, str | None]:
    """(summed, the key holding the count the mean is over); parsed once per key, as every step repeats them."""
    chain = parse_chain_key(key)
    if chain is not None:
        count = cp_chain_count_key(*chain[:3])
        return key == count, count
    cap = parse_cp_key(key)
    if cap is not None:
        count = cp_count_key(cap.source, cap.position)
        return key == count, count
    gp = parse_gp_key(key)
    if gp is not None:
        return False, cp_count_key(source, gp.position)
    seq = parse_sequence_key(key)
    if seq is not None:
        tokens = sequence_tokens_key(seq[0])
        return key == tokens, tokens
    return mm_weight_key(key)


def _weight(key: str, stats: Mapping[str, float], source: str) -> float | None:
    """None for a count (summed); else the number of positions the key's mean is taken over."""
    summed, count = _weight_key(key, source)
    if summed:
        return None
    return 1.0 if count is None else float(stats.get(count, 0.0))


class RecordMeans:
    """Capture records accumulated over micro-batches (or probe batches): counts summed, every mean weighted by
    the number of positions it was taken over, so the result equals the statistics of the whole batch."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def add(self, stats: Mapping[str, float], source: str) -> None:
        for k, v in stats.items():
            w = _weight(k, stats, source)
            if w is None:
                self._sums[k] = self._sums.get(k, 0.0) + float(v)
            elif w > 0:
                self._sums[k] = self._sums.get(k, 0.0) + float(v) * w
                self._weights[k] = self._weights.get(k, 0.0) + w

    def pop(self) -> dict[str, float]:
        """The means (sorted by key), then reset. Empty when nothing was added."""
        return means_of(*self.pop_totals())

    def pop_totals(self) -> tuple[dict[str, float], dict[str, float]]:
        """(weighted sums, weights) per key, then reset: what ranks add up before taking the means."""
        out, self._sums, self._weights = (self._sums, self._weights), {}, {}
        return out


def means_of(sums: Mapping[str, float], weights: Mapping[str, float]) -> dict[str, float]:
    """Means from `RecordMeans.pop_totals()` (possibly summed over ranks): keys with weight 0 are left out,
    counts (no weight) are kept as sums."""
    out = {k: (v / weights[k] if k in weights else v) for k, v in sums.items() if k not in weights or weights[k] > 0}
    return dict(sorted(out.items()))


def safe_float(x: float) -> float:
    return x if math.isfinite(x) else float("nan")


def role_probs(rec: Mapping[str, float], source: str | Source, position: str | Position) -> dict[str, float]:
    """{role: mean p} from the `cp/{source}/{position}/{role}` keys of a record (entropy and count left out)."""
    out: dict[str, float] = {}
    for key, v in rec.items():
        cap = parse_cp_key(key)
        if cap is not None and cap.is_role and key == cp_key(source, position, cap.stat):
            out[cap.stat] = v
    return out
