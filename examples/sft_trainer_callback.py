"""CollapseProbeCallback on a TRL `SFTTrainer` run (tool-use trajectories, offline, CPU, tiny model).

SFTTrainer, like GRPOTrainer, never builds the logits (TRL's fused LM head); the callback scores its training
forward at the labelled tokens (`cp/rollout/...`: the assistant turns; tool results carry no loss and are not
decision positions) and also probes a fixed gold-context set (`cp/probe/...`) every few steps:

    python examples/sft_trainer_callback.py --out /tmp/cp_sft
    collapse-probe analyze /tmp/cp_sft/trainer    # records: /tmp/cp_sft/trainer/collapse_probe/metrics.jsonl

The dataset is pre-tokenized (`input_ids` + `assistant_masks`, a column SFTTrainer turns into labels). With a
chat template that has `{% generation %}` markers, a `messages` dataset and `assistant_only_loss=True` do the same.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from collapse_probe import CollapseProbeCallback
from collapse_probe.train import tiny
from collapse_probe import world


def build_base_model(path: Path) -> Path:
    """Stand-in for a hub checkpoint: the tiny model saved with save_pretrained."""
    if not (path / "config.json").is_file():
        tokenizer = tiny.build_tokenizer()
        tiny.build_model(tokenizer, "tiny").save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def trajectories(tokenizer, n: int = 256) -> Dataset:
    """The tool world's oracle conversations; `assistant_masks` is 1 on the assistant's tokens only."""
    rows = []
    for task in world.task_split("train", n):
        ids, mask = world.encode_trajectory(tokenizer, task)
        rows.append({"input_ids": ids, "assistant_masks": mask})
    return Dataset.from_list(rows)


def sft_args(out: Path, steps: int, **overrides) -> SFTConfig:
    base = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3,
                lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                bf16=False, gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    return SFTConfig(**{**base, **overrides})


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=5, help="probe every N steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the tiny model runs best on one)")
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    model_path = build_base_model(out / "base_model")
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    trainer = SFTTrainer(model=str(model_path), args=sft_args(out / "trainer", opts.steps),
                         train_dataset=trajectories(tokenizer), processing_class=tokenizer,
                         callbacks=[CollapseProbeCallback(every=opts.every)])
    trainer.train()

    records = out / "trainer" / "collapse_probe" / "metrics.jsonl"
    print(f"collapse-probe records: {records}")
    return records


if __name__ == "__main__":
    main()
