"""A move away from the first value, for sparse and noise-free series (probe scores of saved checkpoints).

Checkpoints are few (every 5-50 steps) and a fixed probe set carries no sampling noise, so there is no baseline
noise to estimate: the alarm is a move of at least `min_shift` log-odds from the first value (in `direction`),
and for a rise the value must also reach `min_value` (1e-6 -> 1e-4 is a large log-odds move of no mass).
"""

from __future__ import annotations

from collapse_probe.detect.event import Event, StreamingDetector, direction_sign, transform_values
from collapse_probe import schema


class FirstValueShiftDetector(StreamingDetector):
    """Fires once, at the first value `min_shift` log-odds past the first value in `direction`."""

    def __init__(self, *, key: str = "", role: str | None = None, position: str | None = None,
                 kind: str = "control_spike", direction: str = "up", min_shift: float = 1.0,
                 min_value: float | None = 0.01, eps: float = 1e-6):
        self.sign = direction_sign(direction)
        self.key, self.role, self.position, self.kind, self.direction = key, role, position, kind, direction
        self.min_shift, self.min_value, self.eps = min_shift, min_value, eps
        self.reset()

    def reset(self) -> None:
        self.first: float | None = None
        self.alarmed = False
        self.events_ = []

    def update(self, step: int, value) -> Event | None:
        raw = schema.finite_or_none(value)
        if raw is None:
            return None
        y = float(transform_values(raw, "logit", self.eps))
        if self.first is None:
            self.first = y
            return None
        moved = self.sign * (y - self.first)
        if self.alarmed or moved < self.min_shift:
            return None
        if self.sign > 0 and self.min_value is not None and raw < self.min_value:
            return None
        self.alarmed = True
        return Event(self.kind, self.key, self.role, self.position, int(step), int(step), moved, self.direction)
