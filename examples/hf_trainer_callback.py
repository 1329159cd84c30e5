"""CollapseProbeCallback on a plain Hugging Face `Trainer` (SFT on tool-use trajectories).

Builds the embedded tiny Qwen2 model, saves it like any hub model, loads it back by path, fine-tunes it for a few
steps on the tool world's oracle trajectories (loss on assistant tokens only) and probes control tokens every
5 steps. Runs offline on a CPU in well under a minute:

    python examples/hf_trainer_callback.py --out /tmp/cp_hf
    collapse-probe analyze /tmp/cp_hf/trainer     # records: /tmp/cp_hf/trainer/collapse_probe/metrics.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

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
    model = AutoModelForCausalLM.from_pretrained(model_path)

    rows = []
    for task in world.task_split("train", 256):
        ids, mask = world.encode_trajectory(tokenizer, task)  # mask: 1 on assistant tokens
        rows.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]})
    dataset = Dataset.from_list(rows)

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in batch)
        pad = lambda xs, v: [x + [v] * (width - len(x)) for x in xs]  # noqa: E731
        return {"input_ids": torch.tensor(pad([r["input_ids"] for r in batch], tokenizer.pad_token_id)),
                "labels": torch.tensor(pad([r["labels"] for r in batch], -100)),
                "attention_mask": torch.tensor(pad([[1] * len(r["input_ids"]) for r in batch], 0))}

    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=opts.steps, per_device_train_batch_size=8,
        learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                      processing_class=tokenizer, callbacks=[CollapseProbeCallback(every=opts.every)])
    trainer.train()

    records = Path(args.output_dir) / "collapse_probe" / "metrics.jsonl"
    print(f"collapse-probe records: {records}")
    return records


if __name__ == "__main__":
    main()
