"""Token-id masks of a right-padded batch [N, T] that decision positions are built from (no host sync): where a
sequence of ids ends, shifted masks, the last index so far, and where a tool call's JSON body closes."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from collapse_probe.tokens import role_sequence


def ends_at(ids: torch.Tensor, seq: Sequence[int]) -> torch.Tensor:
    """[N, T] True at t where ids[t-len(seq)+1 .. t] == seq (a single id: ids == id; no seq: all False)."""
    if not seq:
        return torch.zeros_like(ids, dtype=torch.bool)
    m = ids == seq[-1]
    for j in range(1, len(seq)):
        back = torch.zeros_like(m)
        back[:, j:] = ids[:, :-j] == seq[-1 - j]
        m &= back
    return m


def shift(m: torch.Tensor, k: int) -> torch.Tensor:
    """m moved k columns right: out[:, t] = m[:, t - k] (False before the start)."""
    out = torch.zeros_like(m)
    out[:, k:] = m[:, : m.shape[1] - k]
    return out


def last_index(m: torch.Tensor) -> torch.Tensor:
    """[N, T] the last column <= t where m is True (-1 before the first)."""
    at = torch.arange(m.shape[1], device=m.device).expand_as(m)
    return torch.where(m, at, torch.full_like(at, -1)).cummax(dim=1).values


def body_closed(ids: torch.Tensor, gen_here: torch.Tensor, gen_next: torch.Tensor, nxt: torch.Tensor, nl: int,
                 role_ids: Mapping[str, int]) -> torch.Tensor:
    """Where a call's JSON body has closed and `</tool_call>` must follow: after the token that brings the body's
    brace depth back to 0 inside an open call of the same generated turn (or after the newline that follows it).
    Depth counts the braces of each token (`RoleIds.braces`, tokens.py: BPE merges such as '"}}\n' close two);
    without that table, after the `json_close` token. End-of-turn here is a premature end of the call."""
    turn = last_index(gen_here & ~shift(gen_here, 1))  # where the current generated turn began
    open_at = last_index(ends_at(ids, role_sequence(role_ids, "tool_open")) & gen_here)
    closed = last_index(ends_at(ids, role_sequence(role_ids, "tool_close")))
    in_call = (open_at >= turn) & (open_at > closed) & (turn >= 0)
    braces = getattr(role_ids, "braces", None)
    if braces:
        opens, closes = _brace_tables(braces, ids.device)
        known = (ids >= 0) & (ids < opens.numel())
        at = ids.clamp(0, opens.numel() - 1)
        o = torch.where(known, opens[at], 0)
        c = torch.where(known, closes[at], 0)
        depth = (o - c).cumsum(dim=1)
        start = depth.gather(1, open_at.clamp(min=0))  # depth at the open tag: the call's own braces count
        body = in_call & (c > 0) & (depth - start == 0) & gen_here
    else:
        jc = role_sequence(role_ids, "json_close")
        body = ends_at(ids, jc) & in_call & gen_here if jc else torch.zeros_like(in_call)
    after_nl = (ids == nl) & shift(body, 1) & gen_here
    return ((body & (nxt != nl)) | after_nl) & gen_next


def _brace_tables(braces: Mapping[int, tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (opening, closing) brace counts per token id (a few hundred entries: cheap to build per call)."""
    tids = torch.tensor(list(braces), dtype=torch.long)
    counts = torch.tensor(list(braces.values()), dtype=torch.long).reshape(-1, 2)
    size = int(tids.max()) + 1
    opens = torch.zeros(size, dtype=torch.long).index_put_((tids,), counts[:, 0])
    closes = torch.zeros(size, dtype=torch.long).index_put_((tids,), counts[:, 1])
    return opens.to(device), closes.to(device)
