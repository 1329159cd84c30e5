"""`watch --once --json` and `analyze --json` give one verdict on every run (one monitor, replayed).

A corpus of 16 small synthetic runs of five kinds: a collapse within the first 3 steps, a slow spike collapse,
a contained spike that does not collapse, stable runs, and a restarted run. The same check over real training
runs is bench/agreement.py.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from collapse_probe.cli.app import app
from collapse_probe.runs.runlog import RunLog
from helpers.runs import synthetic_records

runner = CliRunner()
AGREE = ("collapsed", "collapse_step", "first_alert_step", "confirmed_at", "spike_step", "breakage_step")


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def early_collapse(seed: int, n: int = 50) -> list[dict]:
    """Success 0.72 -> 0 within 3 steps from step 1 (a harsh learning rate); turns break at once."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        k = min(t, 3) / 3
        out.append({"step": t, "success": max(0.0, 0.72 * (1 - k) + rng.normal(0, 0.01)),
                    "fmt/full_collapse": 0.85 * k, "fmt/text_pollution": 0.02 + 0.1 * k,
                    "fmt/healthy_tool_call": 0.98 - 0.95 * k,
                    "cp/rollout/after_open/end_of_turn": 1 / (1 + math.exp(-(_logit(0.03) + 5 * k
                                                                            + rng.normal(0, 0.2))))})
    return out


def contained_spike(seed: int, n: int = 60) -> list[dict]:
    """p(end-of-turn | open) spikes to 0.3 around step 25 and is pulled back (interleaved SFT); success holds."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        bump = math.exp(-((t - 25) / 4) ** 2)
        p = 1 / (1 + math.exp(-(_logit(0.02) + 3.0 * bump + rng.normal(0, 0.2))))
        out.append({"step": t, "success": float(np.clip(0.85 - 0.15 * bump + rng.normal(0, 0.02), 0, 1)),
                    "fmt/full_collapse": 0.02 + 0.2 * bump, "fmt/text_pollution": 0.02,
                    "fmt/healthy_tool_call": 0.96 - 0.2 * bump, "cp/rollout/after_open/end_of_turn": p,
                    "cp/rollout/after_open/json_open": 0.97 * (1 - p)})
    return out


def restarted(seed: int) -> list[dict]:
    """A collapsing run resumed at step 30 from an earlier checkpoint: steps 30.. are logged again."""
    recs = synthetic_records(True, n=45, seed=seed)
    for i, r in enumerate(recs):
        r["time"] = 1000.0 + i
    again = [{**r, "time": 2000.0 + i, "success": min(1.0, r["success"] + 0.01)}
             for i, r in enumerate(synthetic_records(True, n=60, seed=seed + 100)[30:])]
    return recs + again


CORPUS = ([("early", s, early_collapse(s)) for s in range(3)]
          + [("slow", s, synthetic_records(True, seed=s)) for s in range(4)]
          + [("contained", s, contained_spike(s)) for s in range(3)]
          + [("stable", s, synthetic_records(False, seed=10 + s)) for s in range(4)]
          + [("restarted", s, restarted(s)) for s in range(2)])


def _write(run, records) -> None:
    run.mkdir(parents=True)
    with RunLog(run) as log:
        for r in records:
            log.append(r)


@pytest.mark.parametrize("kind,seed,records", CORPUS, ids=[f"{k}-{s}" for k, s, _ in CORPUS])
def test_watch_and_analyze_agree(tmp_path, kind, seed, records):
    run = tmp_path / f"{kind}-{seed}"
    _write(run, records)
    w = runner.invoke(app, ["watch", str(run), "--once", "--json"])
    a = runner.invoke(app, ["analyze", str(run), "--json"])
    assert w.exit_code in (0, 3) and a.exit_code in (0, 3), (w.output, a.output)
    watched, analysed = json.loads(w.stdout.strip().splitlines()[-1]), json.loads(a.stdout)
    assert {k: watched[k] for k in AGREE} == {k: analysed[k] for k in AGREE}
    assert w.exit_code == (3 if analysed["collapsed"] else 0)
    expect = {"early": True, "slow": True, "contained": False, "stable": False, "restarted": True}[kind]
    assert analysed["collapsed"] is expect, analysed["summary"]
    if kind == "early":
        assert analysed["collapse_step"] <= 4
    if kind == "contained":
        assert analysed["spike_step"] is not None  # the spike is seen, and it is not called a collapse


def test_verl_file_logger_names_are_read(tmp_path):
    """verl's file logger (`{"step": N, "data": {...}}`, its own metric names): the score drop and the peer
    baselines are read from verl's keys, and watch and analyze agree on it."""
    f = tmp_path / "verl" / "exp.jsonl"
    f.parent.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for s in range(1, 41):
        score = 0.62 if s < 20 else 0.02
        lines.append(json.dumps({"step": s, "data": {"critic/score/mean": score + rng.normal(0, 0.01),
                                                     "actor/entropy": 0.8 + rng.normal(0, 0.01),
                                                     "actor/grad_norm": 1.0 + rng.normal(0, 0.02)}}))
    f.write_text("\n".join(lines) + "\n")
    a = json.loads(runner.invoke(app, ["analyze", str(f), "--json"]).stdout)
    w = json.loads(runner.invoke(app, ["watch", str(f), "--once", "--json"]).stdout.strip().splitlines()[-1])
    assert a["collapse_step"] == 20 == w["collapse_step"]
    assert a["baselines"]["entropy_drop"]["logged"] and a["baselines"]["grad_norm_spike"]["logged"]
    # no format or control-token signal in a bare verl log: an unconfirmed collapse (issue 22), never "false"
    assert a["collapsed"] is None is w["collapsed"] and a["status"] == "unconfirmed" and a["collapse_reason"] is None
