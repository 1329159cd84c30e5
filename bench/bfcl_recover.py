"""The whole forensics on one checkpoint directory, on BFCL multi-turn (or a JSONL file), on CPU or a GPU.

    python bench/bfcl_recover.py CKPT [--tasks bfcl:multi_turn_base] [-n 4] [--device cuda]
                                 [--reference CKPT0] [--template auto|native|hermes] [--out FILE.json]

Prints the result as JSON on stdout and writes it to --out after every phase (a long CPU run leaves its figures
behind as it goes). On CPU with SmolLM2-135M-Instruct a BFCL prompt is ~4-5k tokens (the tool docs) and each
fresh prefill takes about a minute on one thread: keep -n small there; a 1.5B model wants --device cuda.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--tasks", default="bfcl:multi_turn_base")
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reference", default=None)
    ap.add_argument("--template", default="auto")
    ap.add_argument("--max-steps", type=int, default=2, help="model messages per user turn (BFCL allows 20)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--repair-steps", type=int, default=2)
    ap.add_argument("--repair-batch", type=int, default=1)
    ap.add_argument("--skip-repair", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from collapse_probe.errors import UserError
    from collapse_probe.recover.chat_run import run_chat_forensics

    out = Path(args.out) if args.out else None
    started = time.perf_counter()

    def save(partial: dict) -> None:
        partial["wall_s"] = time.perf_counter() - started
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(partial, indent=1, default=str))

    def tick(phase: str, done: int, total: int) -> None:
        print(f"[{time.perf_counter() - started:7.0f}s] {phase} {done}/{total}", file=sys.stderr, flush=True)

    try:
        res = run_chat_forensics(args.checkpoint, args.tasks, n=args.n, template=args.template,
                                 reference=args.reference, max_steps=args.max_steps,
                                 max_new_tokens=args.max_new_tokens, repair_steps=args.repair_steps,
                                 repair_batch=args.repair_batch, skip_repair=args.skip_repair, device=args.device,
                                 progress=tick, on_result=save)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    save(res)
    print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
