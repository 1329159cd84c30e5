"""A run's verdict: did it collapse, when, which alerts came first, and how many steps ahead of the drop.

Built only by `detect.monitor.CollapseMonitor.verdict()`, live or on replay. Two step numbers per alert:
`step` (onset: the first step of the excursion, dated back) and `detected_at` (the step at which the alert is
available). Leads are `collapse_step - detected_at`: how many steps before the reward drop a user could have
acted; `onset_lead_steps` uses the back-dated onset instead, for comparison. Negative leads are late alerts.

A verdict never claims what it did not see: when the reward dropped but the records held no control-token or
format value at all, the rule cannot tell a collapse from a hard task, and the verdict is an unconfirmed collapse
(`status` "unconfirmed", `collapsed` None in `headline()`), naming what would confirm it (CONFIRM_WITH).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from collapse_probe.detect.event import Event

WARNING_KINDS = ("control_spike", "control_drift", "format_breakage")
# What would let the rule see a drop's structure (a run without control-token or format records)
CONFIRM_WITH = ("the rollout dumps beside the log (verl: trainer.rollout_data_dir=DIR; TRL: the completions "
                "parquet)", "control-token captures (verl: VERL_USE_EXTERNAL_MODULES=collapse_probe.integrations.verl; "
                "HF/TRL: CollapseProbeCallback)")
STATUSES = ("collapsed", "unconfirmed", "reward_drop", "healthy")
_BASELINE_UNITS = "x"


def _opt(v) -> int | None:
    return None if v is None else int(v)


def _lead(later: int | None, earlier: int | None) -> int | None:
    return None if later is None or earlier is None else int(later - earlier)


@dataclass
class Verdict:
    collapsed: bool
    collapse_reason: str | None
    confirmed_at: int | None      # the step at which the collapse was confirmed
    collapse_step: int | None     # onset of the reward drop (success below the rule's fraction of its peak)
    drop_detected_at: int | None  # the step at which the reward drop was confirmed
    spike_step: int | None        # onset of the first control-token spike
    breakage_step: int | None     # onset of the first format-breakage alert
    first_alert_step: int | None  # detected_at of the first control-token / format alert
    first_alert_onset: int | None
    last_step: int | None
    source: str | None = None
    position: str | None = None
    events: list[Event] = field(default_factory=list)
    baselines: dict[str, dict] = field(default_factory=dict)
    drift_step: int | None = None       # onset of the first control-token drift
    structure_logged: bool = True       # the records held control-token or format values

    @classmethod
    def from_events(cls, events: list[Event], *, collapsed: bool, collapse_reason: str | None,
                    confirmed_at: int | None, last_step: int | None, baselines: dict[str, dict],
                    source: str | None = None, position: str | None = None,
                    structure_logged: bool = True) -> "Verdict":
        events = sorted(events, key=lambda e: (e.detected_at, e.step, e.kind, e.key))
        first = lambda kind: next((e for e in events if e.kind == kind), None)  # noqa: E731
        drop, spike, brk = first("reward_drop"), first("control_spike"), first("format_breakage")
        drift = first("control_drift")
        warn = next((e for e in events if e.kind in WARNING_KINDS), None)
        collapse_step = None if drop is None else drop.step
        for b in baselines.values():
            b["lead_steps"] = _lead(collapse_step, b.get("detected_at"))
        return cls(collapsed=collapsed, collapse_reason=collapse_reason, confirmed_at=confirmed_at,
                   collapse_step=collapse_step, drop_detected_at=None if drop is None else drop.detected_at,
                   spike_step=None if spike is None else spike.step,
                   breakage_step=None if brk is None else brk.step,
                   first_alert_step=None if warn is None else warn.detected_at,
                   first_alert_onset=None if warn is None else warn.step, last_step=last_step,
                   source=source, position=position, events=events, baselines=baselines,
                   drift_step=None if drift is None else drift.step, structure_logged=structure_logged)

    @property
    def lead_steps(self) -> int | None:
        """Steps from the first alert being available to the reward drop (negative: the alert came late)."""
        return _lead(self.collapse_step, self.first_alert_step)

    @property
    def onset_lead_steps(self) -> int | None:
        return _lead(self.collapse_step, self.first_alert_onset)

    @property
    def unconfirmed(self) -> bool:
        """The reward dropped, and the records hold nothing that could tell whether the drop is structural."""
        return not self.collapsed and self.collapse_step is not None and not self.structure_logged

    @property
    def status(self) -> str:
        """One of STATUSES: collapsed, unconfirmed (a drop the records cannot explain), reward_drop (a drop with
        healthy turns), healthy."""
        if self.collapsed:
            return "collapsed"
        if self.unconfirmed:
            return "unconfirmed"
        return "reward_drop" if self.collapse_step is not None else "healthy"

    def first_event(self, kind: str) -> Event | None:
        return next((e for e in self.events if e.kind == kind), None)

    def headline(self) -> dict:
        """The fields every command reports the same way (watch's status, analyze's JSON)."""
        # an unconfirmed collapse is not "collapsed": false (a gate reading the field must not pass it)
        return {"collapsed": None if self.unconfirmed else bool(self.collapsed),
                "collapse_reason": self.collapse_reason,
                "confirmed_at": _opt(self.confirmed_at), "collapse_step": _opt(self.collapse_step),
                "drop_detected_at": _opt(self.drop_detected_at), "spike_step": _opt(self.spike_step),
                "breakage_step": _opt(self.breakage_step), "first_alert_step": _opt(self.first_alert_step),
                "first_alert_onset": _opt(self.first_alert_onset), "lead_steps": self.lead_steps,
                "onset_lead_steps": self.onset_lead_steps, "drift_step": _opt(self.drift_step),
                "status": self.status,
                "confirm_with": list(CONFIRM_WITH) if self.unconfirmed else None}

    def to_dict(self) -> dict:
        return {**self.headline(), "last_step": _opt(self.last_step), "source": self.source,
                "position": self.position, "events": [e.to_dict() for e in self.events],
                "baselines": {k: {"step": _opt(v.get("step")), "detected_at": _opt(v.get("detected_at")),
                                  "lead_steps": v.get("lead_steps"), "logged": v.get("logged")}
                              for k, v in self.baselines.items()}}

    def summary(self) -> str:
        def describe(kind: str, label: str) -> str:
            e = self.first_event(kind)
            if e is None:
                return f"{label}: none"
            unit = "log-odds" if kind in WARNING_KINDS else _BASELINE_UNITS
            who = f"{e.role} {e.direction}" if e.role else f"{e.key} {e.direction}"
            return f"{label}: alert at step {e.detected_at} (onset {e.step}; {who}, {e.magnitude:+.2f} {unit})"

        state = f"YES ({self.collapse_reason}, confirmed at step {self.confirmed_at})" if self.collapsed else "no"
        if self.unconfirmed:
            state = ("UNCONFIRMED (the reward dropped, but the records hold no control-token or format data, so "
                     "whether the turns broke is unknown; to confirm, add " + " or ".join(CONFIRM_WITH) + ")")
        elif not self.collapsed and self.collapse_step is not None:
            state += " (reward dropped, but no control-token or format warning and turns stay well-formed)"
        drop = "none" if self.collapse_step is None else \
            f"step {self.collapse_step} (confirmed at step {self.drop_detected_at})"
        lines = [f"collapsed: {state}", describe("control_spike", "control-token spike"),
                 describe("control_drift", "control-token drift"), describe("format_breakage", "format breakage"),
                 f"reward drop: {drop}"]
        if self.lead_steps is not None:
            when = "before" if self.lead_steps >= 0 else "after"
            lines.append(f"lead: first alert available {abs(self.lead_steps)} steps {when} the reward drop "
                         f"(onset {self.onset_lead_steps:+d})")
        for name, b in self.baselines.items():
            step = "not logged" if b.get("logged") is False else \
                ("none" if b.get("detected_at") is None else f"alert at step {b['detected_at']}")
            lead = "" if b.get("lead_steps") is None else f" (lead {b['lead_steps']})"
            lines.append(f"baseline {name}: {step}{lead}")
        return "\n".join(lines)
