"""GRPOTrainer step time with and without CollapseProbeCallback, interleaved, ratio in one run.

Two trainers on the same model shape and data: one with `callbacks=[CollapseProbeCallback(every=10**9)]` (the
on-policy capture every step; the probe set only at step 0 and the end, outside the timed steps), one without.
They take turns for `--rounds` rounds of `--steps` steps each, so drift on a shared machine hits both; step times
come from `on_step_begin` to the step's `on_log` (generation, our
on_step_end and on_log included). Prints the medians and the ratio.

    python bench/callback_overhead.py                       # CPU, tiny model (target <= 3%)
    python bench/callback_overhead.py --device cuda         # Qwen2.5-1.5B shape, random init (target <= 1%)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collapse_probe import CollapseProbeCallback  # noqa: E402
from collapse_probe.train import tiny  # noqa: E402
from collapse_probe import world  # noqa: E402


class StepTimer(TrainerCallback):
    """From `on_step_begin` to the step's `on_log` (logging_steps=1): the callback puts itself ahead of the others,
    so its `on_step_end` (cross-rank sums) and `on_log` (monitor, record write, dashboard keys) are inside."""

    def __init__(self):
        self.times: list[float] = []
        self._t0: float | None = None

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()

    def on_log(self, args, state, control, **kw):
        if self._t0 is None:  # the end-of-training summary log
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)
        self._t0 = None


def reward(completions, **kw):
    return [float(len(c) % 3) for c in completions]


def build_model(tok, device: str):
    if device == "cpu":
        return tiny.build_model(tok, "tiny")
    cfg = Qwen2Config(vocab_size=max(len(tok), 151936), hidden_size=1536, intermediate_size=8960,
                      num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=True)  # Qwen2.5-1.5B's shape
    return Qwen2ForCausalLM(cfg).to(torch.bfloat16)


def make_trainer(out: Path, tok, model, device: str, with_callback: bool, steps: int, timer: StepTimer):
    cpu = device == "cpu"
    args = GRPOConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8 if cpu else 16,
                      num_generations=4 if cpu else 8, max_completion_length=32 if cpu else 256,
                      temperature=1.0, learning_rate=1e-5, beta=0.0, logging_steps=1, save_strategy="no",
                      report_to="none", use_cpu=cpu, bf16=not cpu, gradient_checkpointing=False,
                      dataloader_num_workers=0, disable_tqdm=True, seed=0)
    data = Dataset.from_dict({"prompt": [f"{t.question}\n{world.TOOL_OPEN}\n"
                                         for t in world.task_split("train", 256)]})
    cbs = [timer] + ([CollapseProbeCallback(every=10 ** 9)] if with_callback else [])
    return GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                       callbacks=cbs)


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--rounds", type=int, default=16, help="fewer rounds: the ratio wanders by a few %%")
    ap.add_argument("--steps", type=int, default=5, help="steps per round per arm")
    ap.add_argument("--threads", type=int, default=1)
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    tok = tiny.build_tokenizer()
    times: dict[str, list[float]] = {"without": [], "with": []}
    paired: list[float] = []  # per round: median with / median without (each trainer instance runs a bit apart)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(opts.rounds):
            rounds: dict[str, float] = {}
            for arm in (("with", "without") if r % 2 else ("without", "with")):  # alternate who goes first
                timer = StepTimer()
                model = build_model(tok, opts.device)
                trainer = make_trainer(Path(tmp) / f"{arm}{r}", tok, model, opts.device, arm == "with",
                                       opts.steps, timer)
                trainer.train()
                times[arm] += timer.times[1:]  # the first step of a fresh trainer warms caches
                rounds.setdefault(arm, statistics.median(timer.times[1:]))
                del trainer, model
            paired.append(rounds["with"] / rounds["without"])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["with"] / med["without"]
    print(f"device={opts.device} steps/arm={len(times['with'])}  median step: without {med['without'] * 1e3:.1f} ms,"
          f" with {med['with'] * 1e3:.1f} ms  ratio {ratio:.4f} ({(ratio - 1) * 100:+.2f}%)"
          f"  paired per-round median ratio {statistics.median(paired):.4f}")
    return ratio


if __name__ == "__main__":
    main()
