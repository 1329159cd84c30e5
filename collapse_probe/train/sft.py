"""Supervised fine-tuning on oracle trajectories: assistant tokens only in the loss.

Sequences are built with the same segment functions the rollout uses, so SFT and RL see identical tokens.
"""

from __future__ import annotations

import random

import torch

from collapse_probe import schema, world
from collapse_probe.train import instruct
from collapse_probe.train.config import TrainConfig


def oracle_batch(tokenizer, tasks: list[world.Task], *, retry_frac: float = 0.0,
                 rng: random.Random | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Encode oracle trajectories; a fraction `retry_frac` of them hold one empty-call retry."""
    rng = rng or random.Random(0)
    seqs, masks = [], []
    for task in tasks:
        retries = 1 if rng.random() < retry_frac else 0
        at = rng.randrange(len(task.chain)) if retries else 0
        ids, mask = world.encode_trajectory(tokenizer, task, empty_call_retries=retries, retry_at=at)
        seqs.append(ids)
        masks.append(mask)
    return seqs, masks


def collate(seqs: list[list[int]], masks: list[list[int]], pad_id: int, *,
            extra: list[list[float]] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad into tensors: input_ids, attention_mask, loss_mask (and `extra` as float tensor)."""
    width = max(len(s) for s in seqs)
    n = len(seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.long)
    extra_t = torch.zeros((n, width)) if extra is not None else None
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        loss_mask[i, :len(m)] = torch.tensor(m)
        if extra_t is not None:
            extra_t[i, :len(s)] = torch.tensor(extra[i])
    out = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}
    if extra_t is not None:
        out["extra"] = extra_t
    return out


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over assistant tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:].float()
    nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                            reduction="none").view_as(mask)
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def sft_step(model, opt, tok, tasks, cfg: TrainConfig, rng: random.Random, lr: float | None = None) -> dict:
    """One SFT step on the oracle (or instruct-mixture) conversations of `tasks`."""
    if cfg.sft_data == "instruct":
        seqs, masks = instruct.instruct_batch(tok, tasks, retry_frac=cfg.retry_frac, rng=rng)
    else:
        seqs, masks = oracle_batch(tok, tasks, retry_frac=cfg.retry_frac, rng=rng)
    return sft_update(model, opt, tok, seqs, masks, cfg, lr)


def sft_update(model, opt, tok, seqs: list[list[int]], masks: list[list[int]], cfg: TrainConfig,
               lr: float | None = None) -> dict:
    """One SFT step on the given sequences (loss on their mask), at `lr` for this step if given."""
    batch = collate(seqs, masks, tok.pad_token_id)
    previous = opt.param_groups[0]["lr"]
    if lr is not None:
        for g in opt.param_groups:
            g["lr"] = lr
    loss = sft_loss(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    used = opt.param_groups[0]["lr"]
    opt.step()
    if lr is not None:
        for g in opt.param_groups:
            g["lr"] = previous
    return {schema.PHASE: "sft", schema.LOSS: float(loss.detach()), schema.GRAD_NORM: float(gn), schema.LR: used}
