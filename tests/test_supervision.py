"""The paper's supervisory signals as trainer options: their mechanics on tiny runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from collapse_probe import world
from collapse_probe.errors import UserError
from collapse_probe.runs.joined import read_records
from collapse_probe.train import error_sft, grpo, hints, judge, offpolicy, tiny
from collapse_probe.train.config import TrainConfig, apply_overrides
from collapse_probe.train.rollout import Trajectory, rollout
from collapse_probe.train.trainer import sample_groups, train


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return tiny.build_model(tok, "tiny", seed=0)


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=2, prompts_per_step=2, group_size=4, max_turns=3, max_new_tokens=8, harness="paper",
                probe_every=0, save_every=0, eval_tasks=2, log_rollouts=0, threads=1)
    return TrainConfig(**{**base, **kw})


def test_the_off_policy_samples_are_the_oracles_trajectory_played_through_the_world(model, tok):
    cfg = _cfg(offpolicy_samples=1, max_turns=8)  # room for the longest chain and its answer
    tasks = world.task_split("train", 2)
    trajs = sample_groups(model, tok, tasks, cfg, step=0)
    assert len(trajs) == 2 * 4
    oracle = [t for t in trajs if t.source == offpolicy.SOURCE]
    assert [t.group for t in oracle] == [0, 1]
    for t in oracle:
        ids, mask = world.encode_trajectory(tok, t.task)
        assert t.ids == ids and t.gen_mask == mask  # the oracle's tokens, observations masked out
        assert t.episode.success and t.reward == cfg.reward(t.episode) == 1.0


def test_the_off_policy_tokens_carry_the_p_over_p_plus_tenth_weight(model, tok):
    task = world.task_split("train", 1)[0]
    t = offpolicy.oracle_sample(tok, task, group=0, max_turns=8, harness="paper")
    adv = torch.tensor([0.7])
    model.zero_grad()
    out = grpo.grpo_loss(model, [t], adv, pad_id=tok.pad_token_id)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # the reference: -sum(w * logp * adv) / n over the oracle's assistant tokens, w = p/(p+0.1) detached
    model.zero_grad()
    ids = torch.tensor([t.ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    m = torch.tensor([t.gen_mask])[:, 1:].float()
    w = logp.detach().exp() / (logp.detach().exp() + 0.1)
    ref = -(w * logp * adv * m).sum() / m.sum()
    ref.backward()
    assert torch.allclose(out.loss, -(w * adv * m).sum() / m.sum(), atol=1e-6)  # ratio 1 in value
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n
    assert out.metrics["oracle/weight_mean"] == pytest.approx(float((w * m).sum() / m.sum()), rel=1e-5)
    assert 0 < out.metrics["oracle/weight_mean"] < 1


def test_hinted_samples_see_the_hint_while_sampling_and_the_loss_context_has_none(model, tok):
    tasks = world.task_split("train", 2)
    raw = rollout(model, tok, tasks, group_size=4, max_turns=2, max_new_tokens=6, seed=1, hinted=2,
                  hint_system=hints.hinted_system)
    assert [t.source for t in raw[:4]] == ["hinted", "hinted", "policy", "policy"]
    assert "Hint: call find_user" in tok.decode(raw[0].ids) and "Hint:" not in tok.decode(raw[2].ids)
    cfg = _cfg(hint_samples=2)
    trajs = sample_groups(model, tok, tasks, cfg, step=0)
    hinted = [t for t in trajs if t.source == hints.SOURCE]
    assert len(hinted) == 4
    for t in hinted:
        plain = tok.encode(world.prompt_text(t.task), add_special_tokens=False)
        assert t.ids[:len(plain)] == plain and "Hint" not in tok.decode(t.ids)
        assert len(t.ids) == len(t.gen_mask) == len(t.old_logp) and sum(t.gen_mask[:len(plain)]) == 0
        # old log-probs recomputed on the hint-free context: the loss's first ratio is 1
        again = grpo.sequence_logp(model, [t], pad_id=tok.pad_token_id)[0]
        assert again == pytest.approx(t.old_logp, abs=1e-5)
    out = grpo.grpo_loss(model, hinted, torch.ones(len(hinted)), pad_id=tok.pad_token_id)
    assert out.metrics["sampling/logp_gap"] < 1e-5 and out.metrics["clip_ratio"] == 0.0


def _traj(task: world.Task, turns: list[str], group: int) -> Trajectory:
    ep = world.Episode(task, harness="paper", max_turns=8)
    for text in turns:
        if ep.step(text) is None:
            break
    return Trajectory(task, ep, [], [], [], reward=float(ep.success), group=group)


def test_erroneous_examples_come_from_prompts_that_failed(tok):
    bad, good = world.task_split("train", 2)
    right = [world.render_call(n, a) for n, a, _ in bad.oracle_calls()]
    pool = error_sft.FailedPrompts()
    pool.add([_traj(bad, [right[0], world.TOOL_OPEN], 0), _traj(bad, ["no idea"], 0),
              _traj(good, [world.TOOL_OPEN], 1),
              _traj(good, [world.render_call(n, a) for n, a, _ in good.oracle_calls()], 1)])
    failures = pool.failures("paper")
    assert {f.task.seed for f in failures} == {bad.seed}  # the group with a success is no example
    assert sorted(f.first_wrong for f in failures) == [0, 1]
    f = next(f for f in failures if f.first_wrong == 1)
    ids, mask = error_sft.erroneous_example(tok, f)
    target = tok.encode(right[1], add_special_tokens=False) + [tok.convert_tokens_to_ids(world.IM_END)]
    assert [i for i, m in zip(ids, mask) if m] == target  # only the correct turn is in the loss
    prefix = tok.decode(ids[:len(ids) - len(target)])
    assert right[0] in prefix and '"user_id"' in prefix  # the failed prefix, with the world's observation


def test_the_rule_judges_reflection_names_the_first_wrong_turn(tok):
    task = world.make_task(5, "weather")
    calls = [world.render_call(n, a) for n, a, _ in task.oracle_calls()]
    f = error_sft.failure_of(_traj(task, [calls[0], world.TOOL_OPEN], 0), "paper")
    text = judge.RuleJudge().analyse(f)
    assert "Turn 1 was right" in text and "Turn 2 was wrong: it opened a tool call" in text
    assert "Root cause: turn 2" in text
    ids, mask = judge.reflection_example(tok, f, judge.RuleJudge())
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "Root cause: turn 2" in learned and calls[1] in learned  # analysis + corrected call
    assert judge.REVIEW_REQUEST in tok.decode(ids) and judge.REVIEW_REQUEST not in learned


def test_a_local_causal_lm_can_be_the_judge(tok, model, tmp_path):
    model.save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    task = world.make_task(2)
    f = error_sft.Failure(task, (world.TOOL_OPEN,), 0, "paper")
    text = judge.ModelJudge(tmp_path / "judge", max_new_tokens=8).analyse(f)
    assert isinstance(text, str) and text
    with pytest.raises(UserError, match="--judge .*no model there"):
        judge.ModelJudge(tmp_path / "nothing")


def test_a_tiny_run_with_every_signal_trains_and_logs_them(tmp_path):
    cfg = _cfg(size="tiny", offpolicy_samples=1, hint_samples=1, error_sft_every=1, error_sft_epochs=1,
               reflection=True, sft_batch=4)
    train(cfg, tmp_path / "run")
    recs = read_records(tmp_path / "run")
    step = recs[0]
    assert step["error_sft/examples"] > 0 and "error_sft/loss" in step  # a random model fails every prompt
    assert step["error_sft/steps"] == -(-step["error_sft/examples"] // 4)  # one epoch in batches of sft_batch
    assert 0 < step["oracle/weight_mean"] < 1 and step["oracle/success"] == 1.0 and "hinted/success" in step
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["offpolicy_samples"] == 1 and written["reflection"] is True


@pytest.mark.parametrize("items, message", [
    (["offpolicy_samples=8"], "offpolicy_samples (8) + hint_samples (0) must be < group_size (8)"),
    (["offpolicy_samples=1", "hint_samples=7"], "must be < group_size (8)"),
    (["reflection=true"], "reflection needs error_sft_every >= 1"),
    (["judge=/x"], "judge is the model that writes reflections"),
    (["error_sft_every=2", "reflection=true", "judge=/nonexistent"], "--judge /nonexistent: no model there"),
])
def test_bad_settings_are_one_line(items, message):
    with pytest.raises(UserError, match=re.escape(message)):
        apply_overrides(TrainConfig(), items)


@pytest.mark.parametrize("sets, message", [
    (["error_sft_every=2", "reflection=true", "judge={tmp}/none"], "no model there"),
    (["offpolicy_samples=8"], "must be < group_size (8)"),
])
def test_bad_signal_settings_on_the_command_line_are_one_line_exit_1(tmp_path, sets, message):
    args = [a for s in sets for a in ("--set", s.format(tmp=tmp_path))]
    proc = subprocess.run([sys.executable, "-c", "from collapse_probe.cli.app import main; main()", "train",
                           "--preset", "grpo-collapse", "--out", str(tmp_path / "run"), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
