"""What the callback does when the collapse monitor speaks: save the last healthy weights, stop the run.

One `CollapseMonitor` (detect/monitor.py) reads the callback's records as they are completed; `Actions.decide`
returns the keys to add to the record (`monitor/...`, schema.py) and whether to save / stop. Defaults log only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from collapse_probe.detect.monitor import WARNING_KINDS, CollapseMonitor
from collapse_probe.errors import UserError
from collapse_probe.schema import ALERT, CHECKPOINT_SAVED, COLLAPSE_REASON, COLLAPSED, STEP, STOPPED
from collapse_probe import schema

ON_WARNING = ("log", "checkpoint")
ON_COLLAPSE = ("log", "stop")


@dataclass
class Decision:
    keys: dict
    save: bool = False
    stop: bool = False


class Actions:
    """`on_warning="checkpoint"`: save a checkpoint at the step the first warning (control-token spike or format
    breakage) fires. `on_collapse="stop"`: stop training at the step the collapse rule is met."""

    def __init__(self, on_warning: str = "log", on_collapse: str = "log", monitor: CollapseMonitor | None = None):
        if on_warning not in ON_WARNING:
            raise UserError(f"on_warning={on_warning!r}: pass one of {', '.join(ON_WARNING)}")
        if on_collapse not in ON_COLLAPSE:
            raise UserError(f"on_collapse={on_collapse!r}: pass one of {', '.join(ON_COLLAPSE)}")
        self.on_warning, self.on_collapse = on_warning, on_collapse
        self.monitor = monitor
        self.saved_at: int | None = None
        self.stopped_at: int | None = None

    def decide(self, record: Mapping) -> Decision:
        """Feed one completed step's record (steps in order); what to add to it and what to do."""
        if self.monitor is None:  # on-policy numbers when the run has them, else the probe set's
            self.monitor = CollapseMonitor(source=schema.pick_source(record))
        was_collapsed = self.monitor.collapsed
        alerts = [e for e in self.monitor.update(record) if e.kind in WARNING_KINDS]
        out = Decision({})
        step = record.get(STEP) if isinstance(record.get(STEP), int) else None
        if alerts:
            out.keys[ALERT] = alerts[0].key
            if self.on_warning == "checkpoint" and self.saved_at is None and step is not None:
                self.saved_at, out.save = step, True
                out.keys[CHECKPOINT_SAVED] = f"{PREFIX_CHECKPOINT_DIR}-{step}"  # the Trainer's folder name
        if self.monitor.collapsed:
            out.keys[COLLAPSED] = 1
            if not was_collapsed:
                out.keys[COLLAPSE_REASON] = self.monitor.collapse_reason or ""
                if self.on_collapse == "stop" and self.stopped_at is None:
                    self.stopped_at, out.stop = step, True
                    out.keys[STOPPED] = 1
        return out
