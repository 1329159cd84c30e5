"""Every file verl writes, built here as verl writes it (issue 12), read by `analyze`, `formats`, `watch`, `report`:
the file logger's JSONL and its directory, rollout/validation dumps, the verl-tool fork's step records, TensorBoard
event directories, checkpoints in each accepted form (with and without HF weights; `.pt` shards never unpickled),
a run's parent directory joining them, and the logger's truncate-on-restart while `watch` follows it."""
from __future__ import annotations

import json
import math
import os
import pickle
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from collapse_probe.runs import lines
from collapse_probe.cli.app import app, main
from collapse_probe.commands.watch import watch

runner = CliRunner()
CALL = '<tool_call>\n{"name": "lookup", "arguments": {"id": "u1"}}\n</tool_call>'
RESP = "\nuser\n<tool_response>\nParis\n</tool_response>\nassistant\n"          # skip_special_tokens=True
BARE = "\nuser\n<tool_response>\nerror: empty call\n</tool_response>\nassistant\n"
MARKER = "PWNED"  # a file the .pt shards create if anything ever unpickles them


def log_lines(n: int = 40, drop: int = 25, spike: int = 15, cp: bool = True, seed: int = 0, first: int = 1):
    """verl file-logger lines: step 0 validation only; `critic/score/mean` 0.62 -> 0.02 at `drop`; with `cp`, our
    integration's `actor/cp/...` keys (p(end of turn | call tag) rising from `spike`). NaN written as null."""
    rng = np.random.default_rng(seed)
    out = [{"step": 0, "data": {"val-core/tool/reward/mean@1": 0.6}}] if first <= 0 else []
    for s in range(max(first, 1), n + 1):
        ramp = min(max((s - spike) / 8, 0.0), 1.0)
        eot = 1 / (1 + math.exp(-(math.log(0.03 / 0.97) + 6 * ramp + rng.normal(0, 0.15))))
        d = {"critic/score/mean": (0.62 if s < drop else 0.02) + rng.normal(0, 0.01),
             "critic/rewards/mean": 0.62 if s < drop else 0.02, "actor/entropy": 0.8 + rng.normal(0, 0.01),
             "actor/grad_norm": 1.0 + rng.normal(0, 0.02), "actor/ppo_kl": 0.001, "actor/pg_clipfrac": 0.01,
             "response_length/mean": 120.0 * (1 - 0.8 * ramp), "num_turns/mean": 3.0, "timing_s/step": None}
        if cp:
            d.update({"actor/cp/rollout/after_open/end_of_turn": eot,
                      "actor/cp/rollout/after_open/json_open": 0.97 * (1 - eot),
                      "actor/cp/rollout/after_open/count": 64.0})
        out.append({"step": s, "data": d})
    return out


def encode(line: dict) -> bytes:
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"  # orjson's compact form


def write_log(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # the logger opens "wb": a restart truncates it
        f.writelines(encode(r) for r in rows)
    return path


def write_dumps(d: Path, n: int = 40, broke: int = 20, rows: int = 8) -> Path:
    """`_dump_generations`: {step}.jsonl rows {input, output, gts, score, step, acc}; turns break from `broke`."""
    d.mkdir(parents=True, exist_ok=True)
    for s in range(1, n + 1):
        k = round(rows * min(max((s - broke) / 5, 0.0), 1.0))
        with open(d / f"{s}.jsonl", "w") as f:
            for i in range(rows):
                bad = i < k
                out = "<tool_call>\n" + BARE + "<tool_call>\n" if bad else CALL + RESP + "u1 lives in Paris."
                f.write(json.dumps({"input": "system\nYou help.\nuser\nWhere does u1 live?\nassistant\n",
                                    "output": out, "gts": "Paris", "score": 0.0 if bad else 1.0, "step": s,
                                    "acc": 0.0 if bad else 1.0}) + "\n")
    return d


REC_OK = ('<tool_call>\n{"name": "lookup", "arguments": {"id": "u1"}}\n</tool_call><|im_end|>\n<|im_start|>user\n'
          '<tool_response>\nParis\n</tool_response><|im_end|>\n<|im_start|>assistant\nu1 lives in Paris.<|im_end|>')
REC_BAD = ('<tool_call>\n<|im_end|>\n<|im_start|>user\n<tool_response>\nerror: empty call\n</tool_response>'
           '<|im_end|>\n<|im_start|>assistant\n<tool_call>\n<|im_end|>')


def write_records(d: Path, n: int = 10, broke: int = 5) -> Path:
    """The fork's `verl_step_records/{run_id}/fcl_eval-step-N.json`: one JSON array (json.dump indent=4),
    special tokens kept, `tool_interact_info[].action`; from step `broke` 5 of 6 trajectories are bare tags."""
    d.mkdir(parents=True, exist_ok=True)
    for s in range(1, n + 1):
        recs = []
        for i in range(6):
            bad = s > broke and i < 5
            recs.append({"id": i, "data_source": "fcl", "prompt": "<|im_start|>user\nWhere does u1 live?<|im_end|>\n"
                         "<|im_start|>assistant\n", "response": REC_BAD if bad else REC_OK,
                         "ground_truth": "Paris", "score": {"score": 0.0 if bad else 1.0, "accuracy": float(not bad)},
                         "reward": 0.0 if bad else 1.0, "extra_info": {"split": "train"},
                         "tool_interact_info": [{"action": "<tool_call>\n" if bad else CALL, "obs": "x"}]})
        (d / f"fcl_eval-step-{s}.json").write_text(json.dumps(recs, indent=4))
    (d / f"fcl_eval-step-val-{n}.json").write_text(json.dumps(recs[:2], indent=4))
    return d


class Boom:
    """Unpickling this runs code: a `.pt` shard that must never be loaded."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["VERL_TEST_MARKER"]),))


def write_checkpoints(root: Path, steps=(10, 20, 30), weights: bool = True) -> Path:
    """default_local_dir: global_step_N/actor/{model,optim,extra_state}_world_size_1_rank_0.pt + huggingface/
    (config and tokenizer always; the weights only as with save_contents hf_model)."""
    from collapse_probe.train import tiny

    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, "tiny")
    gen = torch.Generator().manual_seed(0)
    for i, step in enumerate(steps):
        actor = root / f"global_step_{step}" / "actor"
        (actor / "huggingface").mkdir(parents=True)
        for part in ("model", "optim", "extra_state"):
            (actor / f"{part}_world_size_1_rank_0.pt").write_bytes(pickle.dumps(Boom()))
        with torch.no_grad():
            model.lm_head.weight.add_(0.05 * i * torch.randn(model.lm_head.weight.shape, generator=gen))
        model.save_pretrained(actor / "huggingface")
        tok.save_pretrained(actor / "huggingface")
        if not weights:
            for f in (actor / "huggingface").glob("*.safetensors"):
                f.unlink()
    (root / "latest_checkpointed_iteration.txt").write_text(str(steps[-1]))
    return root


@pytest.fixture
def no_unpickling(tmp_path, monkeypatch):
    """Any unpickling fails the test (and the shards would leave a marker file behind)."""
    monkeypatch.setenv("VERL_TEST_MARKER", str(tmp_path / MARKER))

    def refuse(*a, **k):
        raise AssertionError("something tried to unpickle")

    class Refusing(pickle.Unpickler):  # still a class: modules imported meanwhile may subclass it
        load = refuse
    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refusing)
    monkeypatch.setattr(torch, "load", refuse)
    yield
    assert not (tmp_path / MARKER).exists()


def analyze_json(*args) -> dict:
    res = runner.invoke(app, ["analyze", *map(str, args), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def one_line_error(argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", ["collapse-probe", *map(str, argv)])
    capsys.readouterr()  # what building the fixture printed
    with pytest.raises(SystemExit) as exc:
        main()
    cap = capsys.readouterr()
    lines_ = cap.err.strip().splitlines()
    assert exc.value.code == 1 and len(lines_) == 1 and lines_[0].startswith("error:"), cap.err
    assert "Traceback" not in cap.err and cap.out == ""
    return lines_[0]


# ------------------------------------------------------------------------------------------ the file logger
def test_analyze_the_log_file_and_its_directory(tmp_path):
    log = write_log(tmp_path / "myproj" / "exp.jsonl", log_lines(first=0))
    for path in (log, log.parent):
        v = analyze_json(path)
        assert v["collapsed"] is True and v["collapse_step"] == 25, v["summary"]
        assert v["source"] == "rollout" and v["spike_step"] is not None and v["spike_step"] < 25
        assert v["path"] == str(log) and v["steps"] == 41  # step 0: validation metrics only
        assert any(e["key"] == "cp/rollout/after_open/end_of_turn" for e in v["events"])  # actor/ prefix mapped
    res = runner.invoke(app, ["analyze", str(log.parent)])
    assert res.exit_code == 0 and "collapsed: YES" in res.stdout and "reward drop: step 25" in res.stdout


def test_a_parent_directory_joins_log_and_dumps(tmp_path):
    """Without our integration the log has no structural signal: the dumps' format mix (training dumps, not
    the validation ones) makes the reward drop a collapse, in `analyze` and `watch --once` alike."""
    root = tmp_path / "run"
    write_log(root / "myproj" / "exp.jsonl", log_lines(cp=False, first=0))
    alone = analyze_json(root / "myproj")
    # no turn read: an unconfirmed collapse (issue 22), not "collapsed": false
    assert alone["collapsed"] is None and alone["status"] == "unconfirmed" and alone["collapse_step"] == 25
    write_dumps(root / "rollout_data")
    write_dumps(root / "validation_data", rows=2, broke=100)
    v = analyze_json(root)
    assert v["collapsed"] is True and v["collapse_step"] == 25 and v["breakage_step"] is not None
    assert v["sources"]["rollouts"] == [str(root / "rollout_data")]
    assert v["final_state_mix"]["full_collapse"] == 1.0
    w = runner.invoke(app, ["watch", str(root), "--once", "--json"])
    assert w.exit_code == 3
    status = json.loads(w.stdout.strip().splitlines()[-1])
    assert {k: status[k] for k in ("collapse_step", "breakage_step", "confirmed_at")} == \
        {k: v[k] for k in ("collapse_step", "breakage_step", "confirmed_at")}
    rep = runner.invoke(app, ["report", str(root), "--out", str(tmp_path / "rep")])
    assert rep.exit_code == 0 and "**Collapsed: yes.**" in (tmp_path / "rep" / "report.md").read_text()


def test_dumps_alone_and_two_experiments(tmp_path, monkeypatch, capsys):
    d = write_dumps(tmp_path / "rollout_data")
    v = analyze_json(d)  # accuracy and reward from the rows: the only metrics there are
    assert v["collapsed"] is True and v["collapse_step"] is not None and v["sources"]["metrics"] is None
    write_log(tmp_path / "two" / "p" / "a.jsonl", log_lines())
    write_log(tmp_path / "two" / "p" / "b.jsonl", log_lines())
    msg = one_line_error(["analyze", tmp_path / "two"], monkeypatch, capsys)
    assert "2 verl logs" in msg and "a.jsonl" in msg and "b.jsonl" in msg
    assert "pass its directory" in one_line_error(["analyze", d / "3.jsonl"], monkeypatch, capsys)
    assert "file-logger log" in one_line_error(["formats", tmp_path / "two" / "p" / "a.jsonl"], monkeypatch, capsys)


# ------------------------------------------------------------------------------------------ formats
def test_formats_on_dumps_and_their_parent(tmp_path):
    root = tmp_path / "run"
    write_log(root / "myproj" / "exp.jsonl", log_lines())  # never read as rollouts
    write_dumps(root / "rollout_data")
    write_dumps(root / "validation_data", rows=2)
    one = json.loads(runner.invoke(app, ["formats", str(root / "rollout_data"), "--json"]).stdout)["groups"]["all"]
    # 21 of 40 steps with broken turns ramping to all 8: bare tags are full collapse, empty right after the tag
    assert one["full_collapse"] == one["empty"]["after_open"] == one["reasons"]["bare_open_tag"] > 0
    assert one["turns"] == one["full_collapse"] + one["healthy_tool_call"] + one["healthy_response"]
    both = json.loads(runner.invoke(app, ["formats", str(root), "--json"]).stdout)["groups"]
    assert set(both) == {"rollout_data", "validation_data"} and both["rollout_data"] == one
    bins = json.loads(runner.invoke(app, ["formats", str(root / "rollout_data"), "--step-bins", "8", "--json"])
                      .stdout)["step_ranges"]
    first, last = bins[0]["groups"]["all"], bins[-1]["groups"]["all"]
    assert first["full_collapse"] == 0 and last["full_collapse"] == last["turns"] > 0  # late steps: all collapsed


def test_the_papers_step_records(tmp_path, monkeypatch):
    d = write_records(tmp_path / "verl_step_records" / "run1")
    got = json.loads(runner.invoke(app, ["formats", str(d), "--json"]).stdout)["groups"]
    # steps 6..10: 5 of 6 trajectories are two bare-tag turns each (special tokens kept: <|im_end|> after the tag)
    assert got["all"]["full_collapse"] == got["all"]["reasons"]["bare_open_tag"] == 5 * 5 * 2
    assert got["all"]["healthy_tool_call"] == got["all"]["healthy_response"] == 5 * 6 + 5
    assert got["val"]["full_collapse"] == 4  # the -step-val- file: its own group
    one = json.loads(runner.invoke(app, ["formats", str(d / "fcl_eval-step-7.json"), "--json"]).stdout)
    assert one["groups"]["all"]["full_collapse"] == 10
    monkeypatch.setattr(lines, "CHUNK", 97)  # element by element across many small reads: the same turns
    assert json.loads(runner.invoke(app, ["formats", str(d), "--json"]).stdout)["groups"] == got
    v = analyze_json(tmp_path / "verl_step_records")
    assert v["collapsed"] is True and v["collapse_step"] == 6


def test_bad_step_records_are_one_line(tmp_path, monkeypatch, capsys):
    d = write_records(tmp_path / "recs", n=2)
    f = d / "fcl_eval-step-2.json"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # cut while being written
    msg = one_line_error(["formats", f], monkeypatch, capsys)
    assert "fcl_eval-step-2.json" in msg and "JSON array" in msg
    (d / "fcl_eval-step-2.json").write_text('{"response": "x"}')
    assert "not a JSON array" in one_line_error(["formats", d / "fcl_eval-step-2.json"], monkeypatch, capsys)


# ------------------------------------------------------------------------------------------ TensorBoard
def test_tensorboard_event_directories(tmp_path):
    from torch.utils.tensorboard import (
        SummaryWriter,  # what verl's tensorboard backend writes with
    )

    tb = tmp_path / "tensorboard_log" / "myproj" / "exp"
    w = SummaryWriter(str(tb))
    for line in log_lines(first=0):
        for k, val in line["data"].items():
            if val is not None:
                w.add_scalar(k, val, line["step"])
    w.close()
    for path in (tb, tmp_path):
        v = analyze_json(path)
        assert v["collapsed"] is True and v["collapse_step"] == 25 and v["sources"]["tensorboard"] == [str(tb)]


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("form", ["root", "global_step_N", "global_step_N/actor", "actor/huggingface"])
def test_checkpoint_forms_with_weights(tmp_path, form, no_unpickling):
    root = write_checkpoints(tmp_path / "ckpts")
    path = {"root": root, "global_step_N": root / "global_step_20", "global_step_N/actor": root / "global_step_20" /
            "actor", "actor/huggingface": root / "global_step_20" / "actor" / "huggingface"}[form]
    v = analyze_json(path, "-n", "0", "--cache", tmp_path / "cache")
    assert v["kind"] == "checkpoints"
    assert [c["step"] for c in v["checkpoints"]] == ([10, 20, 30] if form == "root" else [20])
    assert all(0 < c["p_end_of_turn"] < 1 for c in v["checkpoints"])


@pytest.mark.parametrize("form", ["root", "global_step_N", "global_step_N/actor", "actor/huggingface"])
def test_checkpoints_without_weights_name_the_fixes(tmp_path, form, monkeypatch, capsys, no_unpickling):
    root = write_checkpoints(tmp_path / "ckpts", steps=(10, 20), weights=False)
    path = {"root": root, "global_step_N": root / "global_step_20", "global_step_N/actor": root / "global_step_20" /
            "actor", "actor/huggingface": root / "global_step_20" / "actor" / "huggingface"}[form]
    msg = one_line_error(["analyze", path, "-n", "0", "--cache", tmp_path / "cache"], monkeypatch, capsys)
    for needle in ("save_contents", "hf_model", "verl.model_merger", "never unpickled"):
        assert needle in msg, msg


def test_one_verdict_from_log_dumps_and_checkpoints(tmp_path, no_unpickling):
    root = tmp_path / "run"
    write_log(root / "myproj" / "exp.jsonl", log_lines(cp=False, first=0))
    write_dumps(root / "rollout_data")
    write_checkpoints(root / "checkpoints" / "myproj" / "exp")
    v = analyze_json(root, "--checkpoints", "-n", "0", "--cache", tmp_path / "cache")
    assert v["kind"] == "run" and v["collapsed"] is True and v["collapse_step"] == 25
    assert v["sources"]["checkpoints"] == [10, 20, 30] and v["sources"]["rollouts"] == [str(root / "rollout_data")]
    assert [c["step"] for c in v["checkpoints"]] == [10, 20, 30] and v["source"] == "probe"


# ------------------------------------------------------------------------------------------ watch
def test_watch_survives_the_loggers_truncate_on_restart(tmp_path):
    """verl reopens its log with "wb" when a run resumes: the file is emptied and written again from the
    resumed step. `watch` notices, treats the earlier steps with new content as a restart, and follows on."""
    log = tmp_path / "myproj" / "exp.jsonl"
    first = log_lines(n=18, drop=100, spike=100, seed=1, first=0)  # healthy up to step 18
    again = log_lines(n=40, seed=2, first=11)                      # resumed at step 10: collapses
    out, done = [], threading.Event()

    class Out:
        def write(self, s: str) -> None:
            out.extend(json.loads(x) for x in s.splitlines() if x.strip())

        def flush(self) -> None:
            pass

    log.parent.mkdir(parents=True)
    f = open(log, "wb", buffering=0)  # noqa: SIM115 - as verl's FileLogger: opened at startup, written per step

    def writer() -> None:
        nonlocal f
        for r in first:
            f.write(encode(r))
            time.sleep(0.01)
        time.sleep(0.5)
        f.close()
        f = open(log, "wb", buffering=0)  # noqa: SIM115 - the restart: truncated, then the resumed steps
        for r in again:
            f.write(encode(r))
            time.sleep(0.01)
        f.close()
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    code = watch(log, as_json=True, out=Out(), poll_s=0.05, stop=lambda: done.is_set() and len(out) > 60)
    t.join()
    steps = [s["step"] for s in out]
    assert code == 3, steps
    i = next(i for i, s in enumerate(out) if s["restarted"])
    assert out[i]["step"] == 11 and steps[:i] == list(range(19))  # steps 0..18, then 11 again: the restart
    assert out[-1]["collapsed"] is True and out[-1]["collapse_step"] == 25 and out[-1]["restarts"] == 1


def test_export_and_plot_see_what_analyze_sees(tmp_path):
    """One joining reader for every command: `export` and `plot` on a verl log directory with rollout dumps show the
    steps and the format-state mix `analyze` judged (they used to read the metrics file alone)."""
    import pandas as pd

    from collapse_probe.runs.timeline import Timeline
    from collapse_probe.schema import STATES, state_key

    root = tmp_path / "run"
    write_log(root / "myproj" / "exp.jsonl", log_lines(cp=False, first=0))
    write_dumps(root / "rollout_data")
    v = analyze_json(root)
    exp = runner.invoke(app, ["export", str(root), str(tmp_path / "t.csv"), "--json"])
    assert exp.exit_code == 0, exp.output
    table = pd.read_csv(tmp_path / "t.csv")
    assert json.loads(exp.stdout)["steps"] == v["steps"] == len(table)
    assert int(table["step"].iloc[0]) == v["first_step"] and int(table["step"].iloc[-1]) == v["last_step"]
    last = table.iloc[-1]
    assert {s: float(last[state_key(s)]) for s in STATES} == {s: v["final_state_mix"][s] for s in STATES}
    tl = Timeline.from_run(root)  # what `plot` draws
    assert len(tl) == v["steps"] and not tl.state_mix().empty
    res = runner.invoke(app, ["plot", str(root), "--out", str(tmp_path / "fig" / "timeline"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["collapsed"] is v["collapsed"] and all(Path(p).is_file() for p in out["figures"])
