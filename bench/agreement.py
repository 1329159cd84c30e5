"""watch and analyze on real training runs: one verdict (issue "One model of a run").

For every run dir under --corpus, runs `collapse-probe watch RUN --once --json` and `collapse-probe analyze RUN
--json` as a user would (two subprocesses) and compares `collapsed`, `collapse_step`, `first_alert_step` and
`confirmed_at`; prints one row per run and the agreement count.

    python bench/agreement.py --corpus runs/agreement          # after /tmp-style training of the corpus, e.g.
    collapse-probe train --preset grpo-collapse --seed 0 --out runs/agreement/collapse-s0 --set save_every=0
    collapse-probe train --preset interleaved --seed 0 --out runs/agreement/contained-s0 --set save_every=0
    collapse-probe train --preset grpo-stable --seed 0 --out runs/agreement/stable-s0 --set save_every=0
    collapse-probe train --preset grpo-stable --seed 0 --out runs/agreement/harsh-s0 --set save_every=0 \\
        --set lr=0.01 --set warmup_steps=0 --set kl_coef=0     # success falls within the first few steps
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from collapse_probe.commands.watch import EXIT_COLLAPSED

FIELDS = ("collapsed", "status", "collapse_step", "first_alert_step", "confirmed_at", "drift_step")


def _run(*args: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "collapse_probe.cli.app", *args], capture_output=True, text=True)
    if res.returncode not in (0, EXIT_COLLAPSED):
        raise SystemExit(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path("runs/agreement"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs = sorted(p for p in args.corpus.iterdir() if (p / "metrics.jsonl").is_file())
    rows = []
    for run in runs:
        w, a = _run("watch", str(run), "--once", "--json"), _run("analyze", str(run), "--json")
        rows.append({"run": run.name, "watch": {k: w.get(k) for k in FIELDS},
                     "analyze": {k: a.get(k) for k in FIELDS}, "agree": all(w.get(k) == a.get(k) for k in FIELDS),
                     "success_first": a.get("success_first"), "success_last": a.get("success_last"),
                     "lead_steps": a.get("lead_steps"), "onset_lead_steps": a.get("onset_lead_steps"),
                     "reason": a.get("collapse_reason")})
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'run':<16} {'agree':>5} {'collapsed':>9} {'drop':>5} {'alert':>5} {'confirmed':>9} {'lead':>5} "
          f"{'lead(onset)':>11} {'success':>13}  reason")
    for r in rows:
        a = r["analyze"]
        f = lambda v: "-" if v is None else str(v)  # noqa: E731
        succ = f"{r['success_first']:.2f}->{r['success_last']:.2f}" if r["success_first"] is not None else "-"
        print(f"{r['run']:<16} {('yes' if r['agree'] else 'NO'):>5} {str(a['collapsed']):>9} "
              f"{f(a['collapse_step']):>5} {f(a['first_alert_step']):>5} {f(a['confirmed_at']):>9} "
              f"{f(r['lead_steps']):>5} {f(r['onset_lead_steps']):>11} {succ:>13}  {r['reason'] or ''}")
    print(f"agreement: {sum(r['agree'] for r in rows)}/{len(rows)} runs")


if __name__ == "__main__":
    main()
