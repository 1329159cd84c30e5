"""Named training presets that make the phenomenon reproducible on a CPU.

    sft               from scratch to a competent tool user (oracle data, a few "empty call -> retry" traces)
    instruct          the multi-syntax mixture (train/instruct.py) on top of the sft model: the tiny model's
                      "Qwen2.5-Instruct", able in four call syntaxes. Two stages because on 2 cores a model
                      trained on the mixture from scratch stays on its loss plateau (validity 1.0, content 0.03
                      after 600 steps at lr 3e-3): the copying skill is learned on one syntax first
    instruct-paper    the instruct mixture with the paper's task structure: episodes of 1-5 user turns, 20% of
                      turns abstaining (a tool withheld or nobody named: call nothing; world/tasks.py)
    instruct-sft      tool SFT (canonical oracle data) of the instruct model: the paper's SFT-first start
    grpo-outcome      the paper's collapse: GRPO from the instruct model, binary 0/1 outcome reward, no format
                      term, the paper-like harness (world.episode PAPER), up to 30 turns
    grpo-outcome-sft  the same RL from instruct-sft (the paper's SFT-first arm, expected stabler)
    grpo-collapse     a second collapse form, format-bonus reward hacking: GRPO from the sft model with a
                      per-turn bonus for opening a tool call; the bare-tag turn farms the bonus (12 x 0.5
                      beats a correct answer's 1.0 + 2-4 x 0.5), so the spike is GRPO maximising the reward
    grpo-stable       from sft, outcome-only reward, gentler learning rate, KL anchor
    interleaved       grpo-collapse's settings plus one SFT step on failed prompts every 2 RL steps

Every preset but `sft` starts from another preset's result (`START`), trained on first use and
cached (keyed by the config chain), or from `--init DIR`.
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

_PAPER_RL = dict(steps=60, warmup_steps=5, max_turns=30, harness="paper", eval_every=0, probe_every=5, save_every=5)

PRESETS: dict[str, TrainConfig] = {
    "sft": TrainConfig(mode=Mode.SFT, size="tiny", steps=500, lr=3e-3, lr_schedule=Schedule.COSINE, sft_batch=32,
                       retry_frac=0.1, eval_every=100, probe_every=25, save_every=0),
    "instruct": TrainConfig(mode=Mode.SFT, steps=300, lr=2e-3, lr_schedule=Schedule.COSINE, sft_batch=16,
                            retry_frac=0.05, sft_data="instruct", eval_every=0, probe_every=0, save_every=0),
    # the paper's task structure (issue 23): the same mixture over episodes of 1-5 user turns, 20% of turns abstaining
    "instruct-paper": TrainConfig(mode=Mode.SFT, steps=300, lr=2e-3, lr_schedule=Schedule.COSINE, sft_batch=16,
                                  retry_frac=0.05, sft_data="instruct", user_turns=5, abstain_frac=0.2,
                                  eval_every=0, probe_every=0, save_every=0),
    "instruct-sft": TrainConfig(mode=Mode.SFT, steps=100, lr=1e-3, lr_schedule=Schedule.COSINE, sft_batch=32,
                                retry_frac=0.05, eval_every=0, probe_every=0, save_every=0),
    "grpo-outcome": TrainConfig(mode=Mode.GRPO, lr=5e-4, reward=_OUTCOME_REWARD, **_PAPER_RL),
    "grpo-outcome-sft": TrainConfig(mode=Mode.GRPO, lr=5e-4, reward=_OUTCOME_REWARD, **_PAPER_RL),
    "grpo-collapse": TrainConfig(mode=Mode.GRPO, lr=5e-4, reward=_BONUS_REWARD, **_RL),
    "grpo-stable": TrainConfig(mode=Mode.GRPO, lr=2e-4, kl_coef=0.05, reward=_OUTCOME_REWARD, **_RL),
    "interleaved": TrainConfig(mode=Mode.INTERLEAVED, lr=5e-4, reward=_BONUS_REWARD, sft_every=2, sft_steps=1,
                               sft_lr=5e-4, **_RL),
}


# preset -> the preset whose model it starts from (absent: built from scratch)
START: dict[str, str] = {"instruct": "sft", "instruct-paper": "sft", "instruct-sft": "instruct", "grpo-outcome": "instruct", "grpo-outcome-sft": "instruct-sft",
                         "grpo-collapse": "sft", "grpo-stable": "sft", "interleaved": "sft"}


def get_preset(name: str, **overrides: Any) -> TrainConfig:
    """A fresh copy of preset `name` with the given fields replaced (None: keep the preset's value); the copy
    is validated like any config, so a bad override raises UserError naming the field."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def cache_dir() -> Path:
    return Path(os.environ.get("COLLAPSE_PROBE_CACHE", Path.home() / ".cache" / "collapse-probe"))


def sft_checkpoint(*, progress: Callable[[int, dict], None] | None = None, steps: int | None = None) -> Path:
    """The cached SFT model the format-bonus presets start from; trained (seed 0) on first use."""
    return cached_model("sft", progress=progress, steps=steps)


def start_chain(preset: str) -> list[str]:
    """The presets whose models `preset` starts from, the first one built from scratch: ["instruct",
    "instruct-sft"] for grpo-outcome-sft, [] for sft."""
    chain: list[str] = []
    while preset in START:
        preset = START[preset]
        chain.insert(0, preset)
    return chain


def is_cached(name: str) -> bool:
    """Whether `cached_model(name)` would return at once (every preset of its chain trained already)."""
    return (_cache_entry(name)[1] / "model.safetensors").exists()


def cached_model(name: str, *, progress: Callable[[int, dict], None] | None = None,
                 steps: int | None = None, threads: int | None = None) -> Path:
    """The last checkpoint of preset `name` trained with seed 0, from the cache or trained now (and the presets
    it starts from, first). The key hashes the config chain, so a changed preset trains afresh."""
    cfg, ckpt = _cache_entry(name, steps)
    if (ckpt / "model.safetensors").exists():
        return ckpt
    run = ckpt.parent
    if name in START:
        cfg.init = str(cached_model(START[name], threads=threads))
    if threads is not None:  # not part of the key: on a busy machine one thread can be the faster choice
        cfg.threads = threads
    from collapse_probe.train.trainer import train  # torch: only when a model is trained

    if run.exists():  # a killed earlier attempt: start clean, the log is append-only otherwise
        import shutil
        shutil.rmtree(run)
    return train(cfg, run, progress=progress)


def _cache_entry(name: str, steps: int | None = None) -> tuple[TrainConfig, Path]:
    """(config, last checkpoint path) of preset `name` in the cache; the key hashes the config and, for a preset
    that starts from another, that one's key (not its path: the cache may move)."""
    cfg = get_preset(name, steps=steps)
    key_text = cfg.to_json()
    if name in START:
        key_text += "\nstart:" + _cache_entry(START[name])[1].parent.name
    run = cache_dir() / f"{name}-{hashlib.sha1(key_text.encode()).hexdigest()[:10]}"
    return cfg, run / f"checkpoint-{cfg.steps}"
