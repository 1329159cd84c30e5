"""Recovery forensics: does the tool skill survive a collapse, hidden behind the format?

Four probes on one checkpoint, each independent of the others:

    formats  the same tasks in other call syntaxes and with other surface content (formats.syntaxes); the
             spread is best minus worst content accuracy across them
    masked   greedy decoding with the spiking control tokens forbidden right after `<tool_call>` (recover.masked)
    repair   a few SFT steps on oracle data, against a fresh model of the same architecture given the same
             steps: the latent-skill ratio (recover.repair)

`run_recovery(ckpt)` runs them all and states plainly which probes found the skill (content accuracy >= 0.60)
and which did not. Whether the checkpoint has collapsed is decided by the one collapse rule of detect/rule.py. `render_recovery_table` and `recovery_markdown` present the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from collapse_probe.errors import UserError
from collapse_probe import world
from collapse_probe.models import load as model_load
from collapse_probe.tokens import resolve_control_tokens
from collapse_probe.formats.registry import HERMES
from collapse_probe.recover.evaluate import evaluate_format, format_spread
from collapse_probe.recover.grid import FORMATS, parse_format_list
from collapse_probe.recover.masked import ObserveAfterOpen, masked_eval
from collapse_probe.capture.stats import role_probs
from collapse_probe.detect.rule import DEFAULT_RULE
from collapse_probe.schema import Position, Source
from collapse_probe.recover.repair import sft_repair

__all__ = ["run_recovery", "load_checkpoint", "findings", "render_recovery_table", "recovery_markdown",
           "SKILL_THRESHOLD", "checkpoint_collapsed"]

SKILL_THRESHOLD = 0.6  # content accuracy at which a probe "found the skill"
# how the one collapse rule reads on a single checkpoint, for the findings
_RULE_TEXT = (f"detect.rule: greedy success below {DEFAULT_RULE.drop_frac:.2f} x 1.00 (no healthy reference) "
              f"and at least {DEFAULT_RULE.broken_frac:.0%} of assistant turns broken")

Progress = Callable[[str, int, int], None]  # (phase, done, total); phases: formats, masked, repair, fresh


def load_checkpoint(path: str | Path):
    """(model, tokenizer, control roles) of a local checkpoint for the embedded tool world: the one loader
    (`models.load`) with its checks, plus the world's control tokens, checked on the tokenizer before the weights
    load."""
    tok = model_load.load_tokenizer(model_load.checkpoint_dir(path))
    roles = resolve_control_tokens(tok)
    need = {"tool_open": world.TOOL_OPEN, "end_of_turn": world.IM_END}
    missing = [s for role, s in need.items() if roles.strings.get(role) != s]
    if missing:
        raise UserError(f"{path}: the tokenizer lacks {' and '.join(missing)} as single control tokens; recover "
                        "runs the embedded tool world (Qwen/Hermes ChatML), which needs them "
                        f"(see `collapse-probe tokens {path}`)")
    model, tok = model_load.load_pretrained(path)
    return model, tok, roles


def run_recovery(ckpt_path: str | Path, *, formats: str | Sequence[str] | None = None, n: int = 32,
                 repair_steps: int | None = None, fresh_max_steps: int = 300, progress: Progress | None = None,
                 max_turns: int = 8, skip_repair: bool = False, mask_roles: Sequence[str] | None = None,
                 repair_target: float = 0.8, tasks: str | None = None, template: str = "auto",
                 reference: str | Path | None = None) -> dict:
    """All recovery probes on one checkpoint. Returns

        {"canonical": {"validity", "success"},
         "formats": {NAME: {"validity", "content_accuracy", "success"}},
         "spread": best minus worst content accuracy across the formats,
         "masked": {"validity", "success", "content_accuracy", "masked_roles", ...},
         "repair": {"steps", "success_before", "success_after", "fresh_steps_to_same", ...} (None if skipped),
         "collapsed": the collapse rule of detect/rule.py on the canonical success and broken turns,
         "findings": [plain sentences]}
    """
    from collapse_probe.capture.probe_set import ProbeSet

    if tasks is not None:  # real tasks (BFCL, a JSONL file) in the model's own template: recover/chat_run.py
        from collapse_probe.recover.chat_run import run_chat_forensics

        return run_chat_forensics(ckpt_path, tasks, n=n, template=template, reference=reference,
                                  repair_steps=2 if repair_steps is None else repair_steps, skip_repair=skip_repair,
                                  progress=progress)
    repair_steps = 50 if repair_steps is None else repair_steps
    fmts = parse_format_list(formats)  # unknown names fail before anything loads
    if n < 1:
        raise UserError(f"n={n}: evaluate at least one task")
    if repair_steps < 1 and not skip_repair:
        raise UserError(f"repair_steps={repair_steps}: give at least 1 step, or skip the repair")
    if fresh_max_steps < 0:
        raise UserError(f"fresh_max_steps={fresh_max_steps} must be >= 0")
    model, tok, roles = load_checkpoint(ckpt_path)
    model.eval()
    tick = progress or (lambda phase, done, total: None)

    # canonical first, with an observer: on-policy p(role | right after <tool_call>) comes for free
    observer = ObserveAfterOpen(roles)
    canon = evaluate_format(model, tok, HERMES, n=n, max_turns=max_turns, logits_processor=observer)
    results: dict[str, dict] = {}
    details: dict[str, dict] = {}
    total = len(fmts)
    for i, fmt in enumerate(fmts):
        tick("formats", i, total)
        res = canon if fmt.name == HERMES else evaluate_format(model, tok, fmt, n=n, max_turns=max_turns)
        details[fmt.name] = res
        results[fmt.name] = {k: res[k] for k in ("validity", "content_accuracy", "success")}
    tick("formats", total, total)

    tick("masked", 0, 1)
    probe_scores = ProbeSet.from_world(tok, n=16, roles=roles).score(model)
    onpolicy = observer.probs()
    masked = masked_eval(model, tok, mask_roles, n=n, max_turns=max_turns, probe=probe_scores, onpolicy=onpolicy,
                         roles=roles)
    masked["probe_after_open"] = role_probs(probe_scores, Source.PROBE, Position.AFTER_OPEN)
    masked["onpolicy_after_open"] = onpolicy
    tick("masked", 1, 1)

    repair = None
    if not skip_repair:
        repair = sft_repair(model, tok, max_steps=repair_steps, fresh_max_steps=fresh_max_steps, n=n,
                            max_turns=max_turns, target=repair_target, success_before=canon["success"],
                            progress=tick)
    result = {
        "canonical": {"validity": canon["validity"], "success": canon["success"]},
        "formats": results,
        "spread": format_spread(results),
        "masked": masked,
        "repair": repair,
        "collapsed": checkpoint_collapsed(canon),
        "findings": [],
    }
    result["findings"] = findings(result, canonical_content=canon["content_accuracy"], details=details)
    return result


def checkpoint_collapsed(canonical: dict) -> bool:
    """The one collapse definition (detect.rule) on one checkpoint: canonical greedy success against a reference
    of 1.0, and broken turns = 1 - the canonical format validity (when known)."""
    validity = canonical.get("validity")
    broken = None if validity is None else 1.0 - float(validity)
    return DEFAULT_RULE.checkpoint_collapsed(float(canonical["success"]), broken, reference=1.0)


# ------------------------------------------------------------------------------------------------ findings
def _where(position: str) -> str:
    return "after <tool_call>" if position == Position.AFTER_OPEN.value else "inside an open <tool_call>"


def findings(result: dict, *, canonical_content: float | None = None,
             details: dict[str, dict] | None = None) -> list[str]:
    """Plain sentences: the verdict, which probes found the skill (content accuracy >= 0.60) and which did not.
    `details` (format name -> the full `evaluate_format` result) adds what the model wrote instead."""
    out: list[str] = []
    can, fmts, m, rep = result["canonical"], result["formats"], result.get("masked"), result.get("repair")
    collapsed = result["collapsed"]
    if canonical_content is None and HERMES in fmts:
        canonical_content = fmts[HERMES]["content_accuracy"]
    # the skill is "hidden" when the trained format does not show it; only then can a probe restore it
    hidden = collapsed or (canonical_content is not None and canonical_content < SKILL_THRESHOLD)
    state = "collapsed" if collapsed else "not collapsed"
    out.append(f"{state} ({_RULE_TEXT}): canonical greedy success {can['success']:.2f}, {can['validity']:.0%} of assistant turns "
               "well-formed" + (f", content accuracy {canonical_content:.2f}" if canonical_content is not None else ""))
    if DEFAULT_RULE.success_dropped(can["success"]) and can["validity"] >= 0.8:  # a drop the rule does not call
        out.append(f"the turns stay well-formed ({can['validity']:.0%}) while success is gone: this failure lives in "
                   "the content (wrong or repeated calls), not in a control-token spike")
    others = {k: v for k, v in fmts.items() if k != HERMES}
    found = {k: v for k, v in others.items() if v["content_accuracy"] >= SKILL_THRESHOLD}
    missed = {k: v for k, v in others.items() if v["content_accuracy"] < SKILL_THRESHOLD}
    if found:
        lead = "the skill shows with the format changed" if hidden else "the skill also holds"
        out.append(f"{lead} (content accuracy >= 0.60): " + ", ".join(
            f"{k} {v['content_accuracy']:.2f} (success {v['success']:.2f})" for k, v in found.items()))
    if missed:
        out.append("no skill visible (content accuracy < 0.60) in: " + ", ".join(
            f"{k} {v['content_accuracy']:.2f}" for k, v in missed.items()))
        stuck = {k: d["canonical_turn_frac"] for k, d in (details or {}).items()
                 if k in missed and FORMATS.get(k) is not None and FORMATS[k].kind == "syntax"
                 and d.get("canonical_turn_frac", 0.0) >= 0.5}
        if stuck:
            out.append("asked for another syntax, the model kept writing canonical <tool_call> calls (" + ", ".join(
                f"{k} {v:.0%} of turns" for k, v in stuck.items()) + "): it does not follow the syntax "
                "instruction, so these formats cannot show the skill either way")
        if not hidden:
            out.append("the model is healthy in its trained format, so these misses measure format/content-OOD "
                       "brittleness, not collapse damage")
    if len(fmts) > 1:
        out.append(f"format spread (best minus worst content accuracy over {len(fmts)} formats): "
                   f"{result['spread']:.2f}")
    masked_found = False
    if m:
        roles = " and ".join(m["masked_roles"]) or "nothing"
        where = _where(m.get("position", Position.AFTER_OPEN.value))
        how = {"auto": "spiking, picked automatically", "auto-fallback": "nothing spiked above 0.05, so the "
               "paper's token", "given": "as asked"}.get(m.get("selection", ""), "")
        changed = m.get("mask_changed", 0)
        if changed == 0:
            out.append(f"masking {roles} {where} ({how}) changed no greedy decision: it was never the top choice "
                       f"there (success {m['success']:.2f})")
        elif m["content_accuracy"] >= SKILL_THRESHOLD and hidden:
            masked_found = True
            alone = {r: v for r, v in (m.get("per_role") or {}).items() if v["content_accuracy"] >= SKILL_THRESHOLD}
            if len(m["masked_roles"]) == 1:
                tokens = "one token"
            elif alone:
                best = max(alone, key=lambda r: alone[r]["success"])
                tokens = (f"one token ({best} masked alone gives success {alone[best]['success']:.2f}, content "
                          f"accuracy {alone[best]['content_accuracy']:.2f})")
            else:
                tokens = f"{len(m['masked_roles'])} tokens together (none alone is enough)" if m.get("per_role") \
                    else f"{len(m['masked_roles'])} tokens"
            out.append(f"masking {roles} {where} restored {m['success']:.2f} success (content accuracy "
                       f"{m['content_accuracy']:.2f}, {changed} greedy choices overridden): the skill was hidden by "
                       f"{tokens}")
        elif m["content_accuracy"] >= SKILL_THRESHOLD:
            out.append(f"masking {roles} {where} overrode {changed} greedy choices; success {m['success']:.2f}, "
                       f"content accuracy {m['content_accuracy']:.2f}")
        else:
            out.append(f"masking {roles} {where} ({how}) did not bring the skill back: success {m['success']:.2f}, "
                       f"content accuracy {m['content_accuracy']:.2f}, though it overrode {changed} greedy choices")
    if collapsed and not found and not masked_found:
        out.append("no perturbed format and no masking recovered the skill: damage spread beyond one token")
    if rep:
        b, a, s = rep["success_before"], rep["success_after"], rep["steps"]
        if s == 0:
            out.append(f"no SFT repair needed: canonical success {b:.2f} already meets the target {rep['target']:.2f}")
        elif rep["reached_target"]:
            out.append(f"{s} SFT repair steps restored canonical success {b:.2f} -> {a:.2f}")
        else:
            out.append(f"{s} SFT repair steps took canonical success only {b:.2f} -> {a:.2f} "
                       f"(target {rep['target']:.2f} not reached)")
        ratio = rep.get("latent_skill_ratio")
        if rep.get("fresh_steps_to_same") is not None:
            verdict = ("the skill was latent, not lost" if ratio >= 3 and rep["reached_target"] else
                       "a head start over a fresh model" if ratio >= 3 else
                       "little head start over a fresh model: the skill was largely lost")
            out.append(f"a fresh model of the same architecture needed {rep['fresh_steps_to_same']} steps to reach "
                       f"{a:.2f} ({ratio:.1f}x the repair): {verdict}")
        elif ratio is not None:
            verdict = "the skill was latent, not lost" if rep["reached_target"] else "a head start over a fresh model"
            out.append(f"a fresh model did not reach {a:.2f} within {rep['fresh_max_steps']} steps (success "
                       f"{rep['fresh_success_at_budget']:.2f} at budget): more than {ratio:.0f}x the repair, "
                       f"{verdict}")
        elif rep.get("fresh_note"):
            out.append(f"fresh-model comparison: {rep['fresh_note']}")
    return out


# ------------------------------------------------------------------------------------------------ rendering
def _esc(s: str) -> str:
    from rich.markup import escape

    return escape(s)


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    rows = []
    can = result["canonical"]
    for name, r in result["formats"].items():
        fmt = FORMATS.get(name)
        note = fmt.description if fmt else ""
        rows.append((name, _f(r["validity"]), _f(r["content_accuracy"]), _f(r["success"]), note))
    if HERMES not in result["formats"]:
        rows.insert(0, (HERMES, _f(can["validity"]), "-", _f(can["success"]), "trained format"))
    m = result.get("masked")
    if m:
        rows.append((f"masked {'+'.join(m['masked_roles'])} @ {m.get('position', Position.AFTER_OPEN.value)}",
                     _f(m["validity"]),
                     _f(m["content_accuracy"]), _f(m["success"]),
                     f"{m.get('selection', '')}; overrode {m.get('mask_changed', 0)} greedy choices"))
    rep = result.get("repair")
    if rep:
        reached = "target reached" if rep["reached_target"] else "target not reached"
        rows.append((f"SFT repair ({rep['steps']} steps)", "-", "-",
                     f"{_f(rep['success_before'])} -> {_f(rep['success_after'])}", reached))
        if rep.get("fresh_steps_to_same") is not None:
            rows.append((f"fresh model ({rep['fresh_steps_to_same']} steps)", "-", "-",
                         _f(rep.get("fresh_success")), f"latent-skill ratio {rep['latent_skill_ratio']:.1f}x"))
        elif rep.get("latent_skill_ratio") is not None:
            rows.append((f"fresh model ({rep['fresh_max_steps']} steps)", "-", "-",
                         _f(rep.get("fresh_success_at_budget")),
                         f"never matched; latent-skill ratio > {rep['latent_skill_ratio']:.0f}x"))
    return rows


def render_recovery_table(result: dict):
    """A rich Table: one row per probe (validity, content accuracy, success, note), findings as the caption."""
    from rich.table import Table

    if result.get("kind") == "task_forensics":
        from collapse_probe.recover.chat_run import render_chat_forensics

        return render_chat_forensics(result)
    collapsed = "yes" if result["collapsed"] else "no"
    table = Table(title=f"Recovery forensics (collapsed: {collapsed}; format spread {result['spread']:.2f})",
                  caption=_esc("\n".join(f"- {s}" for s in result.get("findings", []))), caption_justify="left")
    for col, kw in (("probe", {}), ("validity", {"justify": "right"}), ("content acc.", {"justify": "right"}),
                    ("success", {"justify": "right"}), ("note", {"style": "dim"})):
        table.add_column(col, **kw)
    for row in _rows(result):
        table.add_row(*(_esc(c) for c in row))
    return table


def recovery_markdown(result: dict) -> str:
    """Markdown for `write_report(..., extra_sections=[("Recovery", recovery_markdown(result))])`."""
    lines = [f"**Collapsed: {'yes' if result['collapsed'] else 'no'}.** Format spread (best minus worst content "
             f"accuracy): {result['spread']:.2f}.", "",
             "| probe | validity | content acc. | success | note |", "|---|---|---|---|---|"]
    for row in _rows(result):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    lines += ["", "Findings:", ""] + [f"- {s}" for s in result.get("findings", [])]
    return "\n".join(lines) + "\n"
