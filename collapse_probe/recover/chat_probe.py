"""Gold trajectories of `tasks.ToolTask`s in the model's own template: the probe set and SFT repair data.

A gold conversation is the task's user turns with, per turn, one assistant message making the ground-truth calls
(in the format's syntax), their real results from the task's environment (BFCL: the classes' own outputs) in the
tool role, and a short closing answer (`GOLD_ANSWER`, BFCL has none). Rendered by `capture.probe_set.ProbeSet
.from_messages` (assistant spans found by rendering prefixes), the same conversations give

    the probe set     decision-position probabilities scored by `ProbeSet.score` (capture/stats.py): right after
                      `<tool_call>\\n` the JSON opening `{"`, end-of-turn and the tag again; at a turn's start the
                      tag (`DECISION_KEYS`)
    the repair data   SFT sequences (assistant tokens in the loss) from the `repair` split, disjoint from `eval`

`chat_repair` trains a copy of the checkpoint for a fixed number of steps on that data and evaluates it in the
same format; the same steps from a reference (the user's checkpoint before RL, or a fresh model of the same
architecture) give the latent-skill ratio: the checkpoint's content accuracy after the steps over the reference's.
"""

from __future__ import annotations

import copy
import random
from typing import Any, Callable, Sequence

import torch

from collapse_probe.capture.probe_set import ProbeSet
from collapse_probe.capture.stats import role_probs
from collapse_probe.recover.chat_episode import ChatFormat
from collapse_probe.recover.chat_eval import evaluate_chat, render_calls
from collapse_probe.schema import LOSS, Position, Source, cp_chain_key
from collapse_probe.tasks import ToolTask
from collapse_probe.tokens import ControlTokens

GOLD_ANSWER = "Done."
# (position, role) pairs the forensics reports: the paper's spike and its neighbours
DECISIONS = ((Position.AFTER_OPEN, "json_open"), (Position.AFTER_OPEN, "end_of_turn"),
             (Position.AFTER_OPEN, "tool_open"), (Position.TURN_START, "tool_open"))
Progress = Callable[[str, int, int], None]


def gold_conversation(task: ToolTask, fmt: ChatFormat) -> list[dict]:
    """The task solved by its ground truth, as plain messages (see the module docstring)."""
    env = task.environment()
    conv: list[dict] = []
    for k, msgs in enumerate(task.turns):
        conv += [dict(m) for m in msgs]
        calls = task.gold[k]
        if calls:
            conv.append({"role": "assistant", "content": render_calls(fmt, calls)})
            conv += [{"role": "tool", "content": env.call(c["name"], c["arguments"])} for c in calls]
        conv.append({"role": "assistant", "content": GOLD_ANSWER})
        env.end_turn()
    return conv


def gold_set(tok: Any, fmt: ChatFormat, tasks: Sequence[ToolTask], roles: ControlTokens) -> ProbeSet:
    """Gold conversations rendered by the model's template through `fmt` (tools of the task's last turn)."""
    convs, tools = [], None
    for task in tasks:
        tools = task.tools_at(len(task.turns))
        convs.append(fmt.messages(gold_conversation(task, fmt), tools))
    # one tools list per set: a template with native tool support renders them; otherwise they are in the text
    return ProbeSet.from_messages(tok, convs, tools=tools if fmt.native_tools else None, roles=roles)


def decision_probs(scores: dict[str, float]) -> dict[str, float | None]:
    """{`after_open/json_open`, `after_open/end_of_turn`, `after_open/tool_open`, `turn_start/tool_open`: p}; for a
    tag of several tokens p is its first piece's (capture's convention) and `.../chain` adds the whole tag's."""
    out: dict[str, float | None] = {}
    for pos, role in DECISIONS:
        out[f"{pos.value}/{role}"] = role_probs(scores, Source.PROBE, pos).get(role)
        chain = cp_chain_key(Source.PROBE.value, pos.value, role)  # a tag of several tokens: the whole tag
        if chain in scores:
            out[f"{pos.value}/{role}/chain"] = scores[chain]
    return out


def probe_decisions(model: torch.nn.Module, tok: Any, fmt: ChatFormat, tasks: Sequence[ToolTask],
                    roles: ControlTokens) -> dict:
    """Score the gold probe set on `model`: the compact decision probabilities plus every `cp/probe/...` key."""
    scores = gold_set(tok, fmt, tasks, roles).score(model, batch_size=1)
    return {"decisions": decision_probs(scores), "records": scores}


def _sft(model: torch.nn.Module, tok: Any, data: ProbeSet, *, steps: int, batch: int, lr: float, seed: int,
         progress: Progress | None, phase: str) -> list[float]:
    from collapse_probe.train.config import TrainConfig
    from collapse_probe.train.sft import sft_update

    cfg = TrainConfig(mode="sft", lr=lr, grad_clip=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    order = list(range(len(data.seqs)))
    random.Random(seed).shuffle(order)
    model.train()
    losses = []
    for step in range(steps):
        pick = [order[(step * batch + j) % len(order)] for j in range(batch)]
        rec = sft_update(model, opt, tok, [data.seqs[i] for i in pick], [data.gen_masks[i] for i in pick], cfg)
        losses.append(float(rec[LOSS]))
        if progress:
            progress(phase, step + 1, steps)
    model.eval()
    return losses


def chat_repair(model: torch.nn.Module, tok: Any, fmt: ChatFormat, repair_tasks: Sequence[ToolTask],
                eval_tasks: Sequence[ToolTask], roles: ControlTokens, *, reference: torch.nn.Module | None = None,
                reference_name: str = "fresh", steps: int = 8, batch: int = 2, lr: float = 1e-4, seed: int = 0,
                before: dict | None = None, max_steps: int = 4, progress: Progress | None = None) -> dict:
    """SFT a copy of `model` for `steps` on the repair split's gold conversations, then evaluate on `eval_tasks`;
    the same for `reference` (a fresh model of the same architecture when None). See the module docstring."""
    from collapse_probe.recover.repair import fresh_like

    data = gold_set(tok, fmt, repair_tasks, roles)
    if before is None:
        before = evaluate_chat(model, tok, fmt, eval_tasks, roles, max_steps=max_steps, progress=progress,
                               phase="repair-eval")
    work = copy.deepcopy(model)
    losses = _sft(work, tok, data, steps=steps, batch=batch, lr=lr, seed=seed, progress=progress, phase="repair")
    after = evaluate_chat(work, tok, fmt, eval_tasks, roles, max_steps=max_steps, progress=progress,
                          phase="repair-eval")
    del work
    ref = copy.deepcopy(reference) if reference is not None else fresh_like(model, seed=seed)
    ref_before = evaluate_chat(ref, tok, fmt, eval_tasks, roles, max_steps=max_steps, progress=progress,
                               phase="reference-eval")
    ref_losses = _sft(ref, tok, data, steps=steps, batch=batch, lr=lr, seed=seed, progress=progress,
                      phase="reference")
    ref_after = evaluate_chat(ref, tok, fmt, eval_tasks, roles, max_steps=max_steps, progress=progress,
                              phase="reference-eval")
    del ref
    keys = ("success", "content_accuracy", "validity", "turn_accuracy")
    ca, cr = after.get("content_accuracy"), ref_after.get("content_accuracy")
    return {
        "steps": steps, "batch": batch, "lr": lr, "format": fmt.name, "repair_tasks": len(repair_tasks),
        "before": {k: before.get(k) for k in keys}, "after": {k: after.get(k) for k in keys},
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "reference": reference_name,
        "reference_before": {k: ref_before.get(k) for k in keys}, "reference_after": {k: ref_after.get(k) for k in keys},
        "reference_loss_first": ref_losses[0] if ref_losses else None,
        "reference_loss_last": ref_losses[-1] if ref_losses else None,
        "latent_skill_ratio": (ca / cr) if ca is not None and cr else None,
        "latent_skill_ratio_note": ("content accuracy after the same SFT steps, checkpoint over reference"
                                    if ca is not None and cr else "undefined: the reference's content accuracy "
                                    "after the same steps is 0"),
    }
