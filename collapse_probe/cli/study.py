"""`collapse-probe study`: the paper's comparison of supervisory signals on the embedded world (study/)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from collapse_probe.cli.output import StudyBar, err, out, print_json
from collapse_probe.errors import UserError
from collapse_probe.runs.report_dir import check_report_dir, stamp_report_dir


def _numbers(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--{what} takes comma-separated numbers (e.g. 1e-3,5e-3), got {text!r}") from None


def study(
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where the runs are written, reused when finished "
                                                               "(default runs/study; --fast: runs/study-fast)."),
    report_dir: Optional[Path] = typer.Option(None, "--report", help="Where the table, figures and claims go "
                                                                     "(default reports/study; --fast: "
                                                                     "runs/study-fast/report)."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default all: vanilla, interleaved, "
                                                     "off-policy, hint, error-sft, reflection)."),
    seeds: Optional[int] = typer.Option(None, min=1, help="Seeds per method, 0..N-1 (default 3; --fast: 1)."),
    lr: Optional[float] = typer.Option(None, help="The learning rate of every method (default 2e-3)."),
    lr_sweep: Optional[str] = typer.Option(None, "--lr-sweep", help="Other lrs vanilla RL also runs at, "
                                                                   "comma-separated (default 1e-3,5e-3; '' for none)."),
    steps: Optional[int] = typer.Option(None, min=1, help="RL steps per run (default 20)."),
    preset: str = typer.Option("grpo-outcome", help="The RL preset every run starts from."),
    init: Optional[str] = typer.Option(None, help="Start model directory (default: the preset's cached start)."),
    eval_tasks: Optional[int] = typer.Option(None, "--eval-tasks", min=1, help="Held-out tasks per evaluation."),
    threads: int = typer.Option(2, min=1, help="Torch threads per run."),
    fast: bool = typer.Option(False, "--fast", help="Tiny budgets, one seed (a few minutes; for tests)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a --report directory that holds another "
                                                              "configuration's results (kept otherwise)."),
    as_json: bool = typer.Option(False, "--json", help="Print the table and the claims as one JSON object."),
) -> None:
    """Run the grid of supervisory signals (methods x seeds, plus an lr sweep of vanilla RL), resumable, and
    write reports/study/: the table, the figures and the check of the paper's claims."""
    from collapse_probe.study.grid import StudyConfig, run_study

    changes: dict = {"preset": preset, "init": init, "threads": threads}
    if seeds is not None:
        changes["seeds"] = tuple(range(seeds))
    if methods is not None:
        changes["methods"] = tuple(m.strip() for m in methods.split(",") if m.strip())
    for key, value in (("lr", lr), ("steps", steps), ("eval_tasks", eval_tasks)):
        if value is not None:
            changes[key] = value
    if lr_sweep is not None:
        changes["lr_sweep"] = _numbers(lr_sweep, "lr-sweep")
    cfg = StudyConfig.fast(**changes) if fast else StudyConfig(**changes)
    # a small run never lands on the full study's results (issue 22): --fast writes elsewhere by default, and a
    # report directory holding another configuration's table is kept unless --overwrite
    out_dir = out_dir if out_dir is not None else Path("runs/study-fast" if fast else "runs/study")
    report_dir = report_dir if report_dir is not None else \
        (Path("runs/study-fast/report") if fast else Path("reports/study"))
    identity = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "threads"}  # threads: same results
    check_report_dir(report_dir, name="study", config=identity, overwrite=overwrite, flag="--report")
    bar = StudyBar()
    try:
        result = run_study(cfg, out_dir, report_dir, progress=bar)
    finally:
        bar.close()
    stamp_report_dir(report_dir, name="study", config=identity)
    if as_json:
        print_json({"table": result["table"], "claims": result["claims"], "report": str(report_dir / "report.md")})
        return
    for c in result["claims"]:
        verdict = {True: "holds", False: "does not hold", None: "not checked"}[c["holds"]]
        out.print(f"{verdict:>14}  {c['claim']}: {c['evidence']}", highlight=False, soft_wrap=True)
    err.print(f"wrote {report_dir / 'report.md'}", highlight=False)
