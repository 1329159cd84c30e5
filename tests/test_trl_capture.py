"""On-policy capture inside a real TRL GRPOTrainer (fused LM head) with `callbacks=[CollapseProbeCallback()]`."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer, SFTTrainer

from collapse_probe import CollapseProbeCallback
from collapse_probe.capture.stats import decision_positions
from collapse_probe.runlog import read_records
from collapse_probe.schema import POSITIONS, Part, Position, Source, cp_count_key, cp_entropy_key, cp_key, gp_key
from collapse_probe.tokens import resolve_control_tokens
from collapse_probe.train import tiny
from collapse_probe import world

TEMPERATURE = 0.7


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
    batches: dict | None = None  # the training batches too, when a test sets a dict

    def compute_loss(self, model, inputs, *args, **kwargs):
        if torch.is_grad_enabled():
            self.refs[self.state.global_step + 1] = reference(model, inputs, self.processing_class)
            if self.batches is not None:
                self.batches[self.state.global_step + 1] = inputs
        return super().compute_loss(model, inputs, *args, **kwargs)


@torch.no_grad()
def reference(model, inputs, tok) -> dict:
    """GRPO: the policy's tokens are completion_mask x tool_mask; gradient pressure from the advantages."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    own = inputs["completion_mask"] * inputs.get("tool_mask", torch.ones_like(inputs["completion_mask"]))
    own = torch.cat([torch.zeros_like(inputs["prompt_mask"]), own], 1)
    return reference_at(model, ids, attn, own, tok, TEMPERATURE, inputs["advantages"].reshape(-1))


@torch.no_grad()
def reference_at(model, ids, attn, own, tok, temperature: float, adv=None) -> dict:
    """Full log-softmax of the logits / temperature at the decision rows, means per position kind."""
    logits = model(input_ids=ids, attention_mask=attn).logits.float()  # not fused: the original forward
    logp = torch.log_softmax(logits / temperature, dim=-1)
    role_ids = resolve_control_tokens(tok).distinct_ids()
    src = Source.ROLLOUT.value
    out = {}
    for kind, (r, c) in decision_positions(ids, own, role_ids).items():
        out[cp_count_key(src, kind)] = float(r.numel())
        if not r.numel():
            continue
        lp = logp[r, c]
        out[cp_entropy_key(src, kind)] = float(-(lp.exp() * lp).sum(-1).mean())
        for role, i in role_ids.items():
            p = lp[:, i].exp()
            out[cp_key(src, kind, role)] = float(p.mean())
            if adv is not None:
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


def _example(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tool_results_are_not_decision_positions(tmp_path):
    """TRL's real multi-turn tool loop (`tools=`): the tool result (`tool_mask = 0`) holds a call tag, yet no decision
    position predicts a tool-result token, and the captured numbers equal the tool-masked reference."""
    ex = _example("trl_grpo_tools_callback")
    echoed = world.render_call("find_user", {"name": "ann"})

    def find_user(name: str) -> str:
        """Find a user id by name; the result echoes a log line that holds a call (a tag in a tool result).

        Args:
            name: the user's first name
        """
        return f"{ex.USER_IDS.get(name, 'unknown')} (log: {echoed})"

    path = ex.build_base_model(tmp_path / "base")
    tok = ex.tool_tokenizer(path)
    trainer = RecordingGRPO(model=str(path), reward_funcs=ex.answer_reward, tools=[find_user],
                            args=ex.grpo_args(tmp_path / "out", tok, 2, temperature=TEMPERATURE,
                                              max_completion_length=96),
                            train_dataset=ex.prompts(16), processing_class=tok,
                            callbacks=[CollapseProbeCallback(every=100)])
    trainer.refs, trainer.batches = {}, {}
    trainer.train()
    recs = {r["step"]: r for r in read_records(tmp_path / "out")}
    role_ids = resolve_control_tokens(tok).distinct_ids()
    opn = role_ids["tool_open"]
    worst, tool_rows = 0.0, 0
    for step, inputs in trainer.batches.items():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        comp = torch.cat([torch.zeros_like(inputs["prompt_mask"]), inputs["completion_mask"]], 1)
        own = comp * torch.cat([torch.ones_like(inputs["prompt_mask"]), inputs["tool_mask"]], 1)
        in_tool = (comp == 1) & (own == 0)
        tool_rows += int((in_tool & (ids == opn)).any(1).sum())  # a tag inside a tool result
        for kind, (r, c) in decision_positions(ids, own, role_ids).items():
            assert bool(own[r, c + 1].all()), kind  # every decision predicts one of the policy's own tokens
        masked = decision_positions(ids, own, role_ids)[Position.AFTER_OPEN.value][0].numel()
        unmasked = decision_positions(ids, comp, role_ids)[Position.AFTER_OPEN.value][0].numel()
        assert recs[step][cp_count_key(Source.ROLLOUT.value, Position.AFTER_OPEN.value)] == masked < unmasked
        for k, v in trainer.refs[step].items():
            worst = max(worst, abs(recs[step][k] - v))
    assert sorted(trainer.batches) == [1, 2] and tool_rows >= 1 and recs[2]["tools/call_frequency"] > 0
    assert worst < 1e-4, worst
    print(f"tool loop: {tool_rows} rows with a tag in a tool result; max abs diff vs reference {worst:.2e}")


class RecordingSFT(SFTTrainer):
    refs: dict

    def compute_loss(self, model, inputs, *args, **kwargs):
        if torch.is_grad_enabled():  # SFT's policy tokens: the labelled ones (tool results carry no label)
            own = (inputs["labels"] != -100).long() * inputs["attention_mask"]
            self.refs[self.state.global_step + 1] = (
                reference_at(model, inputs["input_ids"], inputs["attention_mask"], own, self.processing_class, 1.0),
                int(((inputs["labels"] == -100) & (inputs["input_ids"] == self.opn)).sum()))
        return super().compute_loss(model, inputs, *args, **kwargs)


def test_sft_on_policy_numbers_are_the_logits_at_labelled_tokens(tmp_path):
    """SFTTrainer (fused head too): `cp/rollout/...` equal the materialised logits at the labelled tokens."""
    ex = _example("sft_trainer_callback")
    path = ex.build_base_model(tmp_path / "base")
    tok = tiny.load_tokenizer(path)
    trainer = RecordingSFT(model=str(path), args=ex.sft_args(tmp_path / "out", 2), processing_class=tok,
                           train_dataset=ex.trajectories(tok, 32), callbacks=[CollapseProbeCallback(every=100)])
    trainer.refs, trainer.opn = {}, tok.convert_tokens_to_ids(world.TOOL_OPEN)
    trainer.train()
    recs = {r["step"]: r for r in read_records(tmp_path / "out")}
    assert sorted(trainer.refs) == [1, 2]
    worst = 0.0
    for step, (ref, unlabelled_tags) in trainer.refs.items():
        assert unlabelled_tags > 0  # tool results and prompts hold tags: not labelled, not counted
        assert ref[cp_count_key(Source.ROLLOUT.value, Position.AFTER_OPEN.value)] > 0
        for k, v in ref.items():
            worst = max(worst, abs(recs[step][k] - v))
    assert worst < 1e-4, worst
    print(f"SFT: max abs diff vs the materialised-logits reference {worst:.2e}")


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
