"""Mismatch at the decision positions (capture/mismatch.py) against a plain-loop reference from two models'
log-softmax at the same rows; the body-closed position (capture/stats.py)."""
import math

import pytest
import torch

from collapse_probe import schema, world
from collapse_probe.capture.mismatch import mismatch_stats, watch_roles
from collapse_probe.capture.stats import RecordMeans, decision_masks, decision_positions, prefix_decisions
from collapse_probe.schema import ANY_TOKEN, Position
from collapse_probe.tokens import resolve_control_tokens
from collapse_probe.train import sft, tiny


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def role_ids(tok):
    rid = resolve_control_tokens(tok).distinct_ids()
    if not getattr(rid, "braces", None):  # tokens.py gives every RoleIds its brace table; stated here otherwise
        rid.braces = {i: (t.count("{"), t.count("}")) for t, i in tok.get_vocab().items() if "{" in t or "}" in t}
    return rid


@pytest.fixture(scope="module")
def batch(tok):
    tasks = world.task_split("probe", 4)
    seqs, masks = [], []
    for i, t in enumerate(tasks):
        ids, mask = world.encode_trajectory(tok, t, empty_call_retries=int(i == 0))
        seqs.append(ids)
        masks.append(mask)
    head = tok.encode(world.prompt_text(tasks[0]), add_special_tokens=False)  # a premature end after the body
    body = tok.encode(world.TOOL_OPEN + '\n{"name": "find_user", "arguments": {}}\n', add_special_tokens=False) + \
        [tok.convert_tokens_to_ids(world.IM_END)]
    seqs.append(head + body)
    masks.append([0] * len(head) + [1] * len(body))
    b = sft.collate(seqs, masks, tok.pad_token_id)
    b["advantages"] = torch.randn(len(seqs), generator=torch.Generator().manual_seed(0))
    return b


@pytest.fixture(scope="module")
def two_models(tok):
    trainer = tiny.build_model(tok, "tiny", seed=1).eval()
    sampler = tiny.build_model(tok, "tiny", seed=1).eval()
    with torch.no_grad():
        for p in sampler.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return trainer, sampler


def _logp(model, b):
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    return torch.log_softmax(logits.double(), -1)


def _reference(lp_all, lq_all, ids, positions, role_ids, adv):
    """Plain loops in float64: per position kind, per sampled role, and the q / pressure of every role."""
    roles, cols = watch_roles(role_ids)
    rec = {}
    for kind, (rr, cc) in positions.items():
        pts = list(zip(rr.tolist(), cc.tolist()))
        for role, col in [(ANY_TOKEN, None)] + list(zip(roles, cols)):
            sel = [(r, c) for r, c in pts if col is None or int(ids[r, c + 1]) == col]
            rec[schema.mm_key(kind, role, "count")] = float(len(sel))
            if sel:
                lp = [float(lp_all[r, c, ids[r, c + 1]]) for r, c in sel]
                lq = [float(lq_all[r, c, ids[r, c + 1]]) for r, c in sel]
                rec[schema.mm_key(kind, role, "p_train")] = sum(map(math.exp, lp)) / len(sel)
                rec[schema.mm_key(kind, role, "p_rollout")] = sum(map(math.exp, lq)) / len(sel)
                rec[schema.mm_key(kind, role, "log_ratio")] = sum(a - b for a, b in zip(lp, lq)) / len(sel)
                rec[schema.mm_key(kind, role, "k3")] = sum(math.exp(a - b) - (a - b) - 1
                                                           for a, b in zip(lp, lq)) / len(sel)
        rec[schema.mm_q_count_key(kind)] = float(len(pts))
        if pts:
            for role, col in zip(roles, cols):
                q = [math.exp(float(lq_all[r, c, col])) for r, c in pts]
                p = [math.exp(float(lp_all[r, c, col])) for r, c in pts]
                rec[schema.mm_key(kind, role, "q")] = sum(q) / len(pts)
                rec[schema.mm_key(kind, role, "pressure")] = sum(float(adv[r]) * (qq - pp) for (r, _), qq, pp
                                                                 in zip(pts, q, p)) / len(pts)
    return rec


def test_mismatch_keys_equal_a_reference_from_two_models(tok, role_ids, batch, two_models):
    trainer, sampler = two_models
    lp_all, lq_all = _logp(trainer, batch), _logp(sampler, batch)
    ids, gen = batch["input_ids"], batch["loss_mask"]
    tgt = ids[:, 1:, None]
    logp_train = lp_all.gather(-1, tgt).squeeze(-1).float()
    logp_rollout = lq_all.gather(-1, tgt).squeeze(-1).float()
    known = gen[:, 1:].bool()
    _, cols = watch_roles(role_ids)
    rollout_roles = lq_all[..., cols].float()
    pos = decision_positions(ids, gen, role_ids)
    got = mismatch_stats(ids, pos, role_ids, logp_train=logp_train, logp_rollout=logp_rollout, known=known,
                         scores=lp_all.float(), rollout_roles=rollout_roles, advantages=batch["advantages"])
    want = _reference(lp_all, lq_all, ids, pos, role_ids, batch["advantages"])
    m = known.double()
    lr = (lp_all.gather(-1, tgt).squeeze(-1) - lq_all.gather(-1, tgt).squeeze(-1)) * m
    want[schema.MM_TOKENS] = float(m.sum())
    want[schema.MM_K3_KL] = float(((lr.exp() - lr - 1) * m).sum() / m.sum())
    want[schema.MM_KL] = float((-lr).sum() / m.sum())
    want[schema.MM_ABS_LOG_RATIO] = float(lr.abs().sum() / m.sum())
    assert set(got) == set(want), set(got) ^ set(want)
    for k in want:
        assert math.isclose(got[k], want[k], rel_tol=1e-5, abs_tol=1e-5), (k, got[k], want[k])
    # the batch has what the keys are for: a premature end-of-turn after the body, both models' views of it
    eot = schema.mm_key(Position.BODY_CLOSED, "end_of_turn", "count")
    assert got[eot] == 1 and got[schema.mm_key(Position.BODY_CLOSED, "tool_close", "count")] >= 4
    assert got[schema.MM_K3_KL] > 0


def test_mismatch_is_zero_for_one_model_and_averages_over_micro_batches(role_ids, batch, two_models):
    trainer, sampler = two_models
    lp_all, lq_all = _logp(trainer, batch), _logp(sampler, batch)
    ids, gen = batch["input_ids"], batch["loss_mask"]
    tgt = ids[:, 1:, None]
    lp, lq = lp_all.gather(-1, tgt).squeeze(-1).float(), lq_all.gather(-1, tgt).squeeze(-1).float()
    known = gen[:, 1:].bool()
    _, cols = watch_roles(role_ids)
    same = mismatch_stats(ids, decision_positions(ids, gen, role_ids), role_ids, logp_train=lp, logp_rollout=lp,
                          known=known, scores=lp_all.float(), rollout_roles=lp_all[..., cols].float(),
                          advantages=batch["advantages"])
    for k, v in same.items():
        if k.endswith(("/log_ratio", "/k3", "/pressure")) or k in (schema.MM_K3_KL, schema.MM_KL):
            assert abs(v) < 1e-6, (k, v)

    def stats(rows):
        i, g = ids[rows], gen[rows]
        return mismatch_stats(i, decision_positions(i, g, role_ids), role_ids, logp_train=lp[rows],
                              logp_rollout=lq[rows], known=known[rows], scores=lp_all[rows].float(),
                              rollout_roles=lq_all[rows][..., cols].float(), advantages=batch["advantages"][rows])
    whole = stats(slice(None))
    means = RecordMeans()
    means.add(stats(slice(0, 2)), "rollout")
    means.add(stats(slice(2, None)), "rollout")
    parts = means.pop()
    assert set(parts) == set(whole)
    for k in whole:
        assert math.isclose(parts[k], whole[k], rel_tol=1e-5, abs_tol=1e-6), k


def test_body_closed_follows_the_braces_and_the_newline(tok, role_ids):
    text = world.TOOL_OPEN + '\n{"name": "f", "arguments": {"a": 1}}\n' + world.TOOL_CLOSE
    turn = tok.encode(text, add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(turn)
    want = pieces.index(world.TOOL_CLOSE) - 1  # the token before the close tag ends the body
    flags = prefix_decisions([turn[:i] for i in range(1, len(turn) + 1)], role_ids)[Position.BODY_CLOSED.value]
    assert [i for i, hit in enumerate(flags) if hit] == [want]
    # the same rule on a batch: not inside a tool response (not generated), nor before the body closes
    ids = torch.tensor([[0] + turn + [0]])
    gen = torch.tensor([[0] + [1] * len(turn) + [0]])
    mask = decision_masks(ids, gen, role_ids)[Position.BODY_CLOSED.value]
    assert torch.nonzero(mask[0]).flatten().tolist() == [want + 1]


def test_trainer_logprobs_read_from_the_decision_rows_give_the_same_keys(role_ids, batch, two_models):
    """TRL / verl hand us no per-token trainer log-probs: read at the decision rows from logits, the same numbers
    (without the whole-batch totals)."""
    trainer, sampler = two_models
    lp_all, lq_all = _logp(trainer, batch), _logp(sampler, batch)
    ids, gen = batch["input_ids"], batch["loss_mask"]
    tgt = ids[:, 1:, None]
    lp, lq = lp_all.gather(-1, tgt).squeeze(-1).float(), lq_all.gather(-1, tgt).squeeze(-1).float()
    known = gen[:, 1:].bool()
    pos = decision_positions(ids, gen, role_ids)
    with torch.no_grad():
        logits = trainer(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1]
    full = mismatch_stats(ids, pos, role_ids, logp_train=lp, logp_rollout=lq, known=known)
    rows = mismatch_stats(ids, pos, role_ids, logp_rollout=lq, known=known,
                          scores=lambda r, c: logits[r, c], is_logp=False)
    totals = {schema.MM_TOKENS, schema.MM_K3_KL, schema.MM_KL, schema.MM_ABS_LOG_RATIO}
    assert set(rows) == set(full) - totals
    for k, v in rows.items():
        assert math.isclose(v, full[k], rel_tol=1e-5, abs_tol=1e-5), k
