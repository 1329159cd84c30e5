"""The reference trainer: SFT, multi-turn GRPO, and interleaved SFT+RL, with capture on by default.

Read top to bottom: `TrainConfig` (every knob), `train()` (the loop), then the helpers it calls.
A run directory holds `config.json`, `metrics.jsonl` (one record per step, appended and flushed), sampled
rollouts as text under `rollouts/`, and checkpoints `checkpoint-N/` in the Hugging Face layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from collapse_probe.capture.probe_set import ProbeSet
from collapse_probe.formats.classify import FormatSpec, classify_turn
from collapse_probe.runlog import RolloutLog, RunLog
from collapse_probe.tokens import resolve_control_tokens
from collapse_probe.train import grpo, sft, tiny
from collapse_probe import world
from collapse_probe.train.rollout import rollout


@dataclass
class TrainConfig:
    mode: str = "grpo"  # "sft" | "grpo" | "interleaved"
    steps: int = 60
    seed: int = 0
    init: str | None = None  # a checkpoint dir to start from (grpo/interleaved) or None: build the tiny model
    size: str = "small"  # tiny model size when built from scratch
    lr: float = 1e-3
    lr_schedule: str = "constant"  # "constant" | "cosine" (to 10% of lr at the last step)
    warmup_steps: int = 0  # linear warm-up: keeps Adam's first, outsized updates from wrecking a trained policy
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    threads: int = 2
    # SFT
    sft_batch: int = 32
    retry_frac: float = 0.1  # oracle traces holding one "empty call -> tool error -> retry"
    # GRPO
    prompts_per_step: int = 8
    group_size: int = 8
    temperature: float = 1.0
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    max_turns: int = 8
    max_new_tokens: int = 40
    reward: dict = field(default_factory=lambda: {"correct": 1.0, "wrong": 0.0, "no_answer": 0.0, "tag_bonus": 0.0})
    # interleaved SFT+RL: every `sft_every` RL steps, `sft_steps` SFT steps on oracle data of failed prompts
    sft_every: int = 0
    sft_steps: int = 1
    sft_lr: float | None = None
    # logging
    eval_every: int = 0  # greedy held-out success every N steps (0: only at the end)
    eval_tasks: int = 64
    probe_every: int = 5  # fixed probe set every N steps (0: off)
    save_every: int = 10  # checkpoint-N/ every N steps (0: only the last)
    log_rollouts: int = 8  # sampled conversations written as text per step

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def train(cfg: TrainConfig, out_dir: str | Path, *, progress: Callable[[int, dict], None] | None = None) -> Path:
    """Run one training job into `out_dir`; returns the path of the last checkpoint."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.to_json())
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model, tok = _load(cfg)
    roles = resolve_control_tokens(tok)
    role_ids = roles.distinct_ids()
    probe = ProbeSet.from_world(tok, n=16) if cfg.probe_every else None
    ref_model = None
    if cfg.kl_coef > 0:
        ref_model, _ = _load(cfg)
        ref_model.eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    reward = world.RewardSpec(**cfg.reward)
    log, rlog = RunLog(out), RolloutLog(out)
    failed: list[world.Task] = []
    spec = FormatSpec.hermes()
    last_ckpt = out
    model.train()
    for step in range(cfg.steps + 1):
        t0 = time.time()
        rec: dict = {"step": step}
        if probe is not None and step % cfg.probe_every == 0:
            rec.update(probe.score(model))
        if cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps:
            rec["eval/success"] = evaluate(model, tok, n=cfg.eval_tasks, max_turns=cfg.max_turns,
                                           max_new_tokens=cfg.max_new_tokens)
        if step == cfg.steps:  # the last record only measures; no update after it
            rec["time/step_s"] = time.time() - t0
            log.append(rec)
            break
        scale = 0.1 + 0.45 * (1 + math.cos(math.pi * step / max(cfg.steps, 1))) if cfg.lr_schedule == "cosine" else 1.0
        if cfg.warmup_steps:
            scale *= min(1.0, (step + 1) / cfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * scale
        if cfg.mode == "sft":
            tasks = world.task_split("train", cfg.sft_batch, offset=step * cfg.sft_batch, run_seed=cfg.seed)
            rec.update(sft_step(model, opt, tok, tasks, cfg, rng))
        else:
            tasks = world.task_split("train", cfg.prompts_per_step, offset=step * cfg.prompts_per_step,
                                     run_seed=cfg.seed)
            trajs = rollout(model, tok, tasks, group_size=cfg.group_size, max_turns=cfg.max_turns,
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, reward=reward,
                            seed=cfg.seed * 100_003 + step)
            adv = grpo.group_advantages(trajs)
            out_loss = grpo.grpo_loss(model, trajs, adv, pad_id=tok.pad_token_id, clip_eps=cfg.clip_eps,
                                      kl_coef=cfg.kl_coef, ref_model=ref_model, temperature=cfg.temperature,
                                      role_ids=role_ids)
            opt.zero_grad(set_to_none=True)
            out_loss.loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            rec.update(out_loss.metrics)
            rec.update(_rollout_metrics(trajs, tok, spec))
            rec.update({"phase": "rl", "loss": float(out_loss.loss.detach()), "grad_norm": float(gn),
                        "lr": opt.param_groups[0]["lr"]})
            failed = ([t.task for t in trajs if not t.success] + failed)[:64]
            if cfg.log_rollouts:
                rlog.write(step, [_rollout_row(t, tok, step) for t in trajs[: cfg.log_rollouts]])
            if cfg.mode == "interleaved" and cfg.sft_every and (step + 1) % cfg.sft_every == 0:
                rec.update(_interleave(model, opt, tok, failed, cfg, rng))
        rec["time/step_s"] = time.time() - t0
        log.append(rec)
        if progress:
            progress(step, rec)
        if cfg.save_every and step % cfg.save_every == 0:  # checkpoint-0 too: the baseline for `analyze`
            last_ckpt = save_checkpoint(model, tok, out, step)
    last_ckpt = save_checkpoint(model, tok, out, cfg.steps)
    log.close()
    return last_ckpt


def _load(cfg: TrainConfig):
    if cfg.init:
        model, tok = tiny.load_pretrained(cfg.init)
    else:
        tok = tiny.build_tokenizer()
        model = tiny.build_model(tok, cfg.size, seed=cfg.seed)
    return model, tok


def sft_step(model, opt, tok, tasks, cfg: TrainConfig, rng: random.Random, lr: float | None = None) -> dict:
    seqs, masks = sft.oracle_batch(tok, tasks, retry_frac=cfg.retry_frac, rng=rng)
    batch = sft.collate(seqs, masks, tok.pad_token_id)
    previous = opt.param_groups[0]["lr"]
    if lr is not None:
        for g in opt.param_groups:
            g["lr"] = lr
    loss = sft.sft_loss(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    used = opt.param_groups[0]["lr"]
    opt.step()
    if lr is not None:
        for g in opt.param_groups:
            g["lr"] = previous
    return {"phase": "sft", "loss": float(loss.detach()), "grad_norm": float(gn), "lr": used}


def _interleave(model, opt, tok, failed: list[world.Task], cfg: TrainConfig, rng: random.Random) -> dict:
    """SFT on the ground truth of prompts that failed during RL (random tasks fill the batch)."""
    losses = []
    for _ in range(cfg.sft_steps):
        pool = failed[: cfg.sft_batch]
        fill = world.task_split("train_fill", cfg.sft_batch - len(pool), offset=rng.randrange(10**6),
                                run_seed=cfg.seed)
        m = sft_step(model, opt, tok, pool + fill, cfg, rng, lr=cfg.sft_lr or cfg.lr)
        losses.append(m["loss"])
    return {"sft/loss": sum(losses) / len(losses), "sft/steps": float(len(losses))}


def _rollout_metrics(trajs, tok, spec) -> dict:
    rewards = torch.tensor([t.reward for t in trajs])
    groups: dict[int, list[float]] = {}
    for t in trajs:
        groups.setdefault(t.group, []).append(t.reward)
    states: dict[str, int] = {}
    reasons: dict[str, int] = {}
    n_turns = 0
    for t in trajs:
        for text in t.episode.turns:
            v = classify_turn(text, spec)
            states[v.state.value] = states.get(v.state.value, 0) + 1
            reasons[v.reason] = reasons.get(v.reason, 0) + 1
            n_turns += 1
    n_turns = max(n_turns, 1)
    rec = {
        "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std(unbiased=False)),
        "reward/group_std_mean": float(sum(torch.tensor(g).std(unbiased=False) for g in groups.values()) / len(groups)),
        "success": sum(t.success for t in trajs) / len(trajs),
        "len/response_mean": sum(sum(t.gen_mask) for t in trajs) / len(trajs),
        "len/turns_mean": sum(len(t.episode.turns) for t in trajs) / len(trajs),
        "tools/calls_mean": sum(t.episode.n_calls for t in trajs) / len(trajs),
        "tools/errors_mean": sum(t.episode.n_errors for t in trajs) / len(trajs),
    }
    for s in ("healthy_tool_call", "healthy_response", "text_pollution", "full_collapse"):
        rec[f"fmt/{s}"] = states.get(s, 0) / n_turns
    rec["format_valid"] = rec["fmt/healthy_tool_call"] + rec["fmt/healthy_response"]
    for r, n in reasons.items():
        rec[f"fmt/reason/{r}"] = n / n_turns
    return rec


def _rollout_row(t, tok, step: int) -> dict:
    return {"step": step, "group": t.group, "task_seed": t.task.seed, "reward": t.reward, "success": t.success,
            "turns": list(t.episode.turns), "text": tok.decode(t.ids, skip_special_tokens=False)}


@torch.no_grad()
def evaluate(model, tok, *, n: int = 64, max_turns: int = 8, max_new_tokens: int = 40, offset: int = 0,
             system: str | None = None, parse=None, logits_processor=None) -> float:
    """Greedy success on held-out tasks (the eval split never overlaps training seeds)."""
    tasks = world.task_split("eval", n, offset=offset)
    trajs = rollout(model, tok, tasks, group_size=1, max_turns=max_turns, max_new_tokens=max_new_tokens,
                    greedy=True, system=system, parse=parse, logits_processor=logits_processor)
    return sum(t.success for t in trajs) / len(trajs)


def save_checkpoint(model, tok, out: Path, step: int) -> Path:
    """`checkpoint-N/` in the Hugging Face layout (safetensors), plus a small trainer_state.json."""
    path = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if path.exists():
        import shutil
        shutil.rmtree(path)
    tmp.rename(path)  # atomic: a reader never sees a half-written checkpoint
    return path
