"""The callback's actions through a real HF Trainer's hooks, on a run made to collapse deterministically, and the
on-policy capture on a trainer that returns logits (HF `Trainer`, labels = assistant tokens)."""

import math

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from collapse_probe import CollapseProbeCallback
from collapse_probe.runs.joined import read_records
from collapse_probe.schema import CHECKPOINT_SAVED, COLLAPSED, STOPPED, SUCCESS, cp_key
from collapse_probe.train import tiny
from collapse_probe import world

SPIKE = cp_key("rollout", "after_open", "end_of_turn")


def collapsing(step: int) -> dict:
    """p(end of turn | after the open tag) spikes at step 15; success falls from step 19."""
    wobble = 0.002 * ((step * 7) % 5)
    return {SPIKE: 0.02 + wobble if step < 15 else 0.7, SUCCESS: 0.9 - wobble if step < 19 else 0.05}


class Scripted(CollapseProbeCallback):
    """The real callback; each step's record also gets the scripted collapse (the model itself is healthy)."""

    def _collect(self, step):
        super()._collect(step)
        self._merge(step, collapsing(step))


def sft_trainer(tmp_path, tok, cb, steps):
    model = tiny.build_model(tok, "tiny")
    rows = []
    for task in world.task_split("train", 32):
        ids, mask = world.encode_trajectory(tok, task)
        rows.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]})

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        pad = lambda xs, v: [x + [v] * (width - len(x)) for x in xs]  # noqa: E731
        return {"input_ids": torch.tensor(pad([r["input_ids"] for r in batch], tok.pad_token_id)),
                "labels": torch.tensor(pad([r["labels"] for r in batch], -100)),
                "attention_mask": torch.tensor(pad([[1] * len(r["input_ids"]) for r in batch], 0))}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    return Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collate,
                   processing_class=tok, callbacks=[cb])


def test_checkpoint_at_the_alarm_and_stop_at_the_collapse(tmp_path):
    tok = tiny.build_tokenizer()
    cb = Scripted(every=100, on_warning="checkpoint", on_collapse="stop")
    trainer = sft_trainer(tmp_path, tok, cb, steps=40)
    trainer.train()
    recs = {r["step"]: r for r in read_records(tmp_path)}
    saved = [s for s, r in recs.items() if CHECKPOINT_SAVED in r]
    assert len(saved) == 1 and 15 <= saved[0] < 19  # the spike alarm, before success falls
    assert (tmp_path / recs[saved[0]][CHECKPOINT_SAVED] / "model.safetensors").is_file()
    stopped = [s for s, r in recs.items() if r.get(STOPPED) == 1]
    assert len(stopped) == 1 and trainer.state.global_step == stopped[0] < 40  # ended early, at the collapse
    assert recs[stopped[0]][COLLAPSED] == 1 and recs[stopped[0]]["monitor/collapse_reason"]
    print(f"checkpoint at step {saved[0]}, stopped at step {stopped[0]} of 40")


def test_defaults_only_log(tmp_path):
    tok = tiny.build_tokenizer()
    trainer = sft_trainer(tmp_path, tok, Scripted(every=100), steps=24)
    trainer.train()
    recs = read_records(tmp_path)
    assert trainer.state.global_step == 24 and not list(tmp_path.glob("checkpoint-*"))
    assert any(r.get(COLLAPSED) == 1 for r in recs) and not any(STOPPED in r for r in recs)


def test_logits_trainer_gets_on_policy_numbers_at_the_labelled_tokens(tmp_path):
    tok = tiny.build_tokenizer()
    trainer = sft_trainer(tmp_path, tok, CollapseProbeCallback(every=100), steps=2)
    trainer.train()
    recs = [r for r in read_records(tmp_path) if r["step"] > 0]
    assert len(recs) == 2
    for r in recs:  # oracle trajectories open calls in assistant turns: measured there, as probabilities
        assert r["cp/rollout/after_open/count"] > 0 and 0 < r[SPIKE] < 1 and math.isfinite(r["loss"])
