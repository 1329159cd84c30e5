"""Control-token spikes: a streaming detector with a robust rolling baseline in log-odds (and entropy drops).

Defaults were set on synthetic series shaped like the collapse in Hao et al. 2026 (arXiv 2606.26027):
p(`<|im_end|>` after `<tool_call>`) at 0.01-0.05 with per-step noise of about 0.3 log-odds, rising to ~0.5 over
10-20 steps; the control-token settings below were then chosen on bench/detection.py's corpus.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque

from collapse_probe import schema
from collapse_probe.detect.event import (
    Event, StreamingDetector, direction_sign, inverse_transform, transform_values,
)

# Extra settings for control-token probabilities rising from a low baseline (used by verdict.py): an absolute
# guard (p > 0.3 while the baseline is < 0.1 is an alarm even in a noisy series) and a floor (p must reach 1%
# before an alarm: 1e-6 -> 1e-4 is a large log-odds rise but irrelevant mass). z 3 for 2 steps: a per-step mean
# over hundreds of decision positions is smooth, and the 1.0 log-odds minimum rise keeps noise out; chosen on
# bench/detection.py's collapse/stable seeds 0-4 (see the closing note of the detection issue).
# The floor is 5% since issue 22 (a warning names a rise that reached at least 5%; it was 1%).
CONTROL_SPIKE_DEFAULTS = dict(z_threshold=3.0, persistence=2, abs_threshold=0.3, abs_baseline=0.1, min_value=0.05)
# Broken-turn fraction (fmt/full_collapse + fmt/text_pollution): fractions of a few hundred turns are often
# exactly 0, so clip at 0.5% (not 1e-6) and demand at least 5% broken turns.
BREAKAGE_DEFAULTS = dict(eps=0.005, abs_threshold=0.3, abs_baseline=0.1, min_value=0.05)



def _sorted_median(s: list[float]) -> float:
    """np.median's value of an already sorted list (the mean of the two middle values for an even count)."""
    m = len(s) // 2
    return float(s[m]) if len(s) % 2 else (s[m - 1] + s[m]) / 2


def _sorted_mad(s: list[float], med: float) -> float:
    """median(|x - med|) of a sorted list: the deviations grow outward from `med` on both sides, so a merge walk
    of half the list finds the middle ones (O(n) in the window, no sort; the same values as sorting them)."""
    n = len(s)
    want = n // 2  # index of the upper middle deviation
    i, j = bisect_left(s, med) - 1, bisect_left(s, med)
    prev = cur = 0.0
    for _ in range(want + 1):
        left = abs(s[i] - med) if i >= 0 else None
        right = abs(s[j] - med) if j < n else None
        prev = cur
        if right is None or (left is not None and left <= right):
            cur, i = left, i - 1
        else:
            cur, j = right, j + 1
    return float(cur) if n % 2 else (prev + cur) / 2


class OnlineSpikeDetector(StreamingDetector):
    """Streaming spike detector with a robust rolling baseline.

    Each finite value x is transformed (`transform`); baseline = median of the last `window` non-alarm values,
    scale = max(1.4826 * MAD, `min_scale`). An update is an excursion when, in the alarm direction,
    z = (x - baseline) / scale > `z_threshold` and x - baseline > `min_rise`, or when the absolute guard holds
    (up: raw x > `abs_threshold` while the baseline is < `abs_baseline`; down: the mirror). With `min_value`
    set, an up-excursion also needs raw x >= min_value. `persistence` consecutive excursions fire one Event.
    Its onset step is the start of the surrounding streak with z > `onset_z` (so a slow ramp is dated to
    where it left the noise, not where it crossed the alarm line). No alarm before `min_history` values.
    After firing the detector is latched until `persistence` consecutive quiet updates re-arm it; excursion
    values, and values already `onset_z` above the baseline, never enter it (so a slow ramp, the usual shape of
    a control-token spike in a real run, cannot drag the baseline up behind it). NaN/None values are ignored.

    Defaults: window 30 (enough for a stable median, short enough to follow slow drift), z 4 with MAD scale
    (about 1 false excursion in 10^4 Gaussian steps; 3 in a row essentially never), min_rise 1.0 log-odds
    (odds x2.7: a rise that matters even when the series is very smooth), min_scale 0.25 log-odds (noise of a
    mean over a few hundred positions), persistence 3 (single-step outliers never fire).
    """

    def __init__(self, *, key: str = "", role: str | None = None, position: str | None = None,
                 kind: str = "control_spike", direction: str = "up", transform: str = "logit",
                 eps: float = 1e-6, window: int = 30, min_history: int = 10, z_threshold: float = 4.0,
                 min_rise: float = 1.0, min_scale: float = 0.25, persistence: int = 3, onset_z: float = 2.0,
                 abs_threshold: float | None = None, abs_baseline: float | None = None,
                 min_value: float | None = None):
        self.sign = direction_sign(direction)
        transform_values(0.5, transform)  # validate
        if not 3 <= min_history <= window or persistence < 1:
            raise ValueError("need 3 <= min_history <= window and persistence >= 1")
        self.key, self.role, self.position, self.kind = key, role, position, kind
        self.direction, self.transform, self.eps = direction, transform, eps
        self.window, self.min_history = int(window), int(min_history)
        self.z_threshold, self.min_rise, self.min_scale = z_threshold, min_rise, min_scale
        self.persistence, self.onset_z = int(persistence), onset_z
        self.abs_threshold, self.abs_baseline, self.min_value = abs_threshold, abs_baseline, min_value
        self._quiet_z = min(onset_z, z_threshold)  # at or below it an update is quiet whatever the scale
        self.reset()

    def reset(self) -> None:
        self._hist: deque[float] = deque(maxlen=self.window)
        self._sorted: list[float] = []   # the same values, sorted (order statistics without a sort per update)
        self._cached: tuple[float, float] | None = None  # (baseline, scale) until the history changes
        self.n = 0                       # finite values seen
        self.run = 0                     # consecutive excursions
        self.soft_start: int | None = None  # first step of the current streak with z > onset_z
        self.quiet = 0                   # consecutive quiet updates while latched
        self.alarmed = False
        self.last_step: int | None = None
        self.baseline: float | None = None
        self.scale: float | None = None
        self.last_z: float | None = None
        self.events_ = []

    def _push(self, y: float) -> None:
        if len(self._hist) == self.window:
            del self._sorted[bisect_left(self._sorted, self._hist[0])]
        self._hist.append(y)
        insort(self._sorted, y)
        self._cached = None

    def _baseline(self) -> tuple[float, float]:
        # median and MAD from the sorted window (issue 22: the per-update sort was analyze's main cost)
        if self._cached is None:
            med = _sorted_median(self._sorted)
            mad = _sorted_mad(self._sorted, med) * 1.4826
            self._cached = (med, max(mad, self.min_scale))
        return self._cached

    def _abs_guard(self, raw: float, base: float) -> bool:
        if self.abs_threshold is None or self.abs_baseline is None:
            return False
        b = inverse_transform(base, self.transform)
        if self.sign > 0:
            return raw > self.abs_threshold and b < self.abs_baseline
        return raw < self.abs_threshold and b > self.abs_baseline

    def update(self, step: int, value) -> Event | None:
        raw = schema.finite_or_none(value)
        if raw is None:
            return None
        step = int(step)
        self.last_step = step
        y = float(transform_values(raw, self.transform, self.eps))
        self.n += 1
        if len(self._hist) < self.min_history:
            self._push(y)
            return None
        if self._cached is None and self._sorted:
            base = _sorted_median(self._sorted)
            d = self.sign * (y - base)
            if d / self.min_scale <= self._quiet_z:
                # z = d / scale <= d / min_scale: below both lines whatever the MAD is, so skip computing it
                # (the common, quiet update; the decision is the one the full computation makes)
                self.baseline, self.scale, self.last_z = base, None, None
                excursion = self._abs_guard(raw, base)
                if not excursion:
                    self.run, self.soft_start = 0, None
                    self._push(y)
                    if self.alarmed:
                        self.quiet += 1
                        if self.quiet >= self.persistence:
                            self.alarmed, self.quiet = False, 0
                    return None
        base, scale = self._baseline()
        self.baseline, self.scale = base, scale
        d = self.sign * (y - base)
        z = d / scale
        self.last_z = z
        excursion = (z > self.z_threshold and d > self.min_rise) or self._abs_guard(raw, base)
        if excursion and self.min_value is not None and self.sign > 0 and raw < self.min_value:
            excursion = False
        soft = excursion or z > self.onset_z
        self.soft_start = (self.soft_start if self.soft_start is not None else step) if soft else None
        if not excursion:
            self.run = 0
            if not soft:  # a slow ramp must not drag the baseline up behind it
                self._push(y)
            if self.alarmed:
                self.quiet = 0 if soft else self.quiet + 1
                if self.quiet >= self.persistence:
                    self.alarmed, self.quiet = False, 0
            return None
        self.run += 1
        self.quiet = 0
        if self.alarmed or self.run < self.persistence:
            return None
        self.alarmed = True
        return Event(self.kind, self.key, self.role, self.position, int(self.soft_start), step, d, self.direction)

    @property
    def state(self) -> dict:
        """JSON-able snapshot (settings are not included)."""
        return {"key": self.key, "n": self.n, "history": [float(v) for v in self._hist], "run": self.run,
                "soft_start": self.soft_start, "quiet": self.quiet, "alarmed": self.alarmed,
                "last_step": self.last_step, "baseline": self.baseline, "scale": self.scale, "z": self.last_z}

    def load_state(self, state: dict) -> None:
        self.reset()
        for v in state.get("history", [])[-self.window:]:
            self._push(float(v))
        for k in ("n", "run", "soft_start", "quiet", "alarmed", "last_step", "baseline", "scale"):
            if k in state:
                setattr(self, k, state[k])


class EntropyDropDetector(OnlineSpikeDetector):
    """Down-spike of entropy in log space (entropy collapse precedes the RAGEN echo trap). Defaults: a drop to
    below exp(-0.3) = 74% of the baseline, z 4 against a MAD floor of 5% relative noise, for 3 steps."""

    def __init__(self, *, key: str = schema.ENTROPY, kind: str = "entropy_drop", direction: str = "down",
                 transform: str = "log", eps: float = 1e-8, min_rise: float = 0.3, min_scale: float = 0.05,
                 **kwargs):
        super().__init__(key=key, kind=kind, direction=direction, transform=transform, eps=eps,
                         min_rise=min_rise, min_scale=min_scale, **kwargs)
