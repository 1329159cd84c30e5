"""`collapse-probe`: the command line. Each subcommand is a thin layer over a library function.

Errors the user can fix print one line and exit 1; `watch` exits 2 once a collapse is confirmed.
Set COLLAPSE_PROBE_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from collapse_probe.errors import UserError
from collapse_probe.schema import POSITIONS, Position

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find out why tool-use RL runs collapse, warn before they do, show the skill survives.")
out = Console()
err = Console(stderr=True)


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------------------------- train
@app.command()
def train(
    preset: str = typer.Option("sft", help="sft | grpo-collapse | grpo-stable | interleaved"),
    seed: int = typer.Option(0, help="Seed for sampling, data order and init."),
    out_dir: Path = typer.Option(..., "--out", help="Run directory to write (config, metrics.jsonl, checkpoints)."),
    init: Optional[str] = typer.Option(None, help="Start from this checkpoint (default for RL presets: the cached sft model)."),
    model: Optional[str] = typer.Option(None, help="Any local HF causal LM directory or hub name to start from (same as --init)."),
    steps: Optional[int] = typer.Option(None, help="Override the preset's number of steps."),
    lr: Optional[float] = typer.Option(None, help="Override the learning rate."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                   help="Override any TrainConfig field, e.g. --set group_size=4 --set reward.tag_bonus=0"),
) -> None:
    """Train with a preset: SFT from scratch, or GRPO / interleaved SFT+RL from the SFT model."""
    from collapse_probe.train.config import Mode, apply_overrides
    from collapse_probe.train.presets import get_preset, sft_checkpoint
    from collapse_probe.train.trainer import check_run_dir, train as run_train

    cfg = apply_overrides(get_preset(preset, seed=seed, steps=steps, lr=lr), set_)
    start = model or init
    if start is None and cfg.mode is not Mode.SFT:
        err.print(f"[dim]{preset} starts from the sft model (cached after the first run)[/dim]")
        with _progress("sft (first use, cached)", get_preset("sft").steps) as bar:
            start = str(sft_checkpoint(progress=bar))
    cfg.init = start
    check_run_dir(out_dir, cfg)  # before the progress bar, so a refusal is one line
    with _progress(f"{preset} seed {seed}", cfg.steps) as bar:
        last = run_train(cfg, out_dir, progress=bar)
    err.print(f"wrote {out_dir} (last checkpoint {last.name})")


class _progress:
    """A rich progress bar fed by the trainer's per-step callback."""

    def __init__(self, label: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err, transient=False)
        self.label, self.total = label, total

    def __enter__(self):
        self.p.start()
        self.task = self.p.add_task(self.label, total=self.total, info="")
        return self

    def __call__(self, step: int, rec: dict) -> None:
        info = []
        for key, name in (("success", "succ"), ("loss", "loss"), ("cp/rollout/after_open/end_of_turn", "p(eot|open)")):
            if isinstance(rec.get(key), float):
                info.append(f"{name} {rec[key]:.3f}")
        self.p.update(self.task, completed=step + 1, info="  ".join(info))

    def __exit__(self, *exc):
        self.p.stop()


# ----------------------------------------------------------------------------------------------- formats
@app.command()
def formats(
    path: Path = typer.Argument(..., help="JSONL of turns, our rollouts/, TRL completions/*.parquet or verl rollout dumps."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    syntax: str = typer.Option("hermes", "--format", help="Tool-call syntax: hermes (alias canonical), "
                               "renamed_tags, json, python_list, xml, markdown, llama3, mistral."),
    known_tools: Optional[str] = typer.Option(None, help="Comma-separated tool names; others count as unknown_tool."),
    step_bins: Optional[int] = typer.Option(None, help="Also break the counts into this many step ranges."),
) -> None:
    """Classify every assistant turn: healthy tool call / healthy response / text pollution / full collapse."""
    from collapse_probe.formats.registry import get_syntax
    from collapse_probe.detect.rollout_files import load_turns, render_summary, summarise_turns

    tools = frozenset(t.strip() for t in known_tools.split(",") if t.strip()) if known_tools else None
    spec = get_syntax(syntax).spec(tools)  # UserError naming every format for an unknown one
    turns = load_turns(path, spec)
    summary = summarise_turns(turns, spec, step_bins=step_bins)
    if as_json:
        _print_json(summary)
    else:
        out.print(render_summary(summary))


# ----------------------------------------------------------------------------------------------- tokens
@app.command()
def tokens(
    model: str = typer.Argument(..., help="A local model/tokenizer directory (or hub name if cached)."),
    token: list[str] = typer.Option([], "--token", help="Override a role: ROLE=STRING (repeatable)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show which control tokens collapse-probe tracks for a tokenizer, and which it could not resolve."""
    from transformers import AutoTokenizer

    from collapse_probe.tokens import parse_token_overrides, resolve_control_tokens

    overrides = parse_token_overrides(token)
    try:
        tok = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise UserError(f"{model}: could not load a tokenizer ({str(exc).splitlines()[0]}); pass a directory "
                        "holding tokenizer files") from None
    ct = resolve_control_tokens(tok, overrides)
    _print_json(ct.to_dict()) if as_json else out.print(ct.report())


# ----------------------------------------------------------------------------------------------- export
@app.command()
def export(run_dir: Path = typer.Argument(...), out_path: Path = typer.Argument(..., help="OUT.parquet or OUT.csv")) -> None:
    """Export a run's metrics to Parquet or CSV for pandas users."""
    from collapse_probe.timeline import Timeline

    err.print(f"wrote {Timeline.from_run(run_dir).export(out_path)}")


# ----------------------------------------------------------------------------------------------- watch
@app.command()
def watch(
    run_dir: Path = typer.Argument(..., help="Run dir, HF output dir (collapse_probe/metrics.jsonl) or a metrics "
                                             "JSONL file (ours or verl's file logger)."),
    as_json: bool = typer.Option(False, "--json",
                                 help="Print one status object per line (flushed) instead of the live view."),
    once: bool = typer.Option(False, "--once", help="Read what is there now, print the last status and exit."),
    idle_timeout: Optional[float] = typer.Option(None, "--idle-timeout", metavar="SECONDS",
                                                 help="Stop when no record arrived for this long "
                                                      "(default: follow forever)."),
    on_alert: Optional[str] = typer.Option(None, "--on-alert", metavar="CMD",
                                           help="Shell command run for each alert; env COLLAPSE_PROBE_ALERT (JSON), "
                                                "COLLAPSE_PROBE_KIND, COLLAPSE_PROBE_STEP, COLLAPSE_PROBE_RUN, "
                                                "COLLAPSE_PROBE_COLLAPSED."),
    poll: float = typer.Option(0.2, "--poll", metavar="SECONDS", help="Poll interval."),
    source: str = typer.Option("auto", help="Captures to monitor: auto | rollout | probe."),
    position: str = typer.Option(Position.AFTER_OPEN.value, help=f"Decision position to monitor: {', '.join(POSITIONS)}."),
) -> None:
    """Follow a live run and alert as it happens; exit 2 once a collapse is confirmed, else 0.

    Live view: each control role's probability with a sparkline, state mix, success, alerts. Read-only."""
    from collapse_probe.watch import watch as do_watch

    if poll <= 0:
        raise UserError(f"--poll {poll} must be positive: pass a poll interval in seconds, e.g. 0.2")
    code = do_watch(run_dir, once=once, as_json=as_json, idle_timeout=idle_timeout, on_alert=on_alert,
                    poll_s=poll, source=source, position=position, console=err)
    raise typer.Exit(code)


# ----------------------------------------------------------------------------------------------- analyze
@app.command()
def analyze(
    path: Path = typer.Argument(..., help="Run dir / metrics JSONL, or a directory of checkpoints "
                                          "(checkpoint-N/, verl global_step_N/actor/huggingface/)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    eval_tasks: int = typer.Option(32, "--eval-tasks", "-n", help="Greedy tool-world tasks per checkpoint (0: skip)."),
    probe: Optional[Path] = typer.Option(None, "--probe", metavar="FILE.jsonl",
                                         help="Chat conversations to probe with (tokenizers without the "
                                              "tool world's tokens)."),
    cache: Optional[Path] = typer.Option(None, "--cache", metavar="DIR",
                                         help="Directory for the per-checkpoint score cache (default: "
                                              "$COLLAPSE_PROBE_CACHE/analyze/<path hash>/, "
                                              "COLLAPSE_PROBE_CACHE defaulting to ~/.cache/collapse-probe)."),
    checkpoints: bool = typer.Option(False, "--checkpoints", help="Score the checkpoints even when metrics exist."),
) -> None:
    """Did the run collapse, when did the warning signs appear, and how early? From metrics or checkpoints."""
    from collapse_probe.analyze import analyze as do_analyze, render

    bar = _ScoreBar()
    try:
        result = do_analyze(path, eval_tasks=eval_tasks, probe=probe, cache=cache, checkpoints=checkpoints,
                            progress=bar)
    finally:
        bar.close()
    if as_json:
        _print_json({k: v for k, v in result.items() if k != "summary"})
    else:
        out.print(render(result), highlight=False, soft_wrap=True)


class _ScoreBar:
    """A rich progress bar on stderr for checkpoint scoring, started at the first checkpoint."""

    def __init__(self):
        self.p = None

    def __call__(self, done: int, total: int, label: str) -> None:
        if self.p is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self.p = Progress(TextColumn("scoring checkpoints"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=err, transient=True,
                              disable=not err.is_terminal)
            self.p.start()
            self.task = self.p.add_task("score", total=total, info="")
        self.p.update(self.task, completed=done, info=label)

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()
            self.p = None


# ----------------------------------------------------------------------------------------------- plot
@app.command()
def plot(
    run_dir: Path = typer.Argument(..., help="Run dir or metrics JSONL."),
    out_stem: Optional[Path] = typer.Option(None, "--out", metavar="STEM",
                                            help="Output stem (default reports/<run name>/timeline)."),
) -> None:
    """Draw the run's timeline (control-token probabilities, state mix, outcome, onsets) as PDF, SVG and PNG."""
    from collapse_probe.report import plot_run

    paths, _ = plot_run(run_dir, out_stem)
    for p in paths:
        out.print(str(p), highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------- report
@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="Run dir or metrics JSONL."),
    out_dir: Optional[Path] = typer.Option(None, "--out", metavar="DIR",
                                           help="Output directory (default reports/<run name>/)."),
) -> None:
    """Write a short Markdown report: figure, verdict with the baselines, final state mix, reason codes, config."""
    from collapse_probe.report import write_report

    out.print(str(write_report(run_dir, out_dir)), highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------- recover
@app.command()
def recover(
    ckpt: Path = typer.Argument(..., help="A checkpoint directory (HF save_pretrained layout, safetensors)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    formats: Optional[str] = typer.Option(None, "--formats", metavar="A,B",
                                          help="Comma-separated formats to try (default: all but llama3, "
                                               "mistral): hermes (alias canonical), renamed_tags, json, "
                                               "python_list, xml, markdown, llama3, mistral, reworded, "
                                               "renamed_tools."),
    n: int = typer.Option(32, "-n", "--n", help="Greedy held-out tasks per probe."),
    repair_steps: int = typer.Option(50, "--repair-steps", help="At most this many SFT repair steps."),
    fresh_max_steps: int = typer.Option(300, "--fresh-max-steps",
                                        help="Budget of SFT steps for the fresh model to match the repair."),
    skip_repair: bool = typer.Option(False, "--skip-repair", help="Skip the SFT repair and the fresh-model run."),
) -> None:
    """Does the tool skill survive the collapse? Format grid, masked decoding, SFT repair vs a fresh model."""
    from collapse_probe.recover import render_recovery_table, run_recovery

    bar = _PhaseBar()  # run_recovery checks its arguments before it loads anything
    try:
        result = run_recovery(ckpt, formats=formats, n=n, repair_steps=repair_steps, fresh_max_steps=fresh_max_steps,
                              skip_repair=skip_repair, progress=bar)
    finally:
        bar.close()
    if as_json:
        _print_json(result)
    else:
        out.print(render_recovery_table(result), highlight=False, soft_wrap=True)


class _PhaseBar:
    """A rich progress bar on stderr with one line per phase (formats, masked, repair, fresh)."""

    def __init__(self):
        self.p = None
        self.tasks: dict[str, int] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.p is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self.p = Progress(TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=err, transient=False, disable=not err.is_terminal)
            self.p.start()
        if phase not in self.tasks:
            self.tasks[phase] = self.p.add_task(phase, total=max(total, 1))
        self.p.update(self.tasks[phase], completed=done, total=max(total, 1))

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()
            self.p = None


# ----------------------------------------------------------------------------------------------- demo
@app.command()
def demo(
    out_dir: Path = typer.Option(Path("reports/demo"), "--out", help="Where the report, figures and JSON go."),
    work_dir: Path = typer.Option(Path("runs/demo"), "--work", help="Where the training run is written."),
    seed: int = typer.Option(0),
    fast: bool = typer.Option(False, "--fast", help="Tiny budgets everywhere (for tests): no real collapse."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """SFT -> GRPO collapse with capture on -> live detection -> recovery -> report, on the embedded default."""
    from collapse_probe.demo import run_demo

    bar = _PhaseBar()
    try:
        res = run_demo(out_dir, work_dir=work_dir, seed=seed, fast=fast, say=lambda m: err.print(m, highlight=False),
                       progress_factory=_progress, phase_progress=bar)
    finally:
        bar.close()
    v = res.verdict
    summary = {"run_dir": str(res.run_dir), "report": str(res.report), "seconds": round(res.seconds, 1),
               "first_alert_step": res.first_alert_step, **{k: v[k] for k in
               ("collapsed", "spike_step", "breakage_step", "collapse_step", "lead_steps")}}
    if res.recovery:
        summary["recovery"] = {k: res.recovery.get(k) for k in ("canonical", "masked", "repair", "findings")}
    if as_json:
        _print_json(summary)
        return
    out.print(f"[bold]demo finished in {res.seconds / 60:.1f} min[/bold]")
    out.print(f"collapsed: {v['collapsed']}  spike step: {v['spike_step']}  breakage step: {v['breakage_step']}  "
              f"collapse step: {v['collapse_step']}  lead: {v['lead_steps']} steps  first live alert: "
              f"step {res.first_alert_step}", highlight=False)
    for line in (res.recovery or {}).get("findings", []):
        out.print(f"recovery: {line}", highlight=False)
    out.print(f"report: {res.report}", highlight=False)


def main() -> None:
    """Console entry point: one clear line for user errors, no tracebacks."""
    debug = bool(os.environ.get("COLLAPSE_PROBE_DEBUG"))
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        app()
    except UserError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except (OSError, ValueError, RuntimeError) as exc:
        if debug:
            raise
        err.print(f"[red]error:[/red] {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                  "(set COLLAPSE_PROBE_DEBUG=1 for a traceback)", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
