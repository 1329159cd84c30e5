"""The capture verl's patched actor fills: per-micro-batch control-token sums (`ActorCapture`), the masks of the
policy's own tokens in verl's packed and padded layouts, and sequence-parallel slicing. Patching is in verl.py."""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from typing import Any

import torch

from collapse_probe.capture.mismatch import mismatch_stats
from collapse_probe.capture.stats import RecordMeans, decision_positions, means_of, position_stats_rows
from collapse_probe.integrations.distributed import all_reduce_totals, capture_keys, mismatch_keys
from collapse_probe.schema import POSITIONS, Source, cp_count_key
from collapse_probe.tokens import resolve_control_tokens

SOURCE = Source.ROLLOUT.value
ATTR = "collapse_probe_capture"   # the attribute holding an ActorCapture on verl's engine / actor object


class ActorCapture:
    """Capture sums of one verl engine or actor over one update (every mini- and micro-batch of it)."""

    def __init__(self, role_ids: dict[str, int]):
        self.role_ids, self.means, self.forwards, self.active = role_ids, RecordMeans(), 0, False
        # fixed: ranks without rows still all-reduce
        self.keys = capture_keys(role_ids, SOURCE, pressure=False) + mismatch_keys(role_ids)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> ActorCapture | None:
        roles = resolve_control_tokens(tokenizer)
        if "tool_open" not in roles.ids:
            warnings.warn("collapse-probe: the actor's tokenizer has no tool-call opening token; no control-token "
                          "statistics are logged", stacklevel=2)
            return None
        return cls(roles.distinct_ids())

    def add(self, ids: torch.Tensor, gen: torch.Tensor, locate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            read: Callable[[torch.Tensor], torch.Tensor], rollout: torch.Tensor | None = None) -> None:
        """One forward: `ids`/`gen` [B, T] right-padded token ids and policy-token mask; `locate(r, c)` the row of
        each position in this rank's logits (-1: another rank's slice); `read(rows)` those logits [M, V], scaled.
        `rollout` [B, T]: the rollout engine's log-prob of the token at c + 1 (verl's `rollout_log_probs`, with
        `calculate_log_probs=true`), for the mismatch keys (capture/mismatch.py)."""
        pos = {}
        for kind, (r, c) in decision_positions(ids, gen, self.role_ids).items():
            keep = locate(r, c) >= 0  # this rank's slice only: another rank counts the rest
            pos[kind] = (r[keep], c[keep])
        stats = position_stats_rows(lambda r, c: read(locate(r, c)), ids, pos, self.role_ids, device=ids.device,
                                    source=SOURCE)
        if rollout is not None:
            known = torch.zeros_like(gen, dtype=torch.bool)
            known[:, :-1] = gen[:, 1:].bool()
            stats.update(mismatch_stats(ids, pos, self.role_ids, logp_rollout=rollout.to(ids.device).float(),
                                        known=known, scores=lambda r, c: read(locate(r, c)), is_logp=False))
        self.means.add(stats, SOURCE)
        self.forwards += 1

    def drop(self) -> None:
        """Forget an update that failed (no collective)."""
        self.means.pop_totals()
        self.active = False

    def finish(self) -> dict[str, float]:
        """The update's statistics, summed over all ranks (a collective: every rank calls it), then reset."""
        sums, weights = self.means.pop_totals()
        sums, weights = all_reduce_totals(sums, weights, self.keys)
        self.active = False
        counts = dict.fromkeys((cp_count_key(SOURCE, pos) for pos in POSITIONS), 0.0)  # "measured nothing" too
        return {**counts, **means_of(sums, weights)}


def attach(obj: Any, tokenizer: Any) -> ActorCapture | None:
    """Give a verl engine or actor its capture (done automatically from the engine's model config, or the actor
    module's local model path; call it for a custom setup)."""
    cap = ActorCapture.for_tokenizer(tokenizer)
    setattr(obj, ATTR, cap)
    return cap


def capture_of(obj: Any, tokenizer: Callable[[], Any]) -> ActorCapture | None:
    if not hasattr(obj, ATTR):
        try:
            attach(obj, tokenizer())
        except Exception as exc:  # noqa: BLE001 - never break a training run over a missing tokenizer
            warnings.warn(f"collapse-probe: no tokenizer for the actor ({type(exc).__name__}: {exc}); no "
                          "control-token statistics are logged", stacklevel=2)
            setattr(obj, ATTR, None)
    return getattr(obj, ATTR)


# ------------------------------------------------------------------------------------------------ layouts
def gen_mask_packed(input_ids: torch.Tensor, response_mask: torch.Tensor, response_lens: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """verl >= 0.8: (ids [B, T] right-padded with -1, policy mask [B, T], cu_seqlens) from the nested
    `input_ids` (prompt + response, no padding), the response mask (padded [B, R] or nested) and each
    sample's response length: the response is the last `response_lens[i]` tokens of sample i (as verl's
    `no_padding_2_padding` slices it)."""
    cu = input_ids.offsets()
    starts = cu.tolist()  # one host copy, not one per sample
    values = input_ids.values()
    lens = [b - a for a, b in itertools.pairwise(starts)]
    ids = torch.full((len(lens), max(lens)), -1, dtype=values.dtype, device=values.device)
    gen = torch.zeros_like(ids, dtype=torch.bool)
    masks = response_mask.unbind() if response_mask.is_nested else list(response_mask)
    for i, (a, n, r) in enumerate(zip(starts, lens, response_lens.tolist())):
        ids[i, :n] = values[a:a + n]
        gen[i, n - r:n] = masks[i][:r].bool()
    return ids, gen, cu


def rollout_packed(values: torch.Tensor, lens: list[int], response_lens: list[int], width: int) -> torch.Tensor:
    """verl >= 0.8: the response-aligned `rollout_log_probs` (padded [B, R] or nested) placed where each token is
    predicted in the packed layout of `gen_mask_packed` (response token j of sample i at n - r + j, predicted at
    n - r + j - 1): [B, width]."""
    out = torch.zeros((len(lens), width), dtype=torch.float32, device=values.device)
    rows = values.unbind() if values.is_nested else list(values)
    for i, (n, r) in enumerate(zip(lens, response_lens)):
        out[i, n - r - 1:n - 1] = rows[i][:r].float()
    return out


def rollout_padded(values: torch.Tensor, width: int) -> torch.Tensor:
    """verl <= 0.7: `rollout_log_probs` [B, R] of a left-right padded batch [B, width] whose last R columns are
    the response, placed at the positions that predict them."""
    out = torch.zeros((values.shape[0], width), dtype=torch.float32, device=values.device)
    r = values.shape[1]
    out[:, width - r - 1:width - 1] = values.float()
    return out


def gen_mask_padded(input_ids: torch.Tensor, response_mask: torch.Tensor, attention_mask: torch.Tensor
                    ) -> torch.Tensor:
    """verl <= 0.7: the policy mask [B, S] of a left-right padded batch whose last R columns are the response."""
    gen = torch.zeros_like(input_ids, dtype=torch.bool)
    width = response_mask.shape[1]
    gen[:, -width:] = response_mask.bool() & attention_mask[:, -width:].bool()
    return gen


def sp_group() -> tuple[int, int]:
    from verl.utils.ulysses import (
        get_ulysses_sequence_parallel_rank,
        get_ulysses_sequence_parallel_world_size,
    )

    return get_ulysses_sequence_parallel_rank(), get_ulysses_sequence_parallel_world_size()


def slice_locator(flat_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], local_len: int, sliced: bool):
    """(r, c) -> row in this rank's logits: with ulysses (`sliced`), rank k holds the k-th `local_len` tokens of
    the (padded) global packed sequence; without it every row is here. -1 for a row on another rank."""
    rank, size = sp_group() if sliced else (0, 1)
    start = rank * local_len if size > 1 else 0

    def locate(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        g = flat_of(r, c) - start
        return torch.where((g >= 0) & (g < local_len), g, torch.full_like(g, -1))
    return locate


def is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


_warned: set[str] = set()


def warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"collapse-probe: {msg}", stacklevel=3)
