"""CollapseProbeCallback: control-token probes and format-state mix for an HF `Trainer` or a TRL trainer.

On-policy numbers (`cp/rollout/...`, `gp/...`) come from the training forward itself (integrations/trl.py: hidden
states x LM head at the decision rows for TRL's fused head, the logits otherwise), summed over ranks each step.
The callback also measures a fixed probe set (`cp/probe/...`, see capture/probe_set.py) every `every` steps,
at the policy's temperature, puts its keys into the Trainer's logs (it runs first, so W&B / TensorBoard / trackio
see them), feeds each step to the collapse monitor (integrations/actions.py), and merges the Trainer's own logs of that step (loss, reward, entropy,
grad_norm, ... under the Trainer's key names) into one record per step, and adds the format-state mix (`fmt/...`)
of the completions TRL logs with `log_completions=True`. Records go to `OUTPUT_DIR/collapse_probe/metrics.jsonl`
(docs/DESIGN.md), readable by every collapse-probe command. A probe error never stops training: it is logged once.

    from collapse_probe import CollapseProbeCallback
    trainer = GRPOTrainer(..., callbacks=[CollapseProbeCallback(every=10)])
    trainer.train()   # meanwhile or after: collapse-probe watch OUTPUT_DIR / analyze OUTPUT_DIR
"""

from __future__ import annotations

import functools
import json
import logging
import numbers
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from collapse_probe.capture.probe_set import ProbeSet
from collapse_probe.capture.stats import means_of
from collapse_probe.errors import UserError
from collapse_probe.formats import registry
from collapse_probe.formats.classify import FormatSpec, StateMix, classify_turn
from collapse_probe.integrations import distributed
from collapse_probe.integrations.actions import Actions
from collapse_probe.integrations.trl import OnPolicyCapture, unwrap_model
from collapse_probe.runs.rollout_files import load_turns
from collapse_probe.runs.runlog import RunLog
from collapse_probe.schema import (MISMATCH_PREFIX, MM_STATUS, PROBE_TIME, STATES, STEP, TIME, add_aliases,
                                   finite_or_none, parse_cp_key, parse_gp_key, state_key)
from collapse_probe.tokens import ControlTokens, resolve_control_tokens

logger = logging.getLogger(__name__)

class CollapseProbeCallback(TrainerCallback):
    """Probe control-token probabilities every `every` steps and log them with the Trainer's metrics.

    Args:
        tokenizer: the policy's tokenizer; default: the `processing_class` (or `tokenizer`) the Trainer passes.
        probe_set: the contexts to score; default: `probe_messages` when given, else the embedded tool world when
            the tokenizer has its tokens (`<|im_start|>`, `<|im_end|>`, `<tool_call>`, ...).
        probe_messages: chat conversations (lists of {"role", "content"[, "tool_calls"]}) to build the probe
            set from with the tokenizer's chat template.
        every: probe every this many optimizer steps (also at step 0 and at the end of training).
        out_dir: where config.json and metrics.jsonl go; default `args.output_dir/collapse_probe/`.
        token_overrides: role -> string for control tokens auto-detection misses (e.g. {"tool_open": "<call>"}).
        format_spec: a `collapse_probe.formats.classify.FormatSpec` or preset name for classifying TRL completions.
        on_policy: capture `cp/rollout/...` and `gp/...` from the training forward (no user code needed).
        on_warning: "log" (default) or "checkpoint": save a checkpoint at the step the first warning fires.
        on_collapse: "log" (default) or "stop": end training at the step the collapse rule is met.
        report: put our keys into the Trainer's logs (its dashboards), not only into metrics.jsonl.
    """

    def __init__(self, tokenizer: Any = None, probe_set: ProbeSet | None = None,
                 probe_messages: list[list[dict]] | None = None, every: int = 10, out_dir: str | None = None,
                 token_overrides: dict[str, str] | None = None, format_spec: Any = None, on_policy: bool = True,
                 on_warning: str = "log", on_collapse: str = "log", report: bool = True):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UserError(f"every={every!r}: pass a whole number of steps >= 1")
        if probe_messages is not None and (not isinstance(probe_messages, list)
                                           or not all(isinstance(c, list) for c in probe_messages)):
            raise UserError("probe_messages must be a list of conversations, each a list of message dicts")
        if probe_set is not None and not isinstance(probe_set, ProbeSet):
            raise UserError(f"probe_set must be a collapse_probe ProbeSet, got {type(probe_set).__name__}")
        self.tokenizer, self.probe_set, self.probe_messages = tokenizer, probe_set, probe_messages
        self.every, self.out_dir, self.token_overrides = every, out_dir, dict(token_overrides or {})
        self.format_spec = format_spec
        self.on_policy, self.report = bool(on_policy), bool(report)
        self.on_warning, self.on_collapse = on_warning, on_collapse
        Actions(on_warning, on_collapse)  # a bad choice is the user's to fix now
        self.roles: ControlTokens | None = None
        if tokenizer is not None and self.token_overrides:  # a bad override is the user's to fix now
            self.roles = resolve_control_tokens(_text_tokenizer(tokenizer), self.token_overrides)
        self._reset()

    def _reset(self) -> None:
        self._log: RunLog | None = None
        self._pending: dict | None = None
        self._last: dict | None = None
        self._probed: int | None = None
        self._output_dir: Path | None = None
        self._spec: Any = None
        self._warned: set[str] = set()
        self._is_main = True
        self._running = False
        self._capture: OnPolicyCapture | None = None
        self._actions = Actions(self.on_warning, self.on_collapse)
        self._judged: int | None = None
        self._temperature = 1.0

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._guard("setup", self._setup, args, state, model, kwargs)
        trainer = _find_trainer(self)
        if trainer is not None:
            self._guard("report", _run_first, self, trainer)
            if self.on_policy and self.roles is not None:
                self._guard("on-policy setup", self._attach, trainer, model)
        if state.global_step == 0:  # a resumed run already has a record for its first step
            self._guard("probe", self._probe, state.global_step, model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self._capture is not None:  # every rank: the sums are reduced collectively
            self._guard("on-policy", self._collect, state.global_step)
        if state.global_step % self.every == 0:
            self._guard("probe", self._probe, state.global_step, model)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and self._is_main:
            self._guard("log", self._merge, state.global_step, _trainer_metrics(logs))
            if not self._running:  # e.g. trainer.evaluate() after train(): the step's record is rewritten whole
                self._guard("write", self._flush)
        if self._running and self._judged != state.global_step:  # once per step (not the summary log)
            self._judged = state.global_step
            self._guard("monitor", self._judge, control)
            if logs is not None and self.report and self._pending is not None:
                self._guard("report", _report, logs, self._pending)  # ahead of the reporters: they log ours too

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self._probed != state.global_step:
            self._guard("probe", self._probe, state.global_step, model)
        self._guard("write", self._flush)
        self._running = False  # the log stays open for metrics logged after training (evaluate)
        if self._capture is not None:
            self._capture.detach()
            self._capture = None

    # ------------------------------------------------------------------ on-policy, actions

    def _attach(self, trainer: Any, model: Any) -> None:
        cap = OnPolicyCapture(self.roles)
        cap.attach(trainer, model)
        self._capture, self._temperature = cap, cap.temperature
        self._keys = distributed.capture_keys(cap.role_ids, cap.source, pressure=True) + \
            distributed.mismatch_keys(cap.role_ids)

    def _collect(self, step: int) -> None:
        sums, weights = distributed.all_reduce_totals(*self._capture.pop_totals(), self._keys)
        ours = means_of(sums, weights)
        if ours and self._capture.mismatch_status and not any(k.startswith(MISMATCH_PREFIX) for k in ours):
            ours[MM_STATUS] = self._capture.mismatch_status  # say why the record has no mismatch keys
        if self._is_main and ours:
            self._merge(step, ours)

    def _judge(self, control: Any) -> None:
        """Feed the step's record to the monitor; rank 0's decisions are broadcast so every rank acts alike."""
        decision = None
        if self._is_main and self._pending is not None:
            decision = self._actions.decide(self._pending)
            self._pending.update(decision.keys)
        flags = [bool(decision and decision.save), bool(decision and decision.stop)]
        if distributed.world_size() > 1:
            flags = distributed.broadcast_flags(flags)
        if flags[0]:
            control.should_save = True
        if flags[1]:
            control.should_training_stop = True

    # ------------------------------------------------------------------ work

    def _setup(self, args, state, model, kwargs) -> None:
        if self._log is not None:
            self._log.close()
        self._reset()
        self._running = True
        self._is_main = bool(getattr(state, "is_world_process_zero", True))
        self._output_dir = Path(args.output_dir)
        out = Path(self.out_dir) if self.out_dir else self._output_dir / "collapse_probe"
        tok = self.tokenizer if self.tokenizer is not None else \
            kwargs.get("processing_class") or kwargs.get("tokenizer")
        tok = _text_tokenizer(tok) if tok is not None else None
        origin = "user" if self.probe_set is not None else None
        try:
            if self.probe_set is None:
                if tok is None:
                    raise UserError("no tokenizer: pass CollapseProbeCallback(tokenizer=...) or give the Trainer a "
                                    "processing_class")
                self.roles = self.roles or resolve_control_tokens(tok, self.token_overrides)
                self.probe_set, origin = _default_probe_set(tok, self.roles, self.probe_messages)
            self.roles = self.probe_set.roles
        finally:  # the trainer's metrics are still logged when the probe set cannot be built
            if self._is_main:
                self._log = RunLog(out, rank=0)
                config = {"source": "callback", "trainer": _trainer_name(self, args),
                          "args_class": type(args).__name__, "output_dir": str(self._output_dir),
                          "every": self.every, "probe_set": origin,
                          "probe_sequences": len(self.probe_set.seqs) if self.probe_set is not None else 0,
                          "model": getattr(getattr(unwrap_model(model), "config", None), "_name_or_path", None),
                          "on_warning": self.on_warning, "on_collapse": self.on_collapse,
                          "roles": self.roles.to_dict() if self.roles is not None else None,
                          "started": time.time()}
                (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")

    def _probe(self, step: int, model) -> None:
        self._probed = step
        if self.probe_set is None or model is None:
            return
        # Every rank scores (a sharded model needs all of them in the forward); only the main one writes.
        net = unwrap_model(model)
        was_training = net.training
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                stats = self.probe_set.score(net, temperature=self._temperature)
        finally:
            net.train(was_training)
        if self._is_main:
            self._merge(step, {**stats, PROBE_TIME: time.perf_counter() - t0})

    def _merge(self, step: int, rec: dict) -> None:
        if not self._is_main:
            return
        if self._pending is not None and self._pending[STEP] != step:
            self._flush()
        if self._pending is None:  # re-open the step just written: its record is replaced, not split
            self._pending = dict(self._last) if self._last and self._last[STEP] == step else {STEP: step}
        self._pending.update(rec)

    def _flush(self) -> None:
        rec, self._pending = self._pending, None
        if rec is None or self._log is None:
            return
        self._guard("completions", self._add_formats, rec)
        rec[TIME] = time.time()
        self._last = rec
        self._log.append(rec)

    def _add_formats(self, rec: dict) -> None:
        """fmt/* of the completions TRL logged for this step (GRPOTrainer with log_completions=True)."""
        if self._output_dir is None or any(state_key(s) in rec for s in STATES):
            return
        f = self._output_dir / "completions" / f"completions_{rec[STEP]:05d}.parquet"
        if not f.is_file():
            return
        if self._spec is None:
            spec = self.format_spec
            self._spec = registry.format_spec(spec) if isinstance(spec, str) else spec or FormatSpec()
        mix = StateMix()
        for turn in load_turns(f, self._spec):
            mix.add(classify_turn(turn["text"], self._spec))
        if mix.total:
            rec.update(mix.metrics())

    def _guard(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # never crash the user's training
            if what not in self._warned:
                self._warned.add(what)
                logger.warning("collapse-probe callback: %s failed (%s: %s); training goes on, further %s "
                               "errors are not reported", what, type(e).__name__, e, what)


# ---------------------------------------------------------------------- helpers

def _text_tokenizer(tok: Any) -> Any:
    """The text tokenizer inside a multimodal processor, else the tokenizer itself."""
    return getattr(tok, "tokenizer", None) or tok


_WORLD_TOKENS = ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")


def _default_probe_set(tok: Any, roles: ControlTokens, messages: list[list[dict]] | None) -> tuple[ProbeSet, str]:
    from collapse_probe.tokens import single_token_id

    if messages:
        return ProbeSet.from_messages(tok, messages, roles=roles), "messages"
    missing = [s for s in _WORLD_TOKENS if single_token_id(tok, s) is None]
    if missing:
        raise UserError(f"the tokenizer lacks the tool world's tokens {missing}: pass probe_messages=[...] "
                        "(chat conversations with tool calls in your model's format) or probe_set=")
    return ProbeSet.from_world(tok, roles=roles), "world"


def _find_trainer(cb: TrainerCallback) -> Any:
    """The Trainer running this callback, found on the call stack (the object whose handler holds `cb`)."""
    import inspect

    frame = inspect.currentframe()
    try:
        for _ in range(12):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                break
            obj = frame.f_locals.get("self")
            handler = getattr(obj, "callback_handler", None)
            if handler is not None and cb in getattr(handler, "callbacks", ()):
                return obj
    finally:
        del frame
    return None


def _run_first(cb: TrainerCallback, trainer: Any) -> None:
    """Move `cb` to the front of the Trainer's callbacks, ahead of the reporters (their `on_log` then sees our
    keys). Safe while the handler iterates its list: the callbacks after `cb` keep their places."""
    callbacks = trainer.callback_handler.callbacks
    callbacks.remove(cb)
    callbacks.insert(0, cb)


@functools.lru_cache(maxsize=4096)
def _ours(key: str) -> bool:
    """A `cp/`, `gp/` or `mm/` key (parsed once per key: every step repeats the same few hundred)."""
    return bool(parse_cp_key(key) or parse_gp_key(key)) or key.startswith(MISMATCH_PREFIX)


def _report(logs: dict, record: dict) -> None:
    """Our finite numeric `cp/` and `gp/` keys of the step into the Trainer's logs dict."""
    for k, v in record.items():
        if k not in logs and _ours(k) and finite_or_none(v) is not None:
            logs[k] = v


def _trainer_name(cb: TrainerCallback, args: Any) -> str:
    """The class of the Trainer running this callback, else guessed from args."""
    trainer = _find_trainer(cb)
    if trainer is not None:
        return type(trainer).__name__
    name = type(args).__name__
    return name[:-len("Config")] + "Trainer" if name.endswith("Config") else "Trainer"


def _number(v: Any) -> float | int | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if hasattr(v, "item") and getattr(v, "size", 0) == 1:  # numpy scalar
        return _number(v.item())
    return None


def _trainer_metrics(logs: dict) -> dict:
    """The Trainer's numeric logs under their own names, plus DESIGN.md aliases where the meaning is plain."""
    out = {}
    for k, v in logs.items():
        if k in (STEP, TIME):
            continue
        x = _number(v)
        if x is not None:
            out[str(k)] = x
    return add_aliases(out)
