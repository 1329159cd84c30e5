import gc
import json
import logging
import math
import weakref

import pytest
import torch

from collapse_probe.capture.hooks import ControlTokenCapture
from collapse_probe.schema import POSITIONS, Position, cp_count_key, cp_entropy_key, cp_key, gp_key
from collapse_probe.errors import UserError
from collapse_probe.tokens import ControlTokens
from collapse_probe.train import sft, tiny
from collapse_probe import world
from helpers.positions import body_ends



@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    m = tiny.build_model(tok, "tiny", seed=1)
    m.eval()  # no dropout: forwards are deterministic
    return m


@pytest.fixture(scope="module")
def batch(tok):
    """Right-padded batch with every decision-position kind: oracle trajectories, one with an empty-call retry,
    one with a call tag not followed by a newline."""
    tasks = world.task_split("probe", 4)
    seqs, masks = [], []
    for i, t in enumerate(tasks):
        ids, mask = world.encode_trajectory(tok, t, empty_call_retries=int(i == 0))
        seqs.append(ids)
        masks.append(mask)
    head = tok.encode(world.prompt_text(tasks[0]), add_special_tokens=False)
    body = tok.encode(world.TOOL_OPEN + '{"name": "find_user", "arguments": {}}', add_special_tokens=False) + \
        [tok.convert_tokens_to_ids(world.IM_END)]
    seqs.append(head + body)
    masks.append([0] * len(head) + [1] * len(body))
    b = sft.collate(seqs, masks, tok.pad_token_id)
    torch.manual_seed(0)
    b["advantages"] = torch.randn(len(seqs))
    return b


def _naive(logits, ids, gen, role_ids, adv, source):
    """Reference: a full float64 log_softmax and plain loops over every position."""
    logp = torch.log_softmax(logits.double(), -1)
    opn, nl, close, jo = (role_ids.get(r, -2) for r in ("tool_open", "newline", "tool_close", "json_open"))
    n, t_len = ids.shape
    pos = {k: [] for k in POSITIONS}
    for r in range(n):
        x, g = ids[r].tolist(), gen[r].tolist()
        for t in range(t_len - 1):
            if not g[t + 1]:
                continue
            prev = x[t - 1] if t > 0 else -1
            prev2 = x[t - 2] if t > 1 else -1
            if (x[t] == opn and x[t + 1] != nl) or (x[t] == nl and prev == opn):
                pos[Position.AFTER_OPEN.value].append((r, t))
            if t > 0 and not g[t]:
                pos[Position.TURN_START.value].append((r, t))
            if x[t] == close and g[t]:
                pos[Position.AFTER_CLOSE.value].append((r, t))
            if x[t] == jo and g[t] and ((prev == nl and prev2 == opn) or prev == opn):
                pos[Position.JSON_BODY.value].append((r, t))
        for t in body_ends(x, g, opn, close, getattr(role_ids, "braces", {})):  # and its newline, if one follows
            at = t + 1 if t + 1 < t_len and x[t + 1] == nl and g[t + 1] else t
            if at + 1 < t_len and g[at + 1]:
                pos[Position.BODY_CLOSED.value].append((r, at))
    rec = {}
    for kind, ps in pos.items():
        rec[cp_count_key(source, kind)] = float(len(ps))
        if not ps:
            continue
        ent = [-(logp[r, t].exp() * logp[r, t]).sum().item() for r, t in ps]
        rec[cp_entropy_key(source, kind)] = sum(ent) / len(ps)
        for role, k in role_ids.items():
            p = [logp[r, t, k].exp().item() for r, t in ps]
            rec[cp_key(source, kind, role)] = sum(p) / len(ps)
            if adv is not None:
                chosen = [adv[r].item() * (1 - pk) for (r, t), pk in zip(ps, p) if ids[r, t + 1] == k]
                other = [adv[r].item() * -pk for (r, t), pk in zip(ps, p) if ids[r, t + 1] != k]
                rec[gp_key(kind, role, "chosen")] = sum(chosen) / len(ps)
                rec[gp_key(kind, role, "other")] = sum(other) / len(ps)
    return rec


def _assert_close(got, want, atol=2e-5):
    assert set(got) == set(want), set(got) ^ set(want)
    for k in want:
        assert math.isclose(got[k], want[k], rel_tol=1e-4, abs_tol=atol), (k, got[k], want[k])


def _forward(model, b, rows=slice(None)):
    return model(input_ids=b["input_ids"][rows], attention_mask=b["attention_mask"][rows])


def test_stats_from_logits_matches_naive_reference(tok, model, batch):
    cap = ControlTokenCapture(tok)
    with torch.no_grad():
        logits = _forward(model, batch).logits
    got = cap.stats_from_logits(logits, batch["input_ids"], batch["loss_mask"], advantages=batch["advantages"])
    want = _naive(logits, batch["input_ids"], batch["loss_mask"], cap.role_ids, batch["advantages"], "rollout")
    _assert_close(got, want)
    for kind in POSITIONS:  # the batch exercises every position kind
        assert got[cp_count_key("rollout", kind)] > 0, kind
    assert 0 <= got["cp/rollout/after_open/end_of_turn"] <= 1


def test_logp_shifted_and_entropy_variants_agree(tok, model, batch):
    cap = ControlTokenCapture(tok, source="probe", entropy=True)
    with torch.no_grad():
        logits = _forward(model, batch).logits
    ids, gen = batch["input_ids"], batch["loss_mask"]
    a = cap.stats_from_logits(logits, ids, gen)
    b = cap.stats_from_logp(torch.log_softmax(logits, -1), ids, gen)
    c = cap.stats_from_logits(logits[:, :-1], ids, gen)  # the usual shifted logits
    _assert_close(b, a)
    _assert_close(c, a)
    assert a["cp/probe/after_open/count"] > 0 and not any(k.startswith("gp/") for k in a)
    # overall entropy over positions that predict a generated token
    lp = torch.log_softmax(logits.double(), -1)
    sel = torch.zeros_like(gen, dtype=torch.bool)
    sel[:, :-1] = gen[:, 1:].bool()
    want = (-(lp.exp() * lp).sum(-1))[sel].mean().item()
    assert math.isclose(a["cp/probe/entropy"], want, rel_tol=1e-4)
    assert a["cp/probe/tokens"] == float(sel.sum())


def test_hook_accumulates_count_weighted_over_micro_batches(tok, model, batch):
    cap = ControlTokenCapture(tok)
    ids, gen, adv = batch["input_ids"], batch["loss_mask"], batch["advantages"]
    parts = [slice(0, 1), slice(1, None)]  # unequal position counts: a plain mean of means would differ
    with torch.no_grad():
        per_part = [cap.stats_from_logits(_forward(model, batch, p).logits, ids[p], gen[p], advantages=adv[p])
                    for p in parts]
        whole = _naive(_forward(model, batch).logits, ids, gen, cap.role_ids, adv, "rollout")
    with cap.attach(model):
        for p in parts:
            cap.set_batch(ids[p], gen[p], advantages=adv[p])
            _forward(model, batch, p)
        got = cap.pop()
    _assert_close(got, whole)
    key, n_key = "cp/rollout/after_open/end_of_turn", "cp/rollout/after_open/count"
    counts = [s[n_key] for s in per_part]
    assert counts[0] != counts[1] and got[n_key] == sum(counts)
    weighted = sum(s[key] * n for s, n in zip(per_part, counts)) / sum(counts)
    assert math.isclose(got[key], weighted, rel_tol=1e-6)
    assert cap.pop() == {}  # reset


def test_hook_keeps_no_reference_to_logits_and_changes_nothing(tok, model, batch):
    m = tiny.build_model(tok, "tiny", seed=2)
    m.train()
    ids, attn, gen = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]

    def step():
        m.zero_grad()
        out = m(input_ids=ids, attention_mask=attn, labels=ids)
        out.loss.backward()
        return out, [p.grad.clone() for p in m.parameters()]

    torch.manual_seed(3)
    plain, plain_grads = step()
    cap = ControlTokenCapture(tok).attach(m)
    cap.set_batch(ids, gen, advantages=batch["advantages"])
    torch.manual_seed(3)
    hooked, hooked_grads = step()
    assert torch.equal(plain.logits, hooked.logits) and torch.equal(plain.loss, hooked.loss)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, hooked_grads))
    assert cap.pop()["cp/rollout/after_open/count"] > 0  # the hook did run
    ref = weakref.ref(hooked.logits)
    del hooked, plain
    gc.collect()
    assert ref() is None, "the hook kept a reference to the logits"
    cap.detach()
    assert not m._forward_hooks


def test_hook_ignores_forwards_without_matching_batch(tok, model, batch, caplog):
    ids, gen = batch["input_ids"], batch["loss_mask"]
    cap = ControlTokenCapture(tok)
    with cap.attach(model):
        with torch.no_grad():
            _forward(model, batch)  # no set_batch: nothing captured
            assert cap.pop() == {}
            cap.set_batch(ids[:2], gen[:2])
            _forward(model, batch)  # another batch's forward (generation, a reference model...): skipped
            assert cap.pop() == {} and cap.skipped == 1
            _forward(model, batch, slice(0, 2))  # the matching forward consumes the context
            assert cap.pop()["cp/rollout/turn_start/count"] > 0
            _forward(model, batch, slice(0, 2))  # consumed: a second forward adds nothing
            assert cap.pop() == {}
    assert not model._forward_hooks
    # a failure inside the hook is logged once and never raised into the training step
    bad = ControlTokens(ids={"tool_open": 10_000, "newline": 1})
    cap = ControlTokenCapture(bad).attach(model)
    with caplog.at_level(logging.WARNING, logger="collapse_probe.capture.hooks"), torch.no_grad():
        for _ in range(2):
            cap.set_batch(ids, gen)
            _forward(model, batch)
    cap.detach()
    assert cap.pop() == {}
    assert sum("capture failed" in r.message for r in caplog.records) == 1


def test_user_errors(tok, batch):
    cap = ControlTokenCapture(tok)
    ids, gen = batch["input_ids"], batch["loss_mask"]
    v = 600
    with pytest.raises(UserError, match="do not match"):
        cap.stats_from_logits(torch.zeros(ids.shape[0], ids.shape[1] - 3, v), ids, gen)
    with pytest.raises(UserError, match="one value per sequence"):
        cap.stats_from_logits(torch.zeros(*ids.shape, v), ids, gen, advantages=torch.zeros(2))
    with pytest.raises(UserError, match="gen_mask"):
        cap.set_batch(ids, gen[:, :-1])
    with pytest.raises(UserError, match="outside the vocabulary"):
        cap.stats_from_logits(torch.zeros(*ids.shape, 10), ids, gen)
    with pytest.raises(UserError, match="tokenizer or ControlTokens"):
        ControlTokenCapture(None)
    with pytest.raises(UserError, match="tool-call opening"):
        ControlTokenCapture(ControlTokens(ids={"eos": 1}))


@pytest.mark.slow
def test_custom_loop_example(tmp_path):
    import importlib.util
    from pathlib import Path

    from collapse_probe.runs.joined import read_records

    path = Path(__file__).resolve().parents[1] / "examples" / "custom_loop.py"
    spec = importlib.util.spec_from_file_location("custom_loop_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--out", str(tmp_path), "--steps", "3", "--every", "2"])
    steps = [json.loads(line)["step"] for line in out.read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
    recs = read_records(tmp_path / "run")
    probed = [r for r in recs if "cp/probe/after_open/end_of_turn" in r]
    assert [r["step"] for r in probed] == [0, 2, 3]
    assert all(0 <= r["cp/probe/after_open/end_of_turn"] <= 1 for r in probed)
    for r in recs[1:]:
        assert math.isfinite(r["loss"]) and 0 <= r["reward/mean"] <= 1
        assert r["cp/rollout/turn_start/count"] == 16  # one generated turn per sample, read by the hook


def test_deferred_stats_match_the_synchronous_ones():
    """The accelerator path (no host sync until resolve) computes the same numbers as position_stats."""
    import torch

    from collapse_probe.capture.stats import decision_positions, position_stats, position_stats_deferred

    torch.manual_seed(0)
    role_ids = {"tool_open": 5, "newline": 6, "json_open": 7, "end_of_turn": 8, "tool_close": 9}
    ids = torch.randint(10, 40, (3, 30))
    for row in range(3):
        ids[row, 4:7] = torch.tensor([5, 6, 7])
        ids[row, 15:18] = torch.tensor([5, 6, 8])
    gen = torch.zeros_like(ids)
    gen[:, 3:] = 1
    logits = torch.randn(3, 30, 40)
    adv = torch.tensor([1.0, -0.5, 0.2])
    want = position_stats(logits, ids, decision_positions(ids, gen, role_ids), role_ids, is_logp=False,
                          source="rollout", advantages=adv)
    got = position_stats_deferred(logits, ids, gen, role_ids, is_logp=False, source="rollout",
                                  advantages=adv).resolve()
    assert set(got) == set(want)
    for k in want:
        assert abs(got[k] - want[k]) < 1e-5, k


def test_prefix_decisions_follow_decision_masks():
    """Token lists (a LogitsProcessor's view) get the decision positions of decision_masks, the one definition."""
    from collapse_probe.capture.stats import decision_masks, prefix_decisions

    torch.manual_seed(1)
    role_ids = {"tool_open": 5, "newline": 6, "json_open": 7, "end_of_turn": 8, "tool_close": 9}
    ids = torch.randint(5, 12, (4, 40))  # dense in control tokens: every rule fires somewhere
    masks = decision_masks(ids, torch.ones_like(ids), role_ids)
    for r in range(ids.shape[0]):
        x = ids[r].tolist()
        for t in range(1, ids.shape[1] - 1):
            got = prefix_decisions([x[:t + 1]], role_ids, next_id=x[t + 1])
            for kind in (Position.AFTER_OPEN.value, Position.AFTER_CLOSE.value, Position.JSON_BODY.value):
                assert got[kind] == [bool(masks[kind][r, t])], (kind, r, t)
    # the next token unknown: a bare tag is after_open (it is, unless a newline follows); an empty list starts a turn
    got = prefix_decisions([[5], [5, 6], [5, 6, 7], []], role_ids)
    assert got[Position.AFTER_OPEN.value] == [True, True, False, False]
    assert got[Position.TURN_START.value] == [False, False, False, True]
    assert prefix_decisions([[5]], role_ids, next_id=6)[Position.AFTER_OPEN.value] == [False]
    assert prefix_decisions([[5]], {"tool_open": 5}, next_id=6)[Position.AFTER_OPEN.value] == [True]  # no newline


def test_synchronous_stats_read_every_row():
    """position_stats reads all decision rows (more than the deferred path's cap) and matches the reference."""
    from collapse_probe.capture.stats import decision_positions, position_stats

    torch.manual_seed(2)
    role_ids = {"tool_open": 5, "newline": 6, "json_open": 7, "end_of_turn": 8}
    ids = torch.randint(10, 30, (2, 400))
    ids[:, 10:390:5] = 5  # 76 bare tags per row
    gen = torch.ones_like(ids)
    logits, adv = torch.randn(2, 400, 30), torch.tensor([0.5, -1.0])
    got = position_stats(logits, ids, decision_positions(ids, gen, role_ids), role_ids, is_logp=False,
                         source="rollout", advantages=adv)
    assert got[cp_count_key("rollout", Position.AFTER_OPEN)] == 152
    _assert_close(got, _naive(logits, ids, gen, role_ids, adv, "rollout"))
