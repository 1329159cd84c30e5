"""On-policy capture inside an HF `Trainer` or a TRL trainer, with no user code.

Callbacks never see the training logits, and TRL's GRPOTrainer never builds them: `add_fused_lm_head` makes every
log-prob forward run the backbone and project through the LM head in tiles. So `OnPolicyCapture.attach(trainer)`:

- wraps `trainer.compute_loss` (instance attribute) to read the batch it receives: the ids, which tokens are the
  policy's own (`completion_mask * tool_mask` for TRL; `labels != -100` for logits trainers) and the advantages;
- hooks the backbone (its `last_hidden_state`) and the model (its output): a fused output (`log_probs`, no logits)
  is scored as hidden rows x LM-head weight at the decision rows only, with TRL's transform (logit scale, softcap,
  / temperature); a logits output is read at the same rows / temperature;
- counts only forwards inside `compute_loss` with gradients on: the no-grad old-logprob, reference and eval
  forwards are skipped;
- reads the sampler's log-probs TRL hands `compute_loss` (`sampling_per_token_logps`, vLLM generation only; the
  trainer's `old_per_token_logps` when there) for the mismatch at the decision positions (capture/mismatch.py);
  without them `mismatch_status` says why (transformers generation has no separate sampler).

Sums are kept per optimizer step (`pop_totals()`); the callback adds them up across ranks before writing.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from collapse_probe.capture.mismatch import mismatch_stats
from collapse_probe.capture.stats import RecordMeans, decision_positions, position_stats_rows
from collapse_probe.errors import UserError
from collapse_probe.schema import Source
from collapse_probe.tokens import ControlTokens

logger = logging.getLogger(__name__)
_WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "FullyShardedDataParallel")


@dataclass
class _Batch:
    ids: torch.Tensor          # [B, T] prompt + completion (TRL) or input_ids
    own: torch.Tensor          # [B, T] 1 on the policy's own tokens
    advantages: torch.Tensor | None
    cursor: int = 0            # rows already scored (TRL may split the batch into chunks)
    # [B, T] aligned like the loss's log-probs (entry c: the token at c + 1): the sampler's (vLLM) log-probs and
    # the trainer's before the update, where TRL passes them; `known` [B, T] where the sampler's exists
    rollout_logp: torch.Tensor | None = None
    train_logp: torch.Tensor | None = None
    known: torch.Tensor | None = None
    sampler_missing: bool = False  # a TRL batch without sampling_per_token_logps


NO_SAMPLER = ("no sampler log-probs: TRL passes sampling_per_token_logps with vLLM generation only (transformers "
              "generation samples with the trained model itself)")


def unwrap_model(model: Any) -> Any:
    """The module inside DDP / DeepSpeed / FSDP wrappers, and the base model inside PEFT."""
    while model is not None and type(model).__name__ in _WRAPPERS and hasattr(model, "module"):
        model = model.module
    if model is not None and hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model


def is_fused(net: Any) -> bool:
    """Whether TRL's `add_fused_lm_head` replaced this model's forward (its code object keeps the name)."""
    fn = getattr(getattr(net, "forward", None), "__func__", None)
    return getattr(getattr(fn, "__code__", None), "co_name", "") == "_fused_forward"


def batch_of(inputs: Any) -> _Batch | None:
    """The ids, own-token mask and advantages in what `compute_loss` receives; None when there are no ids."""
    if not isinstance(inputs, dict):
        return None
    if "completion_ids" in inputs and "prompt_ids" in inputs:  # TRL GRPO / RLOO
        prompt, comp = inputs["prompt_ids"], inputs["completion_ids"]
        own = inputs["completion_mask"].long() if "completion_mask" in inputs else torch.ones_like(comp)
        if inputs.get("tool_mask") is not None:  # tool results are not the policy's tokens
            own = own * inputs["tool_mask"].long()
        ids = torch.cat([prompt, comp], dim=1)
        own = torch.cat([torch.zeros_like(prompt), own], dim=1)
        rollout = _aligned(inputs.get("sampling_per_token_logps"), prompt.shape[1], ids.shape[1], comp.shape)
        train = _aligned(inputs.get("old_per_token_logps"), prompt.shape[1], ids.shape[1], comp.shape)
        known = None
        if rollout is not None:
            known = torch.zeros_like(own, dtype=torch.bool)
            known[:, :-1] = own[:, 1:].bool()
    elif isinstance(inputs.get("input_ids"), torch.Tensor):
        ids = inputs["input_ids"]
        labels, attn = inputs.get("labels"), inputs.get("attention_mask")
        own = (labels != -100).long() if isinstance(labels, torch.Tensor) and labels.shape == ids.shape \
            else torch.ones_like(ids)
        if isinstance(inputs.get("completion_mask"), torch.Tensor) and inputs["completion_mask"].shape == ids.shape:
            own = own * inputs["completion_mask"].long()  # SFTTrainer's completion-only loss
        if isinstance(attn, torch.Tensor) and attn.shape == ids.shape:
            own = own * attn.long()
    else:
        return None
    adv = inputs.get("advantages")
    if isinstance(adv, torch.Tensor):
        adv = adv.detach().reshape(adv.shape[0], -1)[:, 0] if adv.dim() == 2 and adv.shape[1] == 1 else adv.detach()
        adv = adv if adv.dim() == 1 and adv.shape[0] == ids.shape[0] else None
    else:
        adv = None
    if "completion_ids" in inputs and "prompt_ids" in inputs:
        return _Batch(ids.detach(), own.detach(), adv, rollout_logp=rollout, train_logp=train, known=known,
                      sampler_missing=rollout is None)
    return _Batch(ids.detach(), own.detach(), adv)


def _aligned(x: Any, prompt_len: int, width: int, shape: torch.Size) -> torch.Tensor | None:
    """Completion-aligned per-token log-probs [B, C] placed at the positions that predict them in the
    prompt + completion ids [B, T] (entry P - 1 + j predicts completion token j); None when absent."""
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(shape):
        return None
    out = torch.zeros((shape[0], width), dtype=torch.float32, device=x.device)
    out[:, prompt_len - 1:prompt_len - 1 + shape[1]] = x.detach().float()
    return out


def head_transform(config: Any, temperature: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """TRL's logits transform for this model: x logit scale, softcap, / temperature (read the same config keys)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if getattr(text, "model_type", "") == "hyperclovax" else 1 / text.logits_scaling
    scale = 1.0 if scale is None else float(scale)
    cap = getattr(text, "final_logit_softcapping", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        x = logits.float() * scale
        if cap:
            x = cap * torch.tanh(x / cap)
        return x / temperature
    return transform


def _gathered_head(head: torch.nn.Module):
    """The full LM-head weight and bias, gathered when sharded. Every rank enters this for every training
    forward, rows or not: the gathers are collectives (ZeRO-3 via TRL's helper, FSDP2 DTensors)."""
    weight, bias = head.weight, getattr(head, "bias", None)
    if type(weight).__name__ == "DTensor":
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
        ctx = maybe_gather_lm_head_ctx(weight, bias)
    except ImportError:
        ctx = contextlib.nullcontext()
    return weight, bias, ctx


class OnPolicyCapture:
    """Control-token statistics of the training forward, at the sampling temperature, per optimizer step."""

    def __init__(self, roles: ControlTokens, *, source: str = Source.ROLLOUT.value):
        if "tool_open" not in roles.ids:
            raise UserError("no tool-call opening token resolved: pass token_overrides={'tool_open': '<tag>'}")
        self.role_ids = roles.distinct_ids()
        self.source = source
        self.temperature = 1.0
        self._means = RecordMeans()
        self._handles: list = []
        self._trainer: Any = None
        self._batch: _Batch | None = None
        self._hidden: torch.Tensor | None = None
        self._warned: set[str] = set()
        self.mismatch_status: str | None = None  # why no mismatch keys (None: measured, or not a TRL batch)
        self.forwards = 0  # training forwards scored (tests and the bench read it)
        self.skipped = 0   # forwards inside compute_loss that were not scored (no grad, or not this batch)

    def attach(self, trainer: Any, model: Any = None) -> "OnPolicyCapture":
        net = unwrap_model(model if model is not None else getattr(trainer, "model", None))
        if not isinstance(net, torch.nn.Module):
            raise UserError(f"no model to hook (got {type(net).__name__})")
        head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
        backbone = getattr(net, "base_model", None)
        self.fused = is_fused(net)
        if self.fused and (head is None or getattr(head, "weight", None) is None or backbone in (None, net)):
            raise UserError(f"{type(net).__name__}: no LM head or backbone found for the fused-head capture")
        temp = getattr(trainer, "temperature", None)
        if temp is None:
            temp = getattr(getattr(trainer, "args", None), "temperature", None)
        self.temperature = float(temp) if isinstance(temp, (int, float)) and temp > 0 else 1.0
        self._net, self._head = net, head
        self._transform = head_transform(net.config, self.temperature) if hasattr(net, "config") else \
            (lambda x: x.float() / self.temperature)
        if self.fused:
            self._handles.append(backbone.register_forward_hook(self._on_backbone))
        self._handles.append(net.register_forward_hook(self._on_model))
        original = trainer.compute_loss
        self._own_attr = "compute_loss" in vars(trainer)  # a user's instance-level override is put back as is

        def compute_loss(model, inputs, *args, **kwargs):  # the trainer's own, with the batch in view
            self._arm(inputs)
            try:
                return original(model, inputs, *args, **kwargs)
            finally:
                self._batch, self._hidden = None, None
        trainer.compute_loss = compute_loss
        self._trainer, self._original = trainer, original
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._trainer is not None:
            if self._own_attr:
                self._trainer.compute_loss = self._original
            else:
                del self._trainer.compute_loss  # back to the class's method
        self._trainer = None

    def pop_totals(self) -> tuple[dict[str, float], dict[str, float]]:
        """(weighted sums, weights) since the last call; `stats.means_of` turns them into the record's means."""
        return self._means.pop_totals()

    # ------------------------------------------------------------------ hooks

    def _arm(self, inputs: Any) -> None:
        try:
            self._batch = batch_of(inputs)
        except Exception as e:  # never into the training loop
            self._batch = None
            self._warn("batch", f"could not read the batch ({type(e).__name__}: {e})")

    def _on_backbone(self, module, args, output) -> None:
        if self._batch is not None and torch.is_grad_enabled():
            hidden = getattr(output, "last_hidden_state", None)
            self._hidden = hidden if isinstance(hidden, torch.Tensor) else \
                (output[0] if isinstance(output, (tuple, list)) else None)

    def _on_model(self, module, args, output) -> None:
        batch, hidden, self._hidden = self._batch, self._hidden, None
        if batch is None:
            return
        if not torch.is_grad_enabled():
            self.skipped += 1  # e.g. an old-logprob forward on the same batch
            return
        try:
            logits = getattr(output, "logits", None)
            if isinstance(logits, torch.Tensor) and logits.dim() == 3:
                scores, n = logits, logits.shape[0]
            elif self.fused and isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
                scores, n = None, hidden.shape[0]
            else:
                self.skipped += 1
                return
            start = batch.cursor
            if start + n > batch.ids.shape[0]:
                self.skipped += 1
                return
            batch.cursor += n
            ids, own = batch.ids[start:start + n], batch.own[start:start + n]
            adv = batch.advantages[start:start + n] if batch.advantages is not None else None
            sampler = None if batch.rollout_logp is None else tuple(
                x[start:start + n] if x is not None else None
                for x in (batch.rollout_logp, batch.train_logp, batch.known))
            self.mismatch_status = NO_SAMPLER if batch.sampler_missing else None
            if scores is not None:
                self._score_logits(scores.detach(), ids, own, adv, sampler)
            else:
                self._score_hidden(hidden.detach(), ids, own, adv, sampler)
            self.forwards += 1
        except Exception as e:
            self._warn("hook", f"on-policy capture failed ({type(e).__name__}: {e})")

    # ------------------------------------------------------------------ scoring

    def _mismatch(self, read, ids: torch.Tensor, pos, sampler, dev: torch.device) -> None:
        """The mismatch keys of this forward's rows, from the sampler's and (when TRL passed them) the trainer's
        old log-probs; the trainer's log-prob of each decision row's token is read from the same rows otherwise."""
        if sampler is None:
            return
        rollout, train, known = (x.to(dev) if x is not None else None for x in sampler)
        rec = mismatch_stats(ids, pos, self.role_ids, logp_rollout=rollout, known=known, logp_train=train,
                             scores=read, is_logp=False)
        self._means.add(rec, self.source)

    def _score_hidden(self, hidden: torch.Tensor, ids: torch.Tensor, own: torch.Tensor, adv, sampler=None) -> None:
        dev = hidden.device
        weight, bias, ctx = _gathered_head(self._head)  # entered on every rank, with or without rows
        with ctx, torch.no_grad():
            w = weight.detach()
            b = bias.detach() if bias is not None else None
            ids, own = ids.to(dev), own.to(dev)
            if hidden.shape[1] != ids.shape[1]:
                raise UserError(f"hidden states {tuple(hidden.shape)} do not match the batch {tuple(ids.shape)}")
            pos = decision_positions(ids, own, self.role_ids)

            def read(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
                h = hidden[r, c].to(w.device, w.dtype)
                return self._transform(torch.nn.functional.linear(h, w, b))
            rec = position_stats_rows(read, ids, pos, self.role_ids, device=dev, source=self.source,
                                      advantages=adv.to(dev) if adv is not None else None)
            self._mismatch(read, ids, pos, sampler, dev)
        self._means.add(rec, self.source)

    def _score_logits(self, logits: torch.Tensor, ids: torch.Tensor, own: torch.Tensor, adv, sampler=None) -> None:
        dev = logits.device
        offset = ids.shape[1] - logits.shape[1]  # older TRL keeps only the last logits_to_keep + 1 positions
        if offset < 0:
            raise UserError(f"logits {tuple(logits.shape)} are longer than the batch {tuple(ids.shape)}")
        with torch.no_grad():
            ids, own = ids.to(dev), own.to(dev)
            pos = decision_positions(ids, own, self.role_ids)
            pos = {k: (r[c >= offset], c[c >= offset]) for k, (r, c) in pos.items()}
            rec = position_stats_rows(lambda r, c: self._transform(logits[r, c - offset]), ids, pos, self.role_ids,
                                      device=dev, source=self.source,
                                      advantages=adv.to(dev) if adv is not None else None)
            self._mismatch(lambda r, c: self._transform(logits[r, c - offset]), ids, pos, sampler, dev)
        self._means.add(rec, self.source)

    def _warn(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("collapse-probe: %s; training goes on without on-policy numbers", msg)
