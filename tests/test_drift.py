"""The drift detector (detect/drift.py): slow monotone rises in log-odds, seen from the first steps, no alarm on
drift-free noise or on rises that never reach 5% probability, and falls of the open tag at turn start."""

import json
import math

import numpy as np
import pytest

from collapse_probe.detect.drift import DRIFT_DEFAULTS, FALL_DEFAULTS, DriftDetector, _quantile


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p):
    return math.log(p / (1 - p))


def _first(det, values):
    return next((e for i, v in enumerate(values) if (e := det.update(i, float(v))) is not None), None)


def test_quantiles_match_numpy():
    rng = np.random.default_rng(0)
    for n in range(1, 25):
        xs = rng.normal(size=n)
        for q in (0.25, 0.5, 0.75):
            assert _quantile(sorted(xs.tolist()), q) == pytest.approx(float(np.quantile(xs, q)))


def test_ramp_from_step_zero_fires_before_the_spike_detector_could():
    """The demo's shape: p 0.023 at step 0, 0.058 by step 10, 0.30 by step 20, rising at almost every step."""
    t = np.arange(40)
    y = np.interp(t, [0, 10, 20, 40], [_logit(0.023), _logit(0.058), _logit(0.30), _logit(0.9)])
    p = _sig(y + np.random.default_rng(1).normal(0, 0.08, t.size))
    det = DriftDetector(key="k", role="end_of_turn", position="after_open", **DRIFT_DEFAULTS)
    ev = _first(det, p)
    assert ev is not None and ev.kind == "control_drift" and ev.direction == "up"
    assert ev.detected_at <= 12 and ev.step <= 5  # dated back to the start of the ramp
    assert p[ev.detected_at] >= 0.05 and ev.magnitude >= DRIFT_DEFAULTS["min_rise"]
    json.dumps(det.state)
    assert [e.detected_at for e in det.fit(t, p).predict()] == [ev.detected_at]  # latched: one event


def test_no_alarm_on_drift_free_noise_or_below_five_percent():
    rng = np.random.default_rng(2)
    fired = sum(_first(DriftDetector(**DRIFT_DEFAULTS), _sig(_logit(0.1) + rng.normal(0, 0.3, 60))) is not None
                for _ in range(200))
    assert fired <= 2  # bench/drift_calibration.py states the rate
    # a steady rise from 1e-4 to 3e-2 is a large log-odds move of no mass: the 5% floor keeps it quiet
    p = _sig(np.linspace(_logit(1e-4), _logit(0.03), 60) + rng.normal(0, 0.1, 60))
    assert _first(DriftDetector(**DRIFT_DEFAULTS), p) is None
    assert _first(DriftDetector(**{**DRIFT_DEFAULTS, "min_value": None}), p) is not None
    # NaN / None are skipped, not counted
    det = DriftDetector(**DRIFT_DEFAULTS)
    assert det.update(0, float("nan")) is None and det.update(1, None) is None and det.n == 0


def test_late_ramp_after_a_flat_start_is_dated_to_its_start():
    rng = np.random.default_rng(3)
    t = np.arange(80)
    y = _logit(0.02) + np.clip((t - 40) / 15, 0, None) * 2.5 + rng.normal(0, 0.2, t.size)
    ev = _first(DriftDetector(**DRIFT_DEFAULTS), _sig(y))
    assert ev is not None and 38 <= ev.step <= 45 and ev.detected_at < 52


def test_fall_of_the_open_tag_at_turn_start():
    rng = np.random.default_rng(4)
    t = np.arange(50)
    healthy = _sig(_logit(0.7) + rng.normal(0, 0.15, t.size))
    assert _first(DriftDetector(direction="down", **FALL_DEFAULTS), healthy) is None
    falling = _sig(_logit(0.7) - np.clip((t - 5) / 8, 0, None) * 1.5 + rng.normal(0, 0.15, t.size))
    ev = _first(DriftDetector(direction="down", **FALL_DEFAULTS), falling)
    assert ev is not None and ev.direction == "down" and falling[ev.detected_at] <= 0.35


def test_bad_settings_raise():
    with pytest.raises(ValueError):
        DriftDetector(direction="sideways")
    with pytest.raises(ValueError):
        DriftDetector(threshold=0)
    with pytest.raises(ValueError):
        DriftDetector(transform="sqrt")


# ------------------------------------------------------------------ speed work (issue 22): same results as before
class _SortingSpike:
    """The spike detector's update as it was before issue 22 (a sort of the window per update, numpy transform):
    the reference the sorted-window implementation must match event for event."""

    def __init__(self, **kw):
        from collapse_probe.detect.spike import OnlineSpikeDetector
        self.det = OnlineSpikeDetector(**kw)

    @staticmethod
    def _median(values):
        s = sorted(values)
        m = len(s) // 2
        return float(s[m]) if len(s) % 2 else (s[m - 1] + s[m]) / 2

    def update(self, step, value):
        from collapse_probe.detect.event import Event, transform_values
        from collapse_probe.schema import finite_or_none
        d_ = self.det
        raw = finite_or_none(value)
        if raw is None:
            return None
        y = float(transform_values(np.float64(raw), d_.transform, d_.eps))  # the array path
        hist = d_._hist
        if len(hist) < d_.min_history:
            hist.append(y)
            return None
        med = self._median(hist)
        scale = max(self._median([abs(x - med) for x in hist]) * 1.4826, d_.min_scale)
        d = d_.sign * (y - med)
        z = d / scale
        excursion = (z > d_.z_threshold and d > d_.min_rise) or d_._abs_guard(raw, med)
        if excursion and d_.min_value is not None and d_.sign > 0 and raw < d_.min_value:
            excursion = False
        soft = excursion or z > d_.onset_z
        d_.soft_start = (d_.soft_start if d_.soft_start is not None else step) if soft else None
        if not excursion:
            d_.run = 0
            if not soft:
                hist.append(y)
            if d_.alarmed:
                d_.quiet = 0 if soft else d_.quiet + 1
                if d_.quiet >= d_.persistence:
                    d_.alarmed, d_.quiet = False, 0
            return None
        d_.run += 1
        d_.quiet = 0
        if d_.alarmed or d_.run < d_.persistence:
            return None
        d_.alarmed = True
        return Event(d_.kind, d_.key, d_.role, d_.position, int(d_.soft_start), step, d, d_.direction)


def _recorded_series():
    """Real per-step series (reports/outcome-sweep/traces.jsonl: p(end-of-turn) and p({") after the open tag of 17
    runs) and synthetic ones with steps, ramps, outliers, ties and NaN."""
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "reports" / "outcome-sweep" / "traces.jsonl"
    runs: dict = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        for key in ("p_eot", "p_json", "success"):
            runs.setdefault((r["run"], key), []).append(r.get(key))
    out = list(runs.values())
    rng = np.random.default_rng(7)
    for i in range(60):
        t = np.arange(120)
        y = _logit(rng.uniform(0.005, 0.5)) + rng.normal(0, rng.choice([0.05, 0.3, 1.0]), t.size)
        y += np.clip((t - rng.integers(5, 100)) / rng.integers(1, 20), 0, 1) * rng.choice([-3.0, 2.0, 4.0])
        p = _sig(y)
        if i % 3 == 0:
            p = np.round(p, 2)  # ties
        p[rng.integers(0, t.size, 3)] = np.nan
        out.append(p.tolist())
    return out


@pytest.mark.parametrize("settings", [
    {}, {"direction": "down"}, {"z_threshold": 3.0, "persistence": 2, "abs_threshold": 0.3, "abs_baseline": 0.1,
                                "min_value": 0.05}, {"eps": 0.005, "abs_threshold": 0.3, "abs_baseline": 0.1},
    {"window": 7, "min_history": 3, "onset_z": 5.0},
])
def test_spike_detector_matches_the_sorting_implementation(settings):
    from collapse_probe.detect.spike import OnlineSpikeDetector
    n_events = 0
    for series in _recorded_series():
        new, ref = OnlineSpikeDetector(**settings), _SortingSpike(**settings)
        for step, v in enumerate(series):
            a, b = new.update(step, v), ref.update(step, v)
            assert a == b, (step, a, b)
            assert list(new._hist) == list(ref.det._hist)
            n_events += a is not None
    assert n_events > 0  # the comparison saw alarms, not only quiet updates


def test_peak_median_matches_numpy():
    from collapse_probe.detect.peak import PeakFractionDetector
    rng = np.random.default_rng(3)
    for smooth in (1, 2, 3, 4, 5):
        det, values, peak = PeakFractionDetector(smooth=smooth), [], None
        for step, v in enumerate(rng.uniform(0, 1, 200)):
            det.update(step, float(v))
            values.append(float(v))
            m = float(np.median(values[-smooth:]))
            peak = m if peak is None else max(peak, m)
            assert det.peak == peak


# ------------------------------------------------------------------ verdicts that say what they did not see
def _drop_records(with_structure: bool):
    recs = []
    for step in range(40):
        r = {"step": step, "time": 1e9 + step, "success": 0.62 if step < 20 else 0.05}
        if with_structure:
            r["cp/rollout/after_open/end_of_turn"] = 0.02
            r["cp/rollout/after_open/json_open"] = 0.97
            r["fmt/full_collapse"], r["fmt/text_pollution"] = 0.0, 0.01
        recs.append(r)
    return recs


def test_reward_drop_without_structure_data_is_an_unconfirmed_collapse():
    from collapse_probe.detect.monitor import replay
    from collapse_probe.detect.verdict import CONFIRM_WITH
    v = replay(_drop_records(with_structure=False))
    assert not v.collapsed and v.unconfirmed and v.status == "unconfirmed" and v.collapse_step == 20
    head = v.headline()
    assert head["collapsed"] is None and head["status"] == "unconfirmed" and head["confirm_with"] == list(CONFIRM_WITH)
    assert json.loads(json.dumps(v.to_dict()))["collapsed"] is None
    text = v.summary()
    assert "UNCONFIRMED" in text and "rollout_data_dir" in text and "CollapseProbeCallback" in text
    assert "turns stay well-formed" not in text  # it read no turn at all
    # the same drop with healthy control tokens and formats logged: a reward drop, not a collapse
    seen = replay(_drop_records(with_structure=True))
    assert not seen.unconfirmed and seen.status == "reward_drop" and seen.headline()["collapsed"] is False
    assert "turns stay well-formed" in seen.summary()
