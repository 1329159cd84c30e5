"""Control-token statistics inside a plain-PyTorch training loop.

`ControlTokenCapture` turns the logits (or the log-softmax) a training step already computes into the
`cp/{source}/{position}/{role}` and `gp/...` record keys of docs/DESIGN.md. Only the decision rows are read: no
second full-vocabulary tensor is built for the batch. Two ways to use it:

- call `stats_from_logits(logits, input_ids, gen_mask)` / `stats_from_logp(logp, ...)` yourself, or
- `attach(model)` a forward hook and call `set_batch(input_ids, gen_mask, advantages=None)` before each
  forward; the hook computes the statistics under `torch.no_grad()` right after the forward, keeps no reference
  to the logits, and `pop()` returns the count-weighted means over all micro-batches since the last `pop()`.

Example (a custom loop; `gen_mask` is 1 on tokens the policy generated)::

    from collapse_probe.capture.hooks import ControlTokenCapture
    from collapse_probe.runs.runlog import RunLog

    capture, log = ControlTokenCapture(tokenizer), RunLog("runs/my_run")
    with capture.attach(model):
        for step, batch in enumerate(batches, 1):
            for mb in batch:  # micro-batches
                capture.set_batch(mb["input_ids"], mb["gen_mask"], advantages=mb["advantages"])
                loss = loss_fn(model(input_ids=mb["input_ids"]).logits, mb)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            log.append({"step": step, "loss": loss.item(), **capture.pop()})

Each process accumulates its own micro-batches; RunLog writes on rank 0 only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from collapse_probe.capture.stats import RecordMeans, decision_positions, position_stats, position_stats_deferred
from collapse_probe.errors import UserError
from collapse_probe.schema import Source, sequence_entropy_key, sequence_tokens_key
from collapse_probe.tokens import ControlTokens, RoleIds, resolve_control_tokens

logger = logging.getLogger(__name__)
_ENTROPY_CHUNK = 256  # rows per chunk for the optional overall entropy


@dataclass
class _Batch:
    input_ids: torch.Tensor
    gen_mask: torch.Tensor
    advantages: torch.Tensor | None
    source: str


class ControlTokenCapture:
    """Next-token probabilities of control tokens at decision positions, from logits already in hand.

    `tokenizer_or_roles`: an HF tokenizer (roles resolved with `resolve_control_tokens(tokenizer, overrides)`)
    or a `ControlTokens`; tags of several tokens (SmolLM2's `<tool_call>`) work too (capture/stats.py says what
    is recorded for them). `entropy=True` adds `cp/{source}/entropy`, the mean entropy over all generated
    positions (computed in chunks of rows; it reads every generated row, so it costs more than the rest).
    """

    def __init__(self, tokenizer_or_roles: Any, *, overrides: dict[str, str] | None = None,
                 source: str = Source.ROLLOUT.value, entropy: bool = False):
        if isinstance(tokenizer_or_roles, ControlTokens):
            if overrides:
                raise UserError("token overrides need a tokenizer to resolve them; pass the tokenizer, "
                                "not ControlTokens")
            self.roles = tokenizer_or_roles
        elif tokenizer_or_roles is not None and hasattr(tokenizer_or_roles, "encode"):
            self.roles = resolve_control_tokens(tokenizer_or_roles, overrides)
        else:
            raise UserError(f"ControlTokenCapture needs a tokenizer or ControlTokens, got "
                            f"{type(tokenizer_or_roles).__name__}")
        if "tool_open" not in self.roles.ids:
            why = self.roles.unresolved.get("tool_open", "not resolved")
            raise UserError(f"no tool-call opening token ({why}): pass overrides={{'tool_open': '<your tag>'}}")
        self.role_ids: RoleIds = self.roles.distinct_ids()  # multi-token roles carry their sequences
        self.source = source
        self.entropy = entropy
        self._batch: _Batch | None = None
        self._handle: Any = None
        self._means = RecordMeans()  # count-weighted over the micro-batches since the last pop()
        self._pending: list = []  # (DeferredStats, source) still on the accelerator
        self._warned: set[str] = set()
        self.skipped = 0  # forwards that did not match the batch set with set_batch

    # ------------------------------------------------------------------ direct use

    def stats_from_logits(self, logits: torch.Tensor, input_ids: torch.Tensor, gen_mask: torch.Tensor, *,
                          advantages: torch.Tensor | None = None, source: str | None = None) -> dict[str, float]:
        """Statistics from raw logits [N, T, V] (or [N, T-1, V], the usual `logits[:, :-1]`) for a batch
        `input_ids` [N, T] whose generated tokens are marked by `gen_mask` [N, T]. `advantages` [N] adds the
        gradient-pressure keys `gp/{position}/{role}/chosen|other`."""
        return self._stats(logits, input_ids, gen_mask, advantages, source or self.source, is_logp=False)

    def stats_from_logp(self, logp_all: torch.Tensor, input_ids: torch.Tensor, gen_mask: torch.Tensor, *,
                        advantages: torch.Tensor | None = None, source: str | None = None) -> dict[str, float]:
        """As `stats_from_logits`, reusing a log-softmax [N, T(-1), V] the loss already computed."""
        return self._stats(logp_all, input_ids, gen_mask, advantages, source or self.source, is_logp=True)

    # ------------------------------------------------------------------ hook use

    def attach(self, model: torch.nn.Module) -> "ControlTokenCapture":
        """Register a forward hook on `model` (its output's `.logits`, or the output tensor). Returns self,
        so `with capture.attach(model): ...` detaches at the end of the block."""
        if self._handle is not None:
            raise UserError("this ControlTokenCapture is already attached: call detach() first")
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
        self._handle = model.register_forward_hook(self._hook)
        return self

    def detach(self) -> None:
        """Remove the hook and drop any batch context not yet consumed."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._batch = None

    def __enter__(self) -> "ControlTokenCapture":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def set_batch(self, input_ids: torch.Tensor, gen_mask: torch.Tensor, advantages: torch.Tensor | None = None,
                  *, source: str | None = None) -> None:
        """Context for the next forward of the attached model: its input ids [N, T], the mask [N, T] of
        generated tokens and optional per-sequence advantages [N]. Consumed by that one forward."""
        ids, mask = _as_2d(input_ids, "input_ids"), _as_2d(gen_mask, "gen_mask")
        if mask.shape != ids.shape:
            raise UserError(f"gen_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}")
        adv = _as_adv(advantages, ids.shape[0])
        self._batch = _Batch(ids.detach(), mask.detach(), adv, source or self.source)

    def add(self, stats: dict[str, float], source: str | None = None) -> None:
        """Accumulate one micro-batch's statistics (what the hook does with its results)."""
        self._means.add(stats, source or self.source)

    def pop(self) -> dict[str, float]:
        """Means over the micro-batches seen since the last pop (each weighted by its number of decision
        positions), counts summed; then reset. Empty when nothing was captured."""
        pending, self._pending = self._pending, []
        for deferred, source in pending:
            self.add(deferred.resolve(), source)
        return self._means.pop()

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        batch = self._batch
        if batch is None:
            return None
        try:
            logits = _logits_of(output)
            if logits is None or logits.dim() != 3 or logits.shape[0] != batch.input_ids.shape[0] \
                    or logits.shape[1] not in (batch.input_ids.shape[1], batch.input_ids.shape[1] - 1):
                self.skipped += 1  # not this batch's forward (e.g. generation): keep the context for the next
                return None
            self._batch = None
            with torch.no_grad():
                if logits.device.type != "cpu" and not self.entropy:
                    # On an accelerator: stay asynchronous; pop() copies the numbers over once per step.
                    ids, gen = batch.input_ids.to(logits.device), batch.gen_mask.to(logits.device)
                    adv = batch.advantages.to(logits.device) if batch.advantages is not None else None
                    self._pending.append((position_stats_deferred(
                        logits.detach(), ids, gen, self.role_ids, is_logp=False, source=batch.source,
                        advantages=adv), batch.source))
                    return None
                rec = self._stats(logits.detach(), batch.input_ids, batch.gen_mask, batch.advantages,
                                  batch.source, is_logp=False)
            self.add(rec, batch.source)
        except Exception as e:  # capture must never break a training step
            self._batch = None
            self._warn_once("hook", f"control-token capture failed in the forward hook "
                                    f"({type(e).__name__}: {e}); training goes on without it")
        finally:
            logits = None  # noqa: F841  (no reference to the step's logits survives the hook)
        return None

    # ------------------------------------------------------------------ internals

    def _stats(self, scores: torch.Tensor, input_ids: torch.Tensor, gen_mask: torch.Tensor,
               advantages: Any, source: str, *, is_logp: bool) -> dict[str, float]:
        if not isinstance(scores, torch.Tensor) or scores.dim() != 3:
            raise UserError(f"expected logits/log-probs of shape [N, T, V], got "
                            f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
        ids, mask = _as_2d(input_ids, "input_ids"), _as_2d(gen_mask, "gen_mask")
        n, t = ids.shape
        if mask.shape != ids.shape:
            raise UserError(f"gen_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}")
        if scores.shape[0] != n or scores.shape[1] not in (t, t - 1):
            raise UserError(f"logits of shape {tuple(scores.shape)} do not match input_ids {tuple(ids.shape)}: "
                            "pass [N, T, V] or the shifted [N, T-1, V] (logits[:, :-1])")
        big = max([*self.role_ids.values(), *(i for s in self.role_ids.sequences.values() for i in s)])
        if big >= scores.shape[-1]:
            raise UserError(f"control token id {big} is outside the vocabulary of size {scores.shape[-1]}: "
                            "is this the tokenizer of this model?")
        dev = scores.device
        ids, mask = ids.to(dev), mask.to(dev)
        adv = _as_adv(advantages, n)
        adv = adv.to(dev) if adv is not None else None
        with torch.no_grad():
            pos = decision_positions(ids, mask, self.role_ids)  # positions are < T-1: valid for both widths
            rec = position_stats(scores, ids, pos, self.role_ids, is_logp=is_logp, source=source, advantages=adv)
            if self.entropy:
                rec.update(_overall_entropy(scores, mask, source, is_logp))
        return rec

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg)


def _logits_of(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    return None


def _as_2d(x: Any, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if t.dim() != 2:
        raise UserError(f"{name} must be 2-D [batch, tokens], got shape {tuple(t.shape)}")
    return t


def _as_adv(advantages: Any, n: int) -> torch.Tensor | None:
    if advantages is None:
        return None
    a = advantages.detach() if isinstance(advantages, torch.Tensor) else torch.as_tensor(advantages)
    if a.dim() == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.dim() != 1 or a.shape[0] != n:
        raise UserError(f"advantages must hold one value per sequence (shape [{n}]), got shape {tuple(a.shape)}")
    return a


def _overall_entropy(scores: torch.Tensor, gen_mask: torch.Tensor, source: str, is_logp: bool) -> dict[str, float]:
    """Mean entropy over the positions whose next token was generated, in chunks of rows."""
    nxt = torch.zeros_like(gen_mask, dtype=torch.bool)
    nxt[:, :-1] = gen_mask[:, 1:].bool()
    r, c = torch.nonzero(nxt[:, : scores.shape[1]], as_tuple=True)
    m = int(r.numel())
    if m == 0:
        return {sequence_tokens_key(source): 0.0}
    total = torch.zeros((), dtype=torch.float32, device=scores.device)
    for i in range(0, m, _ENTROPY_CHUNK):
        rows = scores[r[i:i + _ENTROPY_CHUNK], c[i:i + _ENTROPY_CHUNK]].float()
        logp = rows if is_logp else torch.log_softmax(rows, dim=-1)
        total += -(logp.exp() * logp).sum()
    return {sequence_entropy_key(source): float(total / m), sequence_tokens_key(source): float(m)}
