"""Drops below a fraction of the running peak: the reward drop, and two peer baselines built on it."""

from __future__ import annotations

from collections import deque

from collapse_probe.detect.event import Event, StreamingDetector
from collapse_probe import schema


class PeakFractionDetector(StreamingDetector):
    """Fires when a value stays below `frac` x its running peak for `persistence` updates.

    The running peak is taken from the first value on, over the median of the last `smooth` values (fewer at the
    start), so one high outlier cannot set an unreachable peak. `min_peak` (the peak must be at least this) and `min_drop` (peak - value at least this)
    keep tiny early-training values from counting. Latched until `persistence` updates are back above the line.
    Event.magnitude = value / peak at the firing step.
    """

    def __init__(self, *, key: str = "", kind: str = "peak_drop", role: str | None = None,
                 position: str | None = None, frac: float = 0.5, persistence: int = 3, smooth: int = 5,
                 min_history: int = 5, min_peak: float = 0.0, min_drop: float = 0.0):
        if not 0 < frac < 1 or persistence < 1 or smooth < 1:
            raise ValueError("need 0 < frac < 1, persistence >= 1 and smooth >= 1")
        self.key, self.kind, self.role, self.position = key, kind, role, position
        self.frac, self.persistence, self.smooth = frac, int(persistence), int(smooth)
        self.min_history, self.min_peak, self.min_drop = int(min_history), min_peak, min_drop
        self.reset()

    def reset(self) -> None:
        self._recent: deque[float] = deque(maxlen=self.smooth)
        self.n, self.peak, self.run, self.run_start, self.quiet = 0, None, 0, None, 0
        self.alarmed = False
        self.events_ = []

    def update(self, step: int, value) -> Event | None:
        v = schema.finite_or_none(value)
        if v is None:
            return None
        self.n += 1
        self._recent.append(v)
        # The peak is tracked from the first value (a run may collapse before any window fills); the median of
        # the last `smooth` values keeps one outlier from setting an unreachable peak.
        r = sorted(self._recent)  # np.median's value, without numpy's per-call cost (a few values)
        h = len(r) // 2
        m = float(r[h]) if len(r) % 2 else (r[h - 1] + r[h]) / 2
        self.peak = m if self.peak is None else max(self.peak, m)
        peak = self.peak
        low = (self.n > self.min_history and peak is not None and peak >= self.min_peak
               and v < self.frac * peak and peak - v >= self.min_drop)
        if not low:
            self.run, self.run_start = 0, None
            if self.alarmed:
                self.quiet += 1
                if self.quiet >= self.persistence:
                    self.alarmed, self.quiet = False, 0
            return None
        self.quiet = 0
        self.run += 1
        self.run_start = int(step) if self.run_start is None else self.run_start
        if self.alarmed or self.run < self.persistence:
            return None
        self.alarmed = True
        return Event(self.kind, self.key, self.role, self.position, self.run_start, int(step),
                     v / peak if peak else float("nan"), "down")

    @property
    def state(self) -> dict:
        return {"key": self.key, "n": self.n, "peak": self.peak, "recent": list(self._recent), "run": self.run,
                "run_start": self.run_start, "alarmed": self.alarmed}


class RewardVarianceCollapseDetector(PeakFractionDetector):
    """RAGEN echo trap: mean in-group reward std falls below half its running peak for 3 steps (groups stop
    disagreeing, so GRPO advantages vanish)."""

    def __init__(self, *, key: str = schema.REWARD_GROUP_STD, kind: str = "reward_var_collapse",
                 frac: float = 0.5, persistence: int = 3, **kwargs):
        super().__init__(key=key, kind=kind, frac=frac, persistence=persistence, **kwargs)


class ValidityDropDetector(PeakFractionDetector):
    """`format_valid` falls below 70% of its running peak for 3 steps. Validity is near 1 on healthy runs and
    measured over hundreds of turns, so a 30% relative loss is far outside noise yet still early."""

    def __init__(self, *, key: str = schema.FORMAT_VALID, kind: str = "validity_drop", frac: float = 0.7,
                 persistence: int = 3, **kwargs):
        super().__init__(key=key, kind=kind, frac=frac, persistence=persistence, **kwargs)
