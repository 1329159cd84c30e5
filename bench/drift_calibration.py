"""False-alarm rate of the drift detector (detect/drift.py) on drift-free series, and its delay on ramps.

Drift-free series are noise around a fixed log-odds level, at the noise levels real runs show (per-step noise of
p(end-of-turn after the open tag) in reports/outcome-sweep/traces.jsonl: 0.08-0.4 log-odds on smooth runs, ~1.1
on the no-warm-up run; the grpo-collapse runs' p(end-of-turn) moves by 0.02-0.05 from step to step before
its ramp; the detection tests use 0.3): Gaussian, heavy-tailed (Student t, 3 dof) and positively
autocorrelated (AR(1), phi 0.5) noise, 60 steps a series (a run's length). Two rates are printed per threshold:

    cusum      the statistic alone (no minimum rise, no 5% floor): what the threshold itself buys
    detector   the monitor's settings (DRIFT_DEFAULTS) on series at the level of a real run's start (p 0.02)
               and at a level where the 5% floor does not help (p 0.10)

then the steps from the start of a ramp to the alarm, for ramps like the demo's (0.02 -> 0.3 over 20 steps).

    python bench/drift_calibration.py                  # 2000 series per noise model
    python bench/drift_calibration.py --series 500 --json
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from collapse_probe.detect.drift import DRIFT_DEFAULTS, FALL_DEFAULTS, DriftDetector

NOISES = {  # name -> (sigma, kind)
    "gauss-0.05": (0.05, "gauss"), "ar1-0.1": (0.1, "ar1"), "gauss-0.1": (0.1, "gauss"), "gauss-0.3": (0.3, "gauss"), "gauss-0.5": (0.5, "gauss"),
    "gauss-1.0": (1.0, "gauss"), "t3-0.3": (0.3, "t3"), "ar1-0.3": (0.3, "ar1"), "ar1-1.0": (1.0, "ar1"),
}
THRESHOLDS = (4.0, 6.0, 8.0, 10.0, 12.0)
STEPS = 60


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def noise(rng: np.random.Generator, sigma: float, kind: str, n: int) -> np.ndarray:
    if kind == "gauss":
        return rng.normal(0, sigma, n)
    if kind == "t3":  # unit-variance Student t (3 dof) scaled to sigma
        return rng.standard_t(3, n) * sigma / math.sqrt(3.0)
    e = rng.normal(0, sigma * math.sqrt(1 - 0.25), n)  # AR(1) phi 0.5 with stationary sd sigma
    out = np.empty(n)
    out[0] = rng.normal(0, sigma)
    for i in range(1, n):
        out[i] = 0.5 * out[i - 1] + e[i]
    return out


def fires(p: np.ndarray, **settings) -> int | None:
    """Index of the first alarm, or None."""
    det = DriftDetector(**settings)
    for i, v in enumerate(p):
        if det.update(i, float(v)) is not None:
            return i
    return None


def false_alarm_rates(series: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out: dict = {}
    for name, (sigma, kind) in NOISES.items():
        cusum = {h: 0 for h in THRESHOLDS}
        det = {"p0.02": 0, "p0.10": 0, "fall-p0.75": 0}
        for _ in range(series):
            e = noise(rng, sigma, kind, STEPS)
            for h in THRESHOLDS:
                cusum[h] += fires(_sig(-2.0 + e), k=DRIFT_DEFAULTS["k"], threshold=h, min_rise=0.0,
                                  min_scale=DRIFT_DEFAULTS["min_scale"],
                                  scale_lag=DRIFT_DEFAULTS["scale_lag"]) is not None
            det["p0.02"] += fires(_sig(math.log(0.02 / 0.98) + e), **DRIFT_DEFAULTS) is not None
            det["p0.10"] += fires(_sig(math.log(0.10 / 0.90) + e), **DRIFT_DEFAULTS) is not None
            det["fall-p0.75"] += fires(_sig(math.log(3.0) + e), direction="down", **FALL_DEFAULTS) is not None
        out[name] = {"cusum": {str(h): c / series for h, c in cusum.items()},
                     "detector": {k: c / series for k, c in det.items()}}
    return out


def ramp_delays(series: int, seed: int) -> dict:
    """Steps from the ramp's start (step 0) to the alarm: p 0.02 -> 0.3 over `length` steps, noise 0.3."""
    rng = np.random.default_rng(seed + 1)
    out = {}
    for length in (10, 20, 40):
        t = np.arange(STEPS)
        lo, hi = math.log(0.02 / 0.98), math.log(0.3 / 0.7)
        delays = []
        for _ in range(series):
            y = lo + np.clip(t / length, 0, 1) * (hi - lo) + rng.normal(0, 0.3, STEPS)
            delays.append(fires(_sig(y), **DRIFT_DEFAULTS))
        hit = [d for d in delays if d is not None]
        out[f"0.02->0.3 over {length}"] = {"fired": len(hit) / series,
                                           "median_delay": float(np.median(hit)) if hit else None,
                                           "step_p_reaches_5pct": int(np.ceil(length * (math.log(0.05 / 0.95) - lo)
                                                                              / (hi - lo)))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res = {"steps": STEPS, "series": a.series, "settings": DRIFT_DEFAULTS, "fall_settings": FALL_DEFAULTS,
           "false_alarms": false_alarm_rates(a.series, a.seed), "ramps": ramp_delays(a.series // 4, a.seed)}
    if a.json:
        print(json.dumps(res))
        return
    print(f"false alarms per {STEPS}-step drift-free series ({a.series} series each); settings {DRIFT_DEFAULTS}")
    print(f"{'noise':<10} " + " ".join(f"{'cusum h=' + str(int(h)):>11}" for h in THRESHOLDS) +
          f" {'det p0.02':>10} {'det p0.10':>10} {'fall p0.75':>11}")
    for name, r in res["false_alarms"].items():
        print(f"{name:<10} " + " ".join(f"{r['cusum'][str(h)]:>11.4f}" for h in THRESHOLDS) +
              f" {r['detector']['p0.02']:>10.4f} {r['detector']['p0.10']:>10.4f} {r['detector']['fall-p0.75']:>11.4f}")
    print("ramps (noise 0.3 log-odds, from step 0): fraction alarmed, median alarm step, step p reaches 5%")
    for name, r in res["ramps"].items():
        print(f"  {name:<22} {r['fired']:.3f}  {r['median_delay']}  {r['step_p_reaches_5pct']}")


if __name__ == "__main__":
    main()
