"""Synthetic run records and run dirs shaped like DESIGN.md, and a snapshot to check a dir was left untouched."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from collapse_probe.runs.runlog import RunLog


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def synthetic_records(collapse: bool = True, n: int = 60, seed: int = 0) -> list[dict]:
    """Records shaped like DESIGN.md. Collapsing: p(end_of_turn after open) 0.03 -> 0.6 from step 20, broken
    turns (fmt/full_collapse) from step 28, success 0.9 -> 0.05 between steps 35 and 45. Stable: flat."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        ramp = min(max((t - 20) / 12, 0.0), 1.0) if collapse else 0.0
        broken = min(max((t - 28) / 12, 0.0), 1.0) if collapse else 0.0
        drop = min(max((t - 35) / 10, 0.0), 1.0) if collapse else 0.0
        x = _logit(0.03) + (_logit(0.6) - _logit(0.03)) * ramp + rng.normal(0, 0.2)
        eot = 1 / (1 + math.exp(-x))
        fc, tp, hr = 0.01 + 0.8 * broken, 0.02 + 0.05 * broken, 0.1 * (1 - broken)
        succ = float(np.clip(0.9 - 0.85 * drop + rng.normal(0, 0.02), 0, 1))
        rec = {"step": t, "cp/rollout/after_open/end_of_turn": eot,
               "cp/rollout/after_open/json_open": 0.97 * (1 - eot),
               "cp/rollout/after_open/tool_open": 0.005 * math.exp(rng.normal(0, 0.2)),
               "cp/rollout/after_open/entropy": 0.2 + eot, "cp/rollout/after_open/count": 120.0,
               "fmt/healthy_tool_call": 1 - fc - tp - hr, "fmt/healthy_response": hr,
               "fmt/text_pollution": tp, "fmt/full_collapse": fc,
               "fmt/reason/ok_call": 1 - fc - tp - hr, "fmt/reason/ok_text": hr,
               "fmt/reason/bare_open_tag": fc, "fmt/reason/invalid_json": tp,
               "format_valid": 1 - fc - tp, "success": succ, "reward/mean": succ,
               "reward/group_std_mean": 0.3 * (1 - drop) + 0.02, "entropy": 0.8 + rng.normal(0, 0.02),
               "grad_norm": 1.0 + rng.normal(0, 0.05), "loss": 0.1, "phase": "rl"}
        if t % 5 == 0:
            rec["cp/probe/after_open/end_of_turn"] = 0.02 + 0.05 * ramp
            rec["cp/probe/after_open/json_open"] = 0.95 - 0.05 * ramp
        out.append(rec)
    return out


def write_run(run_dir: Path, collapse: bool = True, n: int = 60, seed: int = 0) -> Path:
    """A run dir: config.json and the `synthetic_records` in metrics.jsonl, written by the real RunLog."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"mode": "grpo", "lr": 1e-3, "seed": 0, "preset": "synthetic"}))
    with RunLog(run_dir) as log:
        for rec in synthetic_records(collapse, n=n, seed=seed):
            log.append(rec)
    return run_dir


def snapshot(d: Path) -> dict:
    """Every path under `d` with its size and mtime: equal snapshots mean nothing was written there."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}
