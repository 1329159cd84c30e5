"""The collapse monitor: one definition of "collapsed", fed one record at a time.

`watch` feeds it live; `analyze`, `report`, `demo` and `recover` replay a run's records through it (`replay`), so
every command reaches the same verdict by construction. Per record it updates
* one control-token spike detector per role at one decision position (`cp/{source}/{position}/{role}`): a role
  rising sharply from a low baseline, and the healthy continuation (`json_open`) falling;
* one drift detector (detect/drift.py) per role there but `json_open`: the slow, steady rise of end-of-turn, the
  tag again or a newline where the call's `{"` belongs, seen from the first steps; and one on the open tag at
  turn start falling (the agent stops calling tools);
* format breakage: the broken-turn fraction fmt/full_collapse + fmt/text_pollution rising (1 - format_valid when
  the state mix is not logged);
* the reward drop on `success` (or `reward/mean`), and the collapse itself, by `detect.rule.CollapseRule`;
* the peer baselines (entropy drop, in-group reward-variance collapse, grad-norm spike, validity drop), so that
  their lead can be compared with ours.
Lead times count from the step at which an alert is available (`detected_at`); the back-dated onset is shown too.
Memory is constant in the run's length: one small detector per monitored key.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from collapse_probe import schema
from collapse_probe.detect.drift import DRIFT_DEFAULTS, FALL_DEFAULTS, DriftDetector
from collapse_probe.detect.event import Event
from collapse_probe.detect.grad_norm import GradNormSpikeDetector
from collapse_probe.detect.mismatch import KIND as MISMATCH_KIND, MismatchRiseDetector, mismatch_value
from collapse_probe.detect.peak import PeakFractionDetector, RewardVarianceCollapseDetector, ValidityDropDetector
from collapse_probe.detect.rule import DEFAULT_RULE, CollapseRule
from collapse_probe.detect.shift import FirstValueShiftDetector
from collapse_probe.detect.spike import (
    BREAKAGE_DEFAULTS, CONTROL_SPIKE_DEFAULTS, EntropyDropDetector, OnlineSpikeDetector,
)
from collapse_probe.detect.verdict import WARNING_KINDS, Verdict

__all__ = ["CollapseMonitor", "replay", "BASELINES", "WARNING_KINDS"]

FALLING_ROLES = ("json_open",)  # healthy continuations: their fall is the alarm, their rise is not
# (position, role) whose steady fall is a symptom: the open tag at turn start (the agent stops calling tools)
FALLING_DRIFTS = ((schema.Position.TURN_START.value, "tool_open"),)
BREAKAGE_KEY = "+".join(schema.state_key(s) for s in schema.BROKEN_STATES)
# name -> (detector class, metric key)
BASELINES = {
    "entropy_drop": (EntropyDropDetector, schema.ENTROPY),
    "reward_var_collapse": (RewardVarianceCollapseDetector, schema.REWARD_GROUP_STD),
    "grad_norm_spike": (GradNormSpikeDetector, schema.GRAD_NORM),
    "validity_drop": (ValidityDropDetector, schema.FORMAT_VALID),
    # the training-inference mismatch (ours, verl's rollout_corr/k3_kl, TRL's sampling/*, ...): detect/mismatch.py
    MISMATCH_KIND: (MismatchRiseDetector, schema.MM_K3_KL),
}


def _num(v: object) -> float | None:
    """schema.finite_or_none, with a fast path for the usual case (a float already)."""
    if type(v) is float:
        return v if v - v == 0.0 else None
    return None if v is None else schema.finite_or_none(v)  # None: a key the record lacks (most lookups)


def broken_fraction(record: Mapping) -> float | None:
    """fmt/full_collapse + fmt/text_pollution, or 1 - format_valid when the state mix was not logged."""
    parts = [_num(record.get(schema.state_key(s))) for s in schema.BROKEN_STATES]
    if any(p is not None for p in parts):
        return sum(p for p in parts if p is not None)
    valid = _num(record.get(schema.FORMAT_VALID))
    return None if valid is None else 1.0 - valid


def metric_value(record: Mapping, name: str) -> float | None:
    """`record[name]`, or the first finite value under another trainer's name for it (schema.METRIC_ALIASES)."""
    for key in schema.metric_keys(name):
        v = _num(record.get(key))
        if v is not None:
            return v
    return None


def success_value(record: Mapping) -> float | None:
    s = metric_value(record, schema.SUCCESS)
    return s if s is not None else metric_value(record, schema.REWARD_MEAN)


class CollapseMonitor:
    """Streaming verdict: feed records in step order with `update(record)`; `verdict()` at any time.

    `checkpoints=True` is for sparse, noise-free probe scores of saved checkpoints: a control-token spike is
    then a move of `spike_settings["min_shift"]` (default 1.0) log-odds from the first checkpoint's value.
    A record whose step is not after the last one is ignored.
    """

    def __init__(self, *, source: str = schema.Source.ROLLOUT.value,
                 position: str = schema.Position.AFTER_OPEN.value, rule: CollapseRule = DEFAULT_RULE,
                 falling_roles: tuple[str, ...] = FALLING_ROLES, spike_settings: Mapping | None = None,
                 breakage_settings: Mapping | None = None,
                 baseline_settings: Mapping[str, Mapping] | None = None, checkpoints: bool = False,
                 drift_settings: Mapping | None = None):
        self.source, self.position, self.rule = str(source), str(position), rule
        self.falling_roles, self.checkpoints = tuple(falling_roles), checkpoints
        self.spike_settings = dict(spike_settings or {})
        self.drift_settings = dict(drift_settings or {})
        self.breakage = OnlineSpikeDetector(kind="format_breakage", key=BREAKAGE_KEY,
                                            **{**BREAKAGE_DEFAULTS, **(breakage_settings or {})})
        self.reward = PeakFractionDetector(kind="reward_drop", key=schema.SUCCESS, frac=rule.drop_frac,
                                           persistence=rule.drop_persistence, smooth=rule.drop_smooth,
                                           min_history=1, min_peak=rule.min_peak, min_drop=rule.min_drop)
        self.baselines = {name: cls(key=key, **(baseline_settings or {}).get(name, {}))
                          for name, (cls, key) in BASELINES.items()}
        self.spikes: dict[tuple[str, str], object] = {}
        self._plan: dict[str, tuple] = {}  # record key -> the detectors it feeds (parsed once per key, not per step)
        self.logged: set[str] = set()
        self.structure_logged = False      # any control-token or format value seen (else a drop is unconfirmed)
        self.events: list[Event] = []
        self.last_alerts: list[Event] = []
        self.last_step: int | None = None
        self.collapsed = False
        self.collapse_reason: str | None = None
        self.confirmed_at: int | None = None

    # ---- detectors -----------------------------------------------------------------------------
    def _spike(self, key: str, role: str, direction: str):
        if (key, direction) not in self.spikes:
            fixed = dict(key=key, role=role, position=self.position, direction=direction)
            if self.checkpoints:
                kw = {k: v for k, v in self.spike_settings.items() if k in ("min_shift", "min_value")}
                det = FirstValueShiftDetector(**fixed, **kw)
            else:
                base = dict(CONTROL_SPIKE_DEFAULTS) if direction == "up" else \
                    {"abs_threshold": None, "abs_baseline": None, "min_value": None}
                det = OnlineSpikeDetector(**fixed, **{**base, **self.spike_settings})
            self.spikes[(key, direction)] = det
        return self.spikes[(key, direction)]

    def _detectors(self, key: str) -> tuple:
        """The detectors a record key feeds, in feeding order (empty for keys the monitor does not read)."""
        ck = schema.parse_cp_key(key)
        if ck is None or not ck.is_role or ck.source != self.source:
            return ()
        dets: list = []
        if ck.position == self.position:
            direction = "down" if ck.stat in self.falling_roles else "up"
            dets.append(self._spike(key, ck.stat, direction))
            if direction == "up" and not self.checkpoints:
                dets.append(DriftDetector(key=key, role=ck.stat, position=ck.position, direction="up",
                                          **{**DRIFT_DEFAULTS, **self.drift_settings}))
        if (ck.position, ck.stat) in FALLING_DRIFTS and not self.checkpoints:
            dets.append(DriftDetector(key=key, role=ck.stat, position=ck.position, direction="down",
                                      **{**FALL_DEFAULTS, **self.drift_settings}))
        return (True, *dets)  # the leading flag: a control-token key of this source (structure data)

    def update(self, record: Mapping) -> list[Event]:
        """Feed one record; returns the alerts raised at this step (empty when quiet or already seen)."""
        try:
            step = int(record[schema.STEP])
        except (KeyError, TypeError, ValueError, OverflowError):
            return []
        if self.last_step is not None and step <= self.last_step:
            return []
        self.last_step = step
        new: list[Event] = []

        def feed(det, value) -> None:
            if value is not None:
                self.logged.add(det.key)
                ev = det.update(step, value)
                if ev is not None:
                    new.append(ev)

        plan = self._plan
        keys = []
        for key in record:
            dets = plan.get(key)
            if dets is None:
                dets = plan[key] = self._detectors(key)
            if len(dets) > 1 or (dets and not self.structure_logged):
                keys.append(key)
        for key in sorted(keys):
            value = _num(record[key])
            self.structure_logged = self.structure_logged or value is not None
            for det in plan[key][1:]:
                feed(det, value)
        broken = broken_fraction(record)
        self.structure_logged = self.structure_logged or broken is not None
        feed(self.breakage, broken)
        for name, det in self.baselines.items():
            val = metric_value(record, det.key)
            if val is None and name == "entropy_drop":
                val = _num(record.get(schema.sequence_entropy_key(self.source)))
            if name == MISMATCH_KIND:
                val = mismatch_value(record)  # whichever mismatch series the run logs
            feed(det, val)
        feed(self.reward, success_value(record))
        self.events += new
        self.last_alerts = new
        self._judge(step, broken)
        return new

    def _judge(self, step: int, broken: float | None) -> None:
        """Latch the collapse by the rule (see detect/rule.py)."""
        if self.collapsed:
            return
        warned = any(e.kind in WARNING_KINDS for e in self.events)
        if self.reward.alarmed and warned:
            self.collapse_reason = "reward drop with a control-token/format alert"
        elif self.reward.alarmed and broken is not None and broken >= self.rule.broken_frac:
            self.collapse_reason = f"reward drop with {broken:.0%} of turns broken"
        elif self.breakage.alarmed and self.breakage.run >= self.rule.breakage_persist:
            self.collapse_reason = "format breakage persists"
        else:
            return
        self.collapsed, self.confirmed_at = True, step

    # ---- what it says --------------------------------------------------------------------------
    def verdict(self) -> Verdict:
        baselines = {}
        for name, det in self.baselines.items():
            ev = min((e for e in self.events if e.kind == name), key=lambda e: e.detected_at, default=None)
            logged = det.key in self.logged
            baselines[name] = {"step": None if ev is None else ev.step,
                               "detected_at": None if ev is None else ev.detected_at, "logged": logged}
        return Verdict.from_events(self.events, collapsed=self.collapsed, collapse_reason=self.collapse_reason,
                                   confirmed_at=self.confirmed_at, last_step=self.last_step,
                                   baselines=baselines, source=self.source, position=self.position,
                                   structure_logged=self.structure_logged)

    def status(self, record: Mapping) -> dict:
        """Feed `record` (if new) and describe the run at its step (what `watch` prints)."""
        self.update(record)
        probs: dict[str, dict[str, float | None]] = {}
        for key, val in record.items():
            ck = schema.parse_cp_key(key)
            if ck is not None and ck.is_role and ck.position == self.position:
                probs.setdefault(ck.source, {})[ck.stat] = schema.finite_or_none(val)
        mix = {s: _num(record.get(schema.state_key(s))) for s in schema.STATES
               if schema.state_key(s) in record}
        v = self.verdict()
        return {"step": self.last_step, "probs": probs.get(self.source, {}), "probs_by_source": probs,
                "state_mix": mix, "success": success_value(record),
                "alerts": [e.to_dict() for e in self.last_alerts], **v.headline()}


def replay(records: Iterable[Mapping], *, source: str | None = None, checkpoints: bool = False,
           rule: CollapseRule = DEFAULT_RULE, spike_settings: Mapping | None = None,
           breakage_settings: Mapping | None = None,
           baseline_settings: Mapping[str, Mapping] | None = None,
           drift_settings: Mapping | None = None) -> Verdict:
    """The verdict of a whole run: its records (one per step, in step order) fed through one monitor.
    `source` None picks rollout captures when the run has them (as `watch` does); that needs the records in
    memory, so a caller streaming a large run picks the source first (from the keys) and passes it."""
    if source is None:
        records = list(records)
        source = schema.pick_source(k for r in records for k in r)
    mon = CollapseMonitor(source=source, rule=rule, spike_settings=spike_settings, checkpoints=checkpoints,
                          breakage_settings=breakage_settings, baseline_settings=baseline_settings,
                          drift_settings=drift_settings)
    for rec in records:
        mon.update(rec)
    return mon.verdict()
