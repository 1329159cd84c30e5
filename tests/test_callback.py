import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from transformers import TrainerControl, TrainerState

from collapse_probe import CollapseProbeCallback
from collapse_probe.formats.classify import state_mix
from collapse_probe.errors import UserError
from collapse_probe.runs.joined import read_records
from collapse_probe.schema import Position, Source, cp_count_key, cp_key
from collapse_probe.train import tiny
from collapse_probe import world

REPO = Path(__file__).resolve().parents[1]
KEY = "cp/probe/after_open/end_of_turn"


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny.build_model(tok, "tiny")


def _raw_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _drive(cb, out, model, tok, *, steps=4, logs=None, state=None):
    """What a Trainer does: begin, (step_end, log) per step, a summary log, end."""
    args, state, control = SimpleNamespace(output_dir=str(out)), state or TrainerState(), TrainerControl()
    kw = {"model": model, "processing_class": tok}
    cb.on_train_begin(args, state, control, **kw)
    for step in range(1, steps + 1):
        state.global_step = step
        cb.on_step_end(args, state, control, **kw)
        cb.on_log(args, state, control, logs=(logs or (lambda s: {"loss": 1.0 / s, "learning_rate": 1e-3}))(step), **kw)
    cb.on_log(args, state, control, logs={"train_runtime": 1.5, "train_loss": 0.5}, **kw)
    cb.on_train_end(args, state, control, **kw)
    return out / "collapse_probe" / "metrics.jsonl"


def test_one_record_per_step_with_probe_and_trainer_logs(tmp_path, model, tok):
    model.train()
    cb, state = CollapseProbeCallback(every=2), TrainerState()
    metrics = _drive(cb, tmp_path, model, tok, steps=5, state=state,
                     logs=lambda s: {"loss": 1.0 / s, "reward": 0.1 * s, "reward_std": 0.2, "learning_rate": 1e-3,
                                     "entropy": 3.0, "grad_norm": None, "epoch": 0.5})
    assert model.training  # train mode restored after each probe
    assert _raw_steps(metrics) == [0, 1, 2, 3, 4, 5]  # one line per step during training
    recs = {r["step"]: r for r in read_records(tmp_path)}
    assert [s for s, r in recs.items() if KEY in r] == [0, 2, 4, 5]  # step 0, every 2, and the last step
    for r in recs.values():
        if KEY in r:
            assert 0 <= r[KEY] <= 1 and r["cp/probe/after_open/count"] > 0 and r["time/probe_s"] >= 0
    r2 = recs[2]
    assert r2["loss"] == 0.5 and r2["reward"] == r2["reward/mean"] == pytest.approx(0.2)
    assert r2["reward/std"] == 0.2 and r2["lr"] == r2["learning_rate"] == 1e-3 and r2["entropy"] == 3.0
    assert "grad_norm" not in r2 and isinstance(r2["time"], float)
    assert recs[5]["train_loss"] == 0.5 and recs[5]["loss"] == 0.2  # the summary log joins the last step
    # trainer.evaluate() after train(): the last step's record is rewritten whole, with the eval metrics
    cb.on_log(SimpleNamespace(output_dir=str(tmp_path)), state, TrainerControl(), logs={"eval_loss": 0.75})
    last = read_records(tmp_path)[-1]
    assert last["step"] == 5 and last["eval_loss"] == 0.75 and last["loss"] == 0.2 and KEY in last
    cfg = json.loads((tmp_path / "collapse_probe" / "config.json").read_text())
    assert cfg["source"] == "callback" and cfg["probe_set"] == "world" and cfg["every"] == 2
    assert cfg["roles"]["ids"]["tool_open"] == tok.convert_tokens_to_ids(world.TOOL_OPEN)


def test_reward_alias_from_a_single_reward_function(tmp_path, model, tok):
    cb = CollapseProbeCallback(every=100, out_dir=str(tmp_path / "elsewhere"))
    _drive(cb, tmp_path, model, tok, steps=1,
           logs=lambda s: {"loss": 0.0, "rewards/fmt/mean": 0.25, "rewards/fmt/std": 0.5})
    (rec,) = [r for r in read_records(tmp_path / "elsewhere") if r["step"] == 1]
    assert rec["reward/mean"] == 0.25 and rec["reward/std"] == 0.5 and KEY in rec  # probed at train end


def test_trl_completions_become_fmt_keys(tmp_path, model, tok):
    texts = [world.render_call("find_user", {"name": "bob"}), world.TOOL_OPEN, "The answer is 7.",
             world.TOOL_OPEN + "\n{bad"]
    (tmp_path / "completions").mkdir()
    df = pd.DataFrame({"step": [2] * 4, "prompt": [[{"role": "user", "content": "q"}]] * 4,
                       "completion": [[{"role": "assistant", "content": t}] for t in texts],
                       "reward": [1.0, 0.5, 0.0, 0.5], "advantage": [0.5, 0.0, -0.5, 0.0]})
    df.to_parquet(tmp_path / "completions" / "completions_00002.parquet")
    _drive(CollapseProbeCallback(every=10), tmp_path, model, tok, steps=3)
    recs = {r["step"]: r for r in read_records(tmp_path)}
    want = state_mix(texts).metrics()
    assert want["fmt/full_collapse"] > 0 and want["fmt/healthy_tool_call"] == 0.25
    assert {k: v for k, v in recs[2].items() if k.startswith("fmt/")} == want
    assert not any(k.startswith("fmt/") for k in recs[1]) and recs[2]["loss"] == 0.5


class _Broken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 2)

    def forward(self, **kw):
        raise RuntimeError("probe forward exploded")


def test_probe_errors_never_stop_training(tmp_path, tok, caplog):
    broken = _Broken().train()
    with caplog.at_level(logging.WARNING, logger="collapse_probe.integrations.callback"):
        metrics = _drive(CollapseProbeCallback(every=1), tmp_path, broken, tok, steps=3)
    assert broken.training
    warnings = [r for r in caplog.records if "probe failed" in r.message]
    assert len(warnings) == 1 and "exploded" in warnings[0].getMessage()
    recs = read_records(metrics)
    assert [r["step"] for r in recs] == [1, 2, 3] and all("loss" in r and KEY not in r for r in recs)


def test_tokenizer_without_world_tokens_falls_back_to_probe_messages(tmp_path, model, tok, caplog):
    plain = SimpleNamespace(encode=lambda s, add_special_tokens=False: [1, 2, 3], get_added_vocab=lambda: {},
                            eos_token=None, chat_template=None, decode=lambda ids: "x")
    with caplog.at_level(logging.WARNING, logger="collapse_probe.integrations.callback"):
        metrics = _drive(CollapseProbeCallback(tokenizer=plain), tmp_path / "a", model, tok, steps=2)
    assert any("setup failed" in r.message and "probe_messages" in r.getMessage() for r in caplog.records)
    assert [r["step"] for r in read_records(metrics)] == [1, 2]  # trainer metrics are still recorded
    conv = [{"role": "system", "content": world.system_prompt()}, {"role": "user", "content": "Where is bob?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "find_user", "arguments": {"name": "bob"}}}]},
            {"role": "tool", "content": '{"user_id": "u1"}'}, {"role": "assistant", "content": "In oslo."}]
    metrics = _drive(CollapseProbeCallback(probe_messages=[conv], every=2), tmp_path / "b", model, tok, steps=2)
    recs = read_records(metrics)
    assert recs[0]["cp/probe/after_open/count"] == 1 and 0 <= recs[0][KEY] <= 1
    assert json.loads((tmp_path / "b" / "collapse_probe" / "config.json").read_text())["probe_set"] == "messages"


def test_only_the_main_process_writes(tmp_path, model, tok):
    state = TrainerState()
    state.is_world_process_zero = False
    _drive(CollapseProbeCallback(every=1), tmp_path, model, tok, steps=2, state=state)
    assert not (tmp_path / "collapse_probe").exists()


def test_bad_arguments_are_user_errors(tok):
    with pytest.raises(UserError, match="every"):
        CollapseProbeCallback(every=0)
    with pytest.raises(UserError, match="probe_messages"):
        CollapseProbeCallback(probe_messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(UserError, match="tool_open"):  # several tokens are a role now; no token at all is not
        CollapseProbeCallback(tokenizer=tok, token_overrides={"tool_open": ""})


def _run_example(name: str, out: Path, *extra: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, str(REPO / "examples" / name), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(out.parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _check_records(metrics: Path, trainer: str) -> list[dict]:
    steps = _raw_steps(metrics)
    assert steps == sorted(set(steps)), "a step was written twice"
    recs = read_records(metrics)
    probed = [r for r in recs if KEY in r]
    assert probed and all(isinstance(r[KEY], float) and 0 <= r[KEY] <= 1 for r in probed)
    assert probed[0]["step"] == 0 and probed[-1]["step"] == recs[-1]["step"]
    assert any(math.isfinite(r.get("loss", math.nan)) for r in recs)
    assert json.loads((metrics.parent / "config.json").read_text())["trainer"] == trainer
    return recs


def _check_on_policy(trained: list[dict]) -> None:
    """The callback alone (no user code) wrote on-policy numbers for every trained step."""
    count = cp_count_key(Source.ROLLOUT.value, Position.TURN_START.value)
    key = cp_key(Source.ROLLOUT.value, Position.TURN_START.value, "tool_open")
    assert all(r.get(count, 0) > 0 and 0 <= r[key] <= 1 for r in trained)


@pytest.mark.slow
def test_hf_trainer_example(tmp_path):
    out = tmp_path / "hf"
    stdout = _run_example("hf_trainer_callback.py", out, "--steps", "10", "--every", "5")
    metrics = out / "trainer" / "collapse_probe" / "metrics.jsonl"
    assert str(metrics) in stdout
    recs = _check_records(metrics, "Trainer")
    assert [r["step"] for r in recs] == list(range(11))
    assert [r["step"] for r in recs if KEY in r] == [0, 5, 10]
    assert all("loss" in r and "grad_norm" in r for r in recs[1:])


@pytest.mark.slow
def test_trl_grpo_example(tmp_path):
    out = tmp_path / "grpo"
    stdout = _run_example("trl_grpo_callback.py", out, "--steps", "4", "--every", "2")
    metrics = out / "trainer" / "collapse_probe" / "metrics.jsonl"
    assert str(metrics) in stdout
    recs = _check_records(metrics, "GRPOTrainer")
    assert [r["step"] for r in recs if KEY in r] == [0, 2, 4]
    trained = [r for r in recs if r["step"] > 0]
    assert len(trained) == 4 and all(0 <= r["reward/mean"] <= 1 and "reward" in r for r in trained)
    assert all("entropy" in r and "loss" in r for r in trained)
    _check_on_policy(trained)
    if list((out / "trainer" / "completions").glob("*.parquet")):  # TRL logged completions: classified
        for r in trained:
            fmt = {k: v for k, v in r.items() if k.startswith("fmt/") and "/reason/" not in k}
            assert len(fmt) == 4 and math.isclose(sum(fmt.values()), 1.0)


@pytest.mark.slow
def test_trl_grpo_tools_example(tmp_path):
    """Multi-turn GRPO through TRL's own tool loop (`tools=`): tool calls ran, on-policy numbers every step."""
    out = tmp_path / "tools"
    _run_example("trl_grpo_tools_callback.py", out, "--steps", "3", "--every", "3")
    recs = _check_records(out / "trainer" / "collapse_probe" / "metrics.jsonl", "GRPOTrainer")
    trained = [r for r in recs if r["step"] > 0]
    assert len(trained) == 3 and all(r["tools/call_frequency"] > 0 for r in trained)
    _check_on_policy(trained)
    after_open = cp_count_key(Source.ROLLOUT.value, Position.AFTER_OPEN.value)
    assert all(r[after_open] > 0 for r in trained)  # the policy's own calls are decision positions


@pytest.mark.slow
def test_sft_trainer_example(tmp_path):
    out = tmp_path / "sft"
    _run_example("sft_trainer_callback.py", out, "--steps", "4", "--every", "2")
    recs = _check_records(out / "trainer" / "collapse_probe" / "metrics.jsonl", "SFTTrainer")
    assert [r["step"] for r in recs if KEY in r] == [0, 2, 4]
    trained = [r for r in recs if r["step"] > 0]
    assert len(trained) == 4 and all("loss" in r for r in trained)
    _check_on_policy(trained)
