"""The tiny presets keep their speed (issue 14): the GRPO loss step before and after micro-batching, interleaved.

Only the loss changed for the tiny model (its 64 trajectories stay one micro-batch), so the comparison is the
loss + backward + AdamW step on one fixed batch of 64 rollouts of the cached `sft` model (the grpo-collapse
preset's start, its settings: 8 prompts x 8 samples, 12 turns), with `grpo_loss_before` (a verbatim copy of the
loss before the change) and today's `grpo.grpo_loss`, alternating which goes first. A full trainer step adds the
rollout (unchanged) on top, measured once and reported so the loss's share is visible.

    python bench/smollm2_tiny_speed.py [--repeats 9] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def grpo_loss_before(model, trajs, advantages, *, pad_id, clip_eps=0.2, temperature=1.0, role_ids=None):
    """The GRPO loss as it was before issue 14 (one full-batch log-softmax), without the KL branch."""
    from collapse_probe.capture.stats import decision_positions, position_stats
    from collapse_probe.train.sft import collate

    batch = collate([t.ids for t in trajs], [t.gen_mask for t in trajs], pad_id, extra=[t.old_logp for t in trajs])
    ids, attn = batch["input_ids"], batch["attention_mask"]
    mask = batch["loss_mask"][:, 1:].float()
    old_logp = batch["extra"][:, 1:]
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    target = ids[:, 1:]
    logp = logp_all.gather(-1, target[..., None]).squeeze(-1)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    obj = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    n_tok = mask.sum().clamp(min=1)
    pg_loss = -(obj * mask).sum() / n_tok
    metrics: dict[str, float] = {}
    with torch.no_grad():
        sel = mask.bool()
        rows = logp_all[sel]
        metrics["entropy"] = float(-(rows.exp() * rows).sum(-1).mean()) if rows.numel() else float("nan")
        metrics["clip_ratio"] = float((((ratio - 1).abs() > clip_eps).float() * mask).sum() / n_tok)
        metrics["sampling/logp_gap"] = float(((logp - old_logp).abs() * mask).sum() / n_tok)
        metrics["pg_loss"] = float(pg_loss.detach())
        if role_ids:
            pos = decision_positions(ids, batch["loss_mask"], role_ids)
            metrics.update(position_stats(logp_all, ids, pos, role_ids, is_logp=True, source="rollout",
                                          advantages=advantages))
    return pg_loss, metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from collapse_probe.tokens import resolve_control_tokens
    from collapse_probe.models import load as model_load
    from collapse_probe.train import grpo
    from collapse_probe.train.presets import get_preset, sft_checkpoint
    from collapse_probe.train.rollout import rollout
    from collapse_probe import world

    torch.set_num_threads(args.threads)
    cfg = get_preset("grpo-collapse")
    model, tok = model_load.load_pretrained(sft_checkpoint())
    role_ids = resolve_control_tokens(tok).distinct_ids()
    t0 = time.perf_counter()
    trajs = rollout(model, tok, world.task_split("train", cfg.prompts_per_step), group_size=cfg.group_size,
                    max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens, reward=cfg.reward, seed=0)
    rollout_s = time.perf_counter() - t0
    adv = grpo.group_advantages(trajs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-9)
    model.train()

    def step(new: bool) -> float:
        t = time.perf_counter()
        if new:
            loss = grpo.grpo_loss(model, trajs, adv, pad_id=tok.pad_token_id, role_ids=role_ids).loss
        else:
            loss = grpo_loss_before(model, trajs, adv, pad_id=tok.pad_token_id, role_ids=role_ids)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    step(False), step(True)  # warm-up
    before, after = [], []
    for i in range(args.repeats):
        for new in ((False, True) if i % 2 == 0 else (True, False)):
            (after if new else before).append(step(new))
    res = {"rollouts": len(trajs), "max_tokens": max(len(t.ids) for t in trajs), "repeats": args.repeats,
           "loss_step_ms_before": 1000 * statistics.median(before), "loss_step_ms_after": 1000 * statistics.median(after),
           "rollout_s": rollout_s, "threads": args.threads}
    res["change_pct"] = 100 * (res["loss_step_ms_after"] / res["loss_step_ms_before"] - 1)
    full_before = rollout_s + res["loss_step_ms_before"] / 1000
    res["step_change_pct"] = 100 * (rollout_s + res["loss_step_ms_after"] / 1000 - full_before) / full_before
    if args.json:
        print(json.dumps(res))
        return
    print(f"tiny grpo-collapse batch: {res['rollouts']} rollouts x <= {res['max_tokens']} tokens, {args.threads} "
          f"threads, {args.repeats} interleaved runs each (medians)")
    print(f"loss+backward+AdamW before {res['loss_step_ms_before']:.1f} ms, after {res['loss_step_ms_after']:.1f} ms "
          f"({res['change_pct']:+.1f}%); with the {rollout_s:.1f} s rollout, a step changes {res['step_change_pct']:+.1f}%")


if __name__ == "__main__":
    main()
