"""The rollout engine: the sampler's own copy of the policy, apart from the trainer.

In the paper's runs vLLM sampled and FSDP trained: two programs, two sets of kernels, and (asynchronous RL) weights
that lag the trainer's. Each source of that training-inference mismatch is one `TrainConfig` field here:

    rollout_dtype   fp32 | bf16 | fp16: the sampler is a copy of the policy in that dtype (the trainer stays fp32)
    rollout_lag     k >= 0: the sampler holds the weights of step t - k (a ring of the last k + 1 state dicts)
    rollout_top_p   the sampler draws from the top-p nucleus (renormalised): tokens outside it are never drawn,
    rollout_top_k   while the trainer's log-probs stay full-distribution

With none of them (fp32, lag 0, no truncation) there is no copy: the policy samples itself, exactly as before. The
sampler's log-probs of the sampled tokens (`Trajectory.old_logp`, after temperature and truncation) are what it
drew from; `watch_ids` keeps its log-probs of the control columns too, for the mismatch capture
(capture/mismatch.py).
"""

from __future__ import annotations

import copy
from collections import deque

import torch

from collapse_probe.errors import UserError
from collapse_probe.train.config import ROLLOUT_DTYPES, TrainConfig

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
assert tuple(DTYPES) == ROLLOUT_DTYPES  # one list of names (config.py), one map to torch here


class RolloutEngine:
    """The sampler. `sync(policy, step)` before each step's sampling; sample with `model` and `top_p` / `top_k`."""

    def __init__(self, policy: torch.nn.Module, *, dtype: str = "fp32", lag: int = 0, top_p: float = 1.0,
                 top_k: int = 0) -> None:
        if dtype not in DTYPES:
            raise UserError(f"rollout_dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if lag < 0:
            raise UserError(f"rollout_lag takes an integer >= 0, got {lag}")
        if not 0 < top_p <= 1:
            raise UserError(f"rollout_top_p takes a number in (0, 1], got {top_p}")
        if top_k < 0:
            raise UserError(f"rollout_top_k takes an integer >= 0, got {top_k}")
        self.dtype, self.lag, self.top_p, self.top_k = dtype, lag, top_p, top_k
        # the policy samples itself unless the weights differ (dtype, staleness): no copy, today's path exactly
        self.shared = dtype == "fp32" and lag == 0
        self.model = policy if self.shared else \
            copy.deepcopy(policy).to(DTYPES[dtype]).eval().requires_grad_(False)
        self._ring: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=lag + 1)
        self.weights_step = 0  # the training step whose weights the sampler holds

    @classmethod
    def from_config(cls, policy: torch.nn.Module, cfg: TrainConfig) -> RolloutEngine:
        return cls(policy, dtype=cfg.rollout_dtype, lag=cfg.rollout_lag, top_p=cfg.rollout_top_p,
                   top_k=cfg.rollout_top_k)

    @property
    def on_policy(self) -> bool:
        """No source of mismatch: the sampler's distribution is the trainer's (up to kernel numerics)."""
        return self.shared and self.top_p >= 1.0 and not self.top_k

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module, step: int) -> int:
        """Before step `step` samples: the policy's weights join the ring, and the sampler loads the oldest there
        (those of step `step - lag`, or step 0's while fewer steps have passed). Returns that step."""
        if self.shared:
            self.weights_step = step
            return step
        state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        self._ring.append((step, state))
        self.weights_step, oldest = self._ring[0]
        self.model.load_state_dict(oldest)  # copied into the sampler's dtype
        return self.weights_step
