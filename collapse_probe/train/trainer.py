"""The reference trainer: SFT, multi-turn GRPO, and interleaved SFT+RL, with capture on by default.

Read top to bottom: `get_lr()`, `train()` (the loop), then the helpers it calls; every knob is a field of
`TrainConfig` (config.py), checked before anything is written.
A run directory holds `config.json`, `metrics.jsonl` (one record per step, appended and flushed), sampled
rollouts as text under `rollouts/`, and checkpoints `checkpoint-N/` in the Hugging Face layout.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch

from collapse_probe.capture.mismatch import watch_roles
from collapse_probe.capture.probe_set import ProbeSet
from collapse_probe.formats.classify import FormatSpec, StateMix, classify_turn
from collapse_probe.runs.runlog import RolloutLog, RunLog, lock_run_dir, unlock_run_dir
from collapse_probe.tokens import resolve_control_tokens
from collapse_probe.models import load as model_load
from collapse_probe.train import error_sft, grpo, hints, instruct, judge, offpolicy, sft, tiny
from collapse_probe import schema, world
from collapse_probe.train.config import Mode, Schedule, TrainConfig
from collapse_probe.train.engine import RolloutEngine
from collapse_probe.train.evaluate import evaluate
from collapse_probe.train.run_files import check_run_dir, remove_run_files
from collapse_probe.train.rollout import POLICY, Trajectory, rollout
from collapse_probe.train.update import ppo_update


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, times the schedule (cosine: from lr to 10% of lr at the last step)."""
    scale = 1.0
    if cfg.lr_schedule is Schedule.COSINE:
        scale = 0.1 + 0.45 * (1 + math.cos(math.pi * step / cfg.steps))
    if cfg.warmup_steps:
        scale *= min(1.0, (step + 1) / cfg.warmup_steps)
    return cfg.lr * scale


def train(cfg: TrainConfig, out_dir: str | Path, *, progress: Callable[[int, dict], None] | None = None,
          overwrite: bool = False) -> Path:
    """Run one training job into `out_dir`; returns the path of the last checkpoint. A directory that holds a
    run is refused unless `overwrite` (then its run files are replaced once the model has loaded)."""
    cfg.validate()  # fields may have been set after construction
    out = Path(out_dir)
    check_run_dir(out, cfg, overwrite=overwrite)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model, tok = _load(cfg)
    roles = resolve_control_tokens(tok)
    role_ids = roles.distinct_ids()
    probe = ProbeSet.from_world(tok, n=16) if cfg.probe_every else None
    reviewer = judge.make_judge(cfg.judge) if cfg.reflection else None  # a bad --judge fails before any write
    ref_model = None
    if cfg.kl_coef > 0:
        ref_model, _ = _load(cfg)
        ref_model.eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    engine = RolloutEngine.from_config(model, cfg)  # the sampler: the policy itself unless a mismatch source is set
    # only now, with the config checked and the model loaded, does the run directory change
    held = lock_run_dir(out)  # refuses a second writer before anything is removed or written
    try:
        if overwrite:
            remove_run_files(out)
        (out / "config.json").write_text(cfg.to_json())
        log, rlog = RunLog(out), RolloutLog(out)
    finally:
        unlock_run_dir(held)  # the RunLog holds it now (same process)
    failed: list[world.Task] = []
    round_ = error_sft.FailedPrompts()
    spec = FormatSpec.hermes()
    last_ckpt = out
    model.train()
    for step in range(cfg.steps + 1):
        t0 = time.time()
        rec: dict = {schema.STEP: step}
        if probe is not None and step % cfg.probe_every == 0:
            rec.update(probe.score(model))
        if cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps:
            rec[schema.EVAL_SUCCESS] = evaluate(model, tok, n=cfg.eval_tasks, max_turns=cfg.max_turns,
                                                max_new_tokens=cfg.max_new_tokens, harness=cfg.harness,
                                                user_turns=cfg.user_turns, abstain_frac=cfg.abstain_frac)
        if step == cfg.steps:  # the last record only measures; no update after it
            rec[schema.STEP_TIME] = time.time() - t0
            log.append(rec)
            break
        for g in opt.param_groups:
            g["lr"] = get_lr(step, cfg)
        if cfg.mode is Mode.SFT:
            tasks = world.task_split("train", cfg.sft_batch, offset=step * cfg.sft_batch, run_seed=cfg.seed,
                                     user_turns=cfg.user_turns, abstain_frac=cfg.abstain_frac)
            rec.update(sft.sft_step(model, opt, tok, tasks, cfg, rng))
        else:
            tasks = world.task_split("train", cfg.prompts_per_step, offset=step * cfg.prompts_per_step,
                                     run_seed=cfg.seed, user_turns=cfg.user_turns, abstain_frac=cfg.abstain_frac)
            metrics, trajs = grpo_step(model, opt, tok, tasks, cfg, step, ref_model=ref_model, role_ids=role_ids,
                                       engine=engine)
            rec.update(metrics)
            own = [t for t in trajs if t.source == POLICY]  # success and formats: the policy unaided
            rec.update(_rollout_metrics(own, spec))
            rec.update(_supervision_metrics(trajs))
            failed = ([t.task for t in own if not t.success] + failed)[:64]
            if cfg.log_rollouts:
                rlog.write(step, [_rollout_row(t, tok, step) for t in trajs[: cfg.log_rollouts]])
            if cfg.mode is Mode.INTERLEAVED and (step + 1) % cfg.sft_every == 0:
                rec.update(_interleave(model, opt, tok, failed, cfg, rng))
            if cfg.error_sft_every:
                round_.add(trajs)
                if (step + 1) % cfg.error_sft_every == 0:
                    rec.update(_error_sft(model, tok, round_.failures(cfg.harness), cfg, rng, reviewer))
                    round_.clear()
        rec[schema.STEP_TIME] = time.time() - t0
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
        model, tok = model_load.load_pretrained(cfg.init)
    else:  # the instruct mixture brings its own BPE merges (other syntaxes' punctuation)
        tok = tiny.build_tokenizer(instruct.instruct_corpus() if cfg.sft_data == "instruct" else None)
        model = tiny.build_model(tok, cfg.size, seed=cfg.seed)
    return model, tok


def sample_groups(model, tok, tasks: list[world.Task], cfg: TrainConfig, step: int, *,
                  engine: RolloutEngine | None = None, watch_ids: list[int] | None = None) -> list[Trajectory]:
    """One step's groups: G samples per task, of which `hint_samples` drawn with a hint (then stripped of it,
    their old log-probs recomputed without it: train/hints.py) and `offpolicy_samples` the oracle's (offpolicy.py).
    `engine` samples (train/engine.py; None: the policy `model` itself); `watch_ids` keeps its log-probs of those
    control columns (the mismatch capture)."""
    sampler = engine.model if engine is not None else model
    trajs = rollout(sampler, tok, tasks, group_size=cfg.group_size - cfg.offpolicy_samples, max_turns=cfg.max_turns,
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, reward=cfg.reward,
                    seed=cfg.seed * 100_003 + step, harness=cfg.harness, hinted=cfg.hint_samples,
                    hint_system=hints.hinted_system, top_p=cfg.rollout_top_p, top_k=cfg.rollout_top_k,
                    watch_ids=watch_ids)
    hinted = [hints.strip_hint(t, tok) for t in trajs if t.source == hints.SOURCE]
    for t, logp in zip(hinted, grpo.sequence_logp(model, hinted, pad_id=tok.pad_token_id,
                                                  temperature=cfg.temperature)):
        t.old_logp, t.watch_logq = logp, None  # the trainer's log-probs now: no sampler to compare
    if cfg.offpolicy_samples:
        trajs = offpolicy.add_oracle_samples(trajs, tok, tasks, per_group=cfg.offpolicy_samples,
                                             max_turns=cfg.max_turns, harness=cfg.harness, reward=cfg.reward)
    return trajs


def grpo_step(model, opt, tok, tasks: list[world.Task], cfg: TrainConfig, step: int, *, ref_model=None,
              role_ids: dict[str, int] | None = None, engine: RolloutEngine | None = None
              ) -> tuple[dict, list[Trajectory]]:
    """One GRPO step: the rollout engine takes the weights it samples with (stale by `rollout_lag`), samples the
    groups, then `ppo_update` (train/update.py: old log-probs, correction, mini-batches) on their group-normalised
    advantages. Returns the metrics (capture, gradient pressure and mismatch included) and the trajectories."""
    if engine is not None:
        engine.sync(model, step)
    watch = watch_roles(role_ids)[1] if role_ids else None
    trajs = sample_groups(model, tok, tasks, cfg, step, engine=engine, watch_ids=watch)
    adv = grpo.group_advantages(trajs)
    metrics = ppo_update(model, opt, trajs, adv, pad_id=tok.pad_token_id, grad_clip=cfg.grad_clip,
                         clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef, ref_model=ref_model,
                         temperature=cfg.temperature, role_ids=role_ids, mini_batches=cfg.ppo_mini_batches,
                         old_logp=cfg.old_logp, correction=cfg.rollout_correction,
                         correction_threshold=cfg.rollout_correction_threshold)
    metrics.update({schema.PHASE: "rl", schema.LR: opt.param_groups[0]["lr"]})
    return metrics, trajs


def _interleave(model, opt, tok, failed: list[world.Task], cfg: TrainConfig, rng: random.Random) -> dict:
    """SFT on the ground truth of prompts that failed during RL (random tasks fill the batch)."""
    losses = []
    for _ in range(cfg.sft_steps):
        pool = failed[: cfg.sft_batch]
        fill = world.task_split("train_fill", cfg.sft_batch - len(pool), offset=rng.randrange(10**6),
                                run_seed=cfg.seed)
        m = sft.sft_step(model, opt, tok, pool + fill, cfg, rng, lr=cfg.sft_lr or cfg.lr)
        losses.append(m[schema.LOSS])
    return {schema.SFT_LOSS: sum(losses) / len(losses), schema.SFT_STEPS: float(len(losses))}


def _error_sft(model, tok, failures: list[error_sft.Failure], cfg: TrainConfig, rng: random.Random,
               reviewer) -> dict:
    """Between RL rounds: `error_sft_epochs` passes of SFT over the round's failures (erroneous examples, plus
    reflections when on), with an optimizer of its own (error_sft.py says why); the RL optimizer is untouched."""
    examples = [error_sft.erroneous_example(tok, f) for f in failures]
    if reviewer is not None:
        examples += [judge.reflection_example(tok, f, reviewer) for f in failures]
    rec: dict = {schema.ERROR_SFT_EXAMPLES: float(len(examples))}
    if not examples:
        return rec
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.error_sft_lr or cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.99))
    losses = []
    for _ in range(cfg.error_sft_epochs):
        order = rng.sample(examples, len(examples))
        for i in range(0, len(order), cfg.sft_batch):
            batch = order[i:i + cfg.sft_batch]
            losses.append(sft.sft_update(model, opt, tok, [b[0] for b in batch], [b[1] for b in batch], cfg)[schema.LOSS])
    rec.update({schema.ERROR_SFT_LOSS: sum(losses) / len(losses), schema.ERROR_SFT_STEPS: float(len(losses))})
    return rec


def _supervision_metrics(trajs) -> dict:
    rec = {}
    for source in (hints.SOURCE, offpolicy.SOURCE):
        sel = [t for t in trajs if t.source == source]
        if sel:
            rec[schema.source_success_key(source)] = sum(t.success for t in sel) / len(sel)
    return rec


def _rollout_metrics(trajs, spec) -> dict:
    rewards = torch.tensor([t.reward for t in trajs])
    groups: dict[int, list[float]] = {}
    for t in trajs:
        groups.setdefault(t.group, []).append(t.reward)
    mix = StateMix()
    for t in trajs:
        for text in t.episode.turns:
            mix.add(classify_turn(text, spec, user_message=t.task.question))
    n = len(trajs)
    rec = {
        schema.REWARD_MEAN: float(rewards.mean()), schema.REWARD_STD: float(rewards.std(unbiased=False)),
        schema.REWARD_GROUP_STD: float(sum(torch.tensor(g).std(unbiased=False) for g in groups.values()) / len(groups)),
        schema.SUCCESS: sum(t.success for t in trajs) / n,
        schema.RESPONSE_LEN: sum(sum(t.gen_mask) for t in trajs) / n,
        schema.TURNS_MEAN: sum(len(t.episode.turns) for t in trajs) / n,
        schema.TOOL_CALLS: sum(t.episode.n_calls for t in trajs) / n,
        schema.TOOL_ERRORS: sum(t.episode.n_errors for t in trajs) / n,
    }
    if mix.total:
        rec.update(mix.metrics())
        rec[schema.FORMAT_VALID] = mix.healthy_fraction()
    return rec


def _rollout_row(t, tok, step: int) -> dict:
    return {"step": step, "group": t.group, "task_seed": t.task.seed, "reward": t.reward, schema.SUCCESS: t.success,
            "turns": list(t.episode.turns), "text": tok.decode(t.ids, skip_special_tokens=False)}


def save_checkpoint(model, tok, out: Path, step: int) -> Path:
    """`checkpoint-N/` in the Hugging Face layout (safetensors), plus a small trainer_state.json."""
    path = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    with model_load.quiet_transformers():
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if path.exists():
        import shutil
        shutil.rmtree(path)
    tmp.rename(path)  # atomic: a reader never sees a half-written checkpoint
    return path
