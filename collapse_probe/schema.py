"""The record schema: every metric key a run log holds, built and parsed here and nowhere else.

A record is a flat dict with `"step": int`, `"time": float` and '/'-separated keys (like TRL and verl logging):

    cp/{source}/{position}/{role}     mean next-token probability of a control role at a decision position
    cp/{source}/{position}/entropy    mean next-token entropy (nats) at those positions
    cp/{source}/{position}/count      how many decision positions were measured
    cp/{source}/entropy               mean token entropy over the whole sequence
    cp/{source}/{position}/{role}/chain[_count]  a multi-token role's whole-sequence probability where it follows
    gp/{position}/{role}/{part}       gradient pressure adv * (1[k = sampled] - p_k), part "chosen" or "other"
    fmt/{state}                       fraction of sampled assistant turns in each format state
    fmt/reason/{code}                 fraction of turns with each reason code (codes: formats.reasons)

plus the trainer metrics named below (`success`, `reward/mean`, ...). Role names come from tokens.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Source(str, Enum):
    """Where a capture comes from: the model's own sequences in the training forward, or a fixed probe set."""

    ROLLOUT = "rollout"
    PROBE = "probe"


class Position(str, Enum):
    """Decision positions: places where the next token decides the structure of a turn."""

    AFTER_OPEN = "after_open"    # right after the tool-call opening tag (and its newline)
    TURN_START = "turn_start"    # the first token of a generated assistant turn
    AFTER_CLOSE = "after_close"  # right after the tool-call closing tag
    JSON_BODY = "json_body"      # right after the JSON body opens inside a call


class FormatState(str, Enum):
    """The four output states of Hao et al. (arXiv 2606.26027)."""

    HEALTHY_TOOL_CALL = "healthy_tool_call"
    HEALTHY_RESPONSE = "healthy_response"
    TEXT_POLLUTION = "text_pollution"
    FULL_COLLAPSE = "full_collapse"


class Part(str, Enum):
    """The two halves of the gradient pressure on a control logit."""

    CHOSEN = "chosen"  # from samples that chose the token
    OTHER = "other"    # from samples that chose another token


POSITIONS: tuple[str, ...] = tuple(p.value for p in Position)
STATES: tuple[str, ...] = tuple(s.value for s in FormatState)
BROKEN_STATES: tuple[FormatState, ...] = (FormatState.FULL_COLLAPSE, FormatState.TEXT_POLLUTION)
HEALTHY_STATES: tuple[FormatState, ...] = (FormatState.HEALTHY_TOOL_CALL, FormatState.HEALTHY_RESPONSE)
SUMMARY_STATS = ("entropy", "count")  # suffixes of cp/{source}/{position}/ that are not roles

# Trainer metrics (the names TRL/verl users would expect; verl's own names are mapped on read).
STEP, TIME = "step", "time"
SUCCESS = "success"
REWARD_MEAN = "reward/mean"
REWARD_STD = "reward/std"
REWARD_GROUP_STD = "reward/group_std_mean"
FORMAT_VALID = "format_valid"
ENTROPY = "entropy"
KL = "kl"
GRAD_NORM = "grad_norm"
LOSS = "loss"
LR = "lr"
PHASE = "phase"
EVAL_SUCCESS = "eval/success"
STEP_TIME = "time/step_s"

# Other trainers' names for our metrics, read when ours are absent (verl's file logger; TRL's are mapped on read
# by integrations/hf_output.py). verl's `critic/score/mean` is the mean outcome score: success under 0/1 rewards.
METRIC_ALIASES: dict[str, tuple[str, ...]] = {
    SUCCESS: ("critic/score/mean",), REWARD_MEAN: ("critic/rewards/mean",), ENTROPY: ("actor/entropy",),
    GRAD_NORM: ("actor/grad_norm",), KL: ("actor/ppo_kl",),
}


def metric_keys(name: str) -> tuple[str, ...]:
    """`name` and the other trainers' names for it, in the order they are read."""
    return (name, *METRIC_ALIASES.get(name, ()))


# verl hands the actor's metrics to its tracker under "actor/": our verl integration's `cp/...` keys are logged as
# `actor/cp/...` (docs/verl.md); readers map them back with `from_verl_key`.
VERL_ACTOR_PREFIX = "actor/"


def from_verl_key(key: str) -> str:
    """Our name for a key in verl's logs: `actor/cp/...` and `actor/gp/...` lose the prefix; others are kept."""
    rest = key[len(VERL_ACTOR_PREFIX):]
    return rest if key.startswith(VERL_ACTOR_PREFIX) and rest[:3] in ("cp/", "gp/") else key


PROBE_TIME = "time/probe_s"  # seconds the callback spent scoring the probe set at that step
# What the callback's monitor said and did at a step (strings: an alert's key, a checkpoint folder's name)
ALERT = "monitor/alert"                  # the key of the warning (control-token or format) raised at this step
COLLAPSED = "monitor/collapsed"          # 1 from the step the collapse rule is met
COLLAPSE_REASON = "monitor/collapse_reason"
CHECKPOINT_SAVED = "monitor/checkpoint"  # checkpoint folder saved at the alarm step (on_warning="checkpoint")
STOPPED = "monitor/stopped"              # 1 when the callback stopped training (on_collapse="stop")


def _value(x: str | Enum) -> str:
    return x.value if isinstance(x, Enum) else str(x)


def cp_key(source: str | Source, position: str | Position, role: str) -> str:
    """`cp/{source}/{position}/{role}`: a control role's mean probability (or `entropy` / `count`)."""
    return f"cp/{_value(source)}/{_value(position)}/{role}"


def cp_entropy_key(source: str | Source, position: str | Position) -> str:
    return cp_key(source, position, "entropy")


def cp_count_key(source: str | Source, position: str | Position) -> str:
    return cp_key(source, position, "count")


CHAIN, CHAIN_COUNT = "chain", "chain_count"  # suffixes of cp/{source}/{position}/{role}/ for multi-token roles


def cp_chain_key(source: str | Source, position: str | Position, role: str) -> str:
    """`cp/{source}/{position}/{role}/chain`: mean probability of a multi-token role's whole sequence (the product
    of its pieces' teacher-forced probabilities), over the positions where the sequence follows."""
    return f"{cp_key(source, position, role)}/{CHAIN}"


def cp_chain_count_key(source: str | Source, position: str | Position, role: str) -> str:
    """`cp/{source}/{position}/{role}/chain_count`: how many positions the chain mean is over (summed)."""
    return f"{cp_key(source, position, role)}/{CHAIN_COUNT}"


def parse_chain_key(key: str) -> tuple[str, str, str, str] | None:
    """(source, position, role, "chain" | "chain_count") of a chained-probability key, else None."""
    parts = key.split("/")
    if len(parts) != 5 or parts[0] != "cp" or not all(parts[1:4]) or parts[4] not in (CHAIN, CHAIN_COUNT):
        return None
    return parts[1], parts[2], parts[3], parts[4]


def sequence_entropy_key(source: str | Source) -> str:
    """`cp/{source}/entropy`: mean token entropy over whole sequences."""
    return f"cp/{_value(source)}/entropy"


def sequence_tokens_key(source: str | Source) -> str:
    """`cp/{source}/tokens`: how many positions `cp/{source}/entropy` is the mean over (summed, not averaged)."""
    return f"cp/{_value(source)}/tokens"


def parse_sequence_key(key: str) -> tuple[str, str] | None:
    """(source, "entropy" | "tokens") of a whole-sequence key `cp/{source}/entropy|tokens`, else None."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "cp" or not parts[1] or parts[2] not in ("entropy", "tokens"):
        return None
    return parts[1], parts[2]


def gp_key(position: str | Position, role: str, part: str | Part) -> str:
    return f"gp/{_value(position)}/{role}/{_value(part)}"


def state_key(state: str | FormatState) -> str:
    return f"fmt/{_value(state)}"


def reason_key(code: str) -> str:
    return f"fmt/reason/{code}"


REASON_PREFIX = "fmt/reason/"


@dataclass(frozen=True)
class CaptureKey:
    """A parsed `cp/` key: `stat` is the role name, or "entropy" / "count" (`is_role` tells them apart)."""

    source: str
    position: str
    stat: str

    @property
    def is_role(self) -> bool:
        return self.stat not in SUMMARY_STATS

    @property
    def key(self) -> str:
        return cp_key(self.source, self.position, self.stat)


def parse_cp_key(key: str) -> CaptureKey | None:
    """The parts of `cp/{source}/{position}/{stat}`, or None for any other key."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "cp" or not all(parts[1:]):
        return None
    return CaptureKey(parts[1], parts[2], parts[3])


@dataclass(frozen=True)
class PressureKey:
    position: str
    role: str
    part: str


def parse_gp_key(key: str) -> PressureKey | None:
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "gp" or parts[3] not in (Part.CHOSEN.value, Part.OTHER.value):
        return None
    return PressureKey(parts[1], parts[2], parts[3])


def parse_reason_key(key: str) -> str | None:
    return key[len(REASON_PREFIX):] if key.startswith(REASON_PREFIX) and len(key) > len(REASON_PREFIX) else None
