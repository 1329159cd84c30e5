import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from collapse_probe.errors import UserError
from collapse_probe.runs.rundir import RunDir
from collapse_probe.runs.history import StepHistory
from collapse_probe.runs.joined import read_records
from collapse_probe.runs.runlog import RolloutLog, RunLog, read_rollouts, rollout_steps, tail_records
from collapse_probe.runs.timeline import Timeline

REPO = Path(__file__).resolve().parents[1]


def test_round_trip_nan_inf_numpy_tensor(tmp_path):
    with RunLog(tmp_path) as log:
        log.append({"step": np.int64(3), "a": math.nan, "b": math.inf, "c": -math.inf, "d": np.float32(0.5),
                    "e": np.int32(7), "f": torch.tensor(2.25), "g": np.bool_(True), "phase": "rl",
                    "h": [1.0, math.nan], "time": 123.0})
        log.append({"step": 4, "loss": 0.125})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    raw = json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert raw["a"] == "NaN" and raw["b"] == "Infinity" and raw["c"] == "-Infinity"
    assert list(raw)[:2] == ["step", "time"]
    recs = read_records(tmp_path)
    assert [r["step"] for r in recs] == [3, 4]
    assert isinstance(recs[1]["time"], float) and abs(recs[1]["time"] - time.time()) < 60
    r = recs[0]
    assert math.isnan(r["a"]) and r["b"] == math.inf and r["c"] == -math.inf
    assert r["d"] == 0.5 and r["e"] == 7 and type(r["e"]) is int and r["f"] == 2.25 and r["g"] is True
    assert r["phase"] == "rl" and r["h"][0] == 1.0 and math.isnan(r["h"][1]) and r["time"] == 123.0


def test_append_requires_int_step(tmp_path):
    with RunLog(tmp_path) as log:
        for bad in ({"loss": 1.0}, {"step": 1.5}, {"step": True}, {"step": "3"}):
            with pytest.raises(TypeError, match="int 'step'"):
                log.append(bad)
    assert (tmp_path / "metrics.jsonl").read_bytes() == b""
    with pytest.raises(ValueError, match="closed"):
        log.append({"step": 0})


def test_sigkill_loses_at_most_the_line_being_written(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RANK", None)
    proc = subprocess.Popen([sys.executable, str(REPO / "tests/helpers/runlog_writer.py"), str(tmp_path),
                             "1000000", "0.002"], stdout=subprocess.PIPE, text=True, env=env)
    done = []
    try:
        for line in proc.stdout:
            done.append(int(line))
            if len(done) >= 30:
                break
        os.kill(proc.pid, signal.SIGKILL)
        done += [int(x) for x in proc.stdout.read().split()]  # steps printed before the kill landed
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = read_records(tmp_path)
    caught = [w for w in caught if "skipped line" in str(w.message)]
    steps = [r["step"] for r in recs]
    assert set(done) <= set(steps)
    assert steps == list(range(len(steps)))  # nothing lost in the middle, at most one extra beyond reported
    assert len(steps) - 1 <= max(done) + 1
    for r in recs:
        assert r["loss"] == r["step"] * 0.5 and r["blob"] == chr(ord("a") + r["step"] % 26) * 1000000
    data = (tmp_path / "metrics.jsonl").read_bytes()
    lines = data.split(b"\n")
    torn = [] if data.endswith(b"\n") else [lines[-1]]
    assert all(json.loads(x) for x in lines[:-1])  # every complete line parses; only the last can be torn
    assert len(caught) == len(torn) <= 1
    # a restarted writer appends after the torn line, on a line of its own
    with RunLog(tmp_path) as log:
        log.append({"step": len(steps), "loss": -1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert read_records(tmp_path)[-1] == {"step": len(steps), "time": pytest.approx(time.time(), abs=60),
                                               "loss": -1.0}


def test_restart_relogs_steps_last_wins(tmp_path):
    log = RunLog(tmp_path)
    for s in range(10):
        log.append({"step": s, "loss": float(s)})
    del log  # "crash": never closed
    with RunLog(tmp_path) as log:
        for s in range(7, 15):
            log.append({"step": s, "loss": 100.0 + s})
    recs = read_records(tmp_path)
    assert [r["step"] for r in recs] == list(range(15))
    assert [r["loss"] for r in recs] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0] + [100.0 + s for s in range(7, 15)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 18  # appended, not truncated


def test_torn_last_line_then_append(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_bytes(b'{"step": 0, "loss": 1.0}\n{"step": 1, "lo')
    with pytest.warns(UserWarning, match=r"line 2 of .*metrics.jsonl"):
        assert [r["step"] for r in read_records(f)] == [0]
    with RunLog(tmp_path) as log:
        log.append({"step": 1, "loss": 2.0})
        log.append({"step": 2, "loss": 3.0})
    assert f.read_bytes().split(b"\n")[1] == b'{"step": 1, "lo'
    with pytest.warns(UserWarning, match="line 2"):
        recs = read_records(f)
    assert [(r["step"], r["loss"]) for r in recs] == [(0, 1.0), (1, 2.0), (2, 3.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_records(f, warn=False)) == 3


def test_read_paths_and_errors(tmp_path):
    hf = tmp_path / "out"
    with RunLog(hf / "collapse_probe") as log:
        log.append({"step": 5, "x": 1})
    assert RunDir(hf).require_metrics() == hf / "collapse_probe" / "metrics.jsonl"
    assert read_records(hf)[0]["x"] == 1 and read_records(hf / "collapse_probe")[0]["x"] == 1
    with pytest.raises(UserError, match=r"no metrics.jsonl under .*empty: pass a run directory"):
        (tmp_path / "empty").mkdir()
        read_records(tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        read_records(tmp_path / "missing")
    bad = tmp_path / "notes.txt"
    bad.write_text("hello world\nsecond line\n")
    with pytest.raises(UserError, match=r"notes.txt is not JSONL: line 1 is not a JSON object"):
        read_records(bad, warn=False)
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(UserError, match="line 1 is not a JSON object"):
        read_records(tmp_path / "list.jsonl", warn=False)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    assert read_records(tmp_path / "blank.jsonl") == []


def test_verl_lines_and_non_dict_lines(tmp_path):
    f = tmp_path / "verl.jsonl"
    f.write_text('{"step": 1, "data": {"actor/entropy": 0.75, "critic/score": Infinity}}\n'
                 '[1, 2, 3]\n'
                 '{"step": 2, "data": {"actor/entropy": 0.5, "actor/grad_norm": NaN}}\n')
    with pytest.warns(UserWarning, match="line 2 .*not a JSON object"):
        recs = read_records(f)
    assert recs[0] == {"step": 1, "actor/entropy": 0.75, "critic/score": math.inf}
    assert recs[1]["step"] == 2 and recs[1]["actor/entropy"] == 0.5 and math.isnan(recs[1]["actor/grad_norm"])


def test_other_ranks_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with RunLog(tmp_path / "r1") as log:
        log.append({"step": 0, "loss": 1.0})
    RolloutLog(tmp_path / "r1").write(0, [{"group": 0, "sample": 0, "text": "x"}])
    assert not (tmp_path / "r1").exists()
    with RunLog(tmp_path / "r0", rank=0) as log:  # explicit rank wins over RANK
        log.append({"step": 0, "loss": 1.0})
    assert len(read_records(tmp_path / "r0")) == 1
    monkeypatch.setenv("RANK", "0")
    with RunLog(tmp_path / "r2", rank=2) as log:
        log.append({"step": 0})
    assert not (tmp_path / "r2").exists()
    monkeypatch.setenv("RANK", "abc")
    with pytest.raises(UserError, match="RANK='abc' is not an integer"):
        RunLog(tmp_path / "r3")


def test_tail_follows_writer_promptly(tmp_path):
    f = tmp_path / "run" / "metrics.jsonl"
    written: dict[int, float] = {}
    got: list[tuple[int, float, float]] = []
    done = threading.Event()

    def writer():
        time.sleep(0.3)  # the file does not exist yet when tailing starts
        with RunLog(tmp_path / "run") as log:
            for s in range(6):
                log.append({"step": s, "v": s * 2.0})
                written[s] = time.monotonic()
                time.sleep(0.1)
        with open(f, "ab") as fh:  # a line arriving in two pieces is yielded once, whole
            fh.write(b'{"step": 6, "v": 1')
            fh.flush()
            time.sleep(0.5)
            fh.write(b'2.0}\n')
        written[6] = time.monotonic()
        time.sleep(0.4)
        with open(f, "wb") as fh:  # truncated and rewritten (a run restarted by a tool that truncates)
            fh.write(b'{"step": 0, "v": -1.0}\n')
        time.sleep(0.4)
        tmp = tmp_path / "new.jsonl"  # replaced by rename: a new inode
        tmp.write_text('{"step": 100, "v": 5.0}\n{"step": 101, "v": 6.0}\n')
        os.replace(tmp, f)
        time.sleep(0.4)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    for r in tail_records(tmp_path / "run", stop=done.is_set):
        got.append((r["step"], r["v"], time.monotonic()))
    t.join()
    assert [(s, v) for s, v, _ in got] == [(s, s * 2.0) for s in range(7)] + [(0, -1.0), (100, 5.0), (101, 6.0)]
    for s, _, at in got[:7]:
        assert at - written[s] < 1.0, f"step {s} arrived {at - written[s]:.2f}s late"


def test_tail_from_end_and_idle_timeout(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_bytes(b'{"step": 0}\n{"step": 1}\n{"step": 2, "x"')
    t0 = time.monotonic()
    def finish_line():
        with f.open("ab") as fh:
            fh.write(b': 1}\n{"step": 3}\n')

    threading.Timer(0.2, finish_line).start()
    got = [r["step"] for r in tail_records(f, from_start=False, poll_s=0.05, idle_timeout_s=0.5)]
    assert got == [2, 3] and time.monotonic() - t0 < 2.0
    assert [r["step"] for r in tail_records(f, poll_s=0.05, idle_timeout_s=0.1)] == [0, 1, 2, 3]


def test_tail_restarts_when_rewritten_in_place_and_longer(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"step": 0, "v": 1.0}\n')
    longer = "".join(f'{{"step": {s}, "v": {s + 10.0}, "pad": "{"x" * 50}"}}\n' for s in range(3))

    def rewrite():  # same inode, new content longer than what the reader has consumed: the head changed
        with open(f, "r+b") as fh:
            fh.truncate(0)
            fh.write(longer.encode())

    got = []
    for r in tail_records(f, poll_s=0.2, idle_timeout_s=0.6):
        got.append((r["step"], r["v"]))
        if len(got) == 1:
            rewrite()
    assert got == [(0, 1.0), (0, 10.0), (1, 11.0), (2, 12.0)]


def export(run, out):
    return Timeline.from_run(run).export(out)


def test_timeline_frame_and_export(tmp_path):
    with RunLog(tmp_path) as log:
        log.append({"step": 1, "reward/mean": math.nan, "kl": math.inf, "phase": "sft", "time": 9.0})
        log.append({"step": 2, "reward/mean": 0.5, "phase": "rl", "time": 10.0})
    df = Timeline.from_run(tmp_path).to_frame()
    assert df.index.name == "step" and list(df.index) == [1, 2]
    assert math.isnan(df.loc[1, "reward/mean"]) and df.loc[2, "reward/mean"] == 0.5 and df.loc[1, "kl"] == math.inf
    pq = export(tmp_path, tmp_path / "out" / "m.parquet")
    back = pd.read_parquet(pq)
    pd.testing.assert_frame_equal(back, df)
    csv = export(tmp_path, tmp_path / "m.csv")
    back = pd.read_csv(csv, index_col="step")
    assert list(back.index) == [1, 2] and list(back["phase"]) == ["sft", "rl"] and back.loc[1, "kl"] == math.inf
    assert back.loc[2, "reward/mean"] == 0.5 and math.isnan(back.loc[1, "reward/mean"])
    with pytest.raises(UserError, match=r"m.xlsx: the output file name must end in .parquet or .csv"):
        export(tmp_path, tmp_path / "m.xlsx")
    assert Timeline.from_records([]).to_frame().empty
    mixed = tmp_path / "mixed"
    with RunLog(mixed) as log:
        log.append({"step": 0, "note": "a"})
        log.append({"step": 1, "note": 2.5})
    assert list(pd.read_parquet(export(mixed, tmp_path / "mixed.parquet"))["note"]) == ["a", "2.5"]


def test_rollout_log_round_trip(tmp_path):
    rl = RolloutLog(tmp_path)
    rows = [{"group": g, "sample": s, "reward": float(s), "success": s == 1, "turns": ["<tool_call>", "NaN"],
             "text": "NaN"} for g in range(2) for s in range(2)]
    rl.write(10, rows)
    rl.write(3, [{"group": 0, "sample": 0, "reward": math.nan, "text": "hi"}])
    rl.write(10, [{"group": 1, "sample": 1, "reward": 9.0, "text": "again"}])  # re-written after a restart
    assert rl.path(10) == tmp_path / "rollouts" / "step_000010.jsonl"
    assert rollout_steps(tmp_path) == [3, 10]
    got = read_rollouts(tmp_path)
    assert [(r["step"], r["group"], r["sample"]) for r in got] == [(3, 0, 0), (10, 0, 0), (10, 0, 1), (10, 1, 0),
                                                                    (10, 1, 1)]
    assert math.isnan(got[0]["reward"]) and got[1]["text"] == "NaN" and got[1]["turns"] == ["<tool_call>", "NaN"]
    assert got[-1]["reward"] == 9.0 and got[-1]["text"] == "again" and got[2]["success"] is True
    assert [r["step"] for r in read_rollouts(tmp_path, steps=[10, 99])] == [10] * 4
    with pytest.raises(UserError, match="no rollouts"):
        read_rollouts(tmp_path / "nothing")


def test_step_history_restart_drops_later_steps_and_merges_repeats():
    h = StepHistory()
    for s in range(6):
        assert h.add({"step": s, "success": 0.9, "time": 100.0 + s}) == "new"
    assert h.add({"step": 5, "eval/success": 0.7, "time": 106.0}) == "merged"
    assert h.add({"step": 2, "success": 0.9, "time": 100.0 + 2}) == "duplicate"  # the same line again
    assert h.add({"step": 3, "success": 0.1, "time": 200.0}) == "restart"        # resumed from step 2
    assert sorted(h.records) == [0, 1, 2, 3] and h.records[3]["success"] == 0.1 and h.restarts == 1


def test_read_records_of_a_restarted_run_keeps_only_the_new_tail(tmp_path):
    with RunLog(tmp_path) as log:
        for s in range(10):
            log.append({"step": s, "success": 0.9, "time": 100.0 + s})
        for s in range(5, 7):  # restarted from step 5, killed at step 6
            log.append({"step": s, "success": 0.2, "time": 200.0 + s})
    recs = read_records(tmp_path)
    assert [r["step"] for r in recs] == list(range(7)) and recs[-1]["success"] == 0.2


def test_the_streaming_index_reads_what_step_history_keeps(tmp_path):
    """StepIndex (offsets only) and StepHistory (records) follow one rule: same records for repeats, merges,
    restarts and older lines read again."""
    from collapse_probe.runs.history import StepHistory as History
    from collapse_probe.runs.joined import open_run

    lines = [{"step": 0, "time": 1.0, "a": 1}, {"step": 1, "time": 2.0, "a": 2}, {"step": 1, "time": 2.0, "a": 2},
             {"step": 1, "time": 3.0, "eval": 0.5}, {"step": 2, "time": 4.0, "a": 3}, {"step": 1, "time": 5.0, "a": 9},
             {"step": 0, "time": 0.5, "a": 7}, {"step": 2, "time": 6.0, "a": 4}]
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in lines))
    hist = History()
    for r in lines:
        hist.add(dict(r))
    assert list(open_run(f).records()) == hist.sorted_records() == [
        {"step": 0, "time": 1.0, "a": 1}, {"step": 1, "time": 5.0, "a": 9}, {"step": 2, "time": 6.0, "a": 4}]


def test_bounded_line_parser(tmp_path):
    from collapse_probe.runs.lines import parse_line

    assert parse_line(b'{"step": 0, "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")[0] is None
    assert parse_line(b'{"step": 0, "a": ' + b"[" * 40 + b"]" * 40 + b"}")[1] == "is nested too deeply"
    assert "out of range" in parse_line(b'{"step": 1000000000000000000000000000000}')[1]
    assert parse_line(b'{"step": 1e30}')[0] is None and parse_line(b'{"step": 3.0}')[0] == {"step": 3}
    f = tmp_path / "metrics.jsonl"
    f.write_bytes(b"junk\n" * 1000 + b'{"step": 0}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_records(f) == [{"step": 0}]
    assert len(caught) == 1 and "1000 unreadable lines" in str(caught[0].message)  # one warning, with a count
