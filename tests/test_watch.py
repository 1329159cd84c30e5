"""`watch`: --once on finished runs, a live file written by a thread (alert latency), restarts, hooks, read-only."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
from typer.testing import CliRunner

from collapse_probe.cli.app import app
from collapse_probe.runs.runlog import RunLog
from collapse_probe.commands.watch import RunWatcher, sparkline, watch
from helpers.runs import snapshot, synthetic_records, write_run


def first_half_peak_step(records: list[dict]) -> int:
    """The first step whose success is below half the running peak."""
    peak = 0.0
    for r in records:
        peak = max(peak, r["success"])
        if r["success"] < 0.5 * peak:
            return r["step"]
    raise AssertionError("no drop in the records")


runner = CliRunner()


def test_once_json_on_finished_runs(tmp_path):
    col = write_run(tmp_path / "col", collapse=True)
    stable = write_run(tmp_path / "stable", collapse=False, seed=1)
    before = snapshot(col)
    res = runner.invoke(app, ["watch", str(col), "--once", "--json"])
    assert res.exit_code == 3, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    st = json.loads(lines[0])
    assert st["step"] == 59 and st["collapsed"] is True and isinstance(st["alerts"], list)
    assert st["probs"]["end_of_turn"] > 0.3 and set(st["state_mix"]) >= {"full_collapse", "healthy_tool_call"}
    assert st["spike_step"] < st["collapse_step"]

    res = runner.invoke(app, ["watch", str(stable), "--once", "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.stdout)
    assert st["collapsed"] is False and st["alerts"] == [] and st["spike_step"] is None

    res = runner.invoke(app, ["watch", str(col), "--once"])  # the rich view
    assert res.exit_code == 3 and "end_of_turn" in res.stdout and "COLLAPSED" in res.stdout
    assert snapshot(col) == before


def test_follow_alerts_within_a_second_before_the_reward_drop(tmp_path):
    run = tmp_path / "live"
    run.mkdir()
    records = synthetic_records(True)
    written: dict[int, float] = {}

    def writer():
        time.sleep(0.3)  # the watcher is already waiting for the file
        with RunLog(run) as log:
            for rec in records:
                log.append(rec)
                written[rec["step"]] = time.monotonic()
                time.sleep(0.05)

    class Out:
        def __init__(self):
            self.lines: list[tuple[float, dict]] = []

        def write(self, s):
            for line in s.splitlines():
                self.lines.append((time.monotonic(), json.loads(line)))

        def flush(self):
            pass

    out = Out()
    th = threading.Thread(target=writer, daemon=True)
    th.start()
    rc = watch(run, as_json=True, out=out, idle_timeout=5.0, poll_s=0.2)
    th.join()
    assert rc == 3
    assert out.lines[-1][1]["collapsed"] is True
    alerted = [(t, st) for t, st in out.lines if st["alerts"]]
    assert alerted
    t_alert, st = alerted[0]
    drop_step = first_half_peak_step(records)
    first = st["alerts"][0]
    assert first["kind"] in ("control_spike", "control_drift") and first["role"] == "end_of_turn"
    assert first["detected_at"] == st["step"] < drop_step
    latency = t_alert - written[st["step"]]
    assert 0 <= latency < 1.0, latency
    assert t_alert < written[drop_step]  # the warning was out before the collapsing record existed
    lat = [t - written[s["step"]] for t, s in out.lines]
    print(f"alert latency {latency:.3f} s; status latency max {max(lat):.3f} s, median {np.median(lat):.3f} s")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_restart_and_duplicates():
    recs = synthetic_records(True, n=30)
    for i, r in enumerate(recs):
        r["time"] = 1000.0 + i
    w = RunWatcher()
    assert all(w.feed(r) is not None for r in recs)
    assert w.feed(dict(recs[10])) is None                       # the same line again
    assert w.feed({**recs[12], "success": 0.1}) is None         # an older line (earlier time) read again
    assert w.last_step == 29
    st = w.feed({**recs[20], "time": 2000.0, "success": 0.5})  # resumed from step 19: newer time
    assert st["restarted"] and st["restarts"] == 1 and st["step"] == 20 and w.last_step == 20
    assert sorted(w.history.records) == list(range(21)) and w.history.records[20]["success"] == 0.5
    assert w.feed({**recs[21], "time": 2001.0})["step"] == 21
    st = w.feed({"step": 21, "time": 2002.0, "eval/success": 0.7})  # more keys for the same step: merged
    assert not st["restarted"] and st["restarts"] == 1 and w.history.records[21]["eval/success"] == 0.7
    assert w.history.records[21]["success"] == recs[21]["success"]
    # verl file-logger lines have no time: a step going back with new content is a restart
    v = RunWatcher()
    for s in range(10):
        v.feed({"step": s, "success": 0.9, "cp/rollout/after_open/end_of_turn": 0.03})
    assert v.feed({"step": 4, "success": 0.9, "cp/rollout/after_open/end_of_turn": 0.03}) is None
    assert v.feed({"step": 5, "success": 0.8, "cp/rollout/after_open/end_of_turn": 0.03})["restarted"]
    assert sparkline([0.01, 0.1, 1.0]) == "▁▅█" and sparkline([None, 0.5], log=False) == " ▄"


def test_restarted_log_and_verl_file_once(tmp_path):
    run = tmp_path / "restarted"
    run.mkdir()
    recs = synthetic_records(True)
    with RunLog(run) as log:  # collapsed up to step 59, then resumed from a step-15 checkpoint, healthy since
        for r in recs:
            log.append(r)
        for r in synthetic_records(False, n=40, seed=3)[16:]:
            log.append(r)
    res = runner.invoke(app, ["watch", str(run), "--once", "--json"])
    st = json.loads(res.stdout)
    assert res.exit_code == 0 and st["restarts"] == 1 and st["step"] == 39 and not st["collapsed"]

    verl = tmp_path / "verl.jsonl"
    verl.write_text("".join(json.dumps({"step": r["step"], "data": {k: v for k, v in r.items() if k != "step"}})
                            + "\n" for r in recs))
    res = runner.invoke(app, ["watch", str(verl), "--once", "--json"])
    assert res.exit_code == 3 and json.loads(res.stdout)["collapsed"]


def test_on_alert_hook_and_read_only(tmp_path):
    run = write_run(tmp_path / "run", collapse=True)
    before = snapshot(run)
    hook_out = tmp_path / "hooks.txt"
    cmd = f'echo "$COLLAPSE_PROBE_KIND $COLLAPSE_PROBE_STEP" >> {hook_out}; ' \
          f'python -c "import json,os; json.loads(os.environ[\'COLLAPSE_PROBE_ALERT\'])"'
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the hook runs where watch runs, never in the run dir
    try:
        res = runner.invoke(app, ["watch", str(run), "--json", "--idle-timeout", "0.3", "--on-alert", cmd])
    finally:
        os.chdir(cwd)
    assert res.exit_code == 3, res.output
    kinds = [line.split()[0] for line in hook_out.read_text().splitlines()]
    assert kinds[0] in ("control_spike", "control_drift") and "collapse" in kinds and "reward_drop" in kinds
    assert all(json.loads(line)["step"] is not None for line in res.stdout.strip().splitlines())
    assert snapshot(run) == before
