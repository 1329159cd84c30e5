"""Masked-decoding probe: forbid the control tokens that spiked, only where they spiked, and see what is left.

The collapse studied here is a probability spike of one control token at one decision position (the end of
turn right after `<tool_call>\\n`). If the skill survives behind that token, forbidding it there should bring
the calls back; if the model still fails, the damage spread beyond one token.

Positions (the current turn's generated ids, as `rollout`'s LogitsProcessor sees them):

    after_open  capture's decision position (`capture.stats.prefix_decisions`, the rule of `decision_masks`):
                after the tag's newline, or after the bare tag, which is the decision unless a newline follows
    in_call     anywhere inside a call that is open (a tool_open with no tool_close after it)

A role of several tokens (SmolLM2's plain-text `</tool_call>`) is forbidden by its first piece, the token that
would start it at that position; the tags that define the positions count where their whole sequence ends.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch

from collapse_probe.capture.stats import prefix_decisions, role_probs
from collapse_probe.errors import UserError
from collapse_probe.schema import Position, Source
from collapse_probe.tokens import ControlTokens, RoleIds, resolve_control_tokens

AFTER_OPEN = Position.AFTER_OPEN.value
IN_CALL = "in_call"
AFTER_TAG = "after_tag"  # observer only: the ids end with the bare tag and the newline may still follow
POSITIONS = (AFTER_OPEN, IN_CALL)
SPIKE_THRESHOLD = 0.05
NEVER_AUTO_MASK = ("json_open", "newline")  # the healthy continuations after the tag
Tag = Union[int, Sequence[int]]  # one token id, or the ids of a tag of several tokens


def _seq(tag: Tag | None) -> tuple[int, ...]:
    return () if tag is None else (int(tag),) if isinstance(tag, int) else tuple(int(i) for i in tag)


def _last_end(ids: Sequence[int], seq: tuple[int, ...], start: int = 0) -> int:
    """Index just after the last complete occurrence of `seq` in ids[start:], or -1."""
    k = len(seq)
    for end in range(len(ids), start + k - 1, -1):
        if tuple(ids[end - k:end]) == seq:
            return end
    return -1


class ForbidTokens:
    """A LogitsProcessor setting the logits of `forbid_ids` to -inf at the chosen decision positions.

    Counts how often it was applied (`applied`) and how often a forbidden token was the greedy choice there
    (`changed`: the decisions the mask actually overrode)."""

    def __init__(self, forbid_ids: Sequence[int], *, open_id: Tag, newline_id: int | None = None,
                 close_id: Tag | None = None, position: str = AFTER_OPEN):
        if position not in POSITIONS:
            raise UserError(f"unknown mask position {position!r}: use {' or '.join(POSITIONS)}")
        self.forbid = torch.tensor(sorted(set(int(i) for i in forbid_ids)), dtype=torch.long)
        self.open_seq, self.close_seq = _seq(open_id), _seq(close_id)
        self.newline_id, self.position = newline_id, position
        tags = {r: s for r, s in (("tool_open", self.open_seq), ("newline", _seq(newline_id)),
                                  ("tool_close", self.close_seq)) if s}
        self.role_ids = RoleIds({r: s[0] for r, s in tags.items()}, tags)
        self.applied = 0
        self.changed = 0

    def rows(self, gen: Sequence[Sequence[int]]) -> list[int]:
        """The rows whose next token is decided at the mask's position."""
        if self.position == AFTER_OPEN:  # the capture's definition, the token being decided unknown
            return [i for i, hit in enumerate(prefix_decisions(gen, self.role_ids)[AFTER_OPEN]) if hit]
        return [i for i, g in enumerate(gen) if self._in_call(g)]

    def _in_call(self, gen: Sequence[int]) -> bool:
        """The last complete tool_open has no complete tool_close after it."""
        opened = _last_end(gen, self.open_seq)
        if opened < 0:
            return False
        return not self.close_seq or _last_end(gen, self.close_seq, opened) < 0

    def __call__(self, gen: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
        rows = self.rows(gen)
        if not rows or self.forbid.numel() == 0:
            return logits
        idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
        ban = self.forbid.to(logits.device)
        top = logits.index_select(0, idx).argmax(-1)
        self.applied += len(rows)
        self.changed += int((top[:, None] == ban[None, :]).any(-1).sum())
        logits = logits.clone()
        logits[idx[:, None], ban[None, :]] = float("-inf")
        return logits


class ObserveAfterOpen:
    """A LogitsProcessor that changes nothing and records the next-token probability of each control role at
    capture's `after_open` decision position (`capture.stats.prefix_decisions`): the on-policy view of the spike,
    which can differ a lot from the fixed gold contexts. Rows ending in the bare tag are that position only when
    no newline follows, which is not known yet when the token is being decided: they are kept apart, as
    `after_tag` (the same as `after_open` for a tokenizer without a newline token, which never has them)."""

    def __init__(self, roles: ControlTokens):
        self.role_ids = roles.all_ids()  # every role's first piece; multi-token tags carry their sequences
        self.open_id = roles.ids.get("tool_open")
        self.newline_id = roles.ids.get("newline")
        self.sums: dict[str, dict[str, float]] = {AFTER_TAG: {}, AFTER_OPEN: {}}
        self.counts = {AFTER_TAG: 0, AFTER_OPEN: 0}

    def __call__(self, gen: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
        if self.open_id is None:
            return logits
        maybe = prefix_decisions(gen, self.role_ids)[AFTER_OPEN]  # whatever the next token
        sure = maybe if self.newline_id is None else \
            prefix_decisions(gen, self.role_ids, next_id=self.newline_id)[AFTER_OPEN]  # even if a newline follows
        for kind, hits in ((AFTER_OPEN, sure), (AFTER_TAG, [a and not b for a, b in zip(maybe, sure)])):
            rows = [i for i, hit in enumerate(hits) if hit]
            if not rows:
                continue
            p = torch.softmax(logits[rows].float(), dim=-1)
            self.counts[kind] += len(rows)
            for role, tid in self.role_ids.items():
                self.sums[kind][role] = self.sums[kind].get(role, 0.0) + float(p[:, tid].sum())
        return logits

    def probs(self) -> dict[str, dict[str, float]]:
        """{position: {role: mean p}}, plus `count` per position."""
        out = {}
        for kind, sums in self.sums.items():
            c = self.counts[kind]
            out[kind] = {r: s / c for r, s in sums.items()} if c else {}
            out[kind]["count"] = float(c)
        return out


def spiking_roles(roles: ControlTokens, *, probe: dict[str, float] | None = None,
                  onpolicy: dict[str, dict[str, float]] | None = None,
                  threshold: float = SPIKE_THRESHOLD) -> tuple[list[str], dict[str, float]]:
    """Roles whose p right after the tag (probe set `cp/probe/after_open/{role}`, or on-policy `after_open` /
    `after_tag`) exceeds `threshold`, other than the healthy continuations (json_open, newline). Roles that
    share a token id are reported once, under the canonical role name. Returns (roles, max p per role)."""
    best: dict[str, float] = {}

    def see(role: str, p) -> None:
        if role in roles.ids and role not in NEVER_AUTO_MASK and isinstance(p, (int, float)):
            name = roles.role_of(roles.ids[role]) or role
            best[name] = max(best.get(name, 0.0), float(p))

    for role, p in role_probs(probe or {}, Source.PROBE, Position.AFTER_OPEN).items():
        see(role, p)
    for kind in (AFTER_OPEN, AFTER_TAG):
        for role, p in ((onpolicy or {}).get(kind) or {}).items():
            if role != "count":
                see(role, p)
    picked = sorted((r for r, p in best.items() if p > threshold), key=lambda r: -best[r])
    return picked, best


def masked_eval(model: torch.nn.Module, tok: Any, roles_to_mask: Sequence[str] | None = None,
                position: str = AFTER_OPEN, n: int = 32, *, max_turns: int = 8, fmt: Any = "canonical",
                threshold: float = SPIKE_THRESHOLD,
                probe: dict[str, float] | None = None, onpolicy: dict[str, dict[str, float]] | None = None,
                roles: ControlTokens | None = None, per_role: bool = True) -> dict:
    """Greedy canonical evaluation with the spiking control tokens forbidden at `position`.

    `roles_to_mask` None picks them automatically (see `spiking_roles`; the probe set is scored here unless
    `probe` scores are passed, and on-policy numbers are used when `onpolicy` is passed); when nothing
    spikes, end_of_turn (the paper's token) is masked. Returns validity, success, content_accuracy,
    masked_roles, and how often the mask fired (`mask_applied`) and overrode the greedy choice
    (`mask_changed`). With several roles masked and `per_role`, each role is also masked alone (`per_role`:
    {role: {validity, success, content_accuracy}}), to tell which token hid the skill."""
    from collapse_probe.recover.evaluate import evaluate_format

    roles = roles or resolve_control_tokens(tok)
    if "tool_open" not in roles.ids:
        raise UserError(f"the tokenizer has no tool_open tag ({roles.unresolved.get('tool_open', 'not resolved')}): "
                        "the masked probe needs it")
    role_p: dict[str, float] = {}
    if roles_to_mask is None:
        if probe is None:
            from collapse_probe.capture.probe_set import ProbeSet
            probe = ProbeSet.from_world(tok, n=16, roles=roles).score(model)
        picked, role_p = spiking_roles(roles, probe=probe, onpolicy=onpolicy, threshold=threshold)
        selection = "auto" if picked else "auto-fallback"
        masked = picked or ["end_of_turn"]
    else:
        selection, masked = "given", list(roles_to_mask)
    unknown = [r for r in masked if r not in roles.ids]
    if unknown:
        raise UserError(f"cannot mask {', '.join(unknown)}: not a control role of this tokenizer "
                        f"(resolved roles: {', '.join(sorted(roles.ids))})")
    def run(names):
        proc = ForbidTokens([roles.ids[r] for r in names], open_id=roles.sequence("tool_open"),
                            newline_id=roles.ids.get("newline"), close_id=roles.sequence("tool_close") or None,
                            position=position)
        return evaluate_format(model, tok, fmt, n=n, max_turns=max_turns, logits_processor=proc), proc

    res, proc = run(masked)
    out = {"validity": res["validity"], "success": res["success"], "content_accuracy": res["content_accuracy"],
           "masked_roles": list(masked), "masked_ids": [roles.ids[r] for r in masked], "position": position,
           "selection": selection, "role_p": role_p, "mask_applied": proc.applied, "mask_changed": proc.changed,
           "calls_per_episode": res["calls_per_episode"], "n": res["n"]}
    if per_role and len(masked) > 1:
        out["per_role"] = {}
        for r in masked:
            one, p1 = run([r])
            out["per_role"][r] = {"validity": one["validity"], "success": one["success"],
                                  "content_accuracy": one["content_accuracy"], "mask_changed": p1.changed}
    return out
