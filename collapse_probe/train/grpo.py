"""Multi-turn GRPO: group-normalised advantages, PPO-clipped token objective, optional KL to a reference.

Whole trajectories are scored; observation (tool response) tokens and the prompt are masked from the loss.

Memory: the policy forward runs in micro-batches sized so one micro-batch's logits stay within
`LOGITS_BUDGET` floats, and token log-probs are gathered from that micro-batch's log-softmax, so no tensor ever
spans the whole batch x vocabulary (the tiny model's 64 trajectories are one micro-batch, a 49k-vocabulary
model's are many). Within a micro-batch the fused log-softmax is kept rather than TRL's logsumexp + gather: the
memory is bounded by the budget either way, and on CPU it is twice as fast. The control-token capture reads the
decision rows of that log-softmax (no second vocabulary tensor). Several micro-batches are backpropagated one at a time: with
`backward=True` here (the returned loss is then only a number), otherwise through activation checkpoints, so
the caller's single `loss.backward()` still holds one micro-batch's activations at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from collapse_probe import schema
from collapse_probe.capture.mismatch import mismatch_stats
from collapse_probe.capture.stats import RecordMeans, decision_positions, position_stats
from collapse_probe.train import offpolicy
from collapse_probe.train.correction import rollout_correction, threshold_of
from collapse_probe.train.rollout import POLICY, Trajectory
from collapse_probe.train.sft import collate

LOGITS_BUDGET = 1 << 26  # floats of [rows, T, V] logits one micro-batch may hold (256 MB)
_ENTROPY_FLOATS = 1 << 22  # floats of full-vocabulary rows the entropy metric reads at once (16 MB)


def group_advantages(trajs: list[Trajectory], *, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps), one value per trajectory."""
    rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
    groups = torch.tensor([t.group for t in trajs])
    adv = torch.zeros_like(rewards)
    for g in groups.unique():
        sel = groups == g
        r = rewards[sel]
        a = r - r.mean()
        adv[sel] = a / (r.std(unbiased=False) + eps) if scale else a
    return adv


@dataclass
class GRPOLossOut:
    loss: torch.Tensor
    metrics: dict[str, float]
    backward_done: bool = False  # True: gradients are already in .grad (grpo_loss(..., backward=True))


def token_logp(logits: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each `index` token, the log-softmax) of one micro-batch's logits."""
    logp_all = torch.log_softmax(logits, dim=-1)
    return logp_all.gather(-1, index[..., None]).squeeze(-1), logp_all


def micro_batches(lengths: list[int], vocab: int, size: int | None = None) -> list[list[int]]:
    """Sequence indices per micro-batch. All in one, in order, when `size` covers the batch or (no `size`) the
    whole batch's logits fit `LOGITS_BUDGET`: the tiny model's path, unchanged. Otherwise longest first, `size`
    sequences each, or (no `size`) as many sequences of similar length as fit the budget, so little is padding."""
    n, width = len(lengths), max(lengths, default=1)
    if size is not None and size >= n or size is None and n * width * vocab <= LOGITS_BUDGET:
        return [list(range(n))]
    order = sorted(range(n), key=lambda i: -lengths[i])
    if size is not None:
        return [order[i:i + size] for i in range(0, n, size)]
    parts: list[list[int]] = []
    for i in order:
        if parts and (len(parts[-1]) + 1) * lengths[parts[-1][0]] * vocab <= LOGITS_BUDGET:
            parts[-1].append(i)
        else:
            parts.append([i])
    return parts


def _logits(model, ids: torch.Tensor, attn: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
    return logits if temperature == 1.0 else logits / temperature


@dataclass
class _Sums:
    """Per-step numbers added over micro-batches (divided once at the end)."""

    pg: float = 0.0
    kl: float = 0.0
    clip: float = 0.0
    gap: float = 0.0
    ent: float = 0.0
    ent_rows: int = 0
    off_w: float = 0.0  # the off-policy weights p/(p+0.1) of oracle tokens, summed, and their count
    off_n: float = 0.0
    capture: RecordMeans = field(default_factory=RecordMeans)
    single: dict[str, float] | None = None  # one micro-batch: its capture record as computed


def _vocab(model) -> int:
    return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)


def grpo_loss(model, trajs: list[Trajectory], advantages: torch.Tensor, *, pad_id: int, clip_eps: float = 0.2,
              kl_coef: float = 0.0, ref_model=None, temperature: float = 1.0,
              role_ids: dict[str, int] | None = None, micro_batch: int | None = None,
              backward: bool = False, train_logp: list[list[float]] | None = None, old_logp: str = "rollout",
              correction: str = "none", correction_threshold: float | None = None) -> GRPOLossOut:
    """The GRPO loss of `trajs` and its metrics (capture and mismatch keys when `role_ids` is given). `micro_batch`:
    sequences per policy forward (default: as many as fit `LOGITS_BUDGET`). `backward=True` backpropagates each
    micro-batch here and returns the loss detached (`backward_done`): no recomputation, the cheapest way for a large
    vocabulary. `Trajectory.old_logp` is the sampler's q; `train_logp` the trainer's log-probs before the update
    (train/update.py): the PPO old log-probs with `old_logp="recompute"`, and p_train of the `correction`
    (train/correction.py: its weights multiply the per-token objective; masked sequences leave the loss)."""
    batch = collate([t.ids for t in trajs], [t.gen_mask for t in trajs], pad_id, extra=[t.old_logp for t in trajs])
    ids, attn, gen = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    mask = gen[:, 1:].float()
    # oracle samples (train/offpolicy.py): weighted p/(p+0.1), unclipped, and left out of the on-policy metrics
    off_rows = torch.tensor([t.source == offpolicy.SOURCE for t in trajs])
    own = torch.tensor([t.source == POLICY for t in trajs])[:, None]  # sampled by the engine: q is known
    on_gen = gen * (~off_rows)[:, None]
    q_logp = batch["extra"][:, 1:]  # the sampler's
    ppo_old, corr = q_logp, None
    if train_logp is not None:
        p_old = collate([t.ids for t in trajs], [t.gen_mask for t in trajs], pad_id, extra=train_logp)["extra"][:, 1:]
        if old_logp == "recompute":  # hinted rows hold the trainer's log-probs already (train/hints.py)
            ppo_old = torch.where(own, p_old, q_logp)
        if correction != "none":
            corr = rollout_correction(p_old, q_logp, mask * own, kind=correction,
                                      threshold=threshold_of(correction, correction_threshold))
            mask = mask * corr.keep[:, None]  # masked sequences leave the loss and its token count
    known = (mask * own).bool()  # where the sampler's q of the token is known: the mismatch capture
    watch = _watch_tensor(trajs, ids.shape[1]) if role_ids else None
    tis_cap = threshold_of(correction, correction_threshold) if correction == "token_tis" else None
    n_tok = mask.sum().clamp(min=1)
    adv_all = advantages.float()
    lengths = [len(t.ids) for t in trajs]
    # each micro-batch: its rows, cut to its longest sequence (right padding: the cut is only padding)
    parts = [(torch.tensor(p), max(lengths[i] for i in p)) for p in
             micro_batches(lengths, _vocab(model) or 1, micro_batch)]
    ref_logp: dict[int, torch.Tensor] = {}
    if kl_coef > 0 and ref_model is not None:
        with torch.no_grad():
            for i, (rows, w) in enumerate(parts):
                ref_logp[i] = token_logp(_logits(ref_model, ids[rows, :w], attn[rows, :w], temperature),
                                         ids[rows, 1:w])[0]
    sums = _Sums()
    done: set[int] = set()

    def part_loss(i: int) -> torch.Tensor:
        rows, w = parts[i]
        logp, logp_all = token_logp(_logits(model, ids[rows, :w], attn[rows, :w], temperature), ids[rows, 1:w])
        m, adv, off = mask[rows, :w - 1], adv_all[rows, None], off_rows[rows, None]
        old = torch.where(off, logp.detach(), ppo_old[rows, :w - 1])
        ratio = torch.exp(logp - old)
        obj = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
        if corr is not None:
            obj = obj * corr.weights[rows, :w - 1]  # detached importance weights (1 where none)
        if off.any():
            weight = offpolicy.off_policy_weight(logp)
            obj = torch.where(off, weight * ratio * adv, obj)
            if i not in done:
                sums.off_w += float((weight * m * off).sum())
                sums.off_n += float((m * off).sum())
        pg = -(obj * m).sum() / n_tok
        loss = pg
        kl = None
        if ref_logp:
            d = ref_logp[i] - logp
            kl = ((torch.exp(d) - d - 1) * m).sum() / n_tok  # k3 estimator, >= 0
            loss = loss + kl_coef * kl
        if i not in done:  # a checkpoint's recomputation in backward does not count twice
            done.add(i)
            _measure(sums, logp_all, logp, ratio, m * ~off, pg, kl, ids[rows, :w], on_gen[rows, :w], adv_all[rows],
                     q_logp[rows, :w - 1], clip_eps, role_ids, single=len(parts) == 1, known=known[rows, :w - 1],
                     watch=None if watch is None else watch[rows, :w - 1], tis_cap=tis_cap)
        return loss

    if backward:
        total = 0.0
        for i in range(len(parts)):
            loss_i = part_loss(i)
            loss_i.backward()
            total += float(loss_i.detach())
        loss = torch.tensor(total)
    elif len(parts) == 1:
        loss = part_loss(0)
    else:
        loss = sum(checkpoint(part_loss, i, use_reentrant=False) for i in range(len(parts)))
    n_on = float((mask * ~off_rows[:, None]).sum().clamp(min=1))
    return GRPOLossOut(loss, _metrics(sums, n_on, bool(ref_logp)), backward_done=backward)


def _watch_tensor(trajs: list[Trajectory], width: int) -> torch.Tensor | None:
    """[N, width - 1, K]: at position c the sampler's log-probs of the control columns where it drew token c + 1
    (`Trajectory.watch_logq`), 0 where unknown (the capture reads only `known` positions); None when none kept."""
    kept = [t.watch_logq if t.watch_logq is not None and len(t.watch_logq) == len(t.ids) else None for t in trajs]
    k = next((len(v) for w in kept if w for v in w if v is not None), 0)
    if not k:
        return None
    out = torch.zeros(len(trajs), width, k)
    zero = [0.0] * k
    for i, w in enumerate(kept):
        if w:
            out[i, :len(w)] = torch.tensor([zero if v is None else v for v in w])
    return out[:, 1:]


@torch.no_grad()
def sequence_logp(model, trajs: list[Trajectory], *, pad_id: int, temperature: float = 1.0) -> list[list[float]]:
    """Per-token log-probs of each trajectory's generated tokens under `model` (0 elsewhere), as the rollout
    records them: for recomputing "old" log-probs on another context (train/hints.py)."""
    if not trajs:
        return []
    batch = collate([t.ids for t in trajs], [t.gen_mask for t in trajs], pad_id)
    ids, attn, gen = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    lengths = [len(t.ids) for t in trajs]
    out: list[list[float]] = [[] for _ in trajs]
    was_training = model.training
    model.eval()  # as the rollout sampled
    for part in micro_batches(lengths, _vocab(model) or 1):
        rows, w = torch.tensor(part), max(lengths[i] for i in part)
        logp = token_logp(_logits(model, ids[rows, :w], attn[rows, :w], temperature), ids[rows, 1:w])[0]
        logp = logp * gen[rows, 1:w]
        for j, i in enumerate(part):
            out[i] = [0.0] + logp[j, :lengths[i] - 1].tolist()
    model.train(was_training)
    return out


@torch.no_grad()
def _measure(sums: _Sums, logp_all, logp, ratio, m, pg, kl, ids, gen, adv, old_logp, clip_eps: float,
             role_ids, *, single: bool, known=None, watch=None, tis_cap: float | None = None) -> None:
    sums.pg += float(pg.detach())
    if kl is not None:
        sums.kl += float(kl.detach())
    sums.clip += float((((ratio - 1).abs() > clip_eps).float() * m).sum())
    sums.gap += float(((logp - old_logp).abs() * m).sum())
    # entropy of generated positions (a trainer metric like TRL's), in row chunks: no [N, T, V] log-softmax
    r, c = torch.nonzero(m.bool(), as_tuple=True)
    step = max(1, _ENTROPY_FLOATS // max(1, logp_all.shape[-1]))
    for j in range(0, r.numel(), step):
        lp = logp_all[r[j:j + step], c[j:j + step]]
        sums.ent += float(-(lp.exp() * lp).sum())
    sums.ent_rows += int(r.numel())
    if role_ids:
        pos = decision_positions(ids, gen, role_ids)  # t predicts t+1, both in range
        rec = position_stats(logp_all, ids, pos, role_ids, is_logp=True, source=schema.Source.ROLLOUT.value,
                             advantages=adv)
        if known is not None and bool(known.any()):  # the sampler beside the trainer (capture/mismatch.py)
            rec.update(mismatch_stats(ids, pos, role_ids, logp_train=logp.detach(), logp_rollout=old_logp,
                                      known=known, scores=logp_all, rollout_roles=watch, advantages=adv,
                                      tis_cap=tis_cap))
        if single:
            sums.single = rec
        else:
            sums.capture.add(rec, schema.Source.ROLLOUT.value)


def _metrics(sums: _Sums, n_tok: float, with_kl: bool) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if with_kl:
        metrics[schema.KL] = sums.kl
    metrics[schema.ENTROPY] = sums.ent / sums.ent_rows if sums.ent_rows else float("nan")
    metrics[schema.CLIP_RATIO] = sums.clip / n_tok
    metrics[schema.LOGP_GAP] = sums.gap / n_tok
    metrics[schema.PG_LOSS] = sums.pg
    if sums.off_n:
        metrics[schema.ORACLE_WEIGHT] = sums.off_w / sums.off_n
    metrics.update(sums.single if sums.single is not None else sums.capture.pop())
    return metrics
