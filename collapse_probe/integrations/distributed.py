"""Cross-rank sums for the callback: every rank adds its capture totals into one vector of fixed keys.

The key list depends only on the roles, the source and whether advantages exist, never on what a rank saw, so a
rank with no decision rows sends zeros and still enters every collective (no rank waits for another forever).
"""

from __future__ import annotations

from typing import Mapping

import torch

from collapse_probe.schema import (ANY_TOKEN, MISMATCH_PREFIX, MM_AGGREGATES, MM_TOKENS, POSITIONS, SAMPLED_STATS,
                                   MismatchStat, Part, cp_count_key, cp_entropy_key, cp_key, gp_key, mm_key,
                                   mm_weight_key, parse_cp_key)


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def capture_keys(role_ids: Mapping[str, int], source: str, *, pressure: bool) -> list[str]:
    """Every key an on-policy capture can produce, in a fixed order."""
    roles = sorted(role_ids)
    keys: list[str] = []
    for pos in POSITIONS:
        keys += [cp_count_key(source, pos), cp_entropy_key(source, pos)] + [cp_key(source, pos, r) for r in roles]
        if pressure:
            keys += [gp_key(pos, r, part) for part in (Part.CHOSEN, Part.OTHER) for r in roles]
    return keys


def mismatch_keys(role_ids: Mapping[str, int]) -> list[str]:
    """Every mismatch key an integration's capture can produce (capture/mismatch.py without the sampler's
    distribution: per sampled role, and the whole-batch totals), in a fixed order."""
    keys: list[str] = []
    for pos in POSITIONS:
        for role in [ANY_TOKEN] + sorted(role_ids):
            keys += [mm_key(pos, role, MismatchStat.COUNT)] + [mm_key(pos, role, s) for s in SAMPLED_STATS]
    return keys + [MM_TOKENS, *MM_AGGREGATES]


def _device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_totals(sums: Mapping[str, float], weights: Mapping[str, float], keys: list[str]
                      ) -> tuple[dict[str, float], dict[str, float]]:
    """Sums and weights added over all ranks (unchanged in a single process). Keys outside `keys` are dropped in
    a multi-process run (they could not be matched across ranks)."""
    if world_size() == 1:
        return dict(sums), dict(weights)
    import torch.distributed as dist

    vec = torch.tensor([float(sums.get(k, 0.0)) for k in keys] + [float(weights.get(k, 0.0)) for k in keys],
                       dtype=torch.float64, device=_device())
    dist.all_reduce(vec)
    flat = vec.tolist()
    n = len(keys)
    # a mismatch key no rank measured (no sampler log-probs in this run) is left out, not reported as 0
    unseen = {k for i, k in enumerate(keys) if k.startswith(MISMATCH_PREFIX) and flat[i] == 0 and flat[n + i] == 0}
    out_sums = {k: flat[i] for i, k in enumerate(keys) if k not in unseen}
    out_weights = {k: flat[n + i] for i, k in enumerate(keys) if not _is_count(k) and k not in unseen}
    return out_sums, out_weights


def _is_count(key: str) -> bool:
    cap = parse_cp_key(key)
    return (cap is not None and key == cp_count_key(cap.source, cap.position)) or mm_weight_key(key)[0]


def broadcast_flags(flags: list[bool]) -> list[bool]:
    """Rank 0's decisions (save, stop) on every rank: they must agree, or ranks leave the loop at different
    steps and the next collective hangs."""
    if world_size() == 1:
        return list(flags)
    import torch.distributed as dist

    t = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float64, device=_device())
    dist.broadcast(t, src=0)
    return [bool(x) for x in t.tolist()]
