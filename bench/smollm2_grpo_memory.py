"""Peak memory of one GRPO step on SmolLM2-135M, 8 prompts x 8 samples (issue 14), under `/usr/bin/time -v`.

Runs the real command a user would: `collapse-probe train --preset grpo-outcome --init MODEL --steps 1` (the
preset's 8 prompts x 8 samples, paper harness, up to 30 turns; a probe-set score at step 0), with the final
record's greedy evaluation cut to 8 tasks and no intermediate checkpoint, and reads the kernel's maximum
resident set size. Before issue 14 the same command was killed for memory (24 GB) in its first step.

    python bench/smollm2_grpo_memory.py [--init runs/real-model/sft/checkpoint-60] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", default=None, help="model dir (default: the untouched smollm2-135m)")
    ap.add_argument("--out", type=Path, default=Path("runs/real-model/grpo-memory"))
    ap.add_argument("--preset", default="grpo-outcome")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    init = args.init
    if init is None:
        from collapse_probe.models.fetch import fetch
        init = str(fetch("smollm2-135m"))
    cmd = ["/usr/bin/time", "-v", sys.executable, "-c", "from collapse_probe.cli.app import main; main()", "train",
           "--preset", args.preset, "--init", init, "--steps", "1", "--out", str(args.out), "--overwrite", "--json",
           "--set", "eval_tasks=8", "--set", "save_every=0"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    rss_gb = int(m.group(1)) / 1024 ** 2 if m else None
    rec = {}
    metrics = args.out / "metrics.jsonl"
    if metrics.is_file():
        rec = json.loads(metrics.read_text().splitlines()[0])
    res = {"command": " ".join(cmd[2:]).replace(sys.executable, "python"), "returncode": proc.returncode,
           "peak_rss_gb": rss_gb, "wall_s": round(wall, 1), "init": init,
           "step0": {k: rec.get(k) for k in ("success", "len/response_mean", "len/turns_mean", "time/step_s",
                                             "cp/rollout/after_open/count")},
           "ok": proc.returncode == 0 and rss_gb is not None and rss_gb <= 8.0}
    if proc.returncode != 0:
        res["stderr_tail"] = proc.stderr[-1500:]
    if args.json:
        print(json.dumps(res))
        return
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
