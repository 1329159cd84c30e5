"""Detection benchmark: train a corpus of real runs, then score every detector on it.

For each run the "truth" is the reward drop: the first step where success falls below half its running peak
(and stays there). Collapsing runs are those with a reward drop; stable runs have none. For every detector:

    detection rate   fraction of collapsing runs where it fired before the reward drop
    false alarms     stable runs where it fired at all
    median lead      steps between its first alarm and the reward drop (collapsing runs it caught)

    python bench/detection.py --corpus runs/detection          # trains what is missing, then the table
    python bench/detection.py --corpus runs/detection --json   # one JSON object
    python bench/detection.py --corpus runs/detection --no-train   # score existing runs only

Runs are trained one after another (each a few minutes on 2 CPU cores); existing complete runs are reused.
A run's category comes from its directory name (collapse-s33, stable-s32, interleaved-s32, outcome-s31, harsh-s0),
so a corpus trained by hand with `collapse-probe train ... --out DIR/collapse-sN` is scored the same way. The
first table is per detector ("first warning (ours)" is the verdict's first control-token or format alert); the
second per run: reward-drop step, first alert (detected_at), lead, verdict status, the highest probability a
warned control-token series reached, and what warned first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# name: (preset, {overrides}); seeds are crossed with these.
CORPUS = {
    "collapse": ("grpo-collapse", {}),  # the preset (lr 5e-4)
    "stable": ("grpo-stable", {}),
    "interleaved": ("interleaved", {}),
    "collapse-lr3e-4": ("grpo-collapse", {"lr": 3e-4}),
    "stable-lr5e-4": ("grpo-stable", {"lr": 5e-4}),
    "outcome": ("grpo-outcome", {}),  # binary outcome reward, the paper-like harness, from the instruct model
    "outcome-sft": ("grpo-outcome-sft", {}),  # the same RL from instruct + tool SFT (the paper's SFT-first arm)
}
SEEDS = (0, 1, 2, 3, 4)
KIND_NAMES = {"control_spike": "control_token spike (ours)", "control_drift": "control_token drift (ours)",
              "format_breakage": "format_breakage (ours)",
              "entropy_drop": "entropy_drop", "reward_var_collapse": "reward_var_collapse (RAGEN)",
              "grad_norm_spike": "grad_norm_spike (KillLossSpike)", "validity_drop": "validity_drop",
              "mismatch_rise": "mismatch_rise (train-inference)"}


def train_missing(corpus: Path, names: list[str], seeds: tuple[int, ...], steps: int | None, threads: int) -> None:
    from collapse_probe.runs.joined import read_records
    from collapse_probe.train.presets import START, cached_model, get_preset
    from collapse_probe.train.trainer import train

    for name in names:
        preset, overrides = CORPUS[name]
        init = str(cached_model(START[preset]))  # each preset starts from its own cached model
        for seed in seeds:
            run = corpus / f"{name}-s{seed}"
            cfg = get_preset(preset, seed=seed, init=init, steps=steps, **overrides)
            cfg.save_every, cfg.log_rollouts, cfg.threads = 0, 2, threads
            if run.exists():
                recs = read_records(run, warn=False)
                if recs and recs[-1]["step"] >= cfg.steps:
                    continue
                import shutil
                shutil.rmtree(run)
            print(f"training {run.name} ...", file=sys.stderr, flush=True)
            train(cfg, run)


CATEGORY_OF = {"collapse": "format-bonus collapse", "interleaved": "contained spike (interleaved)",
               "stable": "stable (KL anchor)", "outcome": "binary outcome (preset lr)", "harsh": "harsh lr"}
OURS = "first warning (ours)"  # the verdict's first control-token / format alert: what a user is told first


def category(run: Path) -> str:
    """The corpus entry a run belongs to, from its directory name (`collapse-s31` -> collapse)."""
    name = run.name.rsplit("-s", 1)[0]
    return next((k for k in CATEGORY_OF if name == k or name.startswith(k + "-")), name)


def _max_warned_p(run_records: list[dict], events) -> float | None:
    """The highest probability a warned control-token series reached (issue 22: a warning names a rise that
    reached at least 5%)."""
    keys = {e.key for e in events if e.kind in ("control_spike", "control_drift") and e.direction == "up"}
    vals = [r[k] for r in run_records for k in keys if isinstance(r.get(k), (int, float))]
    return max(vals) if vals else None


def score(corpora: list[Path]) -> dict:
    from collapse_probe.detect.monitor import replay
    from collapse_probe.detect.verdict import WARNING_KINDS
    from collapse_probe.runs.timeline import Timeline

    rows = []
    runs = sorted(p for corpus in corpora for p in corpus.iterdir() if (p / "metrics.jsonl").exists())
    for run in runs:
        tl = Timeline.from_run(run)
        records = list(tl.records())
        v = replay(records)
        d = v.to_dict()
        truth = d["collapse_step"]
        # Every detector is scored by when it would have alarmed online (detected_at), not its dated onset.
        detectors = {KIND_NAMES.get(k, k): None for k in KIND_NAMES}
        for ev in v.events:
            name = KIND_NAMES.get(ev.kind, ev.kind)
            if name in detectors and detectors[name] is None and ev.kind != "reward_drop":
                detectors[name] = ev.detected_at
        detectors[OURS] = d["first_alert_step"]
        warnings = [e.to_dict() for e in v.events if e.kind in WARNING_KINDS]
        rows.append({"run": f"{run.parent.name}/{run.name}", "category": category(run), "collapsing": truth is not None,
                     "reward_drop_step": truth, "steps": len(tl), "status": d["status"], "collapsed": d["collapsed"],
                     "collapse_reason": d["collapse_reason"], "first_warning": warnings[0] if warnings else None,
                     "max_warned_p": _max_warned_p(records, [e for e in v.events if e.kind in WARNING_KINDS]),
                     "alarms": detectors})
    table = {}
    names = [OURS, *sorted({k for r in rows for k in r["alarms"]} - {OURS})]
    for name in names:
        col = [r for r in rows if r["collapsing"]]
        caught = [r for r in col if r["alarms"][name] is not None and r["alarms"][name] < r["reward_drop_step"]]
        stable = [r for r in rows if r["category"] == "stable"]
        quiet_expected = [r for r in rows if not r["collapsing"]]
        leads = [r["reward_drop_step"] - r["alarms"][name] for r in caught]
        fired = {r["run"]: r["reward_drop_step"] - r["alarms"][name] for r in col if r["alarms"][name] is not None}
        table[name] = {"detection_rate": len(caught) / len(col) if col else None,
                       "caught": len(caught), "collapsing_runs": len(col),
                       "false_alarms": sum(r["alarms"][name] is not None for r in stable), "stable_runs": len(stable),
                       "fired_without_drop": sum(r["alarms"][name] is not None for r in quiet_expected),
                       "runs_without_drop": len(quiet_expected),
                       "median_lead_steps": statistics.median(leads) if leads else None,
                       "fired_any_time": len(fired), "leads": fired,
                       "median_lead_when_fired": statistics.median(fired.values()) if fired else None}
    return {"runs": rows, "detectors": table}


def render(result: dict) -> str:
    """The two tables as text: per detector, then per run."""
    rows = result["runs"]
    n_col = sum(r["collapsing"] for r in rows)
    cats = sorted({r["category"] for r in rows})
    lines = [f"{len(rows)} runs: {n_col} with a reward drop; " +
             ", ".join(f"{sum(r['category'] == c for r in rows)} {CATEGORY_OF.get(c, c)}" for c in cats),
             "detected = fired before the reward drop (runs with a drop); false alarms = fired at all on a stable "
             "run; lead = drop step - alert step (detected_at), negative: after the drop", "",
             f"{'detector':<32} {'detected':>9} {'false alarms':>13} {'median lead':>12}  leads per run (fired at all)"]
    for name, t in result["detectors"].items():
        lead = "-" if t["median_lead_steps"] is None else f"{t['median_lead_steps']:.1f}"
        per = ", ".join(f"{k.split('/')[-1]}:{v:+d}" for k, v in t["leads"].items()) or "-"
        lines.append(f"{name:<32} {t['caught']:>5}/{t['collapsing_runs']:<3} "
                     f"{t['false_alarms']:>9}/{t['stable_runs']:<3} {lead:>12}  {per}")
    lines += ["", f"{'run':<28} {'steps':>5} {'drop':>5} {'alert':>5} {'lead':>5}  {'verdict':<12} "
              f"{'max p warned':>12}  first warning"]
    for r in rows:
        f = lambda v: "-" if v is None else str(v)  # noqa: E731
        w = r["first_warning"]
        what = "-" if w is None else f"{w['kind']} {w['role'] or w['key']} {w['direction']} (onset {w['step']})"
        alert = r["alarms"][OURS]
        lead = None if alert is None or r["reward_drop_step"] is None else r["reward_drop_step"] - alert
        mp = "-" if r["max_warned_p"] is None else f"{r['max_warned_p']:.3f}"
        lines.append(f"{r['run']:<28} {r['steps']:>5} {f(r['reward_drop_step']):>5} {f(alert):>5} {f(lead):>5}  "
                     f"{r['status']:<12} {mp:>12}  {what}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path("runs/detection"))
    ap.add_argument("--also", type=Path, action="append", default=[],
                    help="score the runs of this directory too (repeatable; nothing is trained there)")
    ap.add_argument("--runs", default="collapse,stable,interleaved,collapse-lr3e-4",
                    help=f"comma-separated corpus entries from: {', '.join(CORPUS)}")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--steps", type=int, default=None, help="override steps per run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.corpus.mkdir(parents=True, exist_ok=True)
    if not args.no_train:
        train_missing(args.corpus, args.runs.split(","), tuple(int(s) for s in args.seeds.split(",")), args.steps,
                      args.threads)
    result = score([args.corpus, *args.also])
    if args.json:
        print(json.dumps(result))
        return
    print(render(result))


if __name__ == "__main__":
    main()
