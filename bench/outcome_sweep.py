"""Where does binary-reward GRPO collapse? A sweep of `grpo-outcome` settings, traced at the after-open position.

Each configuration is the `grpo-outcome` preset (binary 0/1 outcome reward, no format term, the paper-like
harness) with a few fields changed. Per run the table gives success (start, min, end), the on-policy
p(end-of-turn right after `<tool_call>\\n`) (start, max, end), the summed gradient-pressure parts at that position
for end-of-turn and `{"` (chosen / other, schema.Part), the most common malformed-turn reason, and whether it
collapsed (success below 20% of step 0 with p(end-of-turn) above 0.3 first: the paper's form).

    python bench/outcome_sweep.py                       # every configuration, seed 0, into runs/outcome-sweep
    python bench/outcome_sweep.py --only lr2e-3,t1.3    # some of them
    python bench/outcome_sweep.py --no-train            # the table from runs already there

Writes reports/outcome-sweep/table.md, table.json and traces.jsonl (per run and step). Complete runs are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# name: (start preset, {TrainConfig field: value}); everything else is grpo-outcome's
CONFIGS: dict[str, tuple[str, dict]] = {
    "preset": ("instruct", {}),
    "lr1e-3": ("instruct", {"lr": 1e-3}),
    "lr2e-3": ("instruct", {"lr": 2e-3}),
    "lr5e-3": ("instruct", {"lr": 5e-3}),
    "lr2e-3-t1.3": ("instruct", {"lr": 2e-3, "temperature": 1.3}),
    "lr2e-3-g4": ("instruct", {"lr": 2e-3, "group_size": 4}),
    "lr2e-3-turns12": ("instruct", {"lr": 2e-3, "max_turns": 12}),
    "lr2e-3-strict": ("instruct", {"lr": 2e-3, "harness": "strict"}),
    "lr2e-3-kl": ("instruct", {"lr": 2e-3, "kl_coef": 0.05}),
    "lr2e-3-sftfirst": ("instruct-sft", {"lr": 2e-3}),
    "lr2e-3-nowarmup": ("instruct", {"lr": 2e-3, "warmup_steps": 0}),
    "lr1e-3-t1.5": ("instruct", {"lr": 1e-3, "temperature": 1.5}),
    "sftfirst": ("instruct-sft", {}),  # grpo-outcome-sft: the preset's RL from instruct + tool SFT
}
EOT, JSON = "end_of_turn", "json_open"


def _train(out: Path, names: list[str], steps: int, seed: int, init_override: dict[str, str], threads: int) -> None:
    from collapse_probe.runs.joined import read_records
    from collapse_probe.train.presets import cached_model, get_preset
    from collapse_probe.train.trainer import train

    for name in names:
        start, fields = CONFIGS[name]
        run = out / f"{name}-s{seed}"
        cfg = get_preset("grpo-outcome", seed=seed, steps=steps, **fields)
        cfg.init = init_override.get(start) or str(cached_model(start, threads=threads))
        cfg.threads = threads
        cfg.save_every, cfg.log_rollouts = 5, 16  # checkpoints: `recover` on the first collapsed one
        if run.exists():
            recs = read_records(run, warn=False)
            if recs and recs[-1]["step"] >= cfg.steps:
                continue
            import shutil
            shutil.rmtree(run)
        print(f"training {run.name} ...", file=sys.stderr, flush=True)
        train(cfg, run)


def summarise(run: Path) -> dict:
    """One row of the table from a run directory."""
    from collapse_probe import schema
    from collapse_probe.runs.timeline import Timeline

    tl = Timeline.from_run(run)
    ao = schema.Position.AFTER_OPEN.value
    succ = tl.success().dropna()
    p = tl.series(schema.cp_key(schema.Source.ROLLOUT, ao, EOT)).dropna() if tl.has(
        schema.cp_key(schema.Source.ROLLOUT, ao, EOT)) else None
    row: dict = {"run": run.name, "steps": int(tl.steps[-1]) if len(tl) else 0}
    if succ.empty:
        return row
    s0 = float(succ.iloc[0])
    row.update(success_start=s0, success_min=float(succ.min()), success_end=float(succ.iloc[-5:].mean()))
    if p is not None and not p.empty:
        row.update(p_eot_start=float(p.iloc[0]), p_eot_max=float(p.max()), p_eot_end=float(p.iloc[-5:].mean()))
    for role in (EOT, JSON):
        for part in schema.Part:
            key = schema.gp_key(ao, role, part)
            if tl.has(key):
                row[f"gp_{role}_{part.value}"] = float(tl.series(key).fillna(0).sum())
    below = succ[succ < 0.2 * s0] if s0 > 0 else succ.iloc[0:0]
    spiked = p[p > 0.3] if p is not None else None
    halved = succ[succ < 0.5 * s0]
    row["collapsed"] = bool(len(below))
    row["paper_form"] = bool(len(below) and spiked is not None and len(spiked) and len(halved)
                             and spiked.index[0] <= halved.index[0])
    from collapse_probe.formats.reasons import REASONS

    prefix = schema.reason_key("")
    broken = {code for code, (state, _) in REASONS.items() if state in schema.BROKEN_STATES}
    reasons = {k[len(prefix):]: float(tl.series(k).fillna(0).mean()) for k in tl.keys()
               if k.startswith(prefix) and k[len(prefix):] in broken}
    if reasons:  # the most common malformed turn over the run (share of all turns)
        top = max(reasons, key=reasons.get)
        row["top_malformed"] = f"{top} {reasons[top]:.2f}"
    return row


def trace_rows(run: Path) -> list[dict]:
    """Per step: success, on-policy p(end-of-turn) and p(`{"`) after the open tag, the four pressure parts."""
    from collapse_probe import schema
    from collapse_probe.runs.timeline import Timeline

    tl = Timeline.from_run(run)
    ao = schema.Position.AFTER_OPEN.value
    keys = {"success": schema.SUCCESS, "p_eot": schema.cp_key(schema.Source.ROLLOUT, ao, EOT),
            "p_json": schema.cp_key(schema.Source.ROLLOUT, ao, JSON)}
    keys.update({f"gp_{role}_{part.value}": schema.gp_key(ao, role, part) for role in (EOT, JSON) for part in schema.Part})
    cols = {name: tl.series(key).reindex(tl.steps) for name, key in keys.items() if tl.has(key)}
    return [{"run": run.name, "step": int(step), **{n: (None if c.isna().iloc[i] else float(c.iloc[i]))
                                                    for n, c in cols.items()}}
            for i, step in enumerate(tl.steps)]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.0f}"
    return str(v)


COLUMNS = ("run", "success_start", "success_min", "success_end", "p_eot_start", "p_eot_max", "p_eot_end",
           "gp_end_of_turn_chosen", "gp_end_of_turn_other", "gp_json_open_chosen", "gp_json_open_other",
           "top_malformed", "collapsed", "paper_form")


def table_markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |\n" for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/outcome-sweep"))
    ap.add_argument("--report", type=Path, default=Path("reports/outcome-sweep"))
    ap.add_argument("--only", default="", help=f"comma-separated names from: {', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", action="append", default=[], metavar="PRESET=DIR",
                    help="use DIR instead of the cached model of PRESET (e.g. instruct=/tmp/model)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy machine)")
    ap.add_argument("--no-train", action="store_true")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configuration {unknown[0]!r}: choose from {', '.join(CONFIGS)}")
    overrides = dict(item.split("=", 1) for item in args.init)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_train:
        _train(args.out, names, args.steps, args.seed, overrides, args.threads)
    rows = [summarise(p) for p in sorted(args.out.iterdir()) if (p / "metrics.jsonl").exists()]
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "table.json").write_text(json.dumps(rows, indent=2))
    traces = [t for p in sorted(args.out.iterdir()) if (p / "metrics.jsonl").exists() for t in trace_rows(p)]
    (args.report / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    md = table_markdown(rows)
    (args.report / "table.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
