"""On-policy capture inside a real TRL GRPOTrainer (fused LM head) with `callbacks=[CollapseProbeCallback()]`."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from trl import SFTTrainer

from collapse_probe import CollapseProbeCallback
from collapse_probe.capture.stats import decision_positions
from collapse_probe.runs.joined import read_records
from collapse_probe.schema import POSITIONS, Position, Source, cp_count_key
from collapse_probe.tokens import resolve_control_tokens
from collapse_probe.models import load as model_load
from collapse_probe.train import tiny
from collapse_probe import world
from helpers.trl_setup import TEMPERATURE, RecordingGRPO, base_model, grpo_args, prompts, reference_at, reward


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
    tok = model_load.load_tokenizer(path)
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
