"""`analyze`: run dirs (JSON keys, verdict), checkpoint folders (probe scores, cache outside the folder, second call
scores nothing), and every bad input -> exit 1 with one line on stderr and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from collapse_probe.cli.app import app, main
from helpers.runs import snapshot, write_run

runner = CliRunner()
KEYS = {"collapsed", "spike_step", "breakage_step", "collapse_step", "lead_steps", "events"}


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    """The embedded tiny random model saved 3 times (weights nudged between saves) as checkpoint-0/5/10."""
    from collapse_probe.train import tiny

    d = tmp_path_factory.mktemp("ckpts")
    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, "tiny")
    gen = torch.Generator().manual_seed(0)
    for i, step in enumerate((0, 5, 10)):
        with torch.no_grad():
            model.lm_head.weight.add_(0.05 * i * torch.randn(model.lm_head.weight.shape, generator=gen))
        model.save_pretrained(d / f"checkpoint-{step}")
        tok.save_pretrained(d / f"checkpoint-{step}")
    return d


def _json(args, env=None) -> dict:
    res = runner.invoke(app, ["analyze", *map(str, args), "--json"], env=env)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_analyze_run_dir_json(tmp_path):
    col = _json([write_run(tmp_path / "col", True)])
    assert KEYS <= set(col)
    assert col["collapsed"] is True and col["kind"] == "run" and col["source"] == "rollout"
    assert col["spike_step"] < col["collapse_step"]
    # the lead counts from the step at which the alert was available, the onset lead from its back-dated start
    assert col["lead_steps"] == col["collapse_step"] - col["first_alert_step"] > 0
    assert col["onset_lead_steps"] == col["collapse_step"] - col["first_alert_onset"] >= col["lead_steps"]
    assert any(e["kind"] == "control_spike" and e["role"] == "end_of_turn" for e in col["events"])
    assert col["final_state_mix"]["full_collapse"] > 0.5
    stable = _json([write_run(tmp_path / "stable", False, seed=1) / "metrics.jsonl"])
    assert stable["collapsed"] is False and stable["spike_step"] is None and stable["collapse_step"] is None
    res = runner.invoke(app, ["analyze", str(tmp_path / "col")])
    assert res.exit_code == 0 and "collapsed: YES" in res.stdout and "lead:" in res.stdout


def test_analyze_checkpoints_cached(ckpt_dir, tmp_path, monkeypatch):
    before = snapshot(ckpt_dir)
    cache = tmp_path / "cache"
    first = _json([ckpt_dir, "--eval-tasks", "0", "--cache", cache])
    assert KEYS <= set(first) and first["kind"] == "checkpoints"
    assert (first["scored"], first["cached"]) == (3, 0)
    assert [c["step"] for c in first["checkpoints"]] == [0, 5, 10]
    p = [c["p_end_of_turn"] for c in first["checkpoints"]]
    assert all(0 < v < 1 for v in p) and len(set(p)) == 3  # the nudged weights give different probe values
    assert first["collapsed"] is False and first["collapse_step"] is None
    second = _json([ckpt_dir, "--eval-tasks", "0", "--cache", cache])
    assert (second["scored"], second["cached"]) == (0, 3)
    assert second["checkpoints"] == first["checkpoints"]
    # other settings are another cache entry; the default cache dir follows COLLAPSE_PROBE_CACHE
    env_cache = tmp_path / "envcache"
    monkeypatch.setenv("COLLAPSE_PROBE_CACHE", str(env_cache))
    third = _json([ckpt_dir / "checkpoint-0", "--eval-tasks", "2"])  # one save_pretrained dir, with success
    assert (third["scored"], third["cached"]) == (1, 0)
    assert isinstance(third["checkpoints"][0]["success"], float)
    assert Path(third["cache"]).is_relative_to(env_cache / "analyze")
    assert snapshot(ckpt_dir) == before  # nothing written into the checkpoint folder


def _bad_inputs(base: Path, ckpt_dir: Path) -> dict[str, list[str]]:
    (base / "empty").mkdir()
    (base / "empty" / "metrics.jsonl").write_text("")
    (base / "nothing").mkdir()
    (base / "notjsonl.jsonl").write_text("step,loss\n0,1.0\n1,0.9\n")
    trunc = base / "trunc"
    for step in (0, 5):
        src = ckpt_dir / f"checkpoint-{step}"
        dst = trunc / f"checkpoint-{step}"
        dst.mkdir(parents=True)
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
    w = trunc / "checkpoint-5" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return {"missing": ["analyze", str(base / "missing")],
            "empty run": ["analyze", str(base / "empty")],
            "not JSONL": ["analyze", str(base / "notjsonl.jsonl")],
            "truncated checkpoint": ["analyze", str(trunc), "-n", "0", "--cache", str(base / "c")],
            "no checkpoints, no metrics": ["analyze", str(base / "nothing")],
            "watch --once missing": ["watch", str(base / "missing"), "--once"],
            "watch --once empty": ["watch", str(base / "empty"), "--once", "--json"],
            "plot empty": ["plot", str(base / "empty")],
            "report not JSONL": ["report", str(base / "notjsonl.jsonl")]}


def test_bad_inputs_exit_1_with_one_line(ckpt_dir, tmp_path, monkeypatch, capsys):
    cases = _bad_inputs(tmp_path, ckpt_dir)
    monkeypatch.chdir(tmp_path)
    for name, argv in cases.items():
        monkeypatch.setattr(sys, "argv", ["collapse-probe", *argv])
        with pytest.raises(SystemExit) as exc:
            main()
        cap = capsys.readouterr()
        assert exc.value.code == 1, (name, cap)
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in cap.err, (name, cap.err)
        assert cap.out == "", name
        if name == "truncated checkpoint":
            assert "checkpoint-5" in lines[0]
    # the real entry point in a fresh interpreter
    proc = subprocess.run([sys.executable, "-c", "from collapse_probe.cli.app import main; main()",
                           *cases["not JSONL"]], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "not JSONL" in proc.stderr
