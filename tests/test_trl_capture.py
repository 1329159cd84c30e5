"""On-policy capture inside a real TRL GRPOTrainer (fused LM head) with `callbacks=[CollapseProbeCallback()]`."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from collapse_probe import CollapseProbeCallback
from collapse_probe.capture.stats import decision_positions
from collapse_probe.runlog import read_records
from collapse_probe.schema import POSITIONS, Part, cp_count_key, cp_entropy_key, cp_key, gp_key
from collapse_probe.tokens import resolve_control_tokens
from collapse_probe.train import tiny
from collapse_probe import world

TEMPERATURE = 0.7


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _rank0(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)


def base_model(path: Path) -> Path:
    if not (path / "config.json").is_file():
        tok = tiny.build_tokenizer()
        tiny.build_model(tok, "tiny").save_pretrained(path)
        tok.save_pretrained(path)
    return path


def reward(completions, **kwargs):
    return [float(len(c) % 3) for c in completions]


def grpo_args(out: Path, steps: int, **kw) -> GRPOConfig:
    base = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, num_generations=4,
                max_completion_length=12, temperature=TEMPERATURE, learning_rate=1e-3, beta=0.0, logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, bf16=False, dataloader_num_workers=0,
                disable_tqdm=True, seed=0, gradient_checkpointing=False)
    return GRPOConfig(**{**base, **kw})


def prompts(n: int = 16) -> Dataset:
    """Text prompts that end inside an open call: every completion starts at an `after_open` decision row."""
    return Dataset.from_dict({"prompt": [f"{t.question}\n{world.TOOL_OPEN}\n" for t in world.task_split("train", n)]})


class RecordingGRPO(GRPOTrainer):
    """Computes the reference on each training batch, from materialised logits (the model's own forward)."""

    refs: dict

    def compute_loss(self, model, inputs, *args, **kwargs):
        if torch.is_grad_enabled():
            self.refs[self.state.global_step + 1] = reference(model, inputs, self.processing_class)
        return super().compute_loss(model, inputs, *args, **kwargs)


@torch.no_grad()
def reference(model, inputs, tok) -> dict:
    """Full log-softmax of the logits / temperature at the decision rows, means per position kind."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    own = inputs["completion_mask"] * inputs.get("tool_mask", torch.ones_like(inputs["completion_mask"]))
    own = torch.cat([torch.zeros_like(inputs["prompt_mask"]), own], 1)
    logits = model(input_ids=ids, attention_mask=attn).logits.float()  # not fused: the original forward
    logp = torch.log_softmax(logits / TEMPERATURE, dim=-1)
    role_ids = resolve_control_tokens(tok).distinct_ids()
    adv = inputs["advantages"].reshape(-1)
    out = {}
    for kind, (r, c) in decision_positions(ids, own, role_ids).items():
        out[cp_count_key("rollout", kind)] = float(r.numel())
        if not r.numel():
            continue
        lp = logp[r, c]
        out[cp_entropy_key("rollout", kind)] = float(-(lp.exp() * lp).sum(-1).mean())
        for role, i in role_ids.items():
            p = lp[:, i].exp()
            out[cp_key("rollout", kind, role)] = float(p.mean())
            chose = (ids[r, c + 1] == i).float()
            out[gp_key(kind, role, Part.CHOSEN)] = float((adv[r] * (1 - p) * chose).mean())
    return out


def test_grpo_on_policy_numbers_equal_the_reference(tmp_path):
    path = base_model(tmp_path / "base")
    tok = tiny.build_tokenizer()
    trainer = RecordingGRPO(model=str(path), reward_funcs=reward, args=grpo_args(tmp_path / "out", 3),
                            train_dataset=prompts(), processing_class=tok,
                            callbacks=[CollapseProbeCallback(every=100)])
    trainer.refs = {}
    trainer.train()
    recs = {r["step"]: r for r in read_records(tmp_path / "out")}
    assert sorted(trainer.refs) == [1, 2, 3]
    worst = 0.0
    for step, ref in trainer.refs.items():
        rec = recs[step]
        assert rec["cp/rollout/after_open/count"] >= 4  # each of the 4 completions starts inside a call
        for k, v in ref.items():
            assert k in rec, k
            worst = max(worst, abs(rec[k] - v))
    assert worst < 1e-4, worst
    print(f"max abs diff vs the materialised-logits reference: {worst:.2e}")
    # the probe set is scored at the policy's temperature, and the callback's capture was removed at the end
    assert "cp/probe/after_open/end_of_turn" in recs[0]
    assert "compute_loss" not in trainer.__dict__


def test_tool_results_are_not_decision_positions(tmp_path):
    """`tool_mask = 0` rows (as TRL's `_tool_call_loop` builds them) never count, even with a tag inside."""
    from collapse_probe.integrations.trl import batch_of

    tok = tiny.build_tokenizer()
    opn, nl = tok.convert_tokens_to_ids(world.TOOL_OPEN), tok.encode("\n", add_special_tokens=False)[-1]
    prompt = torch.tensor([[5, 6, 7]])
    comp = torch.tensor([[opn, nl, 9, 10, opn, nl, 11, 12, opn, nl, 13]])
    mask = torch.ones_like(comp)
    tool = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1]])  # a tool result holding a tag, then the policy again
    b = batch_of({"prompt_ids": prompt, "completion_ids": comp, "completion_mask": mask, "tool_mask": tool,
                  "advantages": torch.tensor([0.5])})
    pos = decision_positions(b.ids, b.own, resolve_control_tokens(tok).distinct_ids())
    r, c = pos["after_open"]
    assert c.tolist() == [4, 12]  # after the policy's own tags; not the one in the tool result (col 8)
    assert 7 not in pos["turn_start"][1].tolist() and 10 in pos["turn_start"][1].tolist()


class _NoHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 2)

    def forward(self, **kw):
        return SimpleNamespace(loss=self.w.weight.sum())


def _fused_forward(self, **kw):  # what TRL's add_fused_lm_head installs, by its code name
    return SimpleNamespace(log_probs=None)


def test_a_model_without_logits_or_head_is_skipped_or_refused(tmp_path, caplog):
    from collapse_probe.errors import UserError
    from collapse_probe.integrations.trl import OnPolicyCapture

    roles = resolve_control_tokens(tiny.build_tokenizer())
    trainer = SimpleNamespace(model=_NoHead(), compute_loss=lambda m, i: m(**i), args=SimpleNamespace())
    cap = OnPolicyCapture(roles).attach(trainer)
    for _ in range(3):  # training goes on; nothing is measured
        trainer.compute_loss(trainer.model, {"input_ids": torch.ones(1, 4, dtype=torch.long)})
    assert cap.pop_totals() == ({}, {}) and cap.skipped == 3
    cap.detach()
    assert trainer.compute_loss(trainer.model, {}).loss is not None  # the user's own method is back
    fused = _NoHead()
    fused.forward = _fused_forward.__get__(fused)
    with pytest.raises(UserError, match="no LM head"):  # the callback turns this into one warning
        OnPolicyCapture(roles).attach(SimpleNamespace(model=fused, compute_loss=None))


def test_every_position_kind_has_fixed_keys():
    from collapse_probe.integrations.distributed import capture_keys

    keys = capture_keys({"tool_open": 1, "end_of_turn": 2}, "rollout", pressure=True)
    assert len(keys) == len(set(keys)) == len(POSITIONS) * (2 + 2 + 4)
