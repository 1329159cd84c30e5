"""CollapseProbeCallback on a multi-turn TRL `GRPOTrainer` run with tools (offline, CPU, tiny model).

TRL's own tool loop (`GRPOTrainer(tools=[...])`) runs each sampled tool call, appends the result to the
conversation (`tool_mask = 0` on those tokens) and lets the policy continue. The callback line is the same as for
single-turn GRPO; its on-policy numbers (`cp/rollout/...`) count only the policy's own tokens, never the tool results:

    python examples/trl_grpo_tools_callback.py --out /tmp/cp_tools
    # records: /tmp/cp_tools/trainer/collapse_probe/metrics.jsonl

Two stand-ins you drop with a real tool-tuned checkpoint (Qwen2.5/Qwen3, Llama 3.1, ...):
- `response_template`: how TRL parses tool calls out of a completion. TRL sets it for the chat templates it knows;
  the tiny model's template is our own ChatML + Hermes one, so we set the same parser Qwen's get.
- `sequence_bias`: the untrained tiny model never writes a call by itself; a sampling bias toward one call, then
  toward an answer after the tool result, makes TRL's tool loop run. Sampling stays stochastic.
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

# transformers' response-parsing template for ChatML + Hermes calls (what TRL's add_response_schema gives Qwen3)
CHATML_HERMES_RESPONSE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {"open": world.TOOL_OPEN, "close_pattern": "</tool_call>\\s*", "repeats": True,
                       "content": "json", "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": "<\\|im_end\\|>\\s*", "content": "text"},
    },
}
USER_IDS = dict(zip(world.NAMES, world.USER_IDS))


def find_user(name: str) -> str:
    """Find a user id by name.

    Args:
        name: the user's first name, lower case
    """
    return USER_IDS.get(name, "unknown")


def build_base_model(path: Path) -> Path:
    """Stand-in for a hub checkpoint: the tiny model saved with save_pretrained."""
    if not (path / "config.json").is_file():
        tokenizer = tiny.build_tokenizer()
        tiny.build_model(tokenizer, "tiny").save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def tool_tokenizer(path: Path):
    """The checkpoint's tokenizer with a tool-call parser (a Qwen/Llama tokenizer gets one from TRL itself)."""
    tok = AutoTokenizer.from_pretrained(path)
    tok.response_template = CHATML_HERMES_RESPONSE
    return tok


def call_bias(tok, name: str = "bob", strength: float = 11.0) -> list[list]:
    """GenerationConfig `sequence_bias`: at a turn start, toward a `find_user` call; after a tool result, toward an
    answer. A key matches the last tokens, so each key holds the turn header and the tokens so far; longer keys get
    a little more, so the answer (its key holds the tool-result tail) wins over a second call after a result."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    header = enc(world.IM_START + "assistant\n")
    call = enc(world.render_call("find_user", {"name": name}) + world.IM_END)
    answer = enc(world.render_answer(USER_IDS[name]) + world.IM_END)
    bias = {}
    for context, tokens in ((header, call), (enc(world.RESP_CLOSE + world.IM_END + "\n") + header, answer)):
        for k in range(1, len(tokens) + 1):
            key = tuple(context + tokens[:k])
            bias[key] = strength + 0.25 * len(key)
    return [[list(k), v] for k, v in bias.items()]


def answer_reward(completions, **kwargs) -> list[float]:
    """1.0 when the final answer quotes what the tool returned, 0.5 for a tool call without that, else 0."""
    out = []
    for messages in completions:
        results = [m["content"] for m in messages if m["role"] == "tool"]
        final = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        out.append(0.0 if not results else 1.0 if f'"{results[-1]}"' in final else 0.5)
    return out


def grpo_args(out: Path, tok, steps: int, **overrides) -> GRPOConfig:
    """A small GRPO run: 2 prompts x 4 samples per step; one tool round per rollout."""
    base = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, num_generations=4,
                max_completion_length=64, max_tool_calling_iterations=1, temperature=1.0, learning_rate=1e-3,
                beta=0.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True, seed=0,
                generation_kwargs={"sequence_bias": call_bias(tok)})
    return GRPOConfig(**{**base, **overrides})


def prompts(n: int = 64) -> Dataset:
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": t.question}]
                                         for t in world.task_split("train", n)]})


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
    tok = tool_tokenizer(model_path)

    trainer = GRPOTrainer(model=str(model_path), reward_funcs=answer_reward, tools=[find_user],
                          args=grpo_args(out / "trainer", tok, opts.steps), train_dataset=prompts(),
                          processing_class=tok, callbacks=[CollapseProbeCallback(every=opts.every)])
    trainer.train()

    records = out / "trainer" / "collapse_probe" / "metrics.jsonl"
    print(f"collapse-probe records: {records}")
    return records


if __name__ == "__main__":
    main()
