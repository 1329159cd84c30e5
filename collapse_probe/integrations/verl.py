"""collapse-probe inside verl's actor: control-token statistics from the logits of the policy-update forward.

Load it in every verl process (verl imports it in each worker as it imports itself):

    export VERL_USE_EXTERNAL_MODULES=collapse_probe.integrations.verl
    # or: actor_rollout_ref.model.external_lib=collapse_probe.integrations.verl

Importing this module patches verl's classes as their modules load (or at once when already loaded):
* verl >= 0.8 (engine workers): `FSDPEngineWithLMHead.prepare_model_outputs`, the engine's output preparation,
  where the logits of each micro-batch are in hand (remove-padding layout `[1, nnz / sp + pad, V]`, or padded
  `[B, T, V]`), and `TrainingWorker.train_mini_batch`, the actor update, which sums, all-reduces and adds them;
* verl <= 0.7: `DataParallelPPOActor._forward_micro_batch` (a forward hook on the actor module for the duration
  of the call: remove-padding, ulysses and padded paths) and `update_policy`.
Only forwards with gradients count (the update, never old/ref log-probs, which verl computes under no_grad); a
position counts only when the token after it is the policy's own (response mask 1: tool tokens are out). The
statistics are `capture.stats` at the decision positions, at the rollout temperature; the sums and counts are
all-reduced over every rank (verl's tracker only averages its workers' means), so the metrics verl logs, as
`actor/cp/rollout/{position}/{role}` (docs/verl.md), are the statistics of the whole update batch. The fused-kernel
path (`use_fused_kernels=True`) yields log-probs only: no statistics there (one warning).
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

import torch

from collapse_probe.integrations.verl_capture import (
    ATTR, ActorCapture, capture_of, gen_mask_packed, gen_mask_padded, is_dtensor, rollout_packed,
    rollout_padded, slice_locator, warn_once,
)
from collapse_probe.schema import VERL_ACTOR_PREFIX

_MARK = "__collapse_probe__"      # set on every wrapper: patching twice is a no-op

__all__ = ["install"]

# ------------------------------------------------------------------------------------------------ verl >= 0.8
def _engine_tokenizer(engine: Any) -> Callable[[], Any]:
    return lambda: engine.model_config.tokenizer


def _capture_engine(engine: Any, output: Any, output_args: dict, micro_batch: Any) -> None:
    from verl.utils import tensordict_utils as tu

    cap = getattr(engine, ATTR, None)
    if cap is None or not cap.active or not torch.is_grad_enabled():
        return
    logits = getattr(output, "logits", None)
    if logits is None or tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False):
        warn_once("fused", "use_fused_kernels=True computes log-probs without logits: no control-token statistics "
                   "(set actor_rollout_ref.model.use_fused_kernels=False to get them)")
        return
    if is_dtensor(logits):
        warn_once("dtensor", "vocabulary-sharded logits (tensor parallel) are not read: no statistics")
        return
    keys = set(micro_batch.keys())
    if "response_mask" not in keys:  # not an RL update (e.g. verl's SFT trainer on the same engine)
        return
    rm = micro_batch["response_mask"]
    resp = micro_batch["responses"] if "responses" in keys else None
    if resp is not None and resp.is_nested:
        rlens = resp.offsets().diff()
    elif rm.is_nested:
        rlens = rm.offsets().diff()
    else:  # padded prompts/responses: lengths from the attention mask, as no_padding_2_padding reads them
        rlens = micro_batch["attention_mask"][:, micro_batch["prompts"].shape[1]:].sum(1)
    ids, gen, cu = gen_mask_packed(micro_batch["input_ids"], rm, rlens)
    rollout = None
    if "rollout_log_probs" in keys:  # calculate_log_probs=true: the rollout engine's log-probs (mismatch keys)
        rollout = rollout_packed(micro_batch["rollout_log_probs"], cu.diff().tolist(), rlens.tolist(), ids.shape[1])
    with torch.no_grad():
        if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
            flat = logits.squeeze(0)                               # [nnz / sp + pad, V]
            temp = output_args["temperature_rmpad"].reshape(-1)   # per token, the same slice
            cu_d = cu.to(ids.device)
            locate = slice_locator(lambda r, c: cu_d[r] + c, flat.shape[0], bool(engine.use_ulysses_sp))
            cap.add(ids, gen, locate, lambda rows: flat[rows].float() / temp[rows, None].float(), rollout)
        else:
            width = logits.shape[1]
            temp = output_args["temperature"].reshape(-1)          # per sample
            locate = slice_locator(lambda r, c: r * width + c, logits.shape[0] * width, False)
            cap.add(ids, gen, locate, lambda rows: logits.reshape(-1, logits.shape[-1])[rows].float()
                    / temp[rows // width, None].float(), rollout)


def _patch_engine(mod: Any) -> None:
    cls = mod.FSDPEngineWithLMHead
    orig = cls.prepare_model_outputs
    if getattr(orig, _MARK, False):
        return

    @functools.wraps(orig)
    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        try:
            _capture_engine(self, output, output_args, micro_batch)  # before verl scales the logits in place
        except Exception as exc:  # noqa: BLE001 - a statistic is never worth a training run
            warn_once("error", f"a micro-batch was not measured ({type(exc).__name__}: {exc})")
        return orig(self, output, output_args, micro_batch, logits_processor_func)

    setattr(prepare_model_outputs, _MARK, True)
    cls.prepare_model_outputs = prepare_model_outputs


def _policy_engine(worker: Any) -> Any | None:
    """The worker's engine when it is a policy (LM head) engine: the critic's value head has no vocabulary."""
    engine = getattr(worker, "engine", None)
    mod = sys.modules.get("verl.workers.engine.fsdp.transformer_impl")
    if engine is None or mod is None or not isinstance(engine, mod.FSDPEngineWithLMHead) or \
            isinstance(engine, getattr(mod, "FSDPEngineWithValueHead", ())):
        return None
    return engine


def _patch_worker(mod: Any) -> None:
    cls = mod.TrainingWorker
    orig = cls.train_mini_batch
    if getattr(orig, _MARK, False):
        return

    @functools.wraps(orig)
    def train_mini_batch(self, data, *args, **kwargs):
        engine = _policy_engine(self)
        cap = capture_of(engine, _engine_tokenizer(engine)) if engine is not None else None
        if cap is None:
            return orig(self, data, *args, **kwargs)
        cap.active = True
        try:
            output = orig(self, data, *args, **kwargs)
        except BaseException:
            cap.drop()  # no collective here: the other ranks may be stuck elsewhere
            raise
        stats = cap.finish()  # every rank: a collective
        if output is not None:
            from verl.utils import tensordict_utils as tu

            metrics = dict(tu.get(output, "metrics") or {})
            metrics.update({k: [v] for k, v in stats.items()})  # verl prefixes "actor/" and averages the list
            tu.assign_non_tensor(output, metrics=metrics)
        return output

    setattr(train_mini_batch, _MARK, True)
    cls.train_mini_batch = train_mini_batch


# ------------------------------------------------------------------------------------------------ verl <= 0.7
def _actor_tokenizer(actor: Any) -> Callable[[], Any]:
    def load() -> Any:
        from transformers import AutoTokenizer

        module = actor.actor_module
        config = getattr(module, "config", None) or getattr(getattr(module, "module", None), "config", None)
        return AutoTokenizer.from_pretrained(config._name_or_path, local_files_only=True)
    return load


def _legacy_hook(cap: ActorCapture, micro_batch: dict, temperature: float, sliced: bool):
    def hook(module, args, kwargs, output) -> None:
        try:
            measure(kwargs, output)
        except Exception as exc:  # noqa: BLE001 - a statistic is never worth a training run
            warn_once("error", f"a micro-batch was not measured ({type(exc).__name__}: {exc})")

    def measure(kwargs: dict, output: Any) -> None:
        logits = getattr(output, "logits", None)
        if logits is None or is_dtensor(logits):
            warn_once("fused", "the fused-kernel path returns log-probs without logits: no control-token "
                       "statistics (set actor_rollout_ref.model.use_fused_kernels=False to get them)")
            return
        ids, am = micro_batch["input_ids"], micro_batch["attention_mask"]
        gen = gen_mask_padded(ids, micro_batch["response_mask"], am)
        rlp = micro_batch.get("rollout_log_probs") if hasattr(micro_batch, "get") else None
        rollout = rollout_padded(rlp, ids.shape[1]) if isinstance(rlp, torch.Tensor) else None
        with torch.no_grad():
            if kwargs.get("attention_mask") is None and logits.shape[0] == 1:  # remove padding: packed tokens
                flat = logits.squeeze(0)
                index = torch.nonzero(am.reshape(-1), as_tuple=False).squeeze(-1)  # unpad_input's order
                width = ids.shape[1]

                def packed(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
                    at = torch.searchsorted(index, r * width + c).clamp(max=max(len(index) - 1, 0))
                    return torch.where(index[at] == r * width + c, at, torch.full_like(at, -10 ** 12))
                locate = slice_locator(packed, flat.shape[0], sliced)
                cap.add(ids, gen, locate, lambda rows: flat[rows].float() / float(temperature), rollout)
            else:
                width = logits.shape[1]
                locate = slice_locator(lambda r, c: r * width + c, logits.shape[0] * width, False)
                cap.add(ids, gen, locate,
                        lambda rows: logits.reshape(-1, logits.shape[-1])[rows].float() / float(temperature), rollout)
    return hook


def _patch_legacy_actor(mod: Any) -> None:
    cls = mod.DataParallelPPOActor
    fwd, upd = cls._forward_micro_batch, cls.update_policy
    if getattr(fwd, _MARK, False):
        return

    @functools.wraps(fwd)
    def forward_micro_batch(self, micro_batch, temperature, *args, **kwargs):
        cap = getattr(self, ATTR, None)
        if cap is None or not cap.active or not torch.is_grad_enabled():
            return fwd(self, micro_batch, temperature, *args, **kwargs)
        hook = _legacy_hook(cap, micro_batch, temperature, bool(getattr(self, "use_ulysses_sp", False)))
        handle = self.actor_module.register_forward_hook(hook, with_kwargs=True)
        try:
            return fwd(self, micro_batch, temperature, *args, **kwargs)
        finally:
            handle.remove()

    @functools.wraps(upd)
    def update_policy(self, data, *args, **kwargs):
        cap = capture_of(self, _actor_tokenizer(self))
        if cap is None:
            return upd(self, data, *args, **kwargs)
        cap.active = True
        try:
            metrics = upd(self, data, *args, **kwargs)
        except BaseException:
            cap.drop()
            raise
        stats = cap.finish()
        metrics.update({VERL_ACTOR_PREFIX + k: v for k, v in stats.items()})  # the name verl >= 0.8 logs
        return metrics

    for f in (forward_micro_batch, update_policy):
        setattr(f, _MARK, True)
    cls._forward_micro_batch, cls.update_policy = forward_micro_batch, update_policy


# ------------------------------------------------------------------------------------------------ loading
_PATCHES: dict[str, Callable[[Any], None]] = {
    "verl.workers.engine.fsdp.transformer_impl": _patch_engine,
    "verl.workers.engine_workers": _patch_worker,
    "verl.workers.actor.dp_actor": _patch_legacy_actor,
}


_BUSY: set[str] = set()


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, patch: Callable[[Any], None]):
        self.inner, self.patch = inner, patch

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        self.patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Patches verl's modules right after they execute: importing verl's workers from inside `import verl`
    (where VERL_USE_EXTERNAL_MODULES is read) would be a circular import."""

    def find_spec(self, name, path=None, target=None):
        if name not in _PATCHES or name in _BUSY:
            return None
        _BUSY.add(name)
        try:
            spec = importlib.util.find_spec(name)  # the other finders' spec (this one steps aside meanwhile)
        finally:
            _BUSY.discard(name)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, _PATCHES[name])
        return spec


def install() -> None:
    """Patch the verl modules already imported and every one imported later (idempotent)."""
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
