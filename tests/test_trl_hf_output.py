"""A TRL output dir written without our callback -> records -> the monitor's verdict."""

import json

import pandas as pd
import pytest

from collapse_probe.detect.monitor import replay
from collapse_probe.integrations.hf_output import read_hf_output
from collapse_probe import world


def trl_output_dir(root, steps=40, collapse_at=22):
    """What GRPOTrainer leaves (trainer_state.json log history, completions parquet): healthy calls, then bare
    tags and a falling reward."""
    history = []
    (root / "completions").mkdir(parents=True)
    for s in range(1, steps + 1):
        broken = s >= collapse_at
        r = 0.1 if broken else 0.8 + 0.01 * (s % 3)
        history.append({"step": s, "epoch": s / steps, "loss": 0.01, "reward": r, "reward_std": 0.3,
                        "entropy": 1.2, "grad_norm": 0.5, "learning_rate": 1e-6,
                        "completions/mean_length": 12.0 if broken else 40.0})
        texts = [world.TOOL_OPEN] * 4 if broken else [world.render_call("find_user", {"name": "bob"})] * 4
        pd.DataFrame({"step": [s] * 4, "prompt": [[{"role": "user", "content": "q"}]] * 4,
                      "completion": [[{"role": "assistant", "content": t}] for t in texts],
                      "reward": [r] * 4}).to_parquet(root / "completions" / f"completions_{s:05d}.parquet")
    history.append({"step": steps, "train_runtime": 10.0, "train_loss": 0.01})
    (root / "trainer_state.json").write_text(json.dumps({"global_step": steps, "log_history": history}))
    return root


def test_trl_output_dir_gives_records_and_a_verdict(tmp_path):
    recs = read_hf_output(trl_output_dir(tmp_path / "run"))
    assert [r["step"] for r in recs] == list(range(1, 41))
    r = recs[0]
    assert r["reward/mean"] == r["reward"] == pytest.approx(0.81) and r["reward/std"] == 0.3
    assert r["entropy"] == 1.2 and r["grad_norm"] == 0.5 and r["fmt/healthy_tool_call"] == 1.0
    assert recs[-1]["fmt/full_collapse"] == 1.0
    verdict = replay(recs)
    assert verdict.collapsed and 22 <= verdict.confirmed_at <= 26
    assert read_hf_output(tmp_path / "missing") is None and read_hf_output(tmp_path) is None


def test_cli_analyze_on_a_trl_output_dir_without_our_callback(tmp_path):
    from typer.testing import CliRunner

    from collapse_probe.cli import app

    run = trl_output_dir(tmp_path / "trl-out")
    res = CliRunner().invoke(app, ["analyze", str(run), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["kind"] == "hf_output" and out["collapsed"] is True and out["collapse_step"] == 22
    res = CliRunner().invoke(app, ["analyze", str(run), "--fail-on", "collapse"])
    assert res.exit_code == 3 and "HF/TRL output dir" in res.stdout
