"""Peak memory and time of `analyze` and `watch --once` on a large metrics.jsonl (issue 13: under 500 MB for 1 GB;
issue 22: at most 200 MB, and `analyze` within 2x the time of a bare `json.loads` pass over the same lines).

    .venv/bin/python bench/memory.py                 # writes /tmp/cp_bench_memory/metrics.jsonl (1 GB), measures
    .venv/bin/python bench/memory.py --gb 0.1 --junk  # smaller, plus a file of junk lines (one warning, a count)

Each command runs in a subprocess under `/usr/bin/time -v` (apt-get install -y time); the figures printed are
its "Maximum resident set size", wall and CPU (user + system) time. The bare pass (`for line in f: json.loads(line)`,
a subprocess too) is measured in the same run; the ratio is analyze's over it (wall and CPU: on a shared machine
the CPU ratio is the steadier one). Records are shaped like the trainer's (control-token captures at
every decision position, the state mix, reward, baselines) plus a logged sample text, so a line is ~`--line-kb`.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from collapse_probe import schema

ROLES = ("end_of_turn", "json_open", "tool_open", "tool_close", "newline", "eos")


def record(step: int, rng: random.Random, pad: str) -> dict:
    """One step of a run that collapses half-way (so the monitor has alerts to raise)."""
    frac = step / 1e5
    eot = min(0.95, 0.02 + max(0.0, frac - 0.5))
    rec: dict = {"step": step, "time": 1.7e9 + step}
    for pos in schema.POSITIONS:
        for role in ROLES:
            rec[schema.cp_key(schema.Source.ROLLOUT, pos, role)] = eot * rng.uniform(0.9, 1.1) if role == \
                "end_of_turn" else rng.random() * 0.1
    for s in schema.STATES:
        rec[schema.state_key(s)] = 0.25
    rec.update({schema.SUCCESS: max(0.0, 0.9 - eot), schema.REWARD_MEAN: 0.9 - eot, schema.ENTROPY: 0.8,
                schema.GRAD_NORM: 1.0 + rng.random() * 0.1, schema.LOSS: 0.1, "sample": pad})
    return rec


def write_metrics(path: Path, gb: float, line_kb: float) -> int:
    rng, pad = random.Random(0), "x" * int(line_kb * 1024 * 0.6)
    target, size, step = int(gb * 2 ** 30), 0, 0
    with open(path, "w") as f:
        while size < target:
            line = json.dumps(record(step, rng, pad)) + "\n"
            f.write(line)
            size += len(line)
            step += 1
    return step


def write_junk(path: Path, gb: float, every: int = 10_000) -> int:
    """Junk lines with a readable record every `every` lines: the reader must warn once, with the count."""
    junk = b'{"this is not": a record, ' + b"z" * 200 + b"\n"
    good, n, size, target = 0, 0, 0, int(gb * 2 ** 30)
    with open(path, "wb") as f:
        while size < target:
            block = junk * every + (json.dumps({"step": good, schema.SUCCESS: 0.5}) + "\n").encode()
            f.write(block)
            size, n, good = size + len(block), n + every, good + 1
    return n


BARE_PASS = "import json, sys\nwith open(sys.argv[1], 'rb') as f:\n    for line in f:\n        json.loads(line)\n"


def measure(args: list[str], code: str = "from collapse_probe.cli.app import main; main()") -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-c", code, *args]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    cpu = sum(float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", p.stderr))
    lines = [ln for ln in p.stderr.splitlines() if not ln.startswith("\t") and "Command" not in ln]
    return {"cmd": " ".join(args), "rc": p.returncode, "peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss
            else None, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "stderr": lines[:3],
            "stdout_bytes": len(p.stdout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--line-kb", type=float, default=4.0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/cp_bench_memory"))
    ap.add_argument("--junk", action="store_true", help="also measure a file of junk lines")
    ap.add_argument("--keep", action="store_true", help="reuse the files if they exist")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    metrics = a.dir / "metrics.jsonl"
    if not (a.keep and metrics.exists()):
        t0 = time.time()
        steps = write_metrics(metrics, a.gb, a.line_kb)
        print(f"wrote {metrics}: {metrics.stat().st_size / 2**30:.2f} GB, {steps} steps, {time.time() - t0:.0f} s")
    bare = measure([str(metrics)], code=BARE_PASS)
    bare["cmd"] = f"bare json.loads pass over {metrics}"
    results = [measure(["analyze", str(metrics), "--json"]), measure(["watch", str(metrics), "--once", "--json"])]
    if a.junk:
        junk = a.dir / "junk" / "metrics.jsonl"
        junk.parent.mkdir(exist_ok=True)
        if not (a.keep and junk.exists()):
            n = write_junk(junk, a.gb)
            print(f"wrote {junk}: {junk.stat().st_size / 2**30:.2f} GB, {n} junk lines")
        results += [measure(["analyze", str(junk), "--json"]), measure(["watch", str(junk), "--once", "--json"])]
    print(f"{bare['cmd']:<70} rc {bare['rc']}  peak RSS {bare['peak_rss_mb']} MB  {bare['wall_s']} s wall  "
          f"{bare['cpu_s']} s cpu")
    for r in results:
        ok = r["peak_rss_mb"] is not None and r["peak_rss_mb"] <= 200
        print(f"{r['cmd']:<70} rc {r['rc']}  peak RSS {r['peak_rss_mb']} MB  {r['wall_s']} s wall  {r['cpu_s']} s cpu  "
              f"{'OK' if ok else 'OVER 200 MB'}  stderr lines: {len(r['stderr'])} {r['stderr'][:1]}")
    a = results[0]
    ratio_wall, ratio_cpu = a["wall_s"] / max(bare["wall_s"], 1e-9), a["cpu_s"] / max(bare["cpu_s"], 1e-9)
    print(f"analyze / bare json.loads pass: {ratio_wall:.2f}x wall, {ratio_cpu:.2f}x cpu (target <= 2x)")
    if any(math.isnan(r["peak_rss_mb"] or math.nan) or r["peak_rss_mb"] > 200 for r in results) or ratio_cpu > 2:
        sys.exit(1)


if __name__ == "__main__":
    main()
