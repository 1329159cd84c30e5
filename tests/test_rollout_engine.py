"""The rollout engine (train/engine.py) and truncated sampling (train/rollout.py), in isolation: the sampler is
not the trainer, each source of mismatch alone."""
import math

import pytest
import torch

from collapse_probe import world
from collapse_probe.errors import UserError
from collapse_probe.train import rollout, sft, tiny
from collapse_probe.train.config import TrainConfig, apply_overrides
from collapse_probe.train.engine import RolloutEngine


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


@pytest.fixture()
def model(tok):
    m = tiny.build_model(tok, "tiny", seed=3)
    m.eval()
    return m


def _full_logp(model, trajs, pad_id, temperature):
    """The trainer's full-distribution log-softmax [N, T-1, V] at every position, and the batch."""
    b = sft.collate([t.ids for t in trajs], [t.gen_mask for t in trajs], pad_id, extra=[t.old_logp for t in trajs])
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    return torch.log_softmax(logits / temperature, -1), b


def test_truncate_logits_keeps_the_nucleus_and_top_k():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: torch.isfinite(x).squeeze(0).tolist()  # noqa: E731
    assert kept(rollout.truncate_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert kept(rollout.truncate_logits(logits, top_p=0.8)) == [True, True, False, False]
    assert kept(rollout.truncate_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert kept(rollout.truncate_logits(logits, top_p=0.01)) == [True, False, False, False]  # at least one
    assert kept(rollout.truncate_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(rollout.truncate_logits(logits, top_p=1.0)) == [True] * 4


def test_default_engine_is_the_policy_itself(tok, model):
    eng = RolloutEngine.from_config(model, TrainConfig())
    assert eng.model is model and eng.on_policy and eng.sync(model, 7) == 7


def test_top_p_sampler_never_draws_outside_the_nucleus(tok, model):
    """Every sampled token lies in the top-p nucleus of the full distribution; its recorded log-prob is the
    truncated, renormalised q (>= the trainer's full-distribution p); the kept control columns are -inf outside."""
    temp, top_p = 0.7, 0.3
    eng = RolloutEngine(model, top_p=top_p)
    watch = [tok.convert_tokens_to_ids(world.IM_END), tok.convert_tokens_to_ids("<tool_call>")]
    trajs = rollout.rollout(eng.model, tok, world.task_split("train", 3), group_size=3, max_turns=2,
                            max_new_tokens=10, temperature=temp, seed=0, top_p=eng.top_p, watch_ids=watch)
    logp_all, b = _full_logp(model, trajs, tok.pad_token_id, temp)
    ids, mask = b["input_ids"][:, 1:], b["loss_mask"][:, 1:].bool()
    q = b["extra"][:, 1:]
    n = 0
    for r, c in torch.nonzero(mask).tolist():
        probs, order = logp_all[r, c].exp().sort(descending=True)
        before = probs.cumsum(0) - probs
        nucleus = set(order[before < top_p].tolist())
        tok_id = int(ids[r, c])
        assert tok_id in nucleus
        p = float(logp_all[r, c, tok_id])
        mass = float(probs[before < top_p].sum())
        assert q[r, c] >= p - 1e-5  # renormalised
        assert math.isclose(float(q[r, c]), p - math.log(mass), abs_tol=2e-4)
        n += 1
    assert n > 30
    for t in trajs:  # the kept columns: the sampler's q, -inf where a column is outside the nucleus
        assert len(t.watch_logq) == len(t.ids)
        assert all((v is not None) == bool(g) for v, g in zip(t.watch_logq[1:], t.gen_mask[1:]))
    row = trajs[0]
    j = next(i for i, g in enumerate(row.gen_mask) if g)
    full = logp_all[0, j - 1, watch]
    probs, order = logp_all[0, j - 1].exp().sort(descending=True)
    inside = set(order[(probs.cumsum(0) - probs) < top_p].tolist())
    for k, tid in enumerate(watch):
        got = row.watch_logq[j][k]
        assert (got == float("-inf")) == (tid not in inside) and (tid not in inside or got >= float(full[k]) - 1e-5)


def test_rollout_defaults_sample_as_before(tok, model):
    """No truncation and no watch: the same draws and log-probs as the sampler always gave."""
    tasks = world.task_split("train", 2)
    a = rollout.rollout(model, tok, tasks, group_size=2, max_turns=2, max_new_tokens=8, seed=5)
    b = rollout.rollout(model, tok, tasks, group_size=2, max_turns=2, max_new_tokens=8, seed=5, top_p=1.0, top_k=0)
    assert [t.ids for t in a] == [t.ids for t in b] and [t.old_logp for t in a] == [t.old_logp for t in b]
    assert all(t.watch_logq is None for t in a)


def test_rollout_lag_samples_with_the_weights_of_step_t_minus_k(tok, model):
    lag = 2
    eng = RolloutEngine(model, lag=lag)
    assert eng.model is not model
    snapshots = []
    for step in range(6):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        assert eng.sync(model, step) == max(0, step - lag)
        want = snapshots[max(0, step - lag)]
        for k, v in eng.model.state_dict().items():
            assert torch.equal(v, want[k]), (step, k)
        with torch.no_grad():  # an "optimizer step" on the policy only
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    assert not torch.equal(next(eng.model.parameters()), next(model.parameters()))
    assert all(not p.requires_grad for p in eng.model.parameters())


def test_bf16_sampler_is_a_copy_whose_logprobs_differ_a_little(tok, model):
    eng = RolloutEngine(model, dtype="bf16")
    eng.sync(model, 0)
    assert next(eng.model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    trajs = rollout.rollout(eng.model, tok, world.task_split("train", 2), group_size=2, max_turns=2,
                            max_new_tokens=8, seed=1)
    logp_all, b = _full_logp(model, trajs, tok.pad_token_id, 1.0)
    p = logp_all.gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
    mask = b["loss_mask"][:, 1:].bool()
    gap = (p - b["extra"][:, 1:])[mask].abs()
    assert 0 < float(gap.mean()) < 0.1  # a real but small per-token gap


@pytest.mark.parametrize("item, msg", [
    ("rollout_top_p=0", "rollout_top_p takes a number in (0, 1], got 0"),
    ("rollout_top_p=1.2", "rollout_top_p takes a number in (0, 1], got 1.2"),
    ("rollout_dtype=int8", "rollout_dtype must be one of fp32, bf16, fp16"),
    ("rollout_correction=tis", "rollout_correction must be one of none, token_tis, seq_tis, seq_mis, geo_mis"),
    ("rollout_lag=-1", "rollout_lag takes an integer >= 0, got -1"),
    ("ppo_mini_batches=3", "ppo_mini_batches 3 does not divide the batch of 64 trajectories"),
    ("old_logp=stale", "old_logp must be one of rollout, recompute"),
])
def test_bad_engine_settings_are_one_line_user_errors(item, msg):
    with pytest.raises(UserError) as e:
        apply_overrides(TrainConfig(), [item])
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_weighted_corrections_need_recomputed_old_logprobs():
    with pytest.raises(UserError, match="needs old_logp=recompute"):
        apply_overrides(TrainConfig(), ["rollout_correction=token_tis"])
    cfg = apply_overrides(TrainConfig(), ["rollout_correction=geo_mis"])  # masking only: fine either way
    assert cfg.rollout_correction == "geo_mis"


def test_new_fields_leave_old_configs_and_cache_keys_alone():
    text = TrainConfig().to_json()
    assert "rollout_" not in text and "old_logp" not in text and "ppo_mini_batches" not in text
    cfg = apply_overrides(TrainConfig(), ["rollout_lag=2", "old_logp=recompute", "ppo_mini_batches=4"])
    again = TrainConfig.from_json(cfg.to_json())
    assert (again.rollout_lag, again.old_logp, again.ppo_mini_batches) == (2, "recompute", 4)
