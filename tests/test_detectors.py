"""Detectors, Timeline and verdicts on synthetic runs shaped like the paper's collapse.

Collapsing runs: p(end_of_turn after the open tag) sits at 0.01-0.04 (0.3 log-odds noise), rises in log-odds
space to 0.5 over 10-20 steps from step ~40; the broken-turn fraction rises ~10 steps later; success falls from
0.9 to 0.1 about 15-18 steps after the spike. Stable runs: noise only, plus single-step outliers that must not
fire any detector.
"""

import json

import numpy as np
import pytest

from collapse_probe.detect.event import Event
from collapse_probe.detect.grad_norm import GradNormSpikeDetector
from collapse_probe.detect.monitor import CollapseMonitor, replay
from collapse_probe.detect.peak import PeakFractionDetector, RewardVarianceCollapseDetector, ValidityDropDetector
from collapse_probe.detect.rule import DEFAULT_RULE, CollapseRule
from collapse_probe.detect.shift import FirstValueShiftDetector
from collapse_probe.detect.spike import EntropyDropDetector, OnlineSpikeDetector
from collapse_probe.runs.timeline import Timeline


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p):
    return np.log(p) - np.log1p(-p)


def make_records(seed, collapse=True, n=100, outliers=3):
    """(records, info) of one synthetic run; info has the true onset steps and the outlier steps."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    onset = int(rng.integers(37, 44)) if collapse else n + 1000
    ramp = int(rng.integers(10, 21))
    frac = np.clip((t - onset) / ramp, 0, 1)
    l0 = _logit(rng.uniform(0.01, 0.04))
    eot = _sig(l0 + frac * (0.0 - l0) + rng.normal(0, 0.3, n))
    tool_open = _sig(_logit(0.004) + frac * 1.0 + rng.normal(0, 0.3, n))
    tool_close = _sig(_logit(1e-4) + rng.normal(0, 0.5, n))
    eos = _sig(_logit(1e-5) + rng.normal(0, 0.5, n))
    probe_eot = _sig(_logit(0.03) + frac * 1.2 + rng.normal(0, 0.2, n))
    ts_tool = _sig(_logit(0.75) + rng.normal(0, 0.1, n))
    ts_eot = _sig(_logit(0.02) + frac * 1.5 + rng.normal(0, 0.3, n))
    b_on = onset + int(rng.integers(8, 13))
    broken = np.clip((t - b_on) / 12, 0, 1)
    s_on = onset + int(rng.integers(15, 19))
    drop = np.clip((t - s_on) / 12, 0, 1)
    p_succ = 0.9 - 0.8 * drop
    ent = 0.7 * np.exp(-0.7 * drop + rng.normal(0, 0.02, n))
    gn = np.exp(rng.normal(0, 0.15, n)) * np.where((t >= s_on + 5) & (t < s_on + 11), 3.0, 1.0)
    out_steps = []
    if not collapse and outliers:
        out_steps = [int(s) for s in rng.choice(np.arange(15, 95, 12), size=outliers, replace=False)]
    recs = []
    for i in t:
        e, fc_p, tp_p = float(eot[i]), 0.01 + 0.7 * broken[i], 0.02 + 0.06 * broken[i]
        s_p, g = float(p_succ[i]), float(gn[i])
        if i in out_steps:  # one bad step: spike, broken turns, low success, big gradient, all at once
            e, fc_p, s_p, g = float(rng.uniform(0.2, 0.4)), 0.3, 0.4, g * 4
        jo = max(1.0 - e - tool_open[i] - tool_close[i] - eos[i] - 0.01, 1e-4)
        hr_p = 0.1 * (1 - broken[i])
        mix = rng.multinomial(480, [1 - fc_p - tp_p - hr_p, hr_p, tp_p, fc_p]) / 480
        succ = rng.binomial(60, s_p) / 60
        recs.append({
            "step": int(i), "time": 1e9 + 10.0 * i, "phase": "rl",
            "cp/rollout/after_open/end_of_turn": e, "cp/rollout/after_open/tool_open": float(tool_open[i]),
            "cp/rollout/after_open/json_open": float(jo), "cp/rollout/after_open/tool_close": float(tool_close[i]),
            "cp/rollout/after_open/eos": float(eos[i]), "cp/rollout/after_open/entropy": 0.3,
            "cp/rollout/after_open/count": 400, "cp/rollout/entropy": float(ent[i]),
            "cp/rollout/turn_start/tool_open": float(ts_tool[i]),
            "cp/rollout/turn_start/end_of_turn": float(ts_eot[i]),
            "cp/probe/after_open/end_of_turn": float(probe_eot[i]),
            "cp/probe/after_open/json_open": float(1 - probe_eot[i] - 0.01),
            "fmt/healthy_tool_call": mix[0], "fmt/healthy_response": mix[1], "fmt/text_pollution": mix[2],
            "fmt/full_collapse": mix[3], "fmt/reason/empty_call": mix[3], "format_valid": float(mix[0] + mix[1]),
            "success": succ, "reward/mean": succ, "reward/std": float(np.sqrt(succ * (1 - succ))),
            "reward/group_std_mean": float(np.sqrt(s_p * (1 - s_p)) * 0.9 + rng.normal(0, 0.015)),
            "entropy": float(ent[i]), "grad_norm": g, "kl": 0.001 * float(i), "loss": 0.1,
        })
    return recs, {"onset": onset, "b_on": b_on, "s_on": s_on, "outliers": out_steps}


COLLAPSE_SEEDS = range(8)
STABLE_SEEDS = range(100, 120)


@pytest.fixture(scope="module")
def collapsing():
    return [make_records(s) for s in COLLAPSE_SEEDS]


@pytest.fixture(scope="module")
def stable():
    return [make_records(s, collapse=False) for s in STABLE_SEEDS]


# ---------------------------------------------------------------------------------------------- Timeline
def test_timeline_sorts_dedups_and_coerces():
    recs = [{"step": 3, "a": 1.0}, {"step": 1, "a": "NaN", "phase": "rl"}, {"step": 3, "a": 2.0},
            {"a": 5.0}, {"step": 2, "a": "Infinity"}]
    tl = Timeline.from_records(recs)
    assert list(tl.steps) == [1, 2, 3]
    a = tl.series("a")
    assert np.isnan(a[1]) and np.isinf(a[2]) and a[3] == 2.0  # the last record of a step wins
    assert tl.series("phase").isna().all()
    missing = tl.series("no/such/key")
    assert len(missing) == 3 and missing.isna().all()
    assert len(Timeline.from_records([]).series("x")) == 0


def test_timeline_control_series_and_states(collapsing):
    tl = Timeline.from_records(collapsing[0][0])
    assert tl.sources() == ["probe", "rollout"]
    assert tl.positions("rollout") == ["after_open", "turn_start"]
    cs = tl.control_series()
    assert set(cs) == {"end_of_turn", "tool_open", "json_open", "tool_close", "eos"}
    assert set(tl.control_series("probe")) == {"end_of_turn", "json_open"}
    mix = tl.state_mix()
    assert list(mix.columns) == ["healthy_tool_call", "healthy_response", "text_pollution", "full_collapse"]
    assert np.allclose(mix.sum(axis=1), 1.0)
    assert tl.success().name == "success"
    no_success = Timeline.from_records([{k: v for k, v in r.items() if k != "success"} for r in collapsing[0][0]])
    assert no_success.success().name == "reward/mean"
    assert tl.to_frame().shape[0] == 100


def test_timeline_from_run_with_real_runlog(tmp_path, collapsing):
    from collapse_probe.runs import runlog

    recs = [dict(r) for r in collapsing[0][0]]
    recs[5]["cp/rollout/after_open/end_of_turn"] = float("nan")
    with runlog.RunLog(tmp_path) as log:
        for r in recs:
            log.append(r)
    tl = Timeline.from_run(tmp_path)
    assert len(tl) == 100 and np.isnan(tl.series("cp/rollout/after_open/end_of_turn")[5])
    assert replay(tl.records()).collapsed


# ---------------------------------------------------------------------------------------------- detectors
def _flat_then_step(rng, n=80, at=50, lo=0.02, hi=0.4):
    p = np.where(np.arange(n) < at, lo, hi)
    return _sig(_logit(p) + rng.normal(0, 0.3, n))


def test_online_spike_detector_step_change():
    rng = np.random.default_rng(0)
    det = OnlineSpikeDetector(key="k", role="end_of_turn", position="after_open")
    events = det.fit(range(80), _flat_then_step(rng)).predict()
    assert len(events) == 1  # latched: one event per excursion
    ev = events[0]
    assert ev.kind == "control_spike" and ev.direction == "up" and ev.step == 50
    assert ev.detected_at == 52  # persistence 3
    assert ev.magnitude > 2.5
    json.dumps(det.state)
    det.reset()
    assert det.state["n"] == 0 and det.predict() == []


def test_online_spike_detector_ignores_outliers_nan_and_warmup():
    rng = np.random.default_rng(1)
    p = _sig(_logit(0.02) + rng.normal(0, 0.3, 80))
    p[[20, 40, 41, 60]] = 0.5  # single outliers and one 2-step burst (< persistence 3)
    p[[30, 31]] = np.nan
    assert OnlineSpikeDetector().fit(range(80), p).predict() == []
    early = _flat_then_step(rng, at=3)
    assert OnlineSpikeDetector(min_history=10).fit(range(80), early).predict() == []  # no baseline before


def test_online_spike_detector_down_and_abs_guard():
    rng = np.random.default_rng(2)
    p = _sig(_logit(np.where(np.arange(80) < 50, 0.95, 0.4)) + rng.normal(0, 0.2, 80))
    (ev,) = OnlineSpikeDetector(direction="down").fit(range(80), p).predict()
    assert ev.direction == "down" and ev.step == 50
    # very noisy series: the z rule is blind, the absolute guard (p > 0.3 from a baseline < 0.1) still fires
    q = _sig(_logit(0.03) + rng.normal(0, 1.2, 80))
    q[50:] = 0.45
    kw = dict(z_threshold=50.0)
    assert OnlineSpikeDetector(**kw).fit(range(80), q).predict() == []
    (ev,) = OnlineSpikeDetector(abs_threshold=0.3, abs_baseline=0.1, **kw).fit(range(80), q).predict()
    assert ev.step == 50
    with pytest.raises(ValueError):
        OnlineSpikeDetector(transform="sqrt")
    with pytest.raises(ValueError):
        OnlineSpikeDetector(direction="sideways")


def test_first_value_shift_detector():
    det = FirstValueShiftDetector(key="k", role="end_of_turn").fit([0, 5, 10, 15], [0.02, 0.03, 0.09, 0.5])
    (ev,) = det.predict()
    assert (ev.step, ev.detected_at) == (10, 10) and ev.magnitude > 1.0
    down = FirstValueShiftDetector(direction="down").fit([0, 5, 10], [0.95, 0.9, 0.5]).predict()
    assert [e.step for e in down] == [10]
    assert FirstValueShiftDetector().fit([0, 5], [1e-6, 1e-4]).predict() == []  # below min_value: no mass


def _reward_drop(steps, values):
    rule = DEFAULT_RULE
    det = PeakFractionDetector(kind="reward_drop", frac=rule.drop_frac, persistence=rule.drop_persistence,
                               smooth=rule.drop_smooth, min_history=1, min_peak=rule.min_peak,
                               min_drop=rule.min_drop)
    events = det.fit(steps, values).predict()
    return events[0].step if events else None


def test_peak_fraction_and_reward_drop():
    steps = np.arange(60)
    s = np.full(60, 0.9)
    s[20] = 0.2  # one bad batch
    assert _reward_drop(steps, s) is None
    s[40:] = 0.3
    assert _reward_drop(steps, s) == 40
    low = np.full(60, 0.05)
    low[40:] = 0.0
    assert _reward_drop(steps, low) is None  # peak below min_peak: nothing to lose
    v = np.r_[np.full(30, 0.3), np.full(30, 0.05)]
    (ev,) = RewardVarianceCollapseDetector().fit(steps, v).predict()
    assert (ev.kind, ev.step, ev.detected_at, ev.direction) == ("reward_var_collapse", 30, 32, "down")
    assert ev.magnitude == pytest.approx(0.05 / 0.3)
    up_outlier = np.full(60, 0.9)
    up_outlier[10] = 5.0  # must not set an unreachable peak
    assert PeakFractionDetector(frac=0.5).fit(steps, up_outlier).predict() == []
    (ev,) = ValidityDropDetector().fit(steps, np.r_[np.full(30, 0.95), np.full(30, 0.6)]).predict()
    assert ev.kind == "validity_drop" and ev.step == 30


def test_grad_norm_and_entropy_baselines():
    rng = np.random.default_rng(4)
    g = np.exp(rng.normal(0, 0.1, 80))
    g[[20, 30, 31, 32]] = 5.0  # shorter than patience 4
    assert GradNormSpikeDetector().fit(range(80), g).predict() == []
    g[60:66] = 5.0
    (ev,) = GradNormSpikeDetector().fit(range(80), g).predict()
    assert (ev.step, ev.detected_at) == (60, 63) and ev.magnitude > 3
    e = 0.7 * np.exp(rng.normal(0, 0.02, 80))
    e[50:] *= 0.4
    (ev,) = EntropyDropDetector().fit(range(80), e).predict()
    assert (ev.kind, ev.direction, ev.step) == ("entropy_drop", "down", 50)


def test_event_to_dict_is_json():
    ev = Event("control_spike", "cp/rollout/after_open/end_of_turn", "end_of_turn", "after_open",
               np.int64(5), np.int64(7), np.float64(2.0), "up")
    d = json.loads(json.dumps(ev.to_dict()))
    assert d == {"kind": "control_spike", "key": "cp/rollout/after_open/end_of_turn", "role": "end_of_turn",
                 "position": "after_open", "step": 5, "detected_at": 7, "magnitude": 2.0, "direction": "up"}
    assert Event("x", "k", None, None, 1, 1, float("nan"), "up").to_dict()["magnitude"] is None


# ---------------------------------------------------------------------------------------------- verdicts
def test_collapsing_runs_warn_before_reward_drop(collapsing):
    for recs, info in collapsing:
        v = replay(Timeline.from_records(recs).records())
        assert v.collapsed and v.confirmed_at is not None
        assert info["onset"] - 2 <= v.spike_step <= info["onset"] + 8, (v.spike_step, info)
        assert v.collapse_step >= info["s_on"]
        assert v.breakage_step is not None and v.breakage_step > v.spike_step
        # the lead counts from the step at which the first alert was available
        assert v.lead_steps == v.collapse_step - v.first_alert_step and v.lead_steps >= 8
        assert v.onset_lead_steps >= v.lead_steps
        spike = v.first_event("control_spike")
        assert spike.detected_at < v.collapse_step
        assert spike.role in ("end_of_turn", "json_open", "tool_open")


def test_stable_runs_raise_no_alarm(stable):
    for recs, info in stable:
        v = replay(Timeline.from_records(recs).records())
        assert v.events == [], (info, [e.to_dict() for e in v.events])
        assert not v.collapsed and v.lead_steps is None
        mon = CollapseMonitor()
        assert all(mon.update(r) == [] for r in recs) and not mon.collapsed


def test_verdict_to_dict_shape(collapsing):
    v = replay(collapsing[0][0])
    d = json.loads(json.dumps(v.to_dict()))
    head = ["collapsed", "collapse_reason", "confirmed_at", "collapse_step", "drop_detected_at", "spike_step",
            "breakage_step", "first_alert_step", "first_alert_onset", "lead_steps", "onset_lead_steps"]
    assert list(d)[:len(head)] == head and {"events", "baselines", "source", "position"} <= set(d)
    assert d["collapsed"] is True
    assert all(isinstance(d[k], int) for k in head if k not in ("collapsed", "collapse_reason"))
    assert {"reward_drop", "control_spike", "format_breakage"} <= {e["kind"] for e in d["events"]}
    assert set(d["baselines"]) == {"entropy_drop", "reward_var_collapse", "grad_norm_spike", "validity_drop",
                                   "mismatch_rise"}
    for b in d["baselines"].values():
        assert set(b) == {"step", "detected_at", "lead_steps", "logged"}
    # the peers' signals arrive later than ours on this kind of collapse
    assert d["baselines"]["entropy_drop"]["lead_steps"] is None or \
        d["baselines"]["entropy_drop"]["lead_steps"] < d["lead_steps"]
    assert d["baselines"]["grad_norm_spike"]["detected_at"] is not None
    text = v.summary()
    assert "collapsed: YES" in text and f"onset {v.spike_step}" in text and "lead" in text


def test_breakage_from_format_valid_only(collapsing):
    recs = [{k: v for k, v in r.items() if not k.startswith("fmt/")} for r in collapsing[1][0]]
    v = replay(recs)
    ev = v.first_event("format_breakage")
    assert ev.key == "fmt/full_collapse+fmt/text_pollution" and ev.step < v.collapse_step


def test_spike_settings_reach_the_spike_detector(collapsing):
    recs = collapsing[0][0]
    assert replay(recs, spike_settings={"z_threshold": 1e6, "abs_threshold": None}).spike_step is None
    with pytest.raises(TypeError):
        replay(recs, spike_settings={"no_such_setting": 1})


def test_live_monitor_equals_replay(collapsing):
    for recs, info in collapsing:
        mon = CollapseMonitor()
        first_collapsed, n_alerts = None, 0
        for r in recs:
            n_alerts += len(mon.update(r))
            if mon.collapsed and first_collapsed is None:
                first_collapsed = r["step"]
        live, offline = mon.verdict(), replay(Timeline.from_records(recs).records())
        assert live.to_dict() == offline.to_dict()
        assert first_collapsed == live.confirmed_at
        assert n_alerts == len(mon.events) >= 3
        assert len(mon.spikes) <= 6  # one detector per key, not per step


def test_monitor_status(collapsing):
    recs = collapsing[2][0]
    mon = CollapseMonitor()
    statuses = [mon.status(r) for r in recs]
    for st in statuses:
        json.dumps(st)
        assert {"step", "probs", "state_mix", "alerts", "collapsed", "first_alert_step"} <= set(st)
    first = statuses[0]
    assert first["alerts"] == [] and first["collapsed"] is False
    assert set(first["probs"]) == {"end_of_turn", "tool_open", "json_open", "tool_close", "eos"}
    assert set(first["state_mix"]) == {"healthy_tool_call", "healthy_response", "text_pollution", "full_collapse"}
    alerted = [st for st in statuses if st["alerts"]]
    assert alerted and alerted[0]["alerts"][0]["kind"] in ("control_spike", "control_drift")
    assert statuses[-1]["collapsed"] is True
    mon2 = CollapseMonitor()
    for r in recs[:60]:
        new = mon2.update(r)
        st = mon2.status(r)
        assert st["alerts"] == [e.to_dict() for e in new]
    assert mon2.update(recs[10]) == []  # old step: ignored


def test_breakage_alone_confirms():
    rng = np.random.default_rng(5)
    recs = [{"step": i, "fmt/full_collapse": float((0.02 if i < 30 else 0.6) + rng.normal(0, 0.003)),
             "fmt/text_pollution": 0.01, "success": 0.9} for i in range(60)]
    v = replay(recs, rule=CollapseRule(breakage_persist=10))
    assert v.breakage_step == 30 and v.collapsed and v.collapse_reason == "format breakage persists"


def _early_collapse(drop_at: int = 1, n: int = 50, first: float = 0.72) -> list[dict]:
    """Success falls from `first` to 0 within 3 steps from `drop_at` and stays there; turns break with it."""
    recs = []
    for t in range(n):
        k = min(max(t - drop_at + 1, 0), 3) / 3
        succ = first * (1 - k)
        recs.append({"step": t, "success": succ, "fmt/full_collapse": 0.9 * k, "fmt/text_pollution": 0.02,
                     "fmt/healthy_tool_call": 0.98 - 0.9 * k, "cp/rollout/after_open/end_of_turn": 0.03 + 0.9 * k})
    return recs


@pytest.mark.parametrize("drop_at", [1, 2, 3])
def test_a_drop_in_the_first_steps_is_a_collapse(drop_at):
    v = replay(_early_collapse(drop_at))
    assert v.collapsed and v.collapse_step is not None and v.collapse_step <= 4, v.summary()
    assert v.confirmed_at <= 5


def test_a_reward_drop_with_healthy_turns_is_not_a_collapse():
    recs = [{"step": t, "success": 0.8 if t < 20 else 0.1, "fmt/full_collapse": 0.01, "fmt/text_pollution": 0.01,
             "fmt/healthy_tool_call": 0.98} for t in range(40)]
    v = replay(recs)
    assert v.collapse_step == 20 and not v.collapsed
    assert "reward dropped, but no control-token or format warning" in v.summary()


def test_checkpoint_mode_uses_the_first_value_shift():
    recs = [{"step": s, "cp/probe/after_open/end_of_turn": p, "success": q}
            for s, p, q in [(0, 0.02, 0.9), (5, 0.04, 0.9), (10, 0.14, 0.85), (15, 0.5, 0.2), (20, 0.9, 0.0)]]
    v = replay(recs, source="probe", checkpoints=True)
    assert v.spike_step == 10 and v.first_alert_step == 10 and v.collapse_step == 15 and v.collapsed
    assert v.lead_steps == 5
