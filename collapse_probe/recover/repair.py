"""SFT repair: how few supervised steps bring a collapsed checkpoint back, against a fresh model given the same.

If a handful of SFT steps on canonical oracle data restore the checkpoint while a randomly initialised model of
the same architecture needs many times more to reach the same success, the skill was latent: hidden behind the
format, not lost. The ratio of the two step counts is the latent-skill ratio.

Both runs see exactly the same data: a fixed pool of oracle conversations (train split, canonical format, no
retry traces), cycled in fixed-size batches, AdamW at the same learning rate, grad-clip 1.0, and greedy
canonical success on held-out tasks every `eval_every` steps.

Pool size matters: on the embedded tiny model a pool of 48 conversations (3 batches of 16) overfits within
10 steps at lr 1e-3 (held-out success peaks near 0.75, then sinks to 0.6), while 128-256 conversations bring
two synthetic collapses back to 0.9+ in about 10 steps. The default is 256 (16 batches of 16, each seen at most
about 3 times within 50 steps).
"""

from __future__ import annotations

import copy
import random
from typing import Any, Callable

import torch

from collapse_probe.capture.probe_set import ProbeSet
from collapse_probe.capture.stats import role_probs
from collapse_probe import world
from collapse_probe.schema import Position, Source
from collapse_probe.train.config import TrainConfig
from collapse_probe.train.evaluate import evaluate
from collapse_probe.train.sft import sft_step

Progress = Callable[[str, int, int], None]  # (phase, done, total)


def after_open_probs(model: torch.nn.Module, tok: Any, probe: ProbeSet | None = None) -> dict[str, float]:
    """Probe-set next-token probabilities right after `<tool_call>\\n`: {role: p} (from cp/probe/after_open/{role})."""
    probe = probe or ProbeSet.from_world(tok, n=16)
    return role_probs(probe.score(model), Source.PROBE, Position.AFTER_OPEN)


def fresh_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The same architecture and config, randomly re-initialised with a fixed seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    fresh = AutoModelForCausalLM.from_config(model.config)
    return fresh.to(dtype=next(model.parameters()).dtype)


def sft_until(model: torch.nn.Module, tok: Any, *, target: float, max_steps: int, eval_every: int = 5, lr: float = 1e-3,
              batch: int = 16, pool: int = 256, n: int = 32, max_turns: int = 8, seed: int = 0,
              phase: str = "repair", progress: Progress | None = None) -> dict:
    """SFT `model` in place on the oracle pool until greedy success >= target (checked every `eval_every`
    steps and after the last) or `max_steps`. Returns steps, success, reached, and the success curve."""
    tasks = world.task_split("repair", pool, run_seed=seed)
    cfg = TrainConfig(mode="sft", lr=lr, retry_frac=0.0, grad_clip=1.0, sft_batch=batch)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    model.train()
    curve: list[tuple[int, float]] = []
    success, reached, step = 0.0, False, 0
    cursor = 0
    for step in range(1, max_steps + 1):
        chunk = [tasks[(cursor + i) % len(tasks)] for i in range(batch)]
        cursor = (cursor + batch) % len(tasks)
        sft_step(model, opt, tok, chunk, cfg, rng)
        if step % eval_every == 0 or step == max_steps:
            success = evaluate(model, tok, n=n, max_turns=max_turns)
            curve.append((step, success))
            if success >= target:
                reached = True
        if progress:
            progress(phase, step, max_steps)
        if reached:
            break
    model.eval()
    return {"steps": step, "success": success, "reached": reached, "curve": curve}


def sft_repair(model: torch.nn.Module, tok: Any, *, max_steps: int = 50, eval_every: int = 5, target: float = 0.8,
               lr: float = 1e-3, batch: int = 16, pool: int = 256, n: int = 32, max_turns: int = 8, fresh: bool = True,
               fresh_max_steps: int = 300, seed: int = 0, success_before: float | None = None,
               progress: Progress | None = None) -> dict:
    """Repair a copy of `model` (the caller's model is not touched), then train a fresh model the same way
    until it reaches the repaired success. See the module docstring."""
    probe = ProbeSet.from_world(tok, n=16)
    work = copy.deepcopy(model)
    if success_before is None:
        success_before = evaluate(work, tok, n=n, max_turns=max_turns)
    p_before = after_open_probs(work, tok, probe)
    if success_before >= target:  # nothing to repair
        rep = {"steps": 0, "success": success_before, "reached": True, "curve": [(0, success_before)]}
    else:
        rep = sft_until(work, tok, target=target, max_steps=max_steps, eval_every=eval_every, lr=lr, batch=batch,
                        pool=pool, n=n, max_turns=max_turns, seed=seed, phase="repair", progress=progress)
    out = {
        "steps": rep["steps"], "success_before": success_before, "success_after": rep["success"],
        "reached_target": rep["reached"], "target": target, "max_steps": max_steps, "eval_every": eval_every,
        "lr": lr, "batch": batch, "pool": pool, "curve": rep["curve"],
        "p_after_open_before": p_before, "p_after_open_after": after_open_probs(work, tok, probe),
        "fresh_steps_to_same": None, "fresh_success": None, "fresh_success_at_budget": None,
        "fresh_max_steps": fresh_max_steps,
        "latent_skill_ratio": None, "latent_skill_ratio_is_lower_bound": False, "fresh_note": None,
    }
    del work
    if not fresh:
        out["fresh_note"] = "skipped"
        return out
    goal = rep["success"]
    if goal <= 0.0 or rep["steps"] == 0:
        out["fresh_note"] = ("repair reached 0 success: nothing for a fresh model to match" if goal <= 0.0 else
                             "the checkpoint needed no repair: nothing to compare")
        return out
    new = fresh_like(model, seed=seed)
    fr = sft_until(new, tok, target=goal, max_steps=fresh_max_steps, eval_every=eval_every, lr=lr, batch=batch,
                   pool=pool, n=n, max_turns=max_turns, seed=seed, phase="fresh", progress=progress)
    out["fresh_curve"] = fr["curve"]
    out["fresh_success"] = fr["success"]
    if fr["reached"]:
        out["fresh_steps_to_same"] = fr["steps"]
        out["latent_skill_ratio"] = fr["steps"] / max(rep["steps"], 1)
    else:
        out["fresh_success_at_budget"] = fr["success"]
        out["latent_skill_ratio"] = fresh_max_steps / max(rep["steps"], 1)
        out["latent_skill_ratio_is_lower_bound"] = True
    return out
