"""What every detector returns (`Event`), the probability transform they share, and the streaming base class.

Probabilities are compared in log-odds space (logit of p clipped to [eps, 1-eps]): a rise from 0.02 to 0.06 is as
visible as one from 0.25 to 0.5, and noise of a mean probability is roughly constant there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np


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


_np_log, _np_log1p = np.log, np.log1p


def transform_values(x, transform: str = "logit", eps: float = 1e-6):
    """logit(clip(x, eps, 1-eps)), log(max(x, eps)) or identity; works on scalars and arrays."""
    if type(x) is float and x == x:  # the detectors' per-update path: numpy's own log (same bits), no array setup
        if transform == "logit":
            p = min(max(x, eps), 1.0 - eps)
            return _np_log(p) - _np_log1p(-p)
        if transform == "log":
            return _np_log(max(x, eps))
    x = np.asarray(x, dtype="float64")
    if transform == "logit":
        p = np.clip(x, eps, 1.0 - eps)
        return np.log(p) - np.log1p(-p)
    if transform == "log":
        return np.log(np.maximum(x, eps))
    if transform == "identity":
        return x
    raise ValueError(f"unknown transform {transform!r}: use 'logit', 'log' or 'identity'")


def inverse_transform(y: float, transform: str) -> float:
    if transform == "logit":
        return float(1.0 / (1.0 + math.exp(-y)))
    if transform == "log":
        return float(math.exp(y))
    return float(y)


def direction_sign(direction: str) -> float:
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be 'up' or 'down', not {direction!r}")
    return 1.0 if direction == "up" else -1.0


class StreamingDetector:
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
