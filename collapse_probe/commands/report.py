"""A short, factual Markdown report of one run: figure, verdict with the baselines side by side, final format-state
mix, top reason codes and the run's config. Other features add sections with `extra_sections`.

Default location: `reports/<run name>/report.md` (relative to the working directory), next to the figure
`timeline.{pdf,svg,png}`. Nothing is written into the run directory.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from collapse_probe import schema
from collapse_probe.detect.monitor import replay
from collapse_probe.errors import UserError
from collapse_probe.runs.rundir import RunDir
from collapse_probe.runs.timeline import Timeline

__all__ = ["default_report_dir", "plot_run", "printable", "run_name", "write_report"]

_BASELINE_LABELS = {"entropy_drop": "entropy drop", "reward_var_collapse": "in-group reward variance collapse",
                    "grad_norm_spike": "grad-norm spike", "validity_drop": "format validity drop"}


def run_name(path: str | os.PathLike) -> str:
    """The run's name: its run dir's (the HF output dir above collapse_probe/ for a callback's files), as
    printable text (bytes of a non-UTF-8 name are escaped, so figures and Markdown can hold it)."""
    return printable(RunDir(path).name)


def printable(text: str | os.PathLike) -> str:
    """Text any encoder accepts: undecodable file-name bytes (surrogates) become backslash escapes."""
    return os.fsdecode(text).encode("utf-8", "backslashreplace").decode("utf-8")


def default_report_dir(path: str | os.PathLike) -> Path:
    return Path("reports") / run_name(path)


FIGURES = ("pdf", "svg", "png")


def run_identity(run_dir: str | os.PathLike) -> dict:
    """What a report or figure of a run is the result of: the run itself (wherever the user pointed in it)."""
    return {"run": os.fsdecode(RunDir(run_dir).root.resolve())}


def plot_run(run_dir: str | os.PathLike, out_stem: str | os.PathLike | None = None, *, verdict=None,
             title: str | None = None, timeline: Timeline | None = None) -> tuple[list[Path], object]:
    """Timeline + verdict + figure; returns (paths of pdf/svg/png, verdict). Pass `timeline` when the run is
    already read (the report does), so it is not read twice."""
    from collapse_probe.plots.timeline import plot_timeline

    tl = timeline if timeline is not None else Timeline.from_run(run_dir)
    verdict = verdict if verdict is not None else replay(tl.records())
    stem = Path(out_stem) if out_stem is not None else default_report_dir(run_dir) / "timeline"
    if stem.suffix.lower() in (".pdf", ".svg", ".png"):
        stem = stem.with_suffix("")
    try:
        paths = plot_timeline(tl, verdict, stem, title=title if title is not None else run_name(run_dir))
    except OSError as exc:
        raise UserError(f"cannot write the figure to {stem}: {exc.strerror}; pass --out with a writable "
                        "location") from None
    return paths, verdict


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _verdict_section(verdict, tl) -> str:
    d = verdict
    succ = tl.success().dropna()
    lines = [f"- **Collapsed: {'yes' if d.collapsed else 'no'}.**"]
    if d.collapse_step is not None and not d.collapsed:
        lines[0] += " Reward dropped, but no control-token or format warning preceded it."
    if len(succ):
        lines.append(f"- `{succ.name}`: {_fmt(float(succ.iloc[0]))} at step {int(succ.index[0])}, peak "
                     f"{_fmt(float(succ.max()))}, {_fmt(float(succ.iloc[-1]))} at step {int(succ.index[-1])}.")
    if d.collapsed:
        lines.append(f"- Collapse confirmed at step {d.confirmed_at}: {d.collapse_reason}.")
    if d.lead_steps is not None:
        when = "before" if d.lead_steps >= 0 else "after"
        lines.append(f"- First alert available at step {d.first_alert_step}, {abs(d.lead_steps)} steps {when} the "
                     f"reward drop (its onset, dated back, {d.onset_lead_steps:+d}).")
    lines += ["", "| signal | onset step | alert at | lead over reward drop (steps, from the alert) | detail |",
              "|---|---|---|---|---|"]

    def row(label, ev, detail="", lead_too=True):
        lead = None if ev is None or d.collapse_step is None or not lead_too else d.collapse_step - ev.detected_at
        at = "–" if ev is None else str(ev.detected_at)
        lines.append(f"| {label} | {_fmt(None if ev is None else ev.step)} | {at} | {_fmt(lead)} | {detail} |")

    for kind, label in (("control_drift", "control-token drift (ours)"), ("control_spike", "control-token spike (ours)")):
        ev = d.first_event(kind)
        row(label, ev, "" if ev is None else f"`{ev.key}` {ev.direction}, {ev.magnitude:+.2f} log-odds")
    ev = d.first_event("format_breakage")
    row("format breakage (ours)", ev, "" if ev is None else f"`{ev.key}` up, {ev.magnitude:+.2f} log-odds")
    ev = d.first_event("reward_drop")
    row("reward drop", ev, "" if ev is None else f"`{ev.key}` below half its peak", lead_too=False)
    for name, b in d.baselines.items():
        ev = d.first_event(name)
        detail = "not logged" if b.get("logged") is False else ("no alarm" if ev is None else f"`{ev.key}`")
        row(f"baseline: {_BASELINE_LABELS.get(name, name)}", ev, detail)
    return "\n".join(lines)


def _mix_section(tl) -> str:
    from collapse_probe.formats.classify import REASONS

    mix = tl.state_mix().dropna(how="all")
    out = []
    if mix.empty:
        out.append("Format states were not logged.")
    else:
        step = int(mix.index[-1])
        first = mix.iloc[0]
        out += [f"At step {step} (first logged step {int(mix.index[0])} for comparison):", "",
                "| state | final | first |", "|---|---|---|"]
        for s, v in mix.iloc[-1].items():
            out.append(f"| {s} | {_fmt(float(v))} | {_fmt(float(first[s]))} |")
    last = {code: tl.series(k) for k in tl.keys()  # noqa: SIM118 - a Timeline, not a dict
            if (code := schema.parse_reason_key(k)) is not None}
    if last:
        steps = [s for s in tl.steps if any(v.loc[s] == v.loc[s] for v in last.values())]
        if steps:
            s = steps[-1]
            top = sorted(((r, float(v.loc[s])) for r, v in last.items() if v.loc[s] == v.loc[s] and v.loc[s] > 0),
                         key=lambda rv: -rv[1])[:5]
            out += ["", f"Top reason codes at step {int(s)}:", "", "| reason | state | fraction | meaning |",
                    "|---|---|---|---|"]
            for r, v in top:
                state, meaning = REASONS.get(r, (None, ""))
                out.append(f"| {r} | {getattr(state, 'value', '–')} | {_fmt(v)} | {meaning} |")
    return "\n".join(out)


def reward_summary(run: RunDir) -> str | None:
    """One sentence on the reward that trained the run, from our trainer's config.json (None for other
    trainers' runs): a collapse under a format bonus is reward hacking, one under a binary outcome is not."""
    c = run.config_path
    try:
        cfg = json.loads(c.read_text()) if c is not None else None
    except (OSError, ValueError):
        return None
    reward = cfg.get("reward") if isinstance(cfg, dict) else None
    if not isinstance(reward, dict) or cfg.get("mode") == "sft":
        return None
    harness = "paper-like harness (a bare tag is an empty reply; errors are observations)" \
        if cfg.get("harness") == "paper" else "strict harness"
    bonus = reward.get("tag_bonus") or 0
    signals = _signals(cfg)
    if bonus > 0:
        return signals + (f"Reward: outcome {reward.get('correct')} plus a format bonus of {bonus} per turn that opens a tool "
                f"call (at most {reward.get('max_bonus_tags', 8)} turns), {harness}. A collapse into bare tags here "
                "is format-bonus reward hacking: the bare-tag policy earns more than a correct solution.")
    return signals + (f"Reward: binary outcome ({reward.get('correct')} correct, {reward.get('wrong')} wrong, no "
                      f"format term), {harness}. A collapse here loses reward: it comes from the training dynamics, "
                      "not the reward.")


def _signals(cfg: dict) -> str:
    """The supervisory signals the run trained with (train/offpolicy.py, hints.py, error_sft.py, judge.py), as a
    sentence ending in a space, or '' when none was on."""
    g = cfg.get("group_size", 8)
    parts = []
    if cfg.get("offpolicy_samples"):
        parts.append(f"{cfg['offpolicy_samples']} of {g} samples per group the oracle's trajectory (off-policy, "
                     "weighted p/(p+0.1))")
    if cfg.get("hint_samples"):
        parts.append(f"{cfg['hint_samples']} of {g} sampled with a hint (removed for the loss)")
    if cfg.get("error_sft_every"):
        judge = f" and reflections by {cfg['judge']}" if cfg.get("judge") else \
            " and the rule judge's reflections" if cfg.get("reflection") else ""
        parts.append(f"SFT on the failed prompts' corrected turns{judge} every {cfg['error_sft_every']} RL steps")
    if cfg.get("mode") == "interleaved":
        parts.append(f"SFT on the ground truth of failed prompts every {cfg.get('sft_every')} RL steps")
    return ("Supervisory signals: " + "; ".join(parts) + ". ") if parts else ""


def _config_section(run: RunDir) -> str:
    c = run.config_path
    if c is None:
        return "No config.json next to the metrics."
    try:
        body = json.dumps(json.loads(c.read_text()), indent=2, sort_keys=False)
    except ValueError:
        body = c.read_text(errors="replace")
    return f"From `{c}`:\n\n```json\n{body}\n```"


def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, verdict=None,
                 extra_sections: list[tuple[str, str]] | tuple = ()) -> Path:
    """Write `out_dir/report.md` (default reports/<run name>/) with the timeline figure next to it; returns
    the report's path. `extra_sections` are (title, markdown body) pairs appended in order."""
    tl = Timeline.from_run(run_dir)
    f = printable(tl.path)
    out = Path(out_dir) if out_dir is not None else default_report_dir(run_dir)
    paths, verdict = plot_run(run_dir, out / "timeline", verdict=verdict, timeline=tl)
    name = run_name(run_dir)
    span = f"steps {int(tl.steps[0])}..{int(tl.steps[-1])} ({len(tl)} logged)"
    caps = ", ".join(f"{s} ({', '.join(tl.positions(s))})" for s in tl.sources()) or "none"
    parts = [f"# collapse-probe report: {name}", "",
             f"Run: `{f}` — {span}. Control-token captures: {caps}.", "",
             f"![timeline]({paths[2].name})", "",
             (f"Figure: [PDF]({paths[0].name}) · [SVG]({paths[1].name}). (a) next-token probabilities at the "
              "decision positions, (b) format-state mix, (c) outcome; vertical lines mark the detected onsets."), "",
             "## Verdict", "", _verdict_section(verdict, tl), "",
             *([reward_summary(RunDir(run_dir)), ""] if reward_summary(RunDir(run_dir)) else []),
             "## Format states", "", _mix_section(tl), "",
             "## Config", "", _config_section(RunDir(run_dir)), ""]
    for title, body in extra_sections:
        parts += [f"## {title}", "", body.rstrip(), ""]
    report = out / "report.md"
    try:
        out.mkdir(parents=True, exist_ok=True)
        report.write_text("\n".join(parts), encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {report}: {exc.strerror}; pass --out with a writable directory") from None
    return report
