"""Monotone drifts in log-odds: a self-starting one-sided CUSUM (the paper's slow, steady rise).

The collapse of arXiv 2606.26027 starts as a slow ramp: p(end-of-turn right after `<tool_call>\\n`) climbs at
almost every step from ~0.02, often from step 0. A spike detector whose baseline is the median of the first
values sees that ramp inflate its own scale, and needs a window before it may speak; this one is built for the
ramp. Each finite value y_t (log-odds) is compared with the level, the running median of every value before it
(two heaps, O(log n); it stops moving at an alarm), in units of the noise scale, and the excess accumulated:

    z_t = sign * (y_t - level_{t-1}) / (scale_t * sqrt(1 + (pi/2) / (t-1)))     (the level's own noise)
    S_t = max(0, S_{t-1} + min(z_t, z_cap) - k)

From the second value on, so a ramp from step 0 is seen at once: a level that follows a ramp lags it by half the
rise, so the sum still grows. An alarm needs S_t >= `threshold` (the evidence), a total move of at least
`min_rise` log-odds from the floor (the lowest level so far; the highest for a fall), and, for a rise, the raw
value at `min_value` or above (1e-5 -> 1e-3 is a big log-odds move of no mass); for a fall, the raw value at most
`max_fraction` of the floor's probability. Its onset (`Event.step`) is the step where S last left 0 (the CUSUM
change point). After an alarm the detector is latched until S returns to 0.

The noise scale is robust and trend-free: the interquartile range of the last `scale_window` step-to-step
differences (a steady slope shifts every difference alike, so it does not widen the range) / (1.349 sqrt 2), or of
differences `scale_lag` steps apart when larger (slowly wandering, correlated noise barely shows from one step to
the next); with fewer than 8 differences their mean absolute size, widened for the small sample; floored at
`min_scale`.
`z_cap` winsorizes the increments (log-odds of a probability near 0 or 1 have heavy tails). Per update: O(log n).
Settings calibrated by bench/drift_calibration.py (the false-alarm rate on drift-free series is printed there).
"""

from __future__ import annotations

import heapq
import math
from collections import deque

from collapse_probe.detect.event import Event, StreamingDetector, direction_sign, inverse_transform, transform_values
from collapse_probe.schema import finite_or_none

_IQR_TO_STEP_SIGMA = 1.349 * math.sqrt(2.0)  # IQR of N(0, 2 sigma^2) differences -> sigma of one value
_MEAN_ABS_TO_STEP_SIGMA = math.sqrt(math.pi) / 2  # E|d| = 2 sigma / sqrt(pi) for those differences

# The monitor's settings. v2 (issue 22), chosen on grpo-collapse seeds 0, 31, 32 and the drift-free synthetic series
# of bench/drift_calibration.py: real captures are smooth (step-to-step noise 0.02-0.05 log-odds), so the noise
# floor is 0.1; correlated noise is measured by differences 3 steps apart; a rise must reach 5% probability (a
# warning names a rise that reached at least 5%) and 0.75 log-odds (odds x2.1) above the floor.
DRIFT_DEFAULTS = dict(k=1.0, threshold=8.0, min_rise=0.75, min_scale=0.1, scale_lag=3, min_value=0.05)
# A fall of the open tag at turn start (the agent stops calling tools): at least 1.5 log-odds and down to half
# its start probability; the tag's start level is a mixture of call and answer turns, so smaller moves are learning.
FALL_DEFAULTS = dict(k=1.0, threshold=8.0, min_rise=1.5, min_scale=0.25, scale_lag=3, max_fraction=0.5)


def _quantile(s: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method) of a sorted list."""
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _iqr(diffs: list[float]) -> float:
    s = sorted(diffs)
    return _quantile(s, 0.75) - _quantile(s, 0.25)


class DriftDetector(StreamingDetector):
    """Self-starting one-sided CUSUM on log-odds (see the module docstring). Constructor defaults are the plain
    statistic (no floors); the monitor's settings are DRIFT_DEFAULTS (rises) and FALL_DEFAULTS (the open tag)."""

    def __init__(self, *, key: str = "", role: str | None = None, position: str | None = None,
                 kind: str = "control_drift", direction: str = "up", transform: str = "logit",
                 eps: float = 1e-6, k: float = 0.5, threshold: float = 8.0,
                 min_rise: float = 1.0, min_scale: float = 0.25, scale_window: int = 20, z_cap: float = 4.0,
                 scale_lag: int = 1,
                 min_value: float | None = None, max_fraction: float | None = None):
        self.sign = direction_sign(direction)
        transform_values(0.5, transform)  # validate
        if scale_window < 4 or threshold <= 0 or k < 0 or min_scale <= 0 or z_cap <= k:
            raise ValueError("need scale_window >= 4, threshold > 0, k >= 0, min_scale > 0 and z_cap > k")
        self.key, self.role, self.position, self.kind = key, role, position, kind
        self.direction, self.transform, self.eps = direction, transform, eps
        self.k, self.threshold = float(k), float(threshold)
        self.min_rise, self.min_scale, self.scale_window = float(min_rise), float(min_scale), int(scale_window)
        self.min_value, self.max_fraction, self.z_cap = min_value, max_fraction, float(z_cap)
        self.scale_lag = int(scale_lag)
        self.reset()

    def reset(self) -> None:
        self._low: list[float] = []       # max-heap (negated) of the lower half of the level's values
        self._high: list[float] = []      # min-heap of the upper half
        # the last values the scale is measured on (its differences are formed only when the scale is needed:
        # a quiet update, the usual one, never needs it)
        self._ys: deque[float] = deque(maxlen=self.scale_window + self.scale_lag)
        self.level: float | None = None   # running median of the values before this one (transformed)
        self.cusum = 0.0
        self.since: int | None = None     # step where the sum last left 0
        self.floor: float | None = None   # the lowest level so far (highest for a fall): where a rise is measured from
        self.alarmed = False
        self.last_step: int | None = None
        self.scale: float | None = None
        self.n = 0
        self.events_ = []

    def _add_level(self, y: float) -> None:
        """Two-heap running median: O(log n) per value."""
        if self._low and y > -self._low[0]:
            heapq.heappush(self._high, y)
        else:
            heapq.heappush(self._low, -y)
        if len(self._low) > len(self._high) + 1:
            heapq.heappush(self._high, -heapq.heappop(self._low))
        elif len(self._high) > len(self._low):
            heapq.heappush(self._low, -heapq.heappop(self._high))
        self.level = -self._low[0] if len(self._low) > len(self._high) else (-self._low[0] + self._high[0]) / 2
        if self.floor is None or self.sign * (self.level - self.floor) < 0:
            self.floor = self.level

    def _scale(self) -> float:
        ys, w, lag = list(self._ys), self.scale_window, self.scale_lag
        diffs = [ys[i] - ys[i - 1] for i in range(max(1, len(ys) - w), len(ys))]  # the last `w` differences
        n = len(diffs)
        if n == 0:
            return self.min_scale
        if n < 8:  # too few differences for quartiles: their mean absolute size, widened for the small sample
            est = sum(map(abs, diffs)) / n * _MEAN_ABS_TO_STEP_SIGMA * (1.0 + 2.0 / n)
        else:
            est = _iqr(diffs) / _IQR_TO_STEP_SIGMA
            lagged = [ys[i] - ys[i - lag] for i in range(max(lag, len(ys) - w), len(ys))] if lag > 1 else []
            if len(lagged) >= 8:  # correlated noise hides in one-step differences; a few steps apart it shows
                est = max(est, _iqr(lagged) / _IQR_TO_STEP_SIGMA)
        return max(est, self.min_scale)

    def _guard(self, raw: float, moved: float) -> bool:
        if moved < self.min_rise:
            return False
        if self.sign > 0:
            return self.min_value is None or raw >= self.min_value
        return self.max_fraction is None or raw <= self.max_fraction * inverse_transform(self.floor,
                                                                                       self.transform)

    def update(self, step: int, value) -> Event | None:
        raw = finite_or_none(value)
        if raw is None:
            return None
        step = int(step)
        self.last_step, self.n = step, self.n + 1
        y = float(transform_values(raw, self.transform, self.eps))
        self._ys.append(y)
        if self.level is None:
            self._add_level(y)
            return None
        moved = self.sign * (y - self.level)
        if self.cusum == 0.0 and moved / self.min_scale <= self.k:
            total = 0.0  # z <= moved / min_scale <= k whatever the scale: the sum stays at 0 (the quiet update)
            self.scale = None
        else:
            scale = self.scale = self._scale()
            # the level is a median of n-1 values: its own noise (~pi/2 / (n-1) of a value's variance) widens z
            z = moved / (scale * math.sqrt(1.0 + 1.5708 / (len(self._low) + len(self._high))))
            # winsorized: one wild value (log-odds of a probability near 0 or 1 have heavy tails) adds <= z_cap
            total = self.cusum + min(z, self.z_cap) - self.k
        if not self.alarmed:  # the level stops at the alarm: the drift must not become the new normal
            self._add_level(y)
        if total <= 0:
            self.cusum, self.since = 0.0, None
            self.alarmed = False  # re-armed once the evidence is gone
            return None
        self.since = step if self.since is None else self.since
        self.cusum = total
        moved = self.sign * (y - self.floor)
        if self.alarmed or total < self.threshold or not self._guard(raw, moved):
            return None
        self.alarmed = True
        return Event(self.kind, self.key, self.role, self.position, int(self.since), step, moved, self.direction)

    @property
    def state(self) -> dict:
        """JSON-able snapshot (settings are not included)."""
        return {"key": self.key, "n": self.n, "level": self.level, "cusum": self.cusum, "since": self.since,
                "alarmed": self.alarmed, "last_step": self.last_step, "scale": self.scale}
