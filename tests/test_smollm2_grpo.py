"""The GRPO loss in micro-batches (issue 14): the same loss, gradients and capture numbers as one batch, so a
49k-vocabulary model fits in memory while the tiny model keeps its single fast batch."""

from __future__ import annotations

import pytest
import torch

from collapse_probe import world
from collapse_probe.schema import Position, Source, cp_chain_key, cp_key
from collapse_probe.tokens import resolve_control_tokens
from collapse_probe.train import grpo
from collapse_probe.train.rollout import Trajectory


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _run(model, trajs, adv, pad_id, role_ids, **kw):
    model.zero_grad(set_to_none=True)
    out = grpo.grpo_loss(model, trajs, adv, pad_id=pad_id, role_ids=role_ids, **kw)
    if not out.backward_done:
        out.loss.backward()
    return out, _grads(model)


def test_micro_batches_follow_the_logits_budget():
    assert grpo.micro_batches([148] * 64, 1024) == [list(range(64))]  # the tiny presets: one batch, as before
    lengths = [200 + 7 * i for i in range(64)]
    parts = grpo.micro_batches(lengths, 49152)
    assert len(parts) > 8 and sorted(i for p in parts for i in p) == list(range(64))
    assert all(len(p) * max(lengths[i] for i in p) * 49152 <= grpo.LOGITS_BUDGET for p in parts)
    assert parts[0][0] == 63  # longest first: sequences of similar length share a micro-batch
    assert grpo.micro_batches([10, 30, 20, 5, 1], 10, size=2) == [[1, 2], [0, 3], [4]]


@pytest.mark.parametrize("kw", [{"micro_batch": 4}, {"micro_batch": 4, "backward": True}])
def test_micro_batched_loss_equals_one_batch_on_the_tiny_model(kw):
    from collapse_probe.train import tiny
    from collapse_probe.train.rollout import rollout

    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, "tiny")
    role_ids = resolve_control_tokens(tok).distinct_ids()
    trajs = rollout(model, tok, world.task_split("train", 4), group_size=4, max_turns=3, max_new_tokens=16, seed=0)
    for t in trajs:
        t.reward = float(t.group % 2)
    adv = grpo.group_advantages(trajs) + torch.linspace(-1, 1, len(trajs))
    ref_model = tiny.build_model(tok, "tiny", seed=1)
    one, g1 = _run(model, trajs, adv, tok.pad_token_id, role_ids, kl_coef=0.1, ref_model=ref_model)
    many, g2 = _run(model, trajs, adv, tok.pad_token_id, role_ids, kl_coef=0.1, ref_model=ref_model, **kw)
    assert many.backward_done == kw.get("backward", False)
    assert many.loss.requires_grad != many.backward_done  # done here: only a number is left
    assert float(many.loss.detach()) == pytest.approx(float(one.loss.detach()), abs=1e-6)
    assert torch.allclose(g1, g2, atol=1e-6)
    assert set(many.metrics) == set(one.metrics)  # the same record keys
    for k, v in one.metrics.items():
        assert many.metrics[k] == pytest.approx(v, abs=1e-5, nan_ok=True), k


def test_smollm2_grpo_loss_in_micro_batches():
    from collapse_probe.models.fetch import fetch
    from collapse_probe.models.load import load_pretrained

    model, tok = load_pretrained(fetch("smollm2-135m"))
    roles = resolve_control_tokens(tok).distinct_ids()
    trajs = []
    for i, task in enumerate(world.task_split("train", 2)):
        ids, mask = world.encode_trajectory(tok, task)
        ids, mask = ids[:200], mask[:200]  # the prompt and the first call: enough for every position kind
        ep = world.Episode(task)
        trajs.append(Trajectory(task, ep, ids, mask, [-0.5 * m for m in mask], reward=float(i), group=0))
    adv = grpo.group_advantages(trajs)
    one, g1 = _run(model, trajs, adv, tok.pad_token_id, roles)
    many, g2 = _run(model, trajs, adv, tok.pad_token_id, roles, micro_batch=1, backward=True)
    assert many.backward_done and float(many.loss) == pytest.approx(float(one.loss.detach()), abs=1e-5)
    assert torch.allclose(g1, g2, atol=1e-5, rtol=1e-4)
    src = Source.ROLLOUT.value
    for key in (cp_key(src, Position.AFTER_OPEN, "json_open"), cp_chain_key(src, Position.TURN_START, "tool_open")):
        assert many.metrics[key] == pytest.approx(one.metrics[key], abs=1e-5)
    assert one.metrics[cp_key(src, Position.AFTER_OPEN, "json_open")] > 0.1
