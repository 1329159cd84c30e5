"""Gradient-norm spikes, the llm-foundry KillLossSpike rule (a peer baseline)."""

from __future__ import annotations

from collections import deque

from collapse_probe.detect.event import Event, StreamingDetector
from collapse_probe import schema


class GradNormSpikeDetector(StreamingDetector):
    """llm-foundry KillLossSpike-like rule on `grad_norm`: a value above `factor` x the running mean of the last
    `window` non-outlier values for `patience` consecutive updates (defaults 2x, window 100, patience 4 as in
    llm-foundry), after `min_history` values. Event.magnitude = value / running mean."""

    def __init__(self, *, key: str = schema.GRAD_NORM, kind: str = "grad_norm_spike", window: int = 100,
                 factor: float = 2.0, patience: int = 4, min_history: int = 10):
        self.key, self.kind, self.role, self.position = key, kind, None, None
        self.window, self.factor, self.patience, self.min_history = int(window), factor, int(patience), min_history
        self.reset()

    def reset(self) -> None:
        self._vals: deque[float] = deque(maxlen=self.window)
        self._sum = 0.0
        self.run, self.run_start, self.alarmed = 0, None, False
        self.events_ = []

    def update(self, step: int, value) -> Event | None:
        v = schema.finite_or_none(value)
        if v is None:
            return None
        if len(self._vals) >= self.min_history:
            mean = self._sum / len(self._vals)
            if v > self.factor * mean:
                self.run += 1
                self.run_start = int(step) if self.run_start is None else self.run_start
                if self.run >= self.patience and not self.alarmed:
                    self.alarmed = True
                    return Event(self.kind, self.key, None, None, self.run_start, int(step),
                                 v / mean if mean else float("inf"), "up")
                return None
        self.run, self.run_start, self.alarmed = 0, None, False
        if len(self._vals) == self.window:
            self._sum -= self._vals[0]
        self._vals.append(v)
        self._sum += v
        return None

    @property
    def state(self) -> dict:
        return {"key": self.key, "n": len(self._vals), "sum": self._sum, "run": self.run,
                "run_start": self.run_start, "alarmed": self.alarmed}
