"""Named training presets that make the phenomenon reproducible on a CPU.

    sft            from scratch to a competent tool user (oracle data, a few "empty call -> retry" traces)
    grpo-collapse  GRPO from the SFT model with a per-turn format bonus for opening a tool call and a high
                   learning rate: the end-of-turn token after `<tool_call>\\n` spikes, turns become a bare tag,
                   success falls
    grpo-stable    same start, outcome-only reward (as in the paper), gentler learning rate, KL anchor
    interleaved    grpo-collapse's settings plus one SFT step on failed prompts every 2 RL steps

The RL presets start from the `sft` result: trained on first use and cached (keyed by the SFT config), or
`--init DIR`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Callable

from collapse_probe.errors import UserError
from collapse_probe.train.config import Mode, Schedule, TrainConfig
from collapse_probe.world import RewardSpec

# Outcome reward plus a per-turn format bonus for opening a tool call: a turn that is only `<tool_call>` then
# end-of-turn collects the bonus and gets an error observation, so GRPO can farm it (the bare-tag shortcut).
_BONUS_REWARD = RewardSpec(correct=1.0, wrong=0.0, no_answer=0.0, tag_bonus=0.5, max_bonus_tags=12)
_OUTCOME_REWARD = RewardSpec(correct=1.0, wrong=0.0, no_answer=0.0, tag_bonus=0.0, max_bonus_tags=12)
_RL = dict(steps=50, warmup_steps=10, max_turns=12, eval_every=0, probe_every=5, save_every=5)

PRESETS: dict[str, TrainConfig] = {
    "sft": TrainConfig(mode=Mode.SFT, size="tiny", steps=500, lr=3e-3, lr_schedule=Schedule.COSINE, sft_batch=32,
                       retry_frac=0.1, eval_every=100, probe_every=25, save_every=0),
    "grpo-collapse": TrainConfig(mode=Mode.GRPO, lr=5e-4, reward=_BONUS_REWARD, **_RL),
    "grpo-stable": TrainConfig(mode=Mode.GRPO, lr=2e-4, kl_coef=0.05, reward=_OUTCOME_REWARD, **_RL),
    "interleaved": TrainConfig(mode=Mode.INTERLEAVED, lr=5e-4, reward=_BONUS_REWARD, sft_every=2, sft_steps=1,
                               sft_lr=5e-4, **_RL),
}


def get_preset(name: str, **overrides: Any) -> TrainConfig:
    """A fresh copy of preset `name` with the given fields replaced (None: keep the preset's value); the copy
    is validated like any config, so a bad override raises UserError naming the field."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def cache_dir() -> Path:
    return Path(os.environ.get("COLLAPSE_PROBE_CACHE", Path.home() / ".cache" / "collapse-probe"))


def sft_checkpoint(*, progress: Callable[[int, dict], None] | None = None, steps: int | None = None) -> Path:
    """The cached SFT model every RL preset starts from; trained (seed 0) on first use."""
    cfg = get_preset("sft", steps=steps)
    key = hashlib.sha1(cfg.to_json().encode()).hexdigest()[:10]
    run = cache_dir() / f"sft-{key}"
    ckpt = run / f"checkpoint-{cfg.steps}"
    if (ckpt / "model.safetensors").exists():
        return ckpt
    from collapse_probe.train.trainer import train  # torch: only when a model is trained

    if run.exists():  # a killed earlier attempt: start clean, the log is append-only otherwise
        import shutil
        shutil.rmtree(run)
    return train(cfg, run, progress=progress)
