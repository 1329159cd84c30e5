"""Check the presets' promises on trained runs (the detection corpus holds them: bench/detection.py).

    grpo-collapse: success falls below 20% of its step-0 value; bare tags / empty turns are the commonest
                   malformed turns; p(end-of-turn | after `<tool_call>`) goes from < 0.05 to > 0.3 first
    grpo-stable, interleaved: success stays >= 70% of its step-0 value (mean of the last 5 steps, and minimum)

    python bench/presets_check.py --corpus runs/detection [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

P_EOT = "cp/rollout/after_open/end_of_turn"


def check_run(path: Path) -> dict:
    from collapse_probe.runs.joined import read_records

    recs = [r for r in read_records(path, warn=False) if "success" in r]
    s0 = recs[0]["success"]
    succ = [r["success"] for r in recs]
    p = [r.get(P_EOT) for r in recs]
    below = next((r["step"] for r in recs if r["success"] < 0.2 * s0), None)
    spike = next((r["step"] for r in recs if (r.get(P_EOT) or 0) > 0.3), None)
    malformed: dict[str, float] = {}
    for r in recs:
        for k, v in r.items():
            if k.startswith("fmt/reason/") and k[11:] not in ("ok_call", "ok_text"):
                malformed[k[11:]] = malformed.get(k[11:], 0.0) + v
    top = sorted(malformed, key=malformed.get, reverse=True)[:2]
    return {"run": path.name, "success_step0": s0, "success_last5": sum(succ[-5:]) / 5, "success_min": min(succ),
            "p_eot_step0": p[0], "p_eot_max": max(x for x in p if x is not None),
            "spike_step": spike, "below_20pct_step": below, "top_malformed": top,
            "collapsed": below is not None,
            "spike_first": spike is not None and below is not None and spike < below and p[0] < 0.05,
            "kept_70pct": sum(succ[-5:]) / 5 >= 0.7 * s0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path("runs/detection"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [check_run(p) for p in sorted(args.corpus.iterdir()) if (p / "metrics.jsonl").exists()]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'run':<22}{'succ@0':>7}{'last5':>7}{'min':>6}{'p@0':>7}{'p max':>7}{'p>0.3':>6}{'<20%':>6}  "
          f"{'top malformed':<32} verdict")
    for r in rows:
        kind = r["run"].rsplit("-s", 1)[0]
        if kind.startswith("collapse"):
            ok = r["collapsed"] and r["spike_first"] and r["top_malformed"][:1] in (["bare_open_tag"], ["empty_turn"])
            verdict = "collapsed, spike first" if ok else "NOT as promised"
        else:
            verdict = "kept >= 70%" if r["kept_70pct"] else "fell below 70%"
        print(f"{r['run']:<22}{r['success_step0']:7.2f}{r['success_last5']:7.2f}{r['success_min']:6.2f}"
              f"{r['p_eot_step0']:7.3f}{r['p_eot_max']:7.3f}{str(r['spike_step']):>6}{str(r['below_20pct_step']):>6}  "
              f"{', '.join(r['top_malformed']):<32} {verdict}")


if __name__ == "__main__":
    main()
