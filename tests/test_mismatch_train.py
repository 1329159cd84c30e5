"""The rollout engine wired into the reference trainer (issue 21's mechanics): old log-probs recomputed, the
correction in the loss, PPO mini-batches, the mismatch keys of a real training step."""
import math

import pytest
import torch

from collapse_probe import schema, world
from collapse_probe.capture.mismatch import watch_roles
from collapse_probe.runs.joined import read_records
from collapse_probe.tokens import resolve_control_tokens
from collapse_probe.train import grpo, rollout, sft, tiny
from collapse_probe.train.config import TrainConfig
from collapse_probe.train.engine import RolloutEngine
from collapse_probe.train.trainer import train
from collapse_probe.train.update import ppo_update

AO = schema.Position.AFTER_OPEN.value


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def role_ids(tok):
    return resolve_control_tokens(tok).distinct_ids()


def _model(tok, seed=2):
    m = tiny.build_model(tok, "tiny", seed=seed)
    m.train()
    return m


def _trajs(model, tok, role_ids, *, seed=0, **kw):
    trajs = rollout.rollout(model, tok, world.task_split("train", 3), group_size=4, max_turns=2, max_new_tokens=10,
                            seed=seed, watch_ids=watch_roles(role_ids)[1], **kw)
    for i, t in enumerate(trajs):
        t.reward = float(i % 3 == 0)
    return trajs


def _grads(model, trajs, tok, adv=None, **kw):
    model.zero_grad(set_to_none=True)
    adv = grpo.group_advantages(trajs) if adv is None else adv
    out = grpo.grpo_loss(model, trajs, adv, pad_id=tok.pad_token_id, **kw)
    out.loss.backward()
    return float(out.loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None], out.metrics


def test_recompute_without_mismatch_gives_todays_loss_and_gradients(tok, role_ids):
    model = _model(tok)
    trajs = _trajs(model, tok, role_ids)
    loss0, g0, _ = _grads(model, trajs, tok)
    train_logp = grpo.sequence_logp(model, trajs, pad_id=tok.pad_token_id)
    loss1, g1, _ = _grads(model, trajs, tok, train_logp=train_logp, old_logp="recompute")
    assert math.isclose(loss0, loss1, rel_tol=1e-5, abs_tol=1e-7)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g0, g1))


def test_token_tis_weights_the_loss_by_min_ratio_c_detached(tok, role_ids):
    """A stale sampler: the loss with token TIS is the recomputed-old PPO loss, each token weighted by
    min(p_train / q, C), the weight a constant (the gradient is the weighted one)."""
    model = _model(tok)
    stale = RolloutEngine(model, lag=1)
    stale.sync(model, 0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trajs = _trajs(stale.model, tok, role_ids)
    adv = grpo.group_advantages(trajs)
    train_logp = grpo.sequence_logp(model, trajs, pad_id=tok.pad_token_id)
    loss, _, _ = _grads(model, trajs, tok, train_logp=train_logp, old_logp="recompute", correction="token_tis",
                        correction_threshold=1.5)
    b = sft.collate([t.ids for t in trajs], [t.gen_mask for t in trajs], tok.pad_token_id,
                    extra=[t.old_logp for t in trajs])
    old = sft.collate([t.ids for t in trajs], [t.gen_mask for t in trajs], tok.pad_token_id,
                      extra=train_logp)["extra"][:, 1:]
    q, mask = b["extra"][:, 1:], b["loss_mask"][:, 1:].float()
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    obj = torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a) * torch.exp(old - q).clamp(max=1.5)
    want = float(-(obj * mask).sum() / mask.sum())
    assert math.isclose(loss, want, rel_tol=1e-4, abs_tol=1e-6)
    assert float((torch.exp(old - q)[mask.bool()] > 1.5).float().mean()) > 0  # the cap cut some weights


def test_ppo_mini_batches_make_m_optimizer_steps(tok, role_ids):
    model = _model(tok)
    trajs = _trajs(model, tok, role_ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = []
    opt.register_step_post_hook(lambda *a: steps.append(1))
    rec = ppo_update(model, opt, trajs, grpo.group_advantages(trajs), pad_id=tok.pad_token_id, grad_clip=1.0,
                     role_ids=role_ids, mini_batches=3, old_logp="recompute")
    assert len(steps) == 3 and math.isfinite(rec[schema.GRAD_NORM])
    ts = schema.Position.TURN_START.value  # every turn has one: the mismatch keys merged over the 3 mini-batches
    assert rec[schema.MM_TOKENS] == sum(sum(t.gen_mask[1:]) for t in trajs)
    assert rec[schema.mm_key(ts, schema.ANY_TOKEN, "count")] == sum(len(t.episode.turns) for t in trajs)
    steps.clear()
    ppo_update(model, opt, trajs, grpo.group_advantages(trajs), pad_id=tok.pad_token_id, grad_clip=1.0)
    assert len(steps) == 1


def test_on_policy_mismatch_is_zero_and_a_stale_sampler_shows(tok, role_ids):
    model = _model(tok)
    trajs = _trajs(model, tok, role_ids)
    _, _, rec = _grads(model, trajs, tok, role_ids=role_ids)
    assert rec[schema.MM_TOKENS] > 50 and rec[schema.MM_K3_KL] < 1e-8
    press = [v for k, v in rec.items() if k.startswith("mm/") and k.endswith("/pressure")]
    assert press and max(abs(v) for v in press) < 1e-5
    stale = RolloutEngine(model, dtype="fp32", lag=1)
    stale.sync(model, 0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # advantages that do not cancel within a group: the first turn's start is the same context for a whole group
    _, _, rec = _grads(model, _trajs(stale.model, tok, role_ids), tok, role_ids=role_ids,
                       adv=torch.linspace(0.2, 1.0, 12))
    assert rec[schema.MM_K3_KL] > 1e-4
    assert max(abs(v) for k, v in rec.items() if k.startswith("mm/") and k.endswith("/pressure")) > 1e-4


@pytest.mark.slow
def test_train_with_every_engine_switch_writes_mismatch_keys(tmp_path):
    cfg = TrainConfig(size="tiny", steps=3, prompts_per_step=2, group_size=4, max_turns=2, max_new_tokens=8,
                      eval_every=0, eval_tasks=2, probe_every=2, save_every=0, log_rollouts=0, rollout_lag=1,
                      rollout_top_p=0.9, rollout_dtype="bf16", old_logp="recompute", ppo_mini_batches=2,
                      rollout_correction="token_tis")
    train(cfg, tmp_path / "run")
    recs = read_records(tmp_path / "run")
    rl = [r for r in recs if r.get(schema.PHASE) == "rl"]
    assert len(rl) == 3
    assert all(schema.MM_K3_KL in r and schema.MM_IS_MEAN in r for r in rl)
    assert any(k.startswith(f"mm/{AO}/") for r in rl for k in r)


def test_trainer_mismatch_keys_equal_two_models_log_softmax(tok, role_ids):
    """In a training step with a stale sampler, the mm/ keys equal the definition computed from the trainer's and
    the sampler's full log-softmax at the same rows (the sampler's q from its KV-cached decoding agrees with its
    full forward to ~1e-6)."""
    from collapse_probe.capture.mismatch import mismatch_stats
    from collapse_probe.capture.stats import decision_positions

    model = _model(tok)
    stale = RolloutEngine(model, lag=1)
    stale.sync(model, 0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trajs = _trajs(stale.model, tok, role_ids)
    adv = torch.linspace(-1.0, 1.0, len(trajs))
    _, _, rec = _grads(model, trajs, tok, role_ids=role_ids, adv=adv)
    b = sft.collate([t.ids for t in trajs], [t.gen_mask for t in trajs], tok.pad_token_id)
    ids, gen = b["input_ids"], b["loss_mask"]

    def full(m):
        with torch.no_grad():
            return torch.log_softmax(m(input_ids=ids, attention_mask=b["attention_mask"]).logits[:, :-1].double(), -1)
    lp_all, lq_all = full(model.eval()), full(stale.model)
    tgt = ids[:, 1:, None]
    _, cols = watch_roles(role_ids)
    lp, lq = lp_all.gather(-1, tgt).squeeze(-1), lq_all.gather(-1, tgt).squeeze(-1)
    want = mismatch_stats(ids, decision_positions(ids, gen, role_ids), role_ids, logp_train=lp, logp_rollout=lq,
                          known=gen[:, 1:].bool(), scores=lp_all, rollout_roles=lq_all[..., cols], advantages=adv)
    got = {k: v for k, v in rec.items() if k.startswith("mm/")}
    assert set(got) == set(want) and rec[schema.MM_K3_KL] > 1e-4
    for k, v in want.items():
        assert math.isclose(got[k], v, rel_tol=1e-4, abs_tol=1e-5), (k, got[k], v)
