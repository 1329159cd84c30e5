"""Control-token statistics at decision positions, computed from logits or log-probs already in hand.

A decision position is a place in a sequence where the next token decides structure (`schema.Position`):

    after_open   right after the tool-call opening tag (and its newline, when the tokenizer has one)
    turn_start   the first token of each generated assistant turn
    after_close  right after the tool-call closing tag
    json_body    right after the JSON body opens (`{"` or `{`) inside a call

Position t "predicts" token t+1; only positions whose next token the policy generated count (`gen_mask`), so
tags in the system prompt are never measured. `decision_masks` is the one definition of these positions; token
lists (a LogitsProcessor's view) go through it too, via `prefix_decisions`.

All statistics gather K control columns at M decision rows: no second full-vocabulary tensor is built (the
trainer's own log-softmax is reused when it exists). One math (`_gather`) serves both entry points:
`position_stats` reads every decision row and syncs once; `position_stats_deferred` reads a fixed number of rows
and never syncs until `DeferredStats.resolve()`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, Sequence

import torch

from collapse_probe.schema import (POSITIONS, Part, Position, Source, cp_count_key, cp_key, cp_entropy_key, gp_key,
                                   parse_cp_key, parse_gp_key, parse_sequence_key, sequence_tokens_key)

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
    """Boolean [N, T] mask of each position kind (no host sync: usable inside an asynchronous GPU step)."""
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
    out[Position.AFTER_OPEN.value] = (after_tag | after_nl) & gen_next
    start = gen_next & ~gen_here
    start[:, 0] = False
    out[Position.TURN_START.value] = start
    out[Position.AFTER_CLOSE.value] = (ids == role_ids.get("tool_close", -2)) & gen_here & gen_next
    jo = role_ids.get("json_open", -2)
    prev2 = torch.full_like(ids, -1)
    prev2[:, 2:] = ids[:, :-2]
    in_call = ((prev == nl) & (prev2 == opn)) | (prev == opn)
    out[Position.JSON_BODY.value] = (ids == jo) & in_call & gen_here & gen_next
    return out


_LOOKBACK = 3  # decision_masks looks at most two tokens back from a position; plus the position itself


def prefix_decisions(prefixes: Sequence[Sequence[int]], role_ids: Mapping[str, int],
                     next_id: int | None = None) -> dict[str, list[bool]]:
    """For each list of generated ids, whether the token after its last id is decided at each position kind.

    `decision_masks` itself applied to the last ids (treated as generated, after a prompt), so token lists follow
    the same rule. `next_id` is the token that follows when known; None (a LogitsProcessor, the token is being
    decided): a list ending in the bare opening tag counts as `after_open`, which it is unless that next token is
    the newline. An empty list is the start of a generated turn (`turn_start`)."""
    if not prefixes:
        return {k: [] for k in POSITIONS}
    ids, gen = [], []
    for p in prefixes:
        tail = [int(t) for t in p[len(p) - _LOOKBACK:]] if len(p) > _LOOKBACK else [int(t) for t in p]
        pad = _LOOKBACK - len(tail)  # the prompt before the turn: unknown ids, not generated
        ids.append([-1] * pad + tail + [-1 if next_id is None else int(next_id)])
        gen.append([0] * pad + [1] * (len(tail) + 1))
    masks = decision_masks(torch.tensor(ids), torch.tensor(gen), role_ids)
    return {k: m[:, _LOOKBACK - 1].tolist() for k, m in masks.items()}


class DeferredStats:
    """Statistics still on the device: `resolve()` copies them to the host with one sync, when convenient
    (e.g. at logging time, after the optimizer step), so capture never stalls an asynchronous GPU step."""

    def __init__(self, source: str, keys: list[str], kinds: list[str], values: torch.Tensor,
                 counts: dict[str, torch.Tensor | float]):
        self.source, self.keys, self.kinds, self.values, self.counts = source, keys, kinds, values, counts

    def resolve(self) -> dict[str, float]:
        """Host floats: `count` of every position kind, the other keys only for kinds with positions."""
        on_device = [k for k, v in self.counts.items() if isinstance(v, torch.Tensor)]
        parts = [self.values] + [self.counts[k].reshape(1).float() for k in on_device]
        flat = torch.cat(parts).tolist()  # the one host sync
        counts = {k: float(v) for k, v in self.counts.items() if not isinstance(v, torch.Tensor)}
        counts.update(zip(on_device, flat[len(self.keys):]))
        rec = {cp_count_key(self.source, kind): counts[kind] for kind in self.counts}
        rec.update((k, v) for k, kind, v in zip(self.keys, self.kinds, flat) if counts[kind] > 0)
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


def _gather(scores: torch.Tensor | RowReader, ids: torch.Tensor, rows: Mapping[str, Rows],
            role_ids: Mapping[str, int], *, is_logp: bool, source: str, advantages: torch.Tensor | None,
            device: torch.device | None = None) -> DeferredStats:
    """The capture math, shared by every entry point: per position kind, read the M decision rows of `scores`
    (a [N, T, V] tensor, or a `RowReader` that builds only those rows, e.g. hidden states x LM head), gather the
    K control columns, and average with the rows' weights. Nothing leaves the device here."""
    roles = sorted(role_ids)
    dev = scores.device if isinstance(scores, torch.Tensor) else device
    read = (lambda r, c: scores[r, c]) if isinstance(scores, torch.Tensor) else scores
    cols = torch.tensor([role_ids[r] for r in roles], dtype=torch.long, device=dev)
    adv_all = advantages.to(dev).float() if advantages is not None else None
    keys: list[str] = []
    kinds: list[str] = []
    vals: list[torch.Tensor] = []
    counts: dict[str, torch.Tensor | float] = {}
    for kind, (r, c, valid) in rows.items():
        if valid is None:
            counts[kind] = denom = float(r.numel())
            if not r.numel():
                continue
        else:
            counts[kind] = valid.sum()
            denom = counts[kind].clamp(min=1)
        got = read(r, c).float()  # [M, V]: only decision rows, a small slice
        logp = got if is_logp else got - torch.logsumexp(got, dim=-1, keepdim=True)
        p = logp.index_select(-1, cols).exp()  # [M, K]
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
        kinds += [kind] * len(names)
        vals += parts
    values = torch.cat(vals) if vals else torch.zeros(0, device=dev)
    return DeferredStats(source, keys, kinds, values, counts)


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
    return False, None


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
