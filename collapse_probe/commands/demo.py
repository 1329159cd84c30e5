"""The whole story in one command: SFT -> GRPO collapse with capture on -> live detection -> recovery -> report.

Everything runs on the embedded tool world and tiny model; `fast=True` shrinks every stage for tests (the
pipeline runs end to end, but too briefly for the collapse itself to happen).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

from collapse_probe.errors import UserError
from collapse_probe.detect.monitor import CollapseMonitor
from collapse_probe.runs.report_dir import check_report_dir, stamp_report_dir
from collapse_probe.runs.rundir import RunDir
from collapse_probe.train.presets import get_preset, sft_checkpoint
from collapse_probe.train.trainer import train

Say = Callable[[str], None]


@dataclasses.dataclass
class DemoResult:
    run_dir: Path
    report: Path
    verdict: dict
    first_alert_step: int | None
    recovery: dict | None
    seconds: float


def run_demo(out_dir: str | Path = "reports/demo", *, work_dir: str | Path = "runs/demo", seed: int = 0,
             fast: bool = False, say: Say = print, progress_factory=None, phase_progress=None,
             skip_recovery: bool = False, overwrite: bool = False) -> DemoResult:
    t0 = time.time()
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    for flag, d in (("--out", out_dir), ("--work", work_dir)):  # before any work: the SFT stage takes minutes
        if d.exists() and not d.is_dir():
            raise UserError(f"{flag} {d} is a file: pass a directory")
        parent = next((q for q in (d, *d.parents) if q.exists()), Path("."))
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {d}: {parent} is not a writable directory: pass a writable place")
    identity = {"seed": int(seed), "fast": bool(fast), "recovery": not skip_recovery}
    check_report_dir(out_dir, name="demo", config=identity, overwrite=overwrite)  # before the minutes of work
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = progress_factory or (lambda label, total: _NullBar())

    # 1. SFT: from scratch to a competent tool user (cached across runs).
    sft_steps = 30 if fast else None
    with bar("sft (cached after first use)", sft_steps or get_preset("sft").steps) as b:
        init = sft_checkpoint(progress=b, steps=sft_steps)
    say(f"sft model: {init}")

    # 2. GRPO with the collapse preset; the online monitor watches every record as it is written.
    cfg = get_preset("grpo-collapse", seed=seed, init=str(init))
    if fast:
        cfg = dataclasses.replace(cfg, steps=3, prompts_per_step=2, group_size=4, probe_every=1, save_every=0,
                                  max_turns=4, max_new_tokens=24)
    run_dir = work_dir / f"grpo-collapse-s{seed}"
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)  # a fresh run: the demo's log must hold one run only
    monitor = CollapseMonitor()  # the same monitor `watch` runs; its verdict is `analyze`'s (a replay)
    first_alert: list[int] = []

    with bar(f"grpo-collapse seed {seed}", cfg.steps) as b:
        def on_step(step: int, rec: dict) -> None:
            b(step, rec)
            for ev in monitor.update(rec):
                first_alert.append(step)
                say(f"  ALERT step {step}: {ev.kind} {ev.role or ev.key} (onset step {ev.step})")
        last_ckpt = train(cfg, run_dir, progress=on_step)

    # 3. The verdict the monitor reached while the run trained.
    verdict = monitor.verdict()
    say(verdict.summary())

    # 4. Recovery forensics on the last checkpoint.
    recovery = None
    sections: list[tuple[str, str]] = []
    if not skip_recovery:
        from collapse_probe.recover.run import recovery_markdown, run_recovery
        at = None if verdict.collapse_step is None else RunDir(run_dir).checkpoint_at_or_after(verdict.collapse_step)
        ckpt = last_ckpt if at is None else at.path
        say(f"recovery forensics on {ckpt.name}, the first checkpoint at or after the reward drop "
            "(format grid, masked decoding, SFT repair)")
        recovery = run_recovery(ckpt, n=8 if fast else 32, repair_steps=4 if fast else 50,
                                fresh_max_steps=8 if fast else 300, progress=phase_progress)
        recovery["checkpoint"] = str(ckpt)
        sections.append(("Recovery", recovery_markdown(recovery)))
        (out_dir / "recovery.json").write_text(json.dumps(recovery, indent=2, default=str))

    from collapse_probe.commands.report import write_report
    report = write_report(run_dir, out_dir, verdict=verdict, extra_sections=sections)
    (out_dir / "verdict.json").write_text(json.dumps(verdict.to_dict(), indent=2, default=str))
    stamp_report_dir(out_dir, name="demo", config=identity)
    return DemoResult(run_dir, report, verdict.to_dict(), first_alert[0] if first_alert else None, recovery,
                      time.time() - t0)


class _NullBar:
    def __enter__(self):
        return self

    def __call__(self, step: int, rec: dict) -> None:
        pass

    def __exit__(self, *exc):
        return False
