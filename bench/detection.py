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
KIND_NAMES = {"control_spike": "control_token (ours)", "format_breakage": "format_breakage (ours)",
              "entropy_drop": "entropy_drop", "reward_var_collapse": "reward_var_collapse (RAGEN)",
              "grad_norm_spike": "grad_norm_spike (KillLossSpike)", "validity_drop": "validity_drop"}


def train_missing(corpus: Path, names: list[str], seeds: tuple[int, ...], steps: int | None, threads: int) -> None:
    from collapse_probe.runlog import read_records
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


def score(corpora: list[Path]) -> dict:
    from collapse_probe.detect.monitor import replay
    from collapse_probe.timeline import Timeline

    rows = []
    runs = sorted(p for corpus in corpora for p in corpus.iterdir() if (p / "metrics.jsonl").exists())
    for run in runs:
        tl = Timeline.from_run(run)
        v = replay(tl.records())
        d = v.to_dict()
        truth = d["collapse_step"]
        # Every detector is scored by when it would have alarmed online (detected_at), not its dated onset.
        detectors = {KIND_NAMES.get(k, k): None for k in KIND_NAMES}
        for ev in v.events:
            name = KIND_NAMES.get(ev.kind, ev.kind)
            if name in detectors and detectors[name] is None and ev.kind != "reward_drop":
                detectors[name] = ev.detected_at if ev.detected_at is not None else ev.step
        rows.append({"run": f"{run.parent.name}/{run.name}", "collapsing": truth is not None, "reward_drop_step": truth,
                     "alarms": detectors})
    table = {}
    names = sorted({k for r in rows for k in r["alarms"]})
    for name in names:
        col = [r for r in rows if r["collapsing"]]
        caught = [r for r in col if r["alarms"][name] is not None and r["alarms"][name] < r["reward_drop_step"]]
        stable = [r for r in rows if not r["collapsing"]]
        false = [r for r in stable if r["alarms"][name] is not None]
        leads = [r["reward_drop_step"] - r["alarms"][name] for r in caught]
        fired = [r["reward_drop_step"] - r["alarms"][name] for r in col if r["alarms"][name] is not None]
        table[name] = {"detection_rate": len(caught) / len(col) if col else None,
                       "caught": len(caught), "collapsing_runs": len(col),
                       "false_alarms": len(false), "stable_runs": len(stable),
                       "median_lead_steps": statistics.median(leads) if leads else None,
                       "fired_any_time": len(fired),
                       "median_lead_when_fired": statistics.median(fired) if fired else None}
    return {"runs": rows, "detectors": table}


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
    n_col = sum(r["collapsing"] for r in result["runs"])
    print(f"{len(result['runs'])} runs: {n_col} collapsing, {len(result['runs']) - n_col} stable")
    print("detected = fired before the reward drop; lead in steps before the drop (negative: after it)")
    print(f"{'detector':<32} {'detected':>9} {'false alarms':>13} {'median lead':>12} {'fired at all':>13} "
          f"{'median lead if fired':>21}")
    for name, t in sorted(result["detectors"].items(), key=lambda kv: -(kv[1]["median_lead_steps"] or -1e9)):
        rate = f"{t['caught']}/{t['collapsing_runs']}"
        lead = "-" if t["median_lead_steps"] is None else f"{t['median_lead_steps']:.1f}"
        any_lead = "-" if t["median_lead_when_fired"] is None else f"{t['median_lead_when_fired']:.1f}"
        false = f"{t['false_alarms']}/{t['stable_runs']}"
        print(f"{name:<32} {rate:>9} {false:>13} {lead:>12} {t['fired_any_time']:>10}/{t['collapsing_runs']:<2} "
              f"{any_lead:>21}")


if __name__ == "__main__":
    main()
