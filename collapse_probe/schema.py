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

import math
from dataclasses import dataclass
from enum import Enum
from typing import Iterable


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
    BODY_CLOSED = "body_closed"  # the JSON body has closed: `</tool_call>` must follow (issue 21)


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
# the reference trainer's own (train/trainer.py, train/grpo.py)
RESPONSE_LEN = "len/response_mean"   # generated tokens per trajectory
TURNS_MEAN = "len/turns_mean"        # assistant turns per trajectory
TOOL_CALLS = "tools/calls_mean"      # executed calls per trajectory
TOOL_ERRORS = "tools/errors_mean"    # calls that returned an error
CLIP_RATIO = "clip_ratio"
PG_LOSS = "pg_loss"
LOGP_GAP = "sampling/logp_gap"       # mean |sampler log-prob - trainer log-prob| of the sampled tokens
ORACLE_WEIGHT = "oracle/weight_mean"  # off-policy supervision: mean p/(p+0.1) of the oracle's tokens
SFT_LOSS, SFT_STEPS = "sft/loss", "sft/steps"  # interleaved SFT after an RL step
ERROR_SFT_EXAMPLES, ERROR_SFT_LOSS, ERROR_SFT_STEPS = "error_sft/examples", "error_sft/loss", "error_sft/steps"


def source_success_key(source: str) -> str:
    """`{source}/success`: the success of one trajectory source (hinted samples, oracle samples)."""
    return f"{source}/success"

# Other trainers' names for our metrics, read when ours are absent: verl's file logger (`critic/score/mean` is the
# mean outcome score: success under 0/1 rewards) and TRL / HF Trainer logs (`reward`, `reward_std`, `learning_rate`).
METRIC_ALIASES: dict[str, tuple[str, ...]] = {
    SUCCESS: ("critic/score/mean",), REWARD_MEAN: ("critic/rewards/mean", "reward"), REWARD_STD: ("reward_std",),
    ENTROPY: ("actor/entropy",), GRAD_NORM: ("actor/grad_norm",), KL: ("actor/ppo_kl",), LR: ("learning_rate",),
}
TRL_REWARD_FN = ("rewards/", "/mean", "/std")  # TRL's per-reward-function keys: rewards/{fn}/mean, rewards/{fn}/std


def add_aliases(rec: dict) -> dict:
    """`rec` with our name added for each metric another trainer logged under its own (their names kept); with
    one TRL reward function and no total reward, its `rewards/{fn}/mean|std` is the reward. Returns `rec`."""
    for ours, theirs in METRIC_ALIASES.items():
        if ours not in rec:
            found = next((rec[t] for t in theirs if t in rec), None)
            if found is not None:
                rec[ours] = found
    prefix, mean, std = TRL_REWARD_FN
    means = [k for k in rec if k.startswith(prefix) and k.endswith(mean)]
    if REWARD_MEAN not in rec and len(means) == 1:
        rec[REWARD_MEAN] = rec[means[0]]
        spread = means[0][: -len(mean)] + std
        if spread in rec and REWARD_STD not in rec:
            rec[REWARD_STD] = rec[spread]
    return rec


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


def finite_or_none(v: object) -> float | None:
    """A record value as a float when it is a finite number (or a number's string, as "NaN" is written), else None;
    booleans are flags, not numbers. The one rule every reader and detector applies to a value."""
    if type(v) is float:  # the usual case, and None (a missing key), without the exception path (issue 22: speed)
        return v if v - v == 0.0 else None
    if v is None or isinstance(v, bool):
        return None
    try:
        v = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return v if math.isfinite(v) else None


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


def pick_source(keys: Iterable[str]) -> str:
    """On-policy (rollout) captures when the run logs them, else the probe set's."""
    sources = {k.source for k in map(parse_cp_key, keys) if k is not None}
    return Source.PROBE.value if Source.ROLLOUT.value not in sources and \
        Source.PROBE.value in sources else Source.ROLLOUT.value


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


# ---------------------------------------------------------------------------------------------------------------
# Training-inference mismatch (issue 21): the rollout engine's (sampler's) view beside the trainer's.
#   mm/{position}/{role}/{p_train|p_rollout|log_ratio|k3}  at decision positions where `role` was sampled (role
#                                  "any": every sampled token there): mean trainer / sampler probability of the
#                                  sampled token, mean log(p_train / p_rollout), mean k3 = exp(r) - r - 1
#   mm/{position}/{role}/count     how many such positions (summed)
#   mm/{position}/{role}/q         the sampler's mean probability of the role there (where its distribution was kept)
#   mm/{position}/{role}/pressure  mean adv * (q_k - p_k): the mismatch part of the push on the role's logit (zero
#                                  on-policy); gp chosen + other minus this is sampling noise
#   mm/{position}/q_count          positions the q / pressure means are over (summed)
#   mm/k3_kl, mm/kl, mm/abs_log_ratio, mm/tokens   over every policy token: k3 and k1 estimates of
#                                  KL(rollout || train), mean |log p_train - log p_rollout|, and the token count
#   mm/corr/...                    the rollout correction's weights and masked share
#   mm/status                      a string: why a capture has no mismatch numbers (e.g. no sampler log-probs)
MISMATCH_PREFIX = "mm/"
ANY_TOKEN = "any"  # the role name of "every sampled token at this position"


class MismatchStat(str, Enum):
    P_TRAIN, P_ROLLOUT, LOG_RATIO, K3, COUNT, Q, PRESSURE = ("p_train", "p_rollout", "log_ratio", "k3", "count",
                                                              "q", "pressure")


SAMPLED_STATS: tuple[str, ...] = tuple(s.value for s in (MismatchStat.P_TRAIN, MismatchStat.P_ROLLOUT,
                                                          MismatchStat.LOG_RATIO, MismatchStat.K3))
Q_STATS: tuple[str, ...] = (MismatchStat.Q.value, MismatchStat.PRESSURE.value)
MM_Q_COUNT = "q_count"
MM_K3_KL, MM_KL, MM_ABS_LOG_RATIO = "mm/k3_kl", "mm/kl", "mm/abs_log_ratio"
MM_TOKENS, MM_STATUS = "mm/tokens", "mm/status"
MM_IS_MEAN, MM_IS_MIN, MM_IS_MAX = "mm/corr/is_mean", "mm/corr/is_min", "mm/corr/is_max"
MM_SEQ_MASKED = "mm/corr/seq_masked_fraction"
MM_ABS_PROB_DIFF = "mm/abs_prob_diff"  # mean |p_train - p_rollout| of the sampled tokens (verl's probs_diff)
MM_AGGREGATES: tuple[str, ...] = (MM_K3_KL, MM_KL, MM_ABS_LOG_RATIO)  # means over MM_TOKENS


def mm_key(position: str | Position, role: str, stat: str | MismatchStat) -> str:
    return f"mm/{_value(position)}/{role}/{_value(stat)}"


def mm_q_count_key(position: str | Position) -> str:
    return f"mm/{_value(position)}/{MM_Q_COUNT}"


@dataclass(frozen=True)
class MismatchKey:
    """A parsed per-position mismatch key: `role` is None for `mm/{position}/q_count`."""
    position: str
    role: str | None
    stat: str


def parse_mm_key(key: str) -> MismatchKey | None:
    """The parts of `mm/{position}/{role}/{stat}` or `mm/{position}/q_count`; None for the aggregates and others."""
    parts = key.split("/")
    if parts[0] != "mm" or len(parts) not in (3, 4) or parts[1] not in POSITIONS:
        return None
    if len(parts) == 3:
        return MismatchKey(parts[1], None, parts[2]) if parts[2] == MM_Q_COUNT else None
    if not parts[2] or parts[3] not in {s.value for s in MismatchStat}:
        return None
    return MismatchKey(parts[1], parts[2], parts[3])


def mm_weight_key(key: str) -> tuple[bool, str | None]:
    """(summed, the count key its mean is over) of a mismatch key; (False, None) for a key that is not one."""
    if key == MM_TOKENS:
        return True, MM_TOKENS
    if key in MM_AGGREGATES:
        return False, MM_TOKENS
    mk = parse_mm_key(key)
    if mk is None:
        return False, None
    if mk.role is None:
        return True, key
    if mk.stat == MismatchStat.COUNT.value:
        return True, key
    if mk.stat in Q_STATS:
        return False, mm_q_count_key(mk.position)
    return False, mm_key(mk.position, mk.role, MismatchStat.COUNT)


# Other trainers' names for the whole-batch mismatch, read when ours are absent (METRIC_ALIASES, below). verl:
# rollout_corr/* (rollout_corr_helper.py) and training/rollout_probs_diff_*; TRL GRPOTrainer: sampling/* (vLLM
# generation only; its logp difference is |old - sampling| log-probs); OpenRLHF vllm_kl, prime-rl mismatch_kl and
# slime train_rollout_kl are their KL(rollout || train) estimates, read as ours (k3); slime's
# train_rollout_logprob_abs_diff is our mean |log-ratio|. Trackers may prefix a name with "train/".
MISMATCH_ALIASES: dict[str, tuple[str, ...]] = {
    MM_K3_KL: ("rollout_corr/k3_kl", "vllm_kl", "train/vllm_kl", "mismatch_kl", "train/mismatch_kl",
               "train_rollout_kl", "train/train_rollout_kl"),
    MM_KL: ("rollout_corr/kl",),
    MM_ABS_LOG_RATIO: ("sampling/sampling_logp_difference/mean", "train_rollout_logprob_abs_diff",
                       "train/train_rollout_logprob_abs_diff"),
    MM_ABS_PROB_DIFF: ("training/rollout_probs_diff_mean",),
    MM_IS_MEAN: ("rollout_corr/rollout_is_mean", "sampling/importance_sampling_ratio/mean"),
    MM_IS_MIN: ("rollout_corr/rollout_is_min", "sampling/importance_sampling_ratio/min"),
    MM_IS_MAX: ("rollout_corr/rollout_is_max", "sampling/importance_sampling_ratio/max"),
    MM_SEQ_MASKED: ("rollout_corr/rollout_rs_seq_masked_fraction",),
}
METRIC_ALIASES.update(MISMATCH_ALIASES)
# the whole-batch mismatch series a run may hold, in the order a reader picks one (ours first, then the closest)
MISMATCH_SERIES: tuple[str, ...] = (MM_K3_KL, MM_ABS_LOG_RATIO, MM_KL, MM_ABS_PROB_DIFF)


def mismatch_series_key(keys: Iterable[str]) -> str | None:
    """The key of the whole-batch mismatch series among `keys` (ours or another trainer's name), or None."""
    have = set(keys)
    return next((k for name in MISMATCH_SERIES for k in metric_keys(name) if k in have), None)
