"""Capture overhead on SmolLM2-135M on CPU (issue 14): forward + backward with and without capture, one run.

A fixed batch of gold tool-world conversations (the train split's oracle trajectories; `gen_mask` = assistant
tokens, so every decision position is there, `<tool_call>` as its 5 pieces) goes through the GRPO loss and its
backward. Three settings alternate, in rotating order, so drift hits all equally:

    off      grpo_loss without capture
    trainer  grpo_loss with role_ids: capture reads the decision rows of each micro-batch's log-softmax
    hook     ControlTokenCapture attached as a forward hook (someone else's loop): decision rows of the logits

Overhead = median(setting) / median(off) - 1. On a shared machine the step time drifts by more than the
capture costs, so the capture's own time (position_stats on one step's logits, timed alone) is reported too.

    python bench/smollm2_capture_overhead.py [--batch 4] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir (default: models fetch smollm2-135m)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from collapse_probe.capture.hooks import ControlTokenCapture
    from collapse_probe.capture.stats import decision_positions, position_stats
    from collapse_probe.models.fetch import fetch
    from collapse_probe.tokens import resolve_control_tokens
    from collapse_probe.train import grpo
    from collapse_probe.train.rollout import Trajectory
    from collapse_probe.train.sft import collate
    from collapse_probe.models.load import load_pretrained
    from collapse_probe import world

    torch.set_num_threads(args.threads)
    model, tok = load_pretrained(args.model or fetch("smollm2-135m"))
    model.train()
    roles = resolve_control_tokens(tok).distinct_ids()
    trajs = []
    for i, task in enumerate(world.task_split("train", args.batch)):
        ids, mask = world.encode_trajectory(tok, task)
        trajs.append(Trajectory(task, world.Episode(task), ids, mask, [-1.0 * m for m in mask], reward=float(i % 2)))
    adv = grpo.group_advantages(trajs)
    hook = ControlTokenCapture(tok).attach(model)
    b = collate([t.ids for t in trajs], [t.gen_mask for t in trajs], tok.pad_token_id)

    def step(kind: str) -> float:
        t0 = time.perf_counter()
        if kind == "hook":
            hook.set_batch(b["input_ids"], b["loss_mask"], advantages=adv)
        # one forward for the whole batch in every setting: the hook needs the batch it was given
        out = grpo.grpo_loss(model, trajs, adv, pad_id=tok.pad_token_id, role_ids=roles if kind == "trainer" else None,
                             micro_batch=len(trajs), backward=True)
        if kind == "hook":
            assert hook.pop(), "the hook captured nothing"
        model.zero_grad(set_to_none=True)
        assert out.backward_done
        return time.perf_counter() - t0

    kinds = ["off", "trainer", "hook"]
    for k in kinds:  # warm-up
        step(k)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(args.repeats):
        order = kinds[i % 3:] + kinds[:i % 3]
        for k in order:
            times[k].append(step(k))
    hook.detach()
    with torch.no_grad():  # the capture's own cost, alone: one forward's logits, decision rows only
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        pos = decision_positions(b["input_ids"], b["loss_mask"], roles)
        alone = []
        for _ in range(5):
            t0 = time.perf_counter()
            position_stats(logits, b["input_ids"], pos, roles, is_logp=False, source="rollout", advantages=adv)
            alone.append(time.perf_counter() - t0)
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    res = {"device": f"CPU, {args.threads} threads, SmolLM2-135M, batch {args.batch} x {b['input_ids'].shape[1]} tokens",
           "repeats": args.repeats, "step_ms": med["off"], "step_ms_trainer_capture": med["trainer"],
           "step_ms_hook_capture": med["hook"],
           "overhead_pct_trainer": 100 * (med["trainer"] / med["off"] - 1),
           "overhead_pct_hook": 100 * (med["hook"] / med["off"] - 1),
           "capture_alone_ms": 1000 * statistics.median(alone),
           "decision_rows": int(sum(r.numel() for r, _ in pos.values())), "all_ms": times}
    res["capture_alone_pct"] = 100 * res["capture_alone_ms"] / med["off"]
    if args.json:
        print(json.dumps(res))
        return
    print(f"capture overhead on {res['device']} ({args.repeats} interleaved runs each, medians)")
    print(f"step {med['off']:.0f} ms | trainer capture {med['trainer']:.0f} ms ({res['overhead_pct_trainer']:+.2f}%) | "
          f"hook capture {med['hook']:.0f} ms ({res['overhead_pct_hook']:+.2f}%) | capture alone "
          f"{res['capture_alone_ms']:.1f} ms ({res['capture_alone_pct']:.2f}% of a step, {res['decision_rows']} rows)")


if __name__ == "__main__":
    main()
