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
import itertools
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

from collapse_probe.capture.stats import (
    RecordMeans,
    decision_positions,
    means_of,
    position_stats_rows,
)
from collapse_probe.integrations.distributed import all_reduce_totals, capture_keys
from collapse_probe.schema import POSITIONS, VERL_ACTOR_PREFIX, Source, cp_count_key
from collapse_probe.tokens import resolve_control_tokens

__all__ = ["ATTR", "ActorCapture", "attach", "gen_mask_packed", "gen_mask_padded", "install"]

SOURCE = Source.ROLLOUT.value
ATTR = "collapse_probe_capture"   # the attribute holding an ActorCapture on verl's engine / actor object
_MARK = "__collapse_probe__"      # set on every wrapper: patching twice is a no-op


class ActorCapture:
    """Capture sums of one verl engine or actor over one update (every mini- and micro-batch of it)."""

    def __init__(self, role_ids: dict[str, int]):
        self.role_ids, self.means, self.forwards, self.active = role_ids, RecordMeans(), 0, False
        self.keys = capture_keys(role_ids, SOURCE, pressure=False)  # fixed: ranks without rows still all-reduce

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> ActorCapture | None:
        roles = resolve_control_tokens(tokenizer)
        if "tool_open" not in roles.ids:
            warnings.warn("collapse-probe: the actor's tokenizer has no tool-call opening token; no control-token "
                          "statistics are logged", stacklevel=2)
            return None
        return cls(roles.distinct_ids())

    def add(self, ids: torch.Tensor, gen: torch.Tensor, locate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            read: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """One forward: `ids`/`gen` [B, T] right-padded token ids and policy-token mask; `locate(r, c)` the row of
        each position in this rank's logits (-1: another rank's slice); `read(rows)` those logits [M, V], scaled."""
        pos = {}
        for kind, (r, c) in decision_positions(ids, gen, self.role_ids).items():
            keep = locate(r, c) >= 0  # this rank's slice only: another rank counts the rest
            pos[kind] = (r[keep], c[keep])
        stats = position_stats_rows(lambda r, c: read(locate(r, c)), ids, pos, self.role_ids, device=ids.device,
                                    source=SOURCE)
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


def _capture_of(obj: Any, tokenizer: Callable[[], Any]) -> ActorCapture | None:
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


def gen_mask_padded(input_ids: torch.Tensor, response_mask: torch.Tensor, attention_mask: torch.Tensor
                    ) -> torch.Tensor:
    """verl <= 0.7: the policy mask [B, S] of a left-right padded batch whose last R columns are the response."""
    gen = torch.zeros_like(input_ids, dtype=torch.bool)
    width = response_mask.shape[1]
    gen[:, -width:] = response_mask.bool() & attention_mask[:, -width:].bool()
    return gen


def _sp() -> tuple[int, int]:
    from verl.utils.ulysses import (
        get_ulysses_sequence_parallel_rank,
        get_ulysses_sequence_parallel_world_size,
    )

    return get_ulysses_sequence_parallel_rank(), get_ulysses_sequence_parallel_world_size()


def _slice_locator(flat_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], local_len: int, sliced: bool):
    """(r, c) -> row in this rank's logits: with ulysses (`sliced`), rank k holds the k-th `local_len` tokens of
    the (padded) global packed sequence; without it every row is here. -1 for a row on another rank."""
    rank, size = _sp() if sliced else (0, 1)
    start = rank * local_len if size > 1 else 0

    def locate(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        g = flat_of(r, c) - start
        return torch.where((g >= 0) & (g < local_len), g, torch.full_like(g, -1))
    return locate


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"collapse-probe: {msg}", stacklevel=3)


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
        _warn_once("fused", "use_fused_kernels=True computes log-probs without logits: no control-token statistics "
                   "(set actor_rollout_ref.model.use_fused_kernels=False to get them)")
        return
    if _is_dtensor(logits):
        _warn_once("dtensor", "vocabulary-sharded logits (tensor parallel) are not read: no statistics")
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
    with torch.no_grad():
        if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
            flat = logits.squeeze(0)                               # [nnz / sp + pad, V]
            temp = output_args["temperature_rmpad"].reshape(-1)   # per token, the same slice
            cu_d = cu.to(ids.device)
            locate = _slice_locator(lambda r, c: cu_d[r] + c, flat.shape[0], bool(engine.use_ulysses_sp))
            cap.add(ids, gen, locate, lambda rows: flat[rows].float() / temp[rows, None].float())
        else:
            width = logits.shape[1]
            temp = output_args["temperature"].reshape(-1)          # per sample
            locate = _slice_locator(lambda r, c: r * width + c, logits.shape[0] * width, False)
            cap.add(ids, gen, locate, lambda rows: logits.reshape(-1, logits.shape[-1])[rows].float()
                    / temp[rows // width, None].float())


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
            _warn_once("error", f"a micro-batch was not measured ({type(exc).__name__}: {exc})")
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
        cap = _capture_of(engine, _engine_tokenizer(engine)) if engine is not None else None
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
            _warn_once("error", f"a micro-batch was not measured ({type(exc).__name__}: {exc})")

    def measure(kwargs: dict, output: Any) -> None:
        logits = getattr(output, "logits", None)
        if logits is None or _is_dtensor(logits):
            _warn_once("fused", "the fused-kernel path returns log-probs without logits: no control-token "
                       "statistics (set actor_rollout_ref.model.use_fused_kernels=False to get them)")
            return
        ids, am = micro_batch["input_ids"], micro_batch["attention_mask"]
        gen = gen_mask_padded(ids, micro_batch["response_mask"], am)
        with torch.no_grad():
            if kwargs.get("attention_mask") is None and logits.shape[0] == 1:  # remove padding: packed tokens
                flat = logits.squeeze(0)
                index = torch.nonzero(am.reshape(-1), as_tuple=False).squeeze(-1)  # unpad_input's order
                width = ids.shape[1]

                def packed(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
                    at = torch.searchsorted(index, r * width + c).clamp(max=max(len(index) - 1, 0))
                    return torch.where(index[at] == r * width + c, at, torch.full_like(at, -10 ** 12))
                locate = _slice_locator(packed, flat.shape[0], sliced)
                cap.add(ids, gen, locate, lambda rows: flat[rows].float() / float(temperature))
            else:
                width = logits.shape[1]
                locate = _slice_locator(lambda r, c: r * width + c, logits.shape[0] * width, False)
                cap.add(ids, gen, locate,
                        lambda rows: logits.reshape(-1, logits.shape[-1])[rows].float() / float(temperature))
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
        cap = _capture_of(self, _actor_tokenizer(self))
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
