"""The training-inference mismatch rising: a peer baseline for the control-token alerts.

VeXact (arXiv 2605.14220) reports a rollout-correction k3 KL that "explodes" before the gradient norm does and
before the collapse. This detector watches the whole-batch mismatch series a run logs (ours `mm/k3_kl`, verl's
`rollout_corr/k3_kl`, OpenRLHF's `vllm_kl`, ...; or, where no KL is logged, the mean |log-ratio|: TRL's
`sampling/sampling_logp_difference/mean`; `schema.MISMATCH_SERIES`) and alarms when it stays above `factor` x
its running mean for `patience` steps: the grad-norm rule (llm-foundry's) with settings for a series that is near
zero while sampler and trainer agree.
"""

from __future__ import annotations

from typing import Mapping

from collapse_probe import schema
from collapse_probe.detect.grad_norm import GradNormSpikeDetector

KIND = "mismatch_rise"


class MismatchRiseDetector(GradNormSpikeDetector):
    """`mm/k3_kl` (or the run's mismatch series) above `factor` x its running mean for `patience` steps, after
    `min_history` values. Event.magnitude = value / running mean."""

    def __init__(self, *, key: str = schema.MM_K3_KL, kind: str = KIND, window: int = 20, factor: float = 3.0,
                 patience: int = 2, min_history: int = 3):
        super().__init__(key=key, kind=kind, window=window, factor=factor, patience=patience,
                         min_history=min_history)


def mismatch_value(record: Mapping) -> float | None:
    """The first finite whole-batch mismatch value of a record, in `schema.MISMATCH_SERIES` order (each under
    ours or another trainer's name). One run logs one kind, so the series is consistent within a run."""
    for name in schema.MISMATCH_SERIES:
        for key in schema.metric_keys(name):
            v = schema.finite_or_none(record.get(key))
            if v is not None:
                return v
    return None
