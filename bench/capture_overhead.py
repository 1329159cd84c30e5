"""Step time with and without control-token capture, measured in one run.

CPU (default): our GRPO step (forward, log-softmax, clipped loss, backward, AdamW) on the tiny model and a fixed
batch of 64 real multi-turn rollouts; capture reads the log-softmax the loss already computed.

GPU (`--device cuda`): a random-init Qwen2.5-1.5B-shaped model (or `--shape 0.5b`), bf16, batch 8 x 1024,
forward + selective log-softmax loss + backward; capture is `ControlTokenCapture` attached as a forward hook,
as in someone else's trainer: it reads only the decision rows of the logits, stays asynchronous on the GPU, and
syncs once per step when `pop()` hands the numbers to the logger.

Runs alternate (off, on, off, on, ...) so drift hits both equally; the overhead is the ratio of medians.

    python bench/capture_overhead.py            # table
    python bench/capture_overhead.py --json     # {"step_ms":..., "step_ms_capture":..., "overhead_pct":...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

SHAPES = {  # Qwen2.5 configs (hidden, layers, heads, kv heads, intermediate)
    "0.5b": (896, 24, 14, 2, 4864),
    "1.5b": (1536, 28, 12, 2, 8960),
}


def cpu_case(threads: int):
    from collapse_probe.tokens import resolve_control_tokens
    from collapse_probe.train import grpo, tiny
    from collapse_probe import world
    from collapse_probe.train.rollout import rollout

    torch.set_num_threads(threads)
    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, "tiny")
    role_ids = dict(resolve_control_tokens(tok).ids)
    # Oracle-like trajectories: sample from a model nudged to the oracle by a few SFT steps would take longer;
    # random-model rollouts have the same shapes and decision positions are forced by teacher data below.
    trajs = rollout(model, tok, world.task_split("train", 8), group_size=8, max_turns=4, max_new_tokens=24, seed=0)
    for t in trajs:
        t.reward = float(t.group % 2)
    adv = grpo.group_advantages(trajs) + torch.linspace(-1, 1, len(trajs))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step(capture: bool) -> float:
        t0 = time.perf_counter()
        out = grpo.grpo_loss(model, trajs, adv, pad_id=tok.pad_token_id, role_ids=role_ids if capture else None)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step, f"CPU, {threads} threads, tiny model, 64 rollouts x {max(len(t.ids) for t in trajs)} tokens"


def gpu_case(shape: str, batch: int, seq: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from collapse_probe.capture.hooks import ControlTokenCapture
    from collapse_probe.schema import Position, Source, cp_count_key
    from collapse_probe.tokens import ControlTokens

    hidden, layers, heads, kv, inter = SHAPES[shape]
    cfg = Qwen2Config(vocab_size=151936, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16)
    model.gradient_checkpointing_disable()
    ids = torch.randint(0, 151000, (batch, seq), device="cuda")
    # Plant tool calls so the capture has decision positions: <tool_call>\n{"  ... every 128 tokens.
    for j in range(64, seq - 4, 128):
        ids[:, j], ids[:, j + 1], ids[:, j + 2] = 151657, 198, 4913
    gen = torch.zeros_like(ids)
    gen[:, seq // 8:] = 1
    roles = ControlTokens(ids={"tool_open": 151657, "tool_close": 151658, "end_of_turn": 151645, "eos": 151643,
                               "turn_start": 151644, "json_open": 4913, "json_close": 3417, "newline": 198},
                          strings={}, unresolved={}, source={})
    capture = ControlTokenCapture(roles).attach(model)  # the forward hook a user's trainer would carry
    adv = torch.randn(batch, device="cuda")

    def step(capture_on: bool) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if capture_on:
            capture.set_batch(ids, gen, advantages=adv)
        logits = model(input_ids=ids).logits[:, :-1]
        # TRL-style selective log-softmax: logsumexp per row, gather the sampled token.
        lse = torch.logsumexp(logits.float(), dim=-1)
        tok_logp = logits.gather(-1, ids[:, 1:, None]).squeeze(-1).float() - lse
        loss = -(tok_logp * adv[:, None] * gen[:, 1:]).sum() / gen.sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if capture_on:
            stats = capture.pop()  # once per step, at logging time: the only host sync capture adds
            assert stats.get(cp_count_key(Source.ROLLOUT, Position.AFTER_OPEN), 0) > 0
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step, f"{torch.cuda.get_device_name()}, Qwen2.5-{shape} shape, bf16, batch {batch} x {seq}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="1.5b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per setting (>= 5)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible")
    step, label = cpu_case(args.threads) if args.device == "cpu" else gpu_case(args.shape, args.batch, args.seq)
    for _ in range(args.warmup):
        step(False), step(True)
    off, on = [], []
    for i in range(max(args.repeats, 5)):
        first = i % 2 == 0  # alternate which setting goes first
        a = step(not first)
        b = step(first)
        (on if first else off).append(b)
        (off if first else on).append(a)
    result = {"device": label, "repeats": len(off), "step_ms": 1000 * statistics.median(off),
              "step_ms_capture": 1000 * statistics.median(on)}
    result["overhead_pct"] = 100 * (result["step_ms_capture"] / result["step_ms"] - 1)
    if args.json:
        print(json.dumps(result))
        return
    print(f"capture overhead on {label} ({result['repeats']} runs each, medians)")
    print(f"{'step (ms)':>12} {'with capture (ms)':>18} {'overhead':>9}")
    print(f"{result['step_ms']:12.1f} {result['step_ms_capture']:18.1f} {result['overhead_pct']:8.2f}%")


if __name__ == "__main__":
    main()
