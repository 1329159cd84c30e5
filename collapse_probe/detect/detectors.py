"""Change and spike detectors over per-step metric series.

Two families share one output type, `Event`:

* streaming detectors (`update(step, value) -> Event | None`, constant memory, used by `watch`); they also
  offer `fit(steps, values)` / `predict()` which simply replays a whole series through `update`;
* `OfflineChangeDetector` (`fit` / `predict`, used by `analyze`): penalised binary segmentation.

Every threshold is a keyword parameter. Defaults were set on synthetic series shaped like the collapse in
Hao et al. 2026 (arXiv 2606.26027): p(`<|im_end|>` after `<tool_call>`) at 0.01-0.05 with per-step noise of
about 0.3 log-odds, rising to ~0.5 over 10-20 steps. They must be re-checked on real runs.

Probabilities are compared in log-odds space (logit of p clipped to [eps, 1-eps]): a rise from 0.02 to 0.06 is as
visible as one from 0.25 to 0.5, and noise of a mean probability is roughly constant there.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "Event", "OnlineSpikeDetector", "OfflineChangeDetector", "PeakFractionDetector", "GradNormSpikeDetector",
    "EntropyDropDetector", "RewardVarianceCollapseDetector", "ValidityDropDetector", "detect_reward_drop",
    "transform_values", "CONTROL_SPIKE_DEFAULTS", "BREAKAGE_DEFAULTS",
]

# Extra settings for control-token probabilities rising from a low baseline (used by verdict.py): an absolute
# guard (p > 0.3 while the baseline is < 0.1 is an alarm even in a noisy series) and a floor (p must reach 1%
# before an alarm: 1e-6 -> 1e-4 is a large log-odds rise but irrelevant mass). z 3 for 2 steps: a per-step mean
# over hundreds of decision positions is smooth, and the 1.0 log-odds minimum rise keeps noise out; chosen on
# bench/detection.py's collapse/stable seeds 0-4 (see the closing note of the detection issue).
CONTROL_SPIKE_DEFAULTS = dict(z_threshold=3.0, persistence=2, abs_threshold=0.3, abs_baseline=0.1, min_value=0.01)
# Broken-turn fraction (fmt/full_collapse + fmt/text_pollution): fractions of a few hundred turns are often
# exactly 0, so clip at 0.5% (not 1e-6) and demand at least 5% broken turns.
BREAKAGE_DEFAULTS = dict(eps=0.005, abs_threshold=0.3, abs_baseline=0.1, min_value=0.05)


@dataclass
class Event:
    """One detected excursion. `step` is the onset (first step of the persistent excursion); `detected_at`
    is the step at which a streaming detector fires (>= step). `magnitude` is the rise in transformed units
    (log-odds for probabilities) or a ratio (value / reference) for the ratio detectors."""

    kind: str
    key: str
    role: str | None
    position: str | None
    step: int
    detected_at: int
    magnitude: float
    direction: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["step"], d["detected_at"] = int(self.step), int(self.detected_at)
        m = float(self.magnitude)
        d["magnitude"] = round(m, 6) if math.isfinite(m) else None
        return d


def transform_values(x, transform: str = "logit", eps: float = 1e-6):
    """logit(clip(x, eps, 1-eps)), log(max(x, eps)) or identity; works on scalars and arrays."""
    x = np.asarray(x, dtype="float64")
    if transform == "logit":
        p = np.clip(x, eps, 1.0 - eps)
        return np.log(p) - np.log1p(-p)
    if transform == "log":
        return np.log(np.maximum(x, eps))
    if transform == "identity":
        return x
    raise ValueError(f"unknown transform {transform!r}: use 'logit', 'log' or 'identity'")


def _inverse(y: float, transform: str) -> float:
    if transform == "logit":
        return float(1.0 / (1.0 + math.exp(-y)))
    if transform == "log":
        return float(math.exp(y))
    return float(y)


def _sign(direction: str) -> float:
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be 'up' or 'down', not {direction!r}")
    return 1.0 if direction == "up" else -1.0


def _finite(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class _Streaming:
    """fit/predict on top of update() for every streaming detector."""

    kind = ""

    def update(self, step: int, value) -> Event | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, steps: Sequence[int], values: Iterable[float]):
        """Reset, then replay the series; events are kept for predict()."""
        self.reset()
        self.events_ = [e for s, v in zip(steps, values) if (e := self.update(int(s), v)) is not None]
        return self

    def predict(self) -> list[Event]:
        return list(getattr(self, "events_", []))


class OnlineSpikeDetector(_Streaming):
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
        self.sign = _sign(direction)
        transform_values(0.5, transform)  # validate
        if not 3 <= min_history <= window or persistence < 1:
            raise ValueError("need 3 <= min_history <= window and persistence >= 1")
        self.key, self.role, self.position, self.kind = key, role, position, kind
        self.direction, self.transform, self.eps = direction, transform, eps
        self.window, self.min_history = int(window), int(min_history)
        self.z_threshold, self.min_rise, self.min_scale = z_threshold, min_rise, min_scale
        self.persistence, self.onset_z = int(persistence), onset_z
        self.abs_threshold, self.abs_baseline, self.min_value = abs_threshold, abs_baseline, min_value
        self.reset()

    def reset(self) -> None:
        self._hist: deque[float] = deque(maxlen=self.window)
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

    def _baseline(self) -> tuple[float, float]:
        h = np.fromiter(self._hist, dtype="float64")
        med = float(np.median(h))
        mad = float(np.median(np.abs(h - med))) * 1.4826
        return med, max(mad, self.min_scale)

    def _abs_guard(self, raw: float, base: float) -> bool:
        if self.abs_threshold is None or self.abs_baseline is None:
            return False
        b = _inverse(base, self.transform)
        if self.sign > 0:
            return raw > self.abs_threshold and b < self.abs_baseline
        return raw < self.abs_threshold and b > self.abs_baseline

    def update(self, step: int, value) -> Event | None:
        raw = _finite(value)
        if raw is None:
            return None
        step = int(step)
        self.last_step = step
        y = float(transform_values(raw, self.transform, self.eps))
        self.n += 1
        if len(self._hist) < self.min_history:
            self._hist.append(y)
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
                self._hist.append(y)
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
        self._hist.extend(float(v) for v in state.get("history", []))
        for k in ("n", "run", "soft_start", "quiet", "alarmed", "last_step", "baseline", "scale"):
            if k in state:
                setattr(self, k, state[k])


class EntropyDropDetector(OnlineSpikeDetector):
    """Down-spike of entropy in log space (entropy collapse precedes the RAGEN echo trap). Defaults: a drop to
    below exp(-0.3) = 74% of the baseline, z 4 against a MAD floor of 5% relative noise, for 3 steps."""

    def __init__(self, *, key: str = "entropy", kind: str = "entropy_drop", direction: str = "down",
                 transform: str = "log", eps: float = 1e-8, min_rise: float = 0.3, min_scale: float = 0.05,
                 **kwargs):
        super().__init__(key=key, kind=kind, direction=direction, transform=transform, eps=eps,
                         min_rise=min_rise, min_scale=min_scale, **kwargs)


class PeakFractionDetector(_Streaming):
    """Fires when a value stays below `frac` x its running peak for `persistence` updates.

    The running peak is taken over the median of the last `smooth` values, so one high outlier cannot set an
    unreachable peak. `min_peak` (the peak must be at least this) and `min_drop` (peak - value at least this)
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
        v = _finite(value)
        if v is None:
            return None
        self.n += 1
        self._recent.append(v)
        if len(self._recent) == self.smooth:
            m = float(np.median(self._recent))
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

    def __init__(self, *, key: str = "reward/group_std_mean", kind: str = "reward_var_collapse",
                 frac: float = 0.5, persistence: int = 3, **kwargs):
        super().__init__(key=key, kind=kind, frac=frac, persistence=persistence, **kwargs)


class ValidityDropDetector(PeakFractionDetector):
    """`format_valid` falls below 70% of its running peak for 3 steps. Validity is near 1 on healthy runs and
    measured over hundreds of turns, so a 30% relative loss is far outside noise yet still early."""

    def __init__(self, *, key: str = "format_valid", kind: str = "validity_drop", frac: float = 0.7,
                 persistence: int = 3, **kwargs):
        super().__init__(key=key, kind=kind, frac=frac, persistence=persistence, **kwargs)


class GradNormSpikeDetector(_Streaming):
    """llm-foundry KillLossSpike-like rule on `grad_norm`: a value above `factor` x the running mean of the last
    `window` non-outlier values for `patience` consecutive updates (defaults 2x, window 100, patience 4 as in
    llm-foundry), after `min_history` values. Event.magnitude = value / running mean."""

    def __init__(self, *, key: str = "grad_norm", kind: str = "grad_norm_spike", window: int = 100,
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
        v = _finite(value)
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


def detect_reward_drop(steps: Sequence[int], success: Iterable[float], *, frac: float = 0.5,
                       persistence: int = 2, smooth: int = 3, min_history: int = 3, min_peak: float = 0.1,
                       min_drop: float = 0.1) -> int | None:
    """First step where success falls below `frac` x its running peak and stays there `persistence` steps.

    Defaults: half the peak (a drop that no sampling noise of ~60 prompts explains), 2 steps (one bad batch is
    not a drop), peak over a 3-step median, and at least 0.1 absolute success lost from a peak of >= 0.1.
    """
    det = PeakFractionDetector(key="success", kind="reward_drop", frac=frac, persistence=persistence,
                               smooth=smooth, min_history=min_history, min_peak=min_peak, min_drop=min_drop)
    events = det.fit(steps, success).predict()
    return events[0].step if events else None


class OfflineChangeDetector:
    """Offline change-point detector: penalised binary segmentation with a least-squares (mean-shift) cost.

    fit(steps, values): values are transformed (`transform`, NaNs dropped); the series is split recursively at
    the point that most reduces the within-segment sum of squares, keeping a split when the reduction exceeds
    `penalty` x sigma^2 x log(n) (a BIC-like penalty; sigma from the MAD of first differences, floored at
    `min_scale`) and both parts have >= `min_size` points (so single-step outliers cannot form a segment), up to
    `max_changes` splits. The procedure is deterministic.

    predict(): walking the segments in time order, the first segment whose median exceeds the mean of the level
    it rose from by more than `min_rise` (in the alarm direction) gives one Event. A ramp cut into several
    rising segments is dated to the first segment of that rising chain whose mean is already `onset_frac` x
    min_rise above the old level. `detected_at` is the first step from the
    onset whose value alone exceeds that level by `min_rise`. With `min_value`, an up-rise must also reach it
    (segment median in raw units).
    """

    def __init__(self, *, key: str = "", role: str | None = None, position: str | None = None,
                 kind: str = "control_spike", direction: str = "up", transform: str = "logit",
                 eps: float = 1e-6, min_size: int = 5, penalty: float = 3.0, min_rise: float = 1.0,
                 min_scale: float = 0.25, max_changes: int = 10, min_value: float | None = None,
                 onset_frac: float = 0.5):
        self.sign = _sign(direction)
        transform_values(0.5, transform)
        self.key, self.role, self.position, self.kind = key, role, position, kind
        self.direction, self.transform, self.eps = direction, transform, eps
        self.min_size, self.penalty, self.min_rise = int(max(min_size, 1)), penalty, min_rise
        self.min_scale, self.max_changes, self.min_value = min_scale, int(max_changes), min_value
        self.onset_frac = onset_frac
        self.steps_ = np.zeros(0, dtype="int64")
        self.y_ = np.zeros(0)
        self.change_points_: list[int] = []

    def fit(self, steps: Sequence[int], values: Iterable[float]) -> "OfflineChangeDetector":
        s = np.asarray(list(steps), dtype="int64")
        v = np.asarray([_finite(x) if _finite(x) is not None else np.nan for x in values], dtype="float64")
        ok = np.isfinite(v)
        self.steps_, self.y_ = s[ok], transform_values(v[ok], self.transform, self.eps)
        self.change_points_ = self._segment(self.y_)
        return self

    def _segment(self, y: np.ndarray) -> list[int]:
        n = len(y)
        if n < 2 * self.min_size:
            return []
        mad = float(np.median(np.abs(np.diff(y) - np.median(np.diff(y))))) * 1.4826 / math.sqrt(2)
        sigma = max(mad, self.min_scale)
        pen = self.penalty * sigma ** 2 * math.log(n)
        c1 = np.concatenate([[0.0], np.cumsum(y)])
        c2 = np.concatenate([[0.0], np.cumsum(y * y)])

        def cost(a: int, b: int) -> float:  # sum of squares of y[a:b] around its mean
            return float(c2[b] - c2[a] - (c1[b] - c1[a]) ** 2 / (b - a))

        def best(a: int, b: int) -> tuple[float, int]:
            ks = np.arange(a + self.min_size, b - self.min_size + 1)
            if len(ks) == 0:
                return 0.0, -1
            left = c2[ks] - c2[a] - (c1[ks] - c1[a]) ** 2 / (ks - a)
            right = c2[b] - c2[ks] - (c1[b] - c1[ks]) ** 2 / (b - ks)
            gains = cost(a, b) - left - right
            i = int(np.argmax(gains))
            return float(gains[i]), int(ks[i])

        cps: list[int] = []
        todo = [(0, n)]
        while todo and len(cps) < self.max_changes:
            cands = [(best(a, b), (a, b)) for a, b in todo]
            (gain, k), (a, b) = max(cands, key=lambda c: c[0][0])
            if k < 0 or gain <= pen:
                break
            cps.append(k)
            todo.remove((a, b))
            todo += [(a, k), (k, b)]
        return sorted(cps)

    def segments(self) -> list[tuple[int, int, float]]:
        """[(first_step, last_step, mean in transformed units)] of the fitted segmentation."""
        bounds = [0, *self.change_points_, len(self.y_)]
        return [(int(self.steps_[a]), int(self.steps_[b - 1]), float(self.y_[a:b].mean()))
                for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def predict(self) -> list[Event]:
        y, sg = self.y_, self.sign
        if len(y) == 0:
            return []
        bounds = [0, *self.change_points_, len(y)]
        segs = [y[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        means = [float(s.mean()) for s in segs]
        start = None  # first segment of the current chain of rising segments
        for i in range(1, len(segs)):
            if sg * (means[i] - means[i - 1]) <= 0:
                start = None
                continue
            start = i if start is None else start
            chain = start
            ref = means[chain - 1]
            rise = sg * (float(np.median(segs[i])) - ref)
            if rise <= self.min_rise:
                continue
            if self.min_value is not None and sg > 0 and _inverse(float(np.median(segs[i])),
                                                                  self.transform) < self.min_value:
                continue
            # date the rise to the first segment of the chain that is already clearly above the old level, so
            # that a slow drift of tiny steps before a real rise does not move the onset far back
            first = next((j for j in range(chain, i + 1)
                          if sg * (means[j] - ref) > self.onset_frac * self.min_rise), i)
            onset = bounds[first]
            over = np.nonzero(sg * (y[onset:] - ref) > self.min_rise)[0]
            det = onset + int(over[0]) if len(over) else onset
            return [Event(self.kind, self.key, self.role, self.position, int(self.steps_[onset]),
                          int(self.steps_[det]), rise, self.direction)]
        return []
