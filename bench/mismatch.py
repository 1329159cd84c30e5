"""The training-inference mismatch, measured: each mismatch source alone and with each rollout correction.

Every run is the `grpo-outcome` preset (binary outcome reward, the paper-like harness) from the instruct model,
with the old log-probs recomputed by the trainer (`old_logp=recompute`, verl's way, the paper's setup), and one
source of mismatch in the rollout engine (train/engine.py) plus one correction (train/correction.py):

    onpolicy           no source (the control)
    lag2               the sampler's weights two steps stale (asynchronous RL)
    top_p0.9           the sampler draws from the top-p 0.9 nucleus
    bf16               a bf16 copy samples
  x none | token_tis | seq_tis | seq_mis | geo_mis  (thresholds: --threshold, else each one's default)

Per run and step (traces.jsonl): success, on-policy p(end-of-turn | after `<tool_call>\\n`) and on the probe set,
the sampler's probability of it (mm/.../q), the gradient parts on it (chosen, other: gp/; mismatch: mm/.../pressure),
the batch k3 and the per-position log-ratio at after_open and body_closed, p(end-of-turn) where the body has closed,
the correction's masked share. table.md / table.json: per run the start/min/end success, p(eot) start/max/end,
summed pressure parts, the top malformed reason, whether it collapsed (success below 0.5 x its peak for 2 steps)
and the steps at which the mismatch (k3 over all tokens, and |log-ratio| at after_open) first rose above 3x its
first-3-step level vs when success first fell below 0.5 x peak, and the monitor's own mismatch alert
(detect/mismatch.py, `mismatch_alert`) vs its reward drop (`monitor_drop`): the lead of the mismatch as a warning.

    python bench/mismatch.py --time-one                   # one run of --steps steps, timed: size the grid
    python bench/mismatch.py --only lag2/none,lag2/geo_mis --seeds 0
    python bench/mismatch.py --no-train                   # the table and figure from runs already there

ONE training job at a time, single-threaded (--threads 1) on a shared machine. Complete runs are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SOURCES: dict[str, dict] = {
    "onpolicy": {},
    "lag2": {"rollout_lag": 2},
    "top_p0.9": {"rollout_top_p": 0.9},
    "bf16": {"rollout_dtype": "bf16"},
}
CORRECTIONS = ("none", "token_tis", "seq_tis", "seq_mis", "geo_mis")
EOT = "end_of_turn"
CONTROL_LR = 0.1  # |mean log-ratio| of the sampled tokens at a control position that counts as moved


def run_fields(name: str, threshold: float | None) -> dict:
    source, _, corr = name.partition("/")
    fields = {**SOURCES[source], "old_logp": "recompute", "rollout_correction": corr or "none"}
    if threshold is not None and corr not in ("", "none"):
        fields["rollout_correction_threshold"] = threshold
    return fields


def _train(out: Path, names: list[str], seeds: list[int], steps: int, threads: int, init: str | None,
           threshold: float | None) -> None:
    from collapse_probe.runs.joined import read_records
    from collapse_probe.train.presets import cached_model, get_preset
    from collapse_probe.train.trainer import train

    for seed in seeds:
        for name in names:
            run = out / f"{name.replace('/', '-')}-s{seed}"
            cfg = get_preset("grpo-outcome", seed=seed, steps=steps, **run_fields(name, threshold))
            cfg.init = init or str(cached_model("instruct", threads=threads))
            cfg.threads, cfg.probe_every, cfg.save_every, cfg.log_rollouts = threads, 1, 0, 8
            if run.exists():
                recs = read_records(run, warn=False)
                if recs and recs[-1]["step"] >= cfg.steps:
                    continue
                import shutil
                shutil.rmtree(run)
            t0 = time.time()
            print(f"training {run.name} ...", file=sys.stderr, flush=True)
            train(cfg, run)
            print(f"  {run.name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)


def _keys() -> dict[str, str]:
    from collapse_probe import schema

    ao, bc = schema.Position.AFTER_OPEN, schema.Position.BODY_CLOSED
    return {
        "success": schema.SUCCESS,
        "p_eot": schema.cp_key(schema.Source.ROLLOUT, ao, EOT),
        "p_eot_probe": schema.cp_key(schema.Source.PROBE, ao, EOT),
        "q_eot": schema.mm_key(ao, EOT, schema.MismatchStat.Q),
        "gp_chosen": schema.gp_key(ao, EOT, schema.Part.CHOSEN),
        "gp_other": schema.gp_key(ao, EOT, schema.Part.OTHER),
        "gp_mismatch": schema.mm_key(ao, EOT, schema.MismatchStat.PRESSURE),
        "k3": schema.MM_K3_KL,
        "abs_log_ratio": schema.MM_ABS_LOG_RATIO,
        "lr_after_open": schema.mm_key(ao, schema.ANY_TOKEN, schema.MismatchStat.LOG_RATIO),
        "lr_body_closed": schema.mm_key(bc, schema.ANY_TOKEN, schema.MismatchStat.LOG_RATIO),
        **{f"lr_{pos}": schema.mm_key(pos, schema.ANY_TOKEN, schema.MismatchStat.LOG_RATIO)
           for pos in schema.POSITIONS if pos not in (ao.value, bc.value)},
        "p_eot_body_closed": schema.cp_key(schema.Source.ROLLOUT, bc, EOT),
        "seq_masked": schema.MM_SEQ_MASKED,
        "grad_norm": schema.GRAD_NORM,
    }


def trace_rows(run: Path) -> list[dict]:
    from collapse_probe.runs.timeline import Timeline

    tl = Timeline.from_run(run)
    cols = {n: tl.series(k).reindex(tl.steps) for n, k in _keys().items() if tl.has(k)}
    return [{"run": run.name, "step": int(s), **{n: (None if c.isna().iloc[i] else float(c.iloc[i]))
                                                 for n, c in cols.items()}} for i, s in enumerate(tl.steps)]


def _first_rise(values: list[float | None], factor: float = 3.0) -> int | None:
    """First index where |value| exceeds `factor` x the mean |value| of the first 3 steps (a crude onset)."""
    vals = [abs(v) if v is not None else None for v in values]
    base = [v for v in vals[:3] if v is not None]
    if not base:
        return None
    level = max(sum(base) / len(base), 1e-6)
    return next((i for i, v in enumerate(vals) if i >= 3 and v is not None and v > factor * level), None)


def summarise(rows: list[dict], run: Path) -> dict:
    from collapse_probe import schema
    from collapse_probe.formats.reasons import REASONS
    from collapse_probe.runs.timeline import Timeline

    succ = [r.get("success") for r in rows]
    row: dict = {"run": run.name, "steps": len(rows) - 1}
    s = [v for v in succ if v is not None]
    if not s:
        return row
    peak, fall = 0.0, None
    below = 0
    for i, v in enumerate(succ):
        if v is None:
            continue
        peak = max(peak, v)
        below = below + 1 if v < 0.5 * peak else 0
        if below == 2 and fall is None:
            fall = i - 1
    row.update(success_start=s[0], success_min=min(s), success_end=sum(s[-3:]) / len(s[-3:]),
               collapsed=fall is not None, collapse_step=fall)
    p = [r.get("p_eot") for r in rows if r.get("p_eot") is not None]
    if p:
        row.update(p_eot_start=p[0], p_eot_max=max(p), p_eot_end=p[-1])
    for part in ("gp_chosen", "gp_other", "gp_mismatch"):
        row[part] = sum(r.get(part) or 0.0 for r in rows)
    k3 = [r.get("k3") for r in rows]
    if any(v is not None for v in k3):
        row["k3_max"] = max(v for v in k3 if v is not None)
    row["k3_rise"] = _first_rise(k3)
    row["ao_rise"] = _first_rise([r.get("lr_after_open") for r in rows])
    # the first step at which the sampled tokens' mean |log p_train - log p_rollout| at some control position
    # passes CONTROL_LR (a reporting threshold, set before the runs), and where
    lr_cols = [k for k in (rows[0] if rows else {}) if k.startswith("lr_")]
    hits = [(i, k) for i, r in enumerate(rows) for k in lr_cols if r.get(k) is not None and abs(r[k]) > CONTROL_LR]
    row["ctl_warn"] = f"{hits[0][0]} ({hits[0][1][3:]})" if hits else None
    from collapse_probe.detect.mismatch import KIND
    from collapse_probe.detect.monitor import replay
    from collapse_probe.runs.joined import read_records

    v = replay(read_records(run, warn=False))  # the monitor's own verdict: its mismatch alert and reward drop
    row.update(monitor_drop=v.collapse_step, mismatch_alert=v.baselines[KIND]["detected_at"])
    tl = Timeline.from_run(run)
    prefix = schema.reason_key("")
    broken = {code for code, (state, _) in REASONS.items() if state in schema.BROKEN_STATES}
    reasons = {k[len(prefix):]: float(tl.series(k).fillna(0).mean()) for k in tl.keys()
               if k.startswith(prefix) and k[len(prefix):] in broken}
    if reasons:
        top = max(reasons, key=reasons.get)
        row["top_malformed"] = f"{top} {reasons[top]:.2f}"
    return row


COLUMNS = ("run", "success_start", "success_min", "success_end", "collapse_step", "p_eot_start", "p_eot_max",
           "p_eot_end", "gp_chosen", "gp_other", "gp_mismatch", "k3_max", "k3_rise", "ao_rise", "ctl_warn",
           "mismatch_alert", "monitor_drop", "top_malformed")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def table_markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |\n" for r in rows)


def figure(traces: dict[str, list[dict]], path: Path) -> None:
    """Per run (one line each): success, p(eot | after open) trainer (solid) and sampler (dotted), k3."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    panels = (("success", "success", None), ("p_eot", "p(eot | after open)", "q_eot"),
              ("p_eot_body_closed", "p(eot | body closed)", None), ("k3", "k3 KL(rollout||train)", None))
    for i, (name, rows) in enumerate(sorted(traces.items())):
        color = f"C{i % 10}"
        steps = [r["step"] for r in rows]
        for ax, (key, label, dotted) in zip(axes, panels):
            ax.plot(steps, [r.get(key) for r in rows], color=color, label=name if key == "success" else None)
            if dotted:
                ax.plot(steps, [r.get(dotted) for r in rows], color=color, linestyle=":")
            ax.set_ylabel(label)
    for ax in axes[1:]:
        ax.set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].set_title("solid: trainer p; dotted: sampler q", fontsize=8)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/mismatch"))
    ap.add_argument("--report", type=Path, default=Path("reports/mismatch"))
    ap.add_argument("--only", default="", help="comma-separated SOURCE/CORRECTION names (default: every pair)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threshold", type=float, default=None, help="every correction's C (default: its own)")
    ap.add_argument("--init", default=None, help="the instruct model dir (default: the cached preset)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--time-one", action="store_true", help="train onpolicy/none for --steps steps and time it")
    ap.add_argument("--no-train", action="store_true")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or [f"{s}/{c}" for s in SOURCES for c in CORRECTIONS]
    for n in names:
        s, _, c = n.partition("/")
        if s not in SOURCES or (c or "none") not in CORRECTIONS:
            sys.exit(f"unknown run {n!r}: SOURCE/CORRECTION from {', '.join(SOURCES)} x {', '.join(CORRECTIONS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.time_one:
        t0 = time.time()
        _train(args.out / "timing", ["onpolicy/none"], [0], args.steps, args.threads, args.init, None)
        print(json.dumps({"steps": args.steps, "seconds": round(time.time() - t0, 1)}))
        return
    if not args.no_train:
        _train(args.out, names, seeds, args.steps, args.threads, args.init, args.threshold)
    runs = sorted(p for p in args.out.iterdir()
                  if (p / "metrics.jsonl").exists() and (p / "metrics.jsonl").stat().st_size)
    traces = {p.name: trace_rows(p) for p in runs}
    rows = [summarise(traces[p.name], p) for p in runs]
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "table.json").write_text(json.dumps(rows, indent=2))
    (args.report / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for v in traces.values() for t in v))
    md = table_markdown(rows)
    (args.report / "table.md").write_text(md)
    if traces:
        figure(traces, args.report / "traces.png")
    print(md)


if __name__ == "__main__":
    main()
