"""train/correction.py against verl's own rollout correction (verl/trainer/ppo/rollout_corr_helper.py, installed)."""
import math

import pytest
import torch

from collapse_probe import schema
from collapse_probe.errors import UserError
from collapse_probe.train.correction import rollout_correction

verl_corr = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    n, t = 12, 9
    q = -torch.rand(n, t, generator=g) * 3
    p = q + torch.randn(n, t, generator=g) * 0.08  # most sequences near 1, some far
    p[0] = q[0] + 0.5  # far above
    p[1] = q[1] - 0.5  # far below
    p[2, :3] = q[2, :3] + 30  # beyond the +-20 safety bound
    mask = (torch.rand(n, t, generator=g) > 0.2).float()
    mask[3] = 0  # an empty sequence
    return p.requires_grad_(), q, mask


def test_token_tis_is_min_ratio_c_detached(batch):
    p, q, mask = batch
    out = rollout_correction(p, q, mask, kind="token_tis", threshold=2.0)
    want = torch.minimum(torch.exp((p - q).clamp(-20, 20)), torch.tensor(2.0))
    on = mask.bool()
    assert torch.allclose(out.weights[on], want[on].detach(), atol=1e-6)
    assert not out.weights.requires_grad and out.keep.eq(1).all()
    w, _ = verl_corr.compute_rollout_correction_weights((p - q).detach(), mask, rollout_is="token",
                                                       rollout_is_threshold=2.0)
    assert torch.allclose(out.weights[on], w[on], atol=1e-6)


@pytest.mark.parametrize("kind, verl_args", [
    ("seq_tis", dict(rollout_is="sequence", rollout_is_threshold=2.0)),
    ("seq_mis", dict(rollout_is="sequence", rollout_is_threshold=2.0, rollout_rs="seq_sum_k1",
                     rollout_rs_threshold="0.5_2.0")),
    ("geo_mis", dict(rollout_is=None, rollout_rs="seq_mean_k1", rollout_rs_threshold="0.9_1.1111111111111112")),
])
def test_sequence_forms_match_verl(batch, kind, verl_args):
    p, q, mask = batch
    c = 1.1111111111111112 if kind == "geo_mis" else 2.0
    out = rollout_correction(p.detach(), q, mask, kind=kind, threshold=c)
    weights, new_mask, metrics = verl_corr.compute_rollout_correction_and_rejection_mask(
        p.detach(), q, mask, **verl_args)
    kept_tokens = mask * out.keep[:, None]
    assert torch.equal(kept_tokens, new_mask.float())  # the same sequences masked
    if weights is not None:
        w = weights.batch["rollout_is_weights"]
        on = kept_tokens.bool()
        assert torch.allclose(out.weights[on], w[on], atol=1e-5)
    else:
        assert out.weights.eq(1).all()
    has = mask.sum(-1) > 0
    assert math.isclose(out.metrics[schema.MM_SEQ_MASKED], float((out.keep[has] == 0).float().mean()))
    if kind != "seq_tis":  # the batch exercises both sides of the band
        assert 0 < out.metrics[schema.MM_SEQ_MASKED] < 1


def test_none_changes_nothing(batch):
    p, q, mask = batch
    out = rollout_correction(p, q, mask, kind="none")
    assert out.weights.eq(1).all() and out.keep.eq(1).all() and out.metrics == {}


def test_unknown_correction_is_a_user_error(batch):
    p, q, mask = batch
    with pytest.raises(UserError, match="must be one of none, token_tis"):
        rollout_correction(p, q, mask, kind="icepop")
