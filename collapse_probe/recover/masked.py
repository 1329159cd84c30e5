"""Masked-decoding probe: forbid the control tokens that spiked, only where they spiked, and see what is left.

The collapse studied here is a probability spike of one control token at one decision position (the end of
turn right after `<tool_call>\\n`). If the skill survives behind that token, forbidding it there should bring
the calls back; if the model still fails, the damage spread beyond one token.

Positions (the current turn's generated ids, as `rollout`'s LogitsProcessor sees them):

    after_open  the ids end with [tool_open] or [tool_open, newline]: the decision right after the tag
    in_call     anywhere inside a call that is open (a tool_open with no tool_close after it)
"""

from __future__ import annotations

from typing import Sequence

import torch

from collapse_probe.errors import UserError
from collapse_probe.tokens import ControlTokens, resolve_control_tokens

POSITIONS = ("after_open", "in_call")
SPIKE_THRESHOLD = 0.05
NEVER_AUTO_MASK = ("json_open", "newline")  # the healthy continuations after the tag


class ForbidTokens:
    """A LogitsProcessor setting the logits of `forbid_ids` to -inf at the chosen decision positions.

    Counts how often it was applied (`applied`) and how often a forbidden token was the greedy choice there
    (`changed`: the decisions the mask actually overrode)."""

    def __init__(self, forbid_ids: Sequence[int], *, open_id: int, newline_id: int | None = None,
                 close_id: int | None = None, position: str = "after_open"):
        if position not in POSITIONS:
            raise UserError(f"unknown mask position {position!r}: use {' or '.join(POSITIONS)}")
        self.forbid = torch.tensor(sorted(set(int(i) for i in forbid_ids)), dtype=torch.long)
        self.open_id, self.newline_id, self.close_id, self.position = open_id, newline_id, close_id, position
        self.applied = 0
        self.changed = 0

    def at_position(self, gen: Sequence[int]) -> bool:
        if not gen:
            return False
        if self.position == "after_open":
            if gen[-1] == self.open_id:
                return True
            return self.newline_id is not None and len(gen) >= 2 and gen[-1] == self.newline_id \
                and gen[-2] == self.open_id
        # in_call: the last tool_open has no tool_close after it
        last_open = max((i for i, t in enumerate(gen) if t == self.open_id), default=-1)
        if last_open < 0:
            return False
        return self.close_id is None or self.close_id not in gen[last_open + 1:]

    def __call__(self, gen: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
        rows = [i for i, g in enumerate(gen) if self.at_position(g)]
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
    """A LogitsProcessor that changes nothing and records the next-token probability of each control role
    right after the tag (`after_tag`: ids end with [tool_open]) and after the tag's newline (`after_open`):
    the on-policy view of the spike, which can differ a lot from the fixed gold contexts."""

    def __init__(self, roles: ControlTokens):
        self.role_ids = {r: i for r, i in roles.ids.items()}
        self.open_id = roles.ids.get("tool_open")
        self.newline_id = roles.ids.get("newline")
        self.sums: dict[str, dict[str, float]] = {"after_tag": {}, "after_open": {}}
        self.counts = {"after_tag": 0, "after_open": 0}

    def __call__(self, gen: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
        if self.open_id is None:
            return logits
        for kind in ("after_tag", "after_open"):
            if kind == "after_tag":
                rows = [i for i, g in enumerate(gen) if g and g[-1] == self.open_id]
            else:
                rows = [i for i, g in enumerate(gen) if len(g) >= 2 and g[-1] == self.newline_id
                        and g[-2] == self.open_id]
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
    """Roles whose p right after the tag (probe set `cp/probe/after_open/*`, or on-policy `after_open` /
    `after_tag`) exceeds `threshold`, other than the healthy continuations (json_open, newline). Roles that
    share a token id are reported once, under the canonical role name. Returns (roles, max p per role)."""
    best: dict[str, float] = {}

    def see(role: str, p) -> None:
        if role in roles.ids and role not in NEVER_AUTO_MASK and isinstance(p, (int, float)):
            name = roles.role_of(roles.ids[role]) or role
            best[name] = max(best.get(name, 0.0), float(p))

    for key, p in (probe or {}).items():
        if key.startswith("cp/probe/after_open/"):
            see(key.rsplit("/", 1)[1], p)
    for kind in ("after_open", "after_tag"):
        for role, p in ((onpolicy or {}).get(kind) or {}).items():
            if role != "count":
                see(role, p)
    picked = sorted((r for r, p in best.items() if p > threshold), key=lambda r: -best[r])
    return picked, best


def masked_eval(model, tok, roles_to_mask: Sequence[str] | None = None, position: str = "after_open",
                n: int = 32, *, max_turns: int = 8, fmt="canonical", threshold: float = SPIKE_THRESHOLD,
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
        raise UserError("the tokenizer has no single tool_open token (<tool_call>): the masked probe needs it")
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
        raise UserError(f"cannot mask {', '.join(unknown)}: not a single control token in this tokenizer "
                        f"(resolved roles: {', '.join(sorted(roles.ids))})")
    def run(names):
        proc = ForbidTokens([roles.ids[r] for r in names], open_id=roles.ids["tool_open"],
                            newline_id=roles.ids.get("newline"), close_id=roles.ids.get("tool_close"),
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
