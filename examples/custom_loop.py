"""Control-token capture in a plain PyTorch RL loop: `ControlTokenCapture` + `RunLog`.

A few GRPO-style policy-gradient steps on tool-world prompts (sample 4 completions per prompt, reward
well-formed `<tool_call>`s, group-normalised advantages, 2 micro-batches per step). A forward hook reads the
training forward's logits at the decision positions of the model's own samples (`cp/rollout/...`, with the
gradient pressure `gp/...`), a fixed probe set is scored every few steps (`cp/probe/...`), and one record per
step goes to RUN_DIR/metrics.jsonl:

    python examples/custom_loop.py --out /tmp/cp_loop      # records: /tmp/cp_loop/run/metrics.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from collapse_probe.capture.hooks import ControlTokenCapture
from collapse_probe.capture.probe_set import ProbeSet
from collapse_probe.runs.runlog import RunLog
from collapse_probe.schema import LOSS, REWARD_MEAN, REWARD_STD, STEP
from collapse_probe.train import tiny
from collapse_probe import world



def build_base_model(path: Path) -> Path:
    """Stand-in for a hub checkpoint: the tiny model saved with save_pretrained."""
    if not (path / "config.json").is_file():
        tokenizer = tiny.build_tokenizer()
        tiny.build_model(tokenizer, "tiny").save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def reward(text: str) -> float:
    calls, error = world.parse_calls(text)
    return 1.0 if calls and error is None else 0.5 if world.TOOL_OPEN in text else 0.0


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--every", type=int, default=4, help="score the probe set every N steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the tiny model runs best on one)")
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    out = Path(opts.out)
    model_path = build_base_model(out / "base_model")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"  # prompts left-padded, completions right-padded
    model = AutoModelForCausalLM.from_pretrained(model_path)
    eos, pad = tokenizer.convert_tokens_to_ids(world.IM_END), tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    capture = ControlTokenCapture(tokenizer)  # resolves <tool_call>, <|im_end|>, {" ... to token ids
    probe = ProbeSet.from_world(tokenizer, n=8)
    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"source": "custom_loop", "roles": capture.roles.to_dict()}))
    tasks = world.task_split("train", 4 * opts.steps)
    group = 4

    with RunLog(run_dir) as log, capture.attach(model):
        log.append({STEP: 0, **probe.score(model)})
        for step in range(1, opts.steps + 1):
            # --- sample: 4 prompts x 4 completions (the hook ignores these forwards: no batch is set)
            prompts = [world.prompt_text(t) for t in tasks[4 * (step - 1): 4 * step] for _ in range(group)]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            model.eval()
            with torch.no_grad():
                seqs = model.generate(**enc, do_sample=True, max_new_tokens=24, eos_token_id=eos, pad_token_id=pad)
            model.train()
            comp = seqs[:, enc["input_ids"].shape[1]:]
            ended = (comp == eos).long().cumsum(-1)
            comp_mask = ((ended == 0) | ((ended == 1) & (comp == eos))).long()  # up to and with the first eos
            texts = [tokenizer.decode(c[m.bool()]) for c, m in zip(comp, comp_mask)]
            rewards = torch.tensor([reward(t) for t in texts])
            grouped = rewards.view(-1, group)
            adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)

            # --- train: 2 micro-batches; set_batch tells the hook which tokens the policy generated
            gen_mask = torch.cat([torch.zeros_like(enc["input_ids"]), comp_mask], dim=1)
            attn = torch.cat([enc["attention_mask"], comp_mask], dim=1)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            total = 0.0
            for rows in torch.arange(len(prompts)).chunk(2):
                ids, gm = seqs[rows], gen_mask[rows]
                capture.set_batch(ids, gm, advantages=adv[rows])
                logits = model(input_ids=ids, attention_mask=attn[rows], position_ids=pos[rows]).logits
                logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                # (or, without the hook: capture.stats_from_logp(full_log_softmax, ids, gm, advantages=...))
                mask = gm[:, 1:].float()
                loss = -(adv[rows, None] * logp * mask).sum() / mask.sum().clamp(min=1) / 2
                loss.backward()
                total += loss.item()
            optimizer.step()
            optimizer.zero_grad()

            rec = {STEP: step, LOSS: total, REWARD_MEAN: rewards.mean().item(),
                   REWARD_STD: rewards.std().item(), **capture.pop()}  # count-weighted over micro-batches
            if step % opts.every == 0 or step == opts.steps:
                rec.update(probe.score(model))
            log.append(rec)

    records = run_dir / "metrics.jsonl"
    print(f"collapse-probe records: {records}")
    return records


if __name__ == "__main__":
    main()
