"""Forensics on the user's own checkpoint, on real tasks, in the model's own chat template (`recover --tasks`).

    run_chat_forensics(CKPT, "bfcl:multi_turn_base", n=4)

1. the template: native tool support, or the Hermes fallback (said in `template.note`), `--template` to choose
2. the format grid: the native/Hermes format, then BFCL's python-list prompting mode, untagged JSON and XML, greedy
   (recover/chat_eval.py): success, content accuracy (in any syntax), validity, turn accuracy, seconds per task
3. the probe set: decision-position probabilities on gold trajectories of the eval tasks (recover/chat_probe.py)
4. masked decoding: end-of-turn forbidden right after the call tag (however many tokens the tag is)
5. SFT repair on the `repair` split (disjoint from `eval`) against the same steps from `--reference` or a fresh
   model of the same architecture: the latent-skill ratio

`on_result(partial)` is called after each phase with the result so far, so a long CPU run leaves its figures
behind as it goes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from collapse_probe.errors import UserError
from collapse_probe.recover.chat_episode import PROMPT_SYNTAXES, TEMPLATES, chat_formats
from collapse_probe.recover.chat_eval import evaluate_chat, masked_chat
from collapse_probe.recover.chat_probe import chat_repair, probe_decisions
from collapse_probe.tasks import open_source
from collapse_probe.tokens import resolve_control_tokens

Progress = Callable[[str, int, int], None]


def load_model(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of any local HF causal LM directory (safetensors only, remote code off)."""
    from collapse_probe.models.load import load_pretrained

    model, tok = load_pretrained(path)
    return model.to(device).eval(), tok


def run_chat_forensics(ckpt: str | Path, tasks: str, *, n: int = 4, template: str = "auto",
                       reference: str | Path | None = None, syntaxes: Sequence[str] = PROMPT_SYNTAXES,
                       max_steps: int = 2, max_new_tokens: int | None = None, repair_steps: int = 2,
                       repair_batch: int = 1, repair_lr: float = 1e-4, skip_repair: bool = False,
                       skip_masked: bool = False, device: str = "cpu", progress: Progress | None = None,
                       on_result: Callable[[dict], None] | None = None) -> dict:
    if n < 1:
        raise UserError(f"-n {n}: evaluate at least one task")
    if repair_steps < 1 and not skip_repair:
        raise UserError(f"--repair-steps {repair_steps}: give at least 1 step, or --skip-repair")
    if template not in TEMPLATES:
        raise UserError(f"unknown --template {template!r}: choose native, hermes or auto")
    source = open_source(tasks)  # bad task input fails before the model loads
    eval_tasks = source.split("eval", n)
    repair_tasks = source.split("repair", max(repair_steps * repair_batch, 1)) if not skip_repair else []
    model, tok = load_model(ckpt, device)
    roles = resolve_control_tokens(tok)
    fmts, info, say = chat_formats(tok, template, syntaxes)
    say_ = on_result or (lambda r: None)
    out: dict = {"kind": "task_forensics", "checkpoint": str(ckpt), "tasks": source.name, "n": len(eval_tasks),
                 "task_ids": [t.id for t in eval_tasks], "device": device,
                 "template": {"used": fmts[0].name, "note": say, "uses_tools": info.uses_tools,
                              "tool_role": info.tool_role, "native_syntax": info.native},
                 "roles": {r: roles.strings[r] for r in ("tool_open", "end_of_turn") if r in roles.strings},
                 "max_steps_per_turn": max_steps, "formats": {}, "timing_s": {}}
    t0 = time.perf_counter()
    for fmt in fmts:
        out["formats"][fmt.name] = evaluate_chat(model, tok, fmt, eval_tasks, roles, max_steps=max_steps,
                                                 max_new_tokens=max_new_tokens, keep_examples=1,
                                                 progress=progress, phase=f"format {fmt.name}")
        say_(out)
    out["timing_s"]["formats"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if progress:
        progress("probe", 0, 1)
    probe = probe_decisions(model, tok, fmts[0], eval_tasks, roles)
    out["probe"] = probe["decisions"]
    out["timing_s"]["probe"] = time.perf_counter() - t0
    say_(out)
    if not skip_masked:
        t0 = time.perf_counter()
        out["masked"] = masked_chat(model, tok, fmts[0], eval_tasks, roles, max_steps=max_steps,
                                    max_new_tokens=max_new_tokens, progress=progress)
        out["timing_s"]["masked"] = time.perf_counter() - t0
        say_(out)
    if not skip_repair:
        t0 = time.perf_counter()
        ref_model = load_model(reference, device)[0] if reference else None
        out["repair"] = chat_repair(model, tok, fmts[0], repair_tasks, eval_tasks, roles, reference=ref_model,
                                    reference_name=str(reference) if reference else "fresh", steps=repair_steps,
                                    batch=repair_batch, lr=repair_lr, before=out["formats"][fmts[0].name],
                                    max_steps=max_steps, progress=progress)
        out["timing_s"]["repair"] = time.perf_counter() - t0
        say_(out)
    out["findings"] = findings(out)
    say_(out)
    return out


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:.2f}"


def findings(out: dict) -> list[str]:
    """Plain sentences: which format showed the skill, what masking and repair did."""
    lines = [f"template: {out['template']['note']}"]
    fm = out["formats"]
    first = next(iter(fm), None)
    if first:
        for name, r in fm.items():
            lines.append(f"{name}: success {_f(r['success'])}, content accuracy {_f(r['content_accuracy'])}, "
                         f"validity {_f(r['validity'])}, {r['seconds_per_task']:.0f} s/task")
        best = max(fm, key=lambda k: fm[k]["content_accuracy"] or 0.0)
        if best != first and (fm[best]["content_accuracy"] or 0) > (fm[first]["content_accuracy"] or 0):
            lines.append(f"more of the skill shows in {best} than in the trained format {first}: the format, not only "
                         "the skill, limits it")
    m = out.get("masked")
    if m:
        lines.append(f"masking {'+'.join(m['masked_roles'])} after {m['tag']!r} overrode {m['mask_changed']} greedy "
                     f"choices: success {_f(m['success'])}, content accuracy {_f(m['content_accuracy'])}")
    rep = out.get("repair")
    if rep:
        lines.append(f"{rep['steps']} SFT steps: content accuracy {_f(rep['before']['content_accuracy'])} -> "
                     f"{_f(rep['after']['content_accuracy'])}; {rep['reference']} reference after the same steps "
                     f"{_f(rep['reference_after']['content_accuracy'])}; latent-skill ratio "
                     f"{_f(rep['latent_skill_ratio'])} ({rep['latent_skill_ratio_note']})")
    return lines


def checkpoint_decisions(path: str | Path, tasks: str, *, n: int = 4, template: str = "auto", device: str = "cpu",
                         progress: Progress | None = None) -> dict:
    """Decision-position probabilities of the gold probe set (the eval split's first `n` tasks, rendered by each
    checkpoint's own template) for every checkpoint under `path` (or `path` itself): `analyze --tasks`."""
    from collapse_probe.recover.chat_probe import probe_decisions
    from collapse_probe.runs.rundir import find_checkpoints, usable_checkpoints

    source = open_source(tasks)
    eval_tasks = source.split("eval", n)
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such directory; pass a run directory with checkpoint-N/ folders or one "
                        "checkpoint directory")
    ckpts = usable_checkpoints(find_checkpoints(p))
    if not ckpts:
        raise UserError(f"{path}: no checkpoint with safetensors weights here (checkpoint-N/, global_step_N/ or a "
                        "save_pretrained directory)")
    rows = []
    for i, ck in enumerate(ckpts):
        if progress:
            progress("checkpoints", i, len(ckpts))
        model, tok = load_model(ck.path, device)
        fmts, _, say = chat_formats(tok, template, ())
        got = probe_decisions(model, tok, fmts[0], eval_tasks, resolve_control_tokens(tok))
        rows.append({"step": ck.step, "path": str(ck.path), "template": say, "decisions": got["decisions"]})
        del model
    if progress:
        progress("checkpoints", len(ckpts), len(ckpts))
    return {"kind": "task_probe", "path": str(p), "tasks": source.name, "n": len(eval_tasks),
            "task_ids": [t.id for t in eval_tasks], "checkpoints": rows}


def render_chat_forensics(result: dict):
    """A rich Table of `run_chat_forensics`: one row per format, masked decoding and repair; findings below."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Forensics on {result['tasks']} (n={result['n']}, greedy, {result['device']})",
                  caption=escape("\n".join(f"- {s}" for s in result.get("findings", []))), caption_justify="left")
    for col in ("probe", "success", "content acc.", "validity", "turn acc.", "s/task"):
        table.add_column(col, justify="left" if col == "probe" else "right")
    rows = [(k, r) for k, r in result["formats"].items()]
    if result.get("masked"):
        rows.append((f"masked {'+'.join(result['masked']['masked_roles'])}", result["masked"]))
    for name, r in rows:
        table.add_row(escape(name), _f(r["success"]), _f(r["content_accuracy"]), _f(r["validity"]),
                      _f(r["turn_accuracy"]), f"{r['seconds_per_task']:.0f}")
    rep = result.get("repair")
    if rep:
        for name, r in ((f"repair ({rep['steps']} SFT steps)", rep["after"]),
                        (f"{rep['reference']} (same steps)", rep["reference_after"])):
            table.add_row(escape(name), _f(r["success"]), _f(r["content_accuracy"]), _f(r["validity"]),
                          _f(r["turn_accuracy"]), "")
    return table


def render_decisions(result: dict) -> str:
    """`analyze --tasks`: one line per checkpoint with its decision-position probabilities."""
    lines = [f"{result['tasks']}: gold trajectories of {result['n']} tasks, each checkpoint's own template"]
    for r in result["checkpoints"]:
        lines.append(f"  step {r['step']:>6}: " + ", ".join(f"{k} {_f(v)}" for k, v in r["decisions"].items()))
    return "\n".join(lines)
