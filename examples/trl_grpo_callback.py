"""CollapseProbeCallback on a real TRL `GRPOTrainer` run (offline, CPU, tiny model).

A few GRPO steps on tool-world questions with a format reward (1 for a well-formed `<tool_call>` JSON call,
0.5 for a bare tag). TRL logs its completions (`log_completions=True`); the callback adds control-token probes
(`cp/probe/...`), TRL's own metrics (loss, reward, entropy, ...) and the format-state mix of the logged
completions (`fmt/...`), one record per step:

    python examples/trl_grpo_callback.py --out /tmp/cp_grpo
    # records: /tmp/cp_grpo/trainer/collapse_probe/metrics.jsonl ; TRL's: /tmp/cp_grpo/trainer/completions/

Replace the model path with your own checkpoint and the reward with yours; the callback line stays the same.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from collapse_probe import CollapseProbeCallback
from collapse_probe.train import tiny
from collapse_probe import world


def build_base_model(path: Path) -> Path:
    """Stand-in for a hub checkpoint: the tiny model saved with save_pretrained. As in Qwen2.5's tokenizer, the
    tool tags are added tokens that are not "special", so TRL's decode(skip_special_tokens=True) keeps them."""
    if not (path / "config.json").is_file():
        tokenizer = tiny.build_tokenizer()
        tiny.build_model(tokenizer, "tiny").save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def tool_call_reward(completions, **kwargs) -> list[float]:
    """1.0 for a completion holding well-formed tool calls, 0.5 for a `<tool_call>` tag without one, else 0."""
    out = []
    for c in completions:
        text = c[-1]["content"] if isinstance(c, list) else c
        calls, error = world.parse_calls(text)
        out.append(1.0 if calls and error is None else 0.5 if world.TOOL_OPEN in text else 0.0)
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--every", type=int, default=2, help="probe every N steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the tiny model runs best on one)")
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    model_path = build_base_model(out / "base_model")

    prompts = [[{"role": "system", "content": world.system_prompt()}, {"role": "user", "content": t.question}]
               for t in world.task_split("train", 64)]
    dataset = Dataset.from_dict({"prompt": prompts})

    args = GRPOConfig(
        output_dir=str(out / "trainer"), max_steps=opts.steps, per_device_train_batch_size=8, num_generations=4,
        max_completion_length=32, temperature=1.0, learning_rate=1e-3, beta=0.0, logging_steps=1,
        log_completions=True, num_completions_to_print=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True,
        seed=0)
    trainer = GRPOTrainer(model=str(model_path), reward_funcs=tool_call_reward, args=args, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(model_path),
                          callbacks=[CollapseProbeCallback(every=opts.every)])
    trainer.train()

    records = Path(args.output_dir) / "collapse_probe" / "metrics.jsonl"
    print(f"collapse-probe records: {records}")
    return records


if __name__ == "__main__":
    main()
