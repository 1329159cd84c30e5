"""Writes tests/fixtures/mismatch/: a verl file-logger log whose mismatch metrics come from verl's own code, and a
TRL output dir whose sampling/* metrics follow GRPOTrainer's formulas. Both runs: a sampler drifting away from
the trainer from step 10 (a stale rollout engine), the score falling from step 18.

    python tests/helpers/mismatch_fixtures.py      # regenerate (the files are committed)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mismatch"
STEPS, DRIFT, DROP = 30, 10, 18


def _logprobs(step: int, n: int = 16, t: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(trainer old log-probs, rollout log-probs, response mask) of one step: the gap grows from DRIFT."""
    g = torch.Generator().manual_seed(step)
    rollout = -torch.rand(n, t, generator=g) * 2
    scale = 0.01 + 0.08 * max(0, step - DRIFT)
    actor = rollout + torch.randn(n, t, generator=g) * scale
    mask = torch.ones(n, t)
    mask[:, t - 4:] = 0
    return actor, rollout, mask


def verl_lines() -> list[dict]:
    from verl import DataProto
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask
    from verl.utils.debug.metrics import calculate_debug_metrics

    out = []
    for s in range(1, STEPS + 1):
        actor, rollout, mask = _logprobs(s)
        _, _, corr = compute_rollout_correction_and_rejection_mask(actor, rollout, mask, rollout_is="token",
                                                                   rollout_is_threshold=2.0)
        data = DataProto.from_dict(tensors={"rollout_log_probs": rollout, "old_log_probs": actor,
                                            "response_mask": mask, "responses": torch.zeros_like(mask).long()})
        score = 0.6 if s < DROP else 0.05
        d = {"critic/score/mean": score + 0.01 * math.sin(s), "critic/rewards/mean": score,
             "actor/entropy": 0.8, "actor/grad_norm": 1.0, "actor/ppo_kl": 0.001, "response_length/mean": 100.0,
             **corr, **calculate_debug_metrics(data)}
        out.append({"step": s, "data": d})
    return out


def trl_history() -> list[dict]:
    """GRPOTrainer's log history with vLLM generation and its IS correction (token_truncate, cap 2): the
    sampling/* keys as grpo_trainer.py computes them from old and sampling log-probs."""
    history = []
    for s in range(1, STEPS + 1):
        actor, rollout, mask = _logprobs(s)
        on = mask.bool()
        delta = (actor - rollout).abs()[on]
        ratio = torch.exp(actor - rollout).clamp(max=2.0)[on]
        r = 0.8 if s < DROP else 0.1
        history.append({"step": s, "epoch": s / STEPS, "loss": 0.01, "reward": r, "reward_std": 0.3,
                        "entropy": 1.2, "grad_norm": 0.5, "learning_rate": 1e-6,
                        "sampling/sampling_logp_difference/mean": float(delta.mean()),
                        "sampling/sampling_logp_difference/max": float(delta.max()),
                        "sampling/importance_sampling_ratio/min": float(ratio.min()),
                        "sampling/importance_sampling_ratio/mean": float(ratio.mean()),
                        "sampling/importance_sampling_ratio/max": float(ratio.max())})
    return history


def main() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    with open(FIXTURES / "verl_exp.jsonl", "w") as f:
        for line in verl_lines():
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
    trl = FIXTURES / "trl_out"
    trl.mkdir(exist_ok=True)
    (trl / "trainer_state.json").write_text(json.dumps({"global_step": STEPS, "log_history": trl_history()},
                                                       indent=1))


if __name__ == "__main__":
    main()
