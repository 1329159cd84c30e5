"""Did the run collapse, when did the warning signs appear, and how early would each detector have warned?

`analyse_timeline` (used by `analyze`) runs, on a whole `Timeline`:
* control-token spike detection on every role at one decision position (any role rising sharply from a low
  baseline, plus the healthy continuation `json_open` falling),
* format breakage: the broken-turn fraction fmt/full_collapse + fmt/text_pollution rising (1 - format_valid
  when the state mix was not logged),
* the reward drop on `success` (or `reward/mean`),
* the peer baselines (entropy drop, in-group reward-variance collapse, grad-norm spike, validity drop) so that
  their lead can be compared with ours.

A run is `collapsed` when the reward drop is confirmed and a spike or a breakage was found.
`OnlineMonitor` (used by `watch`) does the same one record at a time in constant memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from collapse_probe.detect.detectors import (
    BREAKAGE_DEFAULTS, CONTROL_SPIKE_DEFAULTS, EntropyDropDetector, Event, GradNormSpikeDetector,
    OfflineChangeDetector, OnlineSpikeDetector, PeakFractionDetector, RewardVarianceCollapseDetector,
    ValidityDropDetector,
)
from collapse_probe.timeline import FORMAT_STATES, Timeline

__all__ = ["Verdict", "analyse_timeline", "OnlineMonitor", "BASELINES"]

WARNING_KINDS = ("control_spike", "format_breakage")
BREAKAGE_KEYS = ("fmt/full_collapse", "fmt/text_pollution")
# Settings that only one of the two spike detectors has; dropped for the other, so one set of overrides works
# with online=True and online=False.
_ONLINE_ONLY = {"window", "min_history", "z_threshold", "persistence", "onset_z", "abs_threshold", "abs_baseline"}
_OFFLINE_ONLY = {"min_size", "penalty", "max_changes", "onset_frac"}
# name -> (detector class, default key)
BASELINES = {
    "entropy_drop": (EntropyDropDetector, "entropy"),
    "reward_var_collapse": (RewardVarianceCollapseDetector, "reward/group_std_mean"),
    "grad_norm_spike": (GradNormSpikeDetector, "grad_norm"),
    "validity_drop": (ValidityDropDetector, "format_valid"),
}


def _lead(later: int | None, earlier: int | None) -> int | None:
    return None if later is None or earlier is None else int(later - earlier)


def _first(events: list[Event], kind: str) -> int | None:
    steps = [e.step for e in events if e.kind == kind]
    return int(min(steps)) if steps else None


@dataclass
class Verdict:
    collapsed: bool
    spike_step: int | None
    breakage_step: int | None
    collapse_step: int | None
    lead_steps: int | None
    events: list[Event] = field(default_factory=list)
    baselines: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        opt = lambda v: None if v is None else int(v)  # noqa: E731
        return {"collapsed": bool(self.collapsed), "spike_step": opt(self.spike_step),
                "breakage_step": opt(self.breakage_step), "collapse_step": opt(self.collapse_step),
                "lead_steps": opt(self.lead_steps), "events": [e.to_dict() for e in self.events],
                "baselines": {k: {"step": opt(v.get("step")), "lead_steps": opt(v.get("lead_steps"))}
                              for k, v in self.baselines.items()}}

    def first_event(self, kind: str) -> Event | None:
        evs = [e for e in self.events if e.kind == kind]
        return min(evs, key=lambda e: (e.step, e.detected_at)) if evs else None

    def summary(self) -> str:
        def describe(kind: str, label: str) -> str:
            e = self.first_event(kind)
            if e is None:
                return f"{label}: none"
            unit = "log-odds" if kind in WARNING_KINDS else "x"
            who = f"{e.role} {e.direction}" if e.role else f"{e.key} {e.direction}"
            return (f"{label}: step {e.step} ({who}, {e.magnitude:+.2f} {unit}, "
                    f"detectable at step {e.detected_at})")

        state = "YES" if self.collapsed else "no"
        if not self.collapsed and self.collapse_step is not None:
            state += " (reward dropped, but no control-token or format warning)"
        lines = [f"collapsed: {state}",
                 describe("control_spike", "control-token spike"),
                 describe("format_breakage", "format breakage"),
                 f"reward drop: {'none' if self.collapse_step is None else f'step {self.collapse_step}'}"]
        if self.lead_steps is not None:
            lines.append(f"lead: first warning {self.lead_steps} steps before the reward drop")
        for name, b in self.baselines.items():
            step = "none" if b.get("step") is None else f"step {b['step']}"
            step = "not logged" if b.get("logged") is False else step
            lead = "" if b.get("lead_steps") is None else f" (lead {b['lead_steps']})"
            lines.append(f"baseline {name}: {step}{lead}")
        return "\n".join(lines)


def _breakage_series(tl: Timeline):
    """(key, series) of the broken-turn fraction, or (None, None) when neither form was logged."""
    present = [k for k in BREAKAGE_KEYS if tl.has(k)]
    if present:
        s = sum(tl.series(k).fillna(0.0) for k in present)
        missing = np.all([tl.series(k).isna().to_numpy() for k in present], axis=0)
        return "+".join(present), s.mask(missing)
    if tl.has("format_valid"):
        return "1-format_valid", 1.0 - tl.series("format_valid")
    return None, None


def _run_detector(det, steps, values) -> list[Event]:
    return det.fit(steps, values).predict()


def _spike_detector(online: bool, kwargs: dict, **fixed):
    if online:
        return OnlineSpikeDetector(**fixed, **{k: v for k, v in kwargs.items() if k not in _OFFLINE_ONLY})
    return OfflineChangeDetector(**fixed, **{k: v for k, v in kwargs.items() if k not in _ONLINE_ONLY})


def analyse_timeline(tl: Timeline, *, source: str = "rollout", position: str = "after_open", online: bool = True,
                     falling_roles: tuple[str, ...] = ("json_open",), reward_frac: float = 0.5,
                     reward_persistence: int = 2, breakage_kwargs: dict | None = None,
                     baseline_kwargs: dict[str, dict] | None = None, **detector_kwargs) -> Verdict:
    """Verdict for one run. `detector_kwargs` override the spike detector's settings (OnlineSpikeDetector
    when `online`, else OfflineChangeDetector); `breakage_kwargs` those of the breakage detector (same class);
    `baseline_kwargs` maps a baseline name to settings of its detector."""
    steps = tl.steps
    events: list[Event] = []
    for role, s in tl.control_series(source, position).items():
        key = f"cp/{source}/{position}/{role}"
        up = {**CONTROL_SPIKE_DEFAULTS, **detector_kwargs}
        if role not in falling_roles:  # a healthy token (the JSON body) rising is no alarm
            events += _run_detector(_spike_detector(online, up, key=key, role=role, position=position), steps, s)
        if role in falling_roles:
            down = {"abs_threshold": None, "abs_baseline": None, "min_value": None, **detector_kwargs}
            det = _spike_detector(online, down, key=key, role=role, position=position, direction="down")
            events += _run_detector(det, steps, s)
    bkey, bser = _breakage_series(tl)
    if bkey is not None:
        kw = {**BREAKAGE_DEFAULTS, **(breakage_kwargs or {})}
        events += _run_detector(_spike_detector(online, kw, key=bkey, kind="format_breakage"), steps, bser)

    succ = tl.success()
    rdet = PeakFractionDetector(key=str(succ.name), kind="reward_drop", frac=reward_frac,
                                persistence=reward_persistence, smooth=3, min_history=3, min_peak=0.1,
                                min_drop=0.1)
    events += _run_detector(rdet, steps, succ)
    collapse_step = _first(events, "reward_drop")

    baselines = {}
    for name, (cls, key) in BASELINES.items():
        if name == "entropy_drop" and not tl.has(key):
            key = f"cp/{source}/entropy"
        kw = {"key": key, **(baseline_kwargs or {}).get(name, {})}
        evs = _run_detector(cls(**kw), steps, tl.series(kw["key"])) if tl.has(kw["key"]) else []
        events += evs
        step = min((e.step for e in evs), default=None)
        baselines[name] = {"step": step, "lead_steps": _lead(collapse_step, step), "logged": tl.has(kw["key"])}

    events.sort(key=lambda e: (e.step, e.detected_at, e.kind, e.key))
    spike_step, breakage_step = _first(events, "control_spike"), _first(events, "format_breakage")
    warn = min((s for s in (spike_step, breakage_step) if s is not None), default=None)
    return Verdict(collapsed=collapse_step is not None and warn is not None, spike_step=spike_step,
                   breakage_step=breakage_step, collapse_step=collapse_step,
                   lead_steps=_lead(collapse_step, warn), events=events, baselines=baselines)


def _num(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


class OnlineMonitor:
    """Streaming verdict for `watch`: feed records in step order with `update(record)`.

    One detector per monitored key (created when the key first appears), so memory does not grow with the run.
    A record whose step is not after the last one is ignored (so update and status may both be called).
    `collapsed` latches once the reward drop is confirmed (success below `reward_frac` x its running peak for
    `reward_persistence` steps) and a spike or breakage alert has been raised (in either order), or when
    format breakage stays in excursion for `breakage_persist` consecutive steps.
    """

    def __init__(self, *, source: str = "rollout", position: str = "after_open",
                 falling_roles: tuple[str, ...] = ("json_open",), reward_frac: float = 0.5,
                 reward_persistence: int = 2, breakage_persist: int = 10, breakage_kwargs: dict | None = None,
                 baseline_kwargs: dict[str, dict] | None = None, **detector_kwargs):
        self.source, self.position, self.falling_roles = source, position, tuple(falling_roles)
        self.detector_kwargs, self.breakage_persist = detector_kwargs, int(breakage_persist)
        self.breakage = OnlineSpikeDetector(kind="format_breakage", key="fmt/full_collapse+fmt/text_pollution",
                                            **{**BREAKAGE_DEFAULTS, **(breakage_kwargs or {})})
        self.reward = PeakFractionDetector(key="success", kind="reward_drop", frac=reward_frac,
                                           persistence=reward_persistence, smooth=3, min_history=3,
                                           min_peak=0.1, min_drop=0.1)
        self.baselines = {name: cls(key=key, **(baseline_kwargs or {}).get(name, {}))
                          for name, (cls, key) in BASELINES.items()}
        self.spikes: dict[tuple[str, str], OnlineSpikeDetector] = {}
        self.events: list[Event] = []
        self.last_alerts: list[Event] = []
        self.last_step: int | None = None
        self.collapsed = False
        self.collapse_reason: str | None = None

    def _first(self, *kinds: str) -> int | None:
        steps = [e.step for e in self.events if e.kind in kinds]
        return min(steps) if steps else None

    @property
    def spike_step(self) -> int | None:
        return self._first("control_spike")

    @property
    def breakage_step(self) -> int | None:
        return self._first("format_breakage")

    @property
    def collapse_step(self) -> int | None:
        return self._first("reward_drop")

    def _spike(self, key: str, role: str, direction: str) -> OnlineSpikeDetector:
        if (key, direction) not in self.spikes:
            base = dict(CONTROL_SPIKE_DEFAULTS) if direction == "up" else \
                {"abs_threshold": None, "abs_baseline": None, "min_value": None}
            self.spikes[(key, direction)] = OnlineSpikeDetector(
                key=key, role=role, position=self.position, direction=direction,
                **{**base, **self.detector_kwargs})
        return self.spikes[(key, direction)]

    def update(self, record: dict) -> list[Event]:
        """Feed one record; returns the alerts raised at this step (empty when quiet or already seen)."""
        try:
            step = int(record["step"])
        except (KeyError, TypeError, ValueError):
            return []
        if self.last_step is not None and step <= self.last_step:
            return []
        self.last_step = step
        new: list[Event] = []

        def feed(det, value):
            if value is not None:
                ev = det.update(step, value)
                if ev is not None:
                    new.append(ev)

        prefix = f"cp/{self.source}/{self.position}/"
        for key in sorted(record):
            role = key[len(prefix):] if key.startswith(prefix) else ""
            if not role or "/" in role or role in ("entropy", "count"):
                continue
            val = _num(record[key])
            if role not in self.falling_roles:  # a healthy token rising is no alarm
                feed(self._spike(key, role, "up"), val)
            if role in self.falling_roles:
                feed(self._spike(key, role, "down"), val)
        parts = [_num(record.get(k)) for k in BREAKAGE_KEYS]
        if any(p is not None for p in parts):
            feed(self.breakage, sum(p for p in parts if p is not None))
        elif _num(record.get("format_valid")) is not None:
            feed(self.breakage, 1.0 - _num(record["format_valid"]))
        for name, det in self.baselines.items():
            val = _num(record.get(det.key))
            if val is None and name == "entropy_drop":
                val = _num(record.get(f"cp/{self.source}/entropy"))
            feed(det, val)
        succ = _num(record.get("success"))
        feed(self.reward, succ if succ is not None else _num(record.get("reward/mean")))

        self.events += new
        self.last_alerts = new
        if not self.collapsed:
            warned = any(e.kind in WARNING_KINDS for e in self.events)
            if self.collapse_step is not None and warned:
                self.collapsed, self.collapse_reason = True, "reward drop after control-token/format alert"
            elif self.breakage.alarmed and self.breakage.run >= self.breakage_persist:
                self.collapsed, self.collapse_reason = True, "format breakage persists"
        return new

    def status(self, record: dict) -> dict:
        """Feed `record` (if new) and describe the run at its step."""
        self.update(record)
        probs: dict[str, dict[str, float | None]] = {}
        for key, val in record.items():
            parts = key.split("/")
            if len(parts) == 4 and parts[0] == "cp" and parts[2] == self.position \
                    and parts[3] not in ("entropy", "count"):
                probs.setdefault(parts[1], {})[parts[3]] = _num(val)
        mix = {s: _num(record.get(f"fmt/{s}")) for s in FORMAT_STATES if f"fmt/{s}" in record}
        succ = _num(record.get("success"))
        return {"step": self.last_step, "probs": probs.get(self.source, {}),
                "probs_by_source": probs,
                "state_mix": mix, "success": succ if succ is not None else _num(record.get("reward/mean")),
                "alerts": [e.to_dict() for e in self.last_alerts], "collapsed": self.collapsed,
                "collapse_reason": self.collapse_reason, "spike_step": self.spike_step,
                "breakage_step": self.breakage_step, "collapse_step": self.collapse_step}
