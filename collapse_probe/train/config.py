"""Every knob of the reference trainer, typed and checked in one place.

`TrainConfig` is what `train()` reads. Each field declares its type (int, float, str, an enum, or Optional of
one) and, in its metadata, its range: `ge` (>=), `gt` (>), `le` (<=), `choices` (allowed strings). The reward
is a nested `world.RewardSpec` whose fields carry the same metadata. `validate()` (run on construction, by
`dataclasses.replace`, and again by `train()`) checks them all and raises `UserError` with one line naming the
field, the bad value and what is allowed.

`apply_overrides(cfg, ["steps=20", "reward.tag_bonus=0"])` is `--set KEY=VALUE`: each VALUE is parsed by
its field's declared type. `to_json()` / `from_json()` write and read a run's config.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from collapse_probe.errors import UserError
from collapse_probe.world import RewardSpec

ROLLOUT_DTYPES = ("fp32", "bf16", "fp16")
CORRECTIONS = ("none", "token_tis", "seq_tis", "seq_mis", "geo_mis")  # train/correction.py defines them
WEIGHTED_CORRECTIONS = ("token_tis", "seq_tis", "seq_mis")  # importance weights (geo_mis only masks)

SIZES = {  # name: (hidden, layers, heads)
    "tiny": (128, 2, 4),
    "small": (128, 4, 4),
    "base": (256, 4, 8),
}


class Mode(str, Enum):
    SFT = "sft"
    GRPO = "grpo"
    INTERLEAVED = "interleaved"  # GRPO plus SFT steps on the prompts that failed


class Schedule(str, Enum):
    CONSTANT = "constant"
    COSINE = "cosine"  # from lr down to 10% of lr at the last step


def _knob(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
          choices: tuple[str, ...] | None = None) -> Any:
    meta = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("choices", choices)) if v is not None}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    mode: Mode = Mode.GRPO
    steps: int = _knob(60, ge=1)
    seed: int = _knob(0, ge=0)
    init: str | None = None  # a checkpoint dir to start from, or None: build the tiny model
    size: str = _knob("small", choices=tuple(SIZES))  # tiny model size when built from scratch
    lr: float = _knob(1e-3, gt=0)
    lr_schedule: Schedule = Schedule.CONSTANT
    warmup_steps: int = _knob(0, ge=0)  # linear warm-up: keeps Adam's first, outsized updates from wrecking a policy
    weight_decay: float = _knob(0.0, ge=0)
    grad_clip: float = _knob(1.0, gt=0)
    threads: int = _knob(2, ge=1)
    # SFT
    sft_batch: int = _knob(32, ge=1)
    retry_frac: float = _knob(0.1, ge=0, le=1)  # oracle traces holding one "empty call -> tool error -> retry"
    # "oracle": hermes oracle trajectories; "instruct": the multi-syntax mixture plus plain Q/A (train/instruct.py)
    sft_data: str = _knob("oracle", choices=("oracle", "instruct"))
    # GRPO
    prompts_per_step: int = _knob(8, ge=1)
    group_size: int = _knob(8, ge=2)  # group-normalised advantages need two samples to compare
    temperature: float = _knob(1.0, gt=0)
    clip_eps: float = _knob(0.2, gt=0)
    kl_coef: float = _knob(0.0, ge=0)
    max_turns: int = _knob(8, ge=1)
    harness: str = _knob("strict", choices=("strict", "paper"))  # world.episode: what a malformed turn does
    max_new_tokens: int = _knob(40, ge=1)
    reward: RewardSpec = field(default_factory=RewardSpec)
    # interleaved SFT+RL: every `sft_every` RL steps, `sft_steps` SFT steps on oracle data of failed prompts
    sft_every: int = _knob(0, ge=0)
    sft_steps: int = _knob(1, ge=1)
    sft_lr: float | None = _knob(None, gt=0)  # None: the RL learning rate
    # supervisory signals (the paper's fixes; docs in train/offpolicy.py, hints.py, error_sft.py, judge.py)
    offpolicy_samples: int = _knob(0, ge=0)  # of each group's samples, this many are the oracle's trajectory
    hint_samples: int = _knob(0, ge=0)  # this many are sampled with a hint in the system prompt
    error_sft_every: int = _knob(0, ge=0)  # RL round length; after each, SFT on the failed prompts' turns
    error_sft_epochs: int = _knob(2, ge=1)  # passes over the round's examples (the paper: 2 epochs)
    error_sft_lr: float | None = _knob(None, gt=0)  # None: the RL learning rate
    reflection: bool = False  # add a judge's analysis of each failure to the error SFT
    judge: str | None = None  # a local HF causal LM that writes the analysis (None: the rule judge)
    # the rollout engine (train/engine.py): the sampler is not the trainer. Defaults: the policy samples itself
    rollout_top_p: float = _knob(1.0, gt=0, le=1)  # nucleus sampling; the trainer's log-probs stay full-distribution
    rollout_top_k: int = _knob(0, ge=0)  # 0: off
    rollout_dtype: str = _knob("fp32", choices=ROLLOUT_DTYPES)  # a bf16/fp16 copy samples; the trainer stays fp32
    rollout_lag: int = _knob(0, ge=0)  # the sampler's weights are this many steps stale (asynchronous RL)
    # "rollout": the sampler's log-probs are the PPO old log-probs (the ratio corrects for it); "recompute": the
    # trainer's own before the update, as verl computes them (nothing corrects for the sampler unless a correction)
    old_logp: str = _knob("rollout", choices=("rollout", "recompute"))
    ppo_mini_batches: int = _knob(1, ge=1)  # optimizer steps a training step, on equal mini-batches (clipped)
    rollout_correction: str = _knob("none", choices=CORRECTIONS)  # train/correction.py (verl's rollout correction)
    rollout_correction_threshold: float | None = _knob(None, gt=1)  # None: the correction's default (correction.py)
    # --- the paper's task structure (issue 23; world/tasks.py make_task): off by default ---
    user_turns: int = _knob(1, ge=1, le=8)  # an episode holds 1..N user turns in sequence (BFCL multi-turn)
    abstain_frac: float = _knob(0.0, ge=0, le=1)  # user turns whose right action is to call nothing (miss_*)
    # --- end of the task-structure block ---
    # logging
    eval_every: int = _knob(0, ge=0)  # greedy held-out success every N steps (0: only at the end)
    eval_tasks: int = _knob(64, ge=1)
    probe_every: int = _knob(5, ge=0)  # fixed probe set every N steps (0: off)
    save_every: int = _knob(10, ge=0)  # checkpoint-N/ every N steps (0: only the last)
    log_rollouts: int = _knob(8, ge=0)  # sampled conversations written as text per step

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (normalising enum strings to enums and ints to floats where a float is declared);
        the config stays mutable, so `train()` calls this again before it writes anything."""
        hints = _hints(TrainConfig)
        for f in dataclasses.fields(self):
            if f.name != "reward":
                setattr(self, f.name, _check(f.name, hints[f.name], f.metadata, getattr(self, f.name)))
        self.reward = _checked_reward(self.reward)
        if self.mode is Mode.INTERLEAVED and self.sft_every < 1:
            raise UserError(f"mode interleaved needs sft_every >= 1 (SFT steps every N RL steps), got "
                            f"{self.sft_every}")
        if self.offpolicy_samples + self.hint_samples >= self.group_size:
            raise UserError(f"offpolicy_samples ({self.offpolicy_samples}) + hint_samples ({self.hint_samples}) "
                            f"must be < group_size ({self.group_size}): a group needs a sample of the policy's own")
        if self.reflection and self.error_sft_every < 1:
            raise UserError("reflection needs error_sft_every >= 1: its SFT runs between RL rounds")
        if self.judge is not None and not self.reflection:
            raise UserError("judge is the model that writes reflections: set reflection=true with it")
        if self.judge is not None:
            check_judge_path(self.judge)
        batch = self.prompts_per_step * self.group_size
        if batch % self.ppo_mini_batches:
            raise UserError(f"ppo_mini_batches {self.ppo_mini_batches} does not divide the batch of {batch} "
                            f"trajectories (prompts_per_step x group_size): choose a divisor of {batch}")
        if self.rollout_correction in WEIGHTED_CORRECTIONS and self.old_logp != "recompute":
            raise UserError(f"rollout_correction {self.rollout_correction} weighs by p_train / q_rollout, which "
                            f"needs old_logp=recompute (with old_logp=rollout the PPO ratio is already p / q)")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values: enums as their strings, the reward as a dict."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in _FIELDS_WRITTEN_WHEN_SET or getattr(self, f.name) != f.default}
        out = {k: v.value if isinstance(v, Enum) else v for k, v in out.items()}
        out["reward"] = _reward_dict(self.reward)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any) -> TrainConfig:
        if not isinstance(data, dict):
            raise UserError(f"a train config is an object of fields, got {type(data).__name__}")
        unknown = [k for k in data if k not in _field_names(cls)]
        if unknown:
            raise UserError(f"unknown field {unknown[0]!r}; fields are {', '.join(_field_names(cls))}")
        values = dict(data)
        if "reward" in values:
            values["reward"] = _reward_from_dict(values["reward"])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"a train config must be JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data)


def check_judge_path(path: str | Path) -> None:
    """A judge must be a local Hugging Face model directory: refused in one line before any training starts."""
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"--judge {path}: no model there (expected a Hugging Face model directory with "
                        f"config.json and *.safetensors); pass a local causal LM or leave judge unset")


# Fields added after the first configs were written appear in config.json only when set away from their default,
# so older configs, and the cached models' keys (a hash of to_json), stay as they were.
_FIELDS_WRITTEN_WHEN_SET = ("sft_data", "harness", "offpolicy_samples", "hint_samples", "error_sft_every",
                            "error_sft_epochs", "error_sft_lr", "reflection", "judge", "rollout_top_p",
                            "rollout_top_k", "rollout_dtype", "rollout_lag", "old_logp", "ppo_mini_batches",
                            "rollout_correction", "rollout_correction_threshold")
_FIELDS_WRITTEN_WHEN_SET += ("user_turns", "abstain_frac")  # the task-structure block (issue 23)


def apply_overrides(cfg: TrainConfig, items: list[str]) -> TrainConfig:
    """A new config with `--set KEY=VALUE` items applied (`reward.NAME=VALUE` reaches into the reward); each
    VALUE is parsed by its field's declared type, `none` for an Optional field."""
    hints = _hints(TrainConfig)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    changes: dict[str, Any] = {}
    reward: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        try:
            if not sep or not key:
                raise UserError("expected KEY=VALUE, e.g. --set group_size=4")
            if key == "reward":
                raise UserError("reward is a group: set its fields as reward.NAME=VALUE")
            if key.startswith("reward."):
                name = key[len("reward."):]
                reward[name] = _parse_reward_field(name, raw)
            elif key in fields:
                changes[key] = _check(key, hints[key], fields[key].metadata, _parse(hints[key], raw), raw)
            else:
                raise UserError(f"unknown field {key!r}; fields are {', '.join(fields)}")
        except UserError as exc:
            raise UserError(f"--set {item}: {exc}") from None
    if reward:
        changes["reward"] = dataclasses.replace(cfg.reward, **reward)
    return dataclasses.replace(cfg, **changes)  # runs validate(): cross-field checks see every override


# ----------------------------------------------------------------------------------------------- reward
# max_bonus_tags joined the reward after the first configs were written: it is written only when set away from
# its default, so those configs (and the sft cache key, a hash of to_json) serialise as before.
_WRITTEN_WHEN_SET = ("max_bonus_tags",)


def _reward_dict(reward: RewardSpec) -> dict[str, Any]:
    defaults = {f.name: f.default for f in dataclasses.fields(RewardSpec)}
    return {k: v for k, v in dataclasses.asdict(reward).items() if k not in _WRITTEN_WHEN_SET or v != defaults[k]}


def _reward_from_dict(data: Any) -> RewardSpec:
    if not isinstance(data, dict):
        raise UserError(f"reward takes an object of reward fields ({', '.join(_field_names(RewardSpec))}), "
                        f"got {data!r}")
    for name in data:
        _reward_field(name)
    return RewardSpec(**data)


def _reward_field(name: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(RewardSpec)}
    if name not in fields:
        raise UserError(f"unknown reward field {name!r}; reward fields are {', '.join(fields)}")
    return fields[name]


def _parse_reward_field(name: str, raw: str) -> Any:
    f = _reward_field(name)
    hint = _hints(RewardSpec)[name]
    return _check(f"reward.{name}", hint, f.metadata, _parse(hint, raw), raw)


def _checked_reward(reward: Any) -> RewardSpec:
    if not isinstance(reward, RewardSpec):
        raise UserError(f"reward takes a RewardSpec (fields {', '.join(_field_names(RewardSpec))}), got {reward!r}")
    hints = _hints(RewardSpec)
    checked = {f.name: _check(f"reward.{f.name}", hints[f.name], f.metadata, getattr(reward, f.name))
               for f in dataclasses.fields(RewardSpec)}
    return dataclasses.replace(reward, **checked)


# ----------------------------------------------------------------------------------------------- typed fields
def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the base type, whether None is allowed) of `T` or `T | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _parse(hint: Any, raw: str) -> Any:
    """A --set string as the declared type; a string that does not parse is returned as is, so the check
    that follows reports it."""
    base, optional = _unwrap(hint)
    text = raw.strip()
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]
        if base is int:
            return int(text)
        if base is float:
            return float(text)
    except (KeyError, ValueError):
        return raw
    return text


def _check(label: str, hint: Any, meta: typing.Mapping[str, Any], value: Any, raw: str | None = None) -> Any:
    """`value` normalised to the declared type, or a UserError naming `label`, the value (as the user typed it,
    `raw`, when it parsed) and what is allowed."""
    base, optional = _unwrap(hint)
    if value is None and optional:
        return None
    ok, out = _coerce(base, meta, value)
    if not ok:
        shown = raw.strip() if raw is not None and not isinstance(value, str) else repr(value)
        raise UserError(f"{label} {_allowed(base, optional, meta)}, got {shown}")
    return out


def _coerce(base: Any, meta: typing.Mapping[str, Any], value: Any) -> tuple[bool, Any]:
    if isinstance(base, type) and issubclass(base, Enum):
        if isinstance(value, base):
            return True, value
        return (True, base(value)) if value in [m.value for m in base] else (False, None)
    if base is bool:
        return isinstance(value, bool), value
    if isinstance(value, bool):  # a bool is an int to Python, never to a config
        return False, None
    if base is int:
        return isinstance(value, int) and _in_range(value, meta), value
    if base is float:
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False, None
        return _in_range(float(value), meta), float(value)
    if base is str:
        return isinstance(value, str) and value in meta.get("choices", (value,)), value
    raise TypeError(f"config fields of type {base!r} are not supported")


def _in_range(x: float, meta: typing.Mapping[str, Any]) -> bool:
    return (("ge" not in meta or x >= meta["ge"]) and ("gt" not in meta or x > meta["gt"])
            and ("le" not in meta or x <= meta["le"]))


def _allowed(base: Any, optional: bool, meta: typing.Mapping[str, Any]) -> str:
    """What a field takes, in words: 'takes an integer >= 1', 'must be one of tiny, small, base'."""
    none = ", or none" if optional else ""
    if isinstance(base, type) and issubclass(base, Enum):
        return f"must be one of {', '.join(m.value for m in base)}{none}"
    if "choices" in meta:
        return f"must be one of {', '.join(meta['choices'])}{none}"
    if base is bool:
        return f"takes true or false{none}"
    kind = {int: "an integer", float: "a number", str: "a string"}[base]
    if "ge" in meta and "le" in meta:
        bounds = f" in [{meta['ge']}, {meta['le']}]"
    elif "gt" in meta and "le" in meta:
        bounds = f" in ({meta['gt']}, {meta['le']}]"
    else:
        bounds = "".join(f" {op} {meta[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<=")) if k in meta)
    return f"takes {kind}{bounds}{' or none' if optional else ''}"
