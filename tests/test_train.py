"""Foundation: tool world, tiny model, rollout, SFT/GRPO/interleaved trainer, run directory layout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from collapse_probe.runs.joined import read_records

from collapse_probe.runs.runlog import read_rollouts
from collapse_probe.train import rollout, sft, tiny
from collapse_probe import world
from collapse_probe.train.config import TrainConfig
from collapse_probe.train.trainer import train


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tok):
    """A random-init tiny model saved with save_pretrained: stands in for any local HF causal LM."""
    path = tmp_path_factory.mktemp("model")
    tiny.build_model(tok, "tiny").save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_world_is_deterministic_and_oracle_solves_every_kind():
    assert world.make_task(7).question == world.make_task(7).question
    for kind in world.TASK_KINDS:
        for seed in range(20):
            task = world.make_task(seed, kind)
            ep = world.Episode(task)
            for turn, obs in world.oracle_turns(task, empty_call_retries=1):
                got = ep.step(turn)
                assert (got is None) == (obs is None)
            assert ep.success and ep.done
            assert len(task.chain) == {"city": 2, "weather": 3, "friend_city": 3, "friend_weather": 4}[kind]


def test_later_arguments_depend_on_earlier_observations():
    task = world.make_task(3, "friend_weather")
    calls = task.oracle_calls()
    for (_, _, obs), (_, args, _) in zip(calls, calls[1:]):
        assert next(iter(args.values())) == next(iter(obs.values()))


@pytest.mark.parametrize("turn", [
    "<tool_call>\n{\"name\": \"find_user\"",
    "<tool_call>\n{name: find_user}\n</tool_call>",
    "<tool_call>\n<tool_call>\n{\"name\": \"find_user\", \"arguments\": {\"name\": \"x\"}}\n</tool_call>",
    "<tool_call>\n[1, 2]\n</tool_call>",
    "<tool_call>\n{\"name\": \"rm_rf\", \"arguments\": {}}\n</tool_call>",
    "<tool_call>\n{\"name\": \"get_city\", \"arguments\": {\"user_id\": \"nobody\"}}\n</tool_call>",
])
def test_a_call_that_cannot_be_executed_ends_the_episode(turn):
    ep = world.Episode(world.make_task(1), max_turns=4)
    assert ep.step(turn) is None and ep.done and not ep.success and ep.n_errors == 1
    assert world.Episode(world.make_task(1), end_on_call_error=False).step(turn) is not None


@pytest.mark.parametrize("turn, error", [
    ("<tool_call>\n", "empty tool call"),
    ("<tool_call>\n{\"name\": \"rm_rf\", \"arguments\": {}}\n</tool_call>", "unknown tool 'rm_rf'"),
    ("<tool_call>\n{\"name\": \"get_city\", \"arguments\": {\"city\": \"x\"}}\n</tool_call>", "takes one string argument"),
    ("<tool_call>\n{\"name\": \"__import__('os').system('true')\", \"arguments\": {}}\n</tool_call>", "unknown tool"),
])
def test_bad_calls_become_observations_not_crashes(turn, error):
    ep = world.Episode(world.make_task(1), max_turns=4, end_on_call_error=False)
    obs = ep.step(turn)
    assert obs is not None and error in obs and not ep.done
    assert ep.n_errors == 1


def test_reward_pays_outcome_and_tag_bonus():
    task = world.make_task(2, "city")
    spec = world.RewardSpec(tag_bonus=0.1)
    ep = world.Episode(task)
    for turn, _ in world.oracle_turns(task, empty_call_retries=1):
        ep.step(turn)
    assert spec(ep) == pytest.approx(1.0 + 0.1 * 3)  # one empty call + two real calls
    ep2 = world.Episode(task, max_turns=2)
    ep2.step("<tool_call>\n")
    ep2.step("<tool_call>\n")
    assert ep2.done and not ep2.success and spec(ep2) == pytest.approx(0.2)


def test_tokenizer_mirrors_qwen_and_survives_save_load(tok, saved_model):
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(saved_model)
    task = world.make_task(5)
    ids, _ = world.encode_trajectory(tok, task)
    ids2, _ = world.encode_trajectory(reloaded, task)
    assert ids == ids2
    for t in world.SPECIAL_TOKENS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    call = world.render_call("get_city", {"user_id": "uba"})
    assert tok.decode(tok.encode(call)) == call
    assert tok.decode(tok.encode(call), skip_special_tokens=True) == call  # tool tags are not "special", as in Qwen2.5
    assert tok.convert_ids_to_tokens(tok.encode(call))[:3] == ["<tool_call>", "\u010a", '{"']
    assert tok.eos_token == "<|im_end|>"
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_rollout_logprobs_match_the_training_forward(tok):
    """The KV-cached, left-padded, cross-turn decoding must see exactly what the training forward sees."""
    torch.manual_seed(0)
    model = tiny.build_model(tok, "tiny")
    trajs = rollout.rollout(model, tok, world.task_split("train", 3), group_size=2, max_turns=3,
                            max_new_tokens=12, seed=0)
    batch = sft.collate([t.ids for t in trajs], [t.gen_mask for t in trajs], tok.pad_token_id,
                        extra=[t.old_logp for t in trajs])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["loss_mask"][:, 1:].bool()
    assert mask.sum() > 20
    assert torch.allclose(logp[mask], batch["extra"][:, 1:][mask], atol=1e-4)
    for t in trajs:
        assert len(t.ids) == len(t.gen_mask) == len(t.old_logp)
        assert t.episode.done


@pytest.mark.slow
def test_sft_then_grpo_then_interleaved_write_run_dirs(tmp_path):
    sft_dir = tmp_path / "sft"
    ckpt = train(TrainConfig(mode="sft", size="tiny", steps=3, sft_batch=4, eval_every=0, eval_tasks=2,
                             probe_every=2, save_every=2), sft_dir)
    recs = read_records(sft_dir)
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    assert all(r["phase"] == "sft" for r in recs[:3]) and "eval/success" in recs[-1]
    assert "cp/probe/after_open/end_of_turn" in recs[0]
    assert (ckpt / "model.safetensors").exists() and (ckpt / "tokenizer.json").exists()
    assert (sft_dir / "checkpoint-2").is_dir() and json.loads((sft_dir / "config.json").read_text())["mode"] == "sft"

    for mode in ("grpo", "interleaved"):
        run = tmp_path / mode
        train(TrainConfig(mode=mode, init=str(ckpt), steps=2, prompts_per_step=2, group_size=3, max_turns=3,
                          max_new_tokens=16, eval_tasks=2, probe_every=1, save_every=1, sft_every=1, sft_batch=4,
                          kl_coef=0.05 if mode == "grpo" else 0.0,
                          reward=world.RewardSpec(correct=1.0, tag_bonus=0.1)), run)
        recs = read_records(run)
        assert [r["step"] for r in recs] == [0, 1, 2]
        for key in ("reward/mean", "success", "format_valid", "entropy", "grad_norm", "len/response_mean",
                    "time/step_s", "fmt/full_collapse", "cp/rollout/turn_start/count"):
            assert key in recs[0], key
        if mode == "grpo":
            assert recs[0]["kl"] >= 0
        else:
            assert "sft/loss" in recs[0]
        rows = read_rollouts(run)
        assert rows and rows[0]["turns"] and "<|im_start|>assistant" in rows[0]["text"]
        assert (run / "checkpoint-1" / "model.safetensors").exists()


@pytest.mark.slow
def test_cli_train_accepts_any_local_hf_model(tmp_path, saved_model):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", "from collapse_probe.cli.app import main; main()", "train",
                           "--preset", "grpo-collapse", "--model", str(saved_model), "--steps", "1",
                           "--set", "group_size=2", "--set", "prompts_per_step=2", "--set", "max_turns=2",
                           "--set", "max_new_tokens=8", "--set", "probe_every=1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["step"] for r in read_records(out)] == [0, 1]
    assert (out / "checkpoint-1" / "config.json").exists()


def test_cli_train_unknown_preset_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from collapse_probe.cli.app import main; main()", "train",
                           "--preset", "nope", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "unknown preset 'nope'" in proc.stderr and "Traceback" not in proc.stderr
