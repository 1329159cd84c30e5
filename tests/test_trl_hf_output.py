"""A TRL output dir written without our callback -> records -> the monitor's verdict."""

import json

import pandas as pd
import pytest

from collapse_probe.detect.monitor import replay
from collapse_probe.runs.hf_output import read_hf_output
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

    from collapse_probe.cli.app import app

    run = trl_output_dir(tmp_path / "trl-out")
    res = CliRunner().invoke(app, ["analyze", str(run), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["kind"] == "hf_output" and out["collapsed"] is True and out["collapse_step"] == 22
    res = CliRunner().invoke(app, ["analyze", str(run), "--fail-on", "collapse"])
    assert res.exit_code == 3 and "HF/TRL output dir" in res.stdout


def _example():
    """examples/trl_grpo_callback.py as a module (its base model builder and tool-call reward)."""
    import importlib.util
    from pathlib import Path

    f = Path(__file__).resolve().parents[1] / "examples" / "trl_grpo_callback.py"
    spec = importlib.util.spec_from_file_location("trl_grpo_callback_example", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_analyze_on_a_real_trl_run_without_our_callback(tmp_path, monkeypatch):
    """A real (tiny, CPU) GRPOTrainer run with no CollapseProbeCallback: TRL's completions parquet, a checkpoint's
    trainer_state.json and TensorBoard events are all `analyze` gets."""
    pytest.importorskip("tensorboard")
    torch = pytest.importorskip("torch")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from typer.testing import CliRunner

    from collapse_probe.cli.app import app

    monkeypatch.delenv("RANK", raising=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ex = _example()
        model_path = ex.build_base_model(tmp_path / "base_model")
        prompts = [[{"role": "system", "content": world.system_prompt()}, {"role": "user", "content": t.question}]
                   for t in world.task_split("train", 16)]
        out = tmp_path / "trainer"
        args = GRPOConfig(
            output_dir=str(out), max_steps=3, per_device_train_batch_size=4, num_generations=4,
            max_completion_length=16, temperature=1.0, learning_rate=1e-3, beta=0.0, logging_steps=1,
            log_completions=True, num_completions_to_print=1, save_strategy="steps", save_steps=3,
            report_to="tensorboard", use_cpu=True, bf16=False, gradient_checkpointing=False,
            dataloader_num_workers=0, disable_tqdm=True, seed=0)
        trainer = GRPOTrainer(model=str(model_path), reward_funcs=ex.tool_call_reward, args=args,
                              train_dataset=Dataset.from_dict({"prompt": prompts}),
                              processing_class=AutoTokenizer.from_pretrained(model_path))
        assert not any(type(c).__name__ == "CollapseProbeCallback" for c in trainer.callback_handler.callbacks)
        trainer.train()
    finally:
        torch.set_num_threads(n)
    assert (out / "checkpoint-3" / "trainer_state.json").is_file() and not (out / "collapse_probe").exists()
    assert sorted(p.name for p in (out / "completions").glob("*.parquet")) == [
        f"completions_{s:05d}.parquet" for s in (1, 2, 3)]
    assert list(out.rglob("events.out.tfevents.*"))

    recs = read_hf_output(out)
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert 0 <= r["reward/mean"] <= 1 and r["reward/mean"] == r["reward"] and "reward/std" in r
        assert "entropy" in r and "grad_norm" in r
        assert any(k.startswith("fmt/") for k in r)  # the format mix of TRL's logged completions
        assert abs(sum(v for k, v in r.items() if k.startswith("fmt/") and k.count("/") == 1) - 1) < 1e-6

    res = CliRunner().invoke(app, ["analyze", str(out), "--json"])
    assert res.exit_code == 0, res.output
    verdict = json.loads(res.stdout)
    assert verdict["kind"] == "hf_output" and verdict["path"] == str(out)
    assert verdict["steps"] == 3 and verdict["first_step"] == 1 and verdict["last_step"] == 3
    assert isinstance(verdict["collapsed"], bool) and "summary" not in verdict
