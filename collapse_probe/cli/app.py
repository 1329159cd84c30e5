"""`collapse-probe`: the command line. Each subcommand is a thin layer over a library function.

Exit codes, one meaning each across all commands:
  0  ok
  1  bad input or failure (one line on stderr: what was wrong and what to do)
  2  usage error (unknown option, missing argument; one line on stderr)
  3  collapse confirmed (`watch`, `analyze --fail-on collapse|warning`)
Every command takes --json: one JSON object on stdout. Set COLLAPSE_PROBE_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from typer import Abort

try:  # typer >= 0.29 runs its own copy of click: its usage errors are those classes, not click's
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - an older typer on the real click
    from click.exceptions import NoArgsIsHelpError, UsageError

from collapse_probe.cli import inspect as cli_inspect
from collapse_probe.cli import models as cli_models
from collapse_probe.cli import study as cli_study
from collapse_probe.cli.output import EXITS, JSON_HELP, PhaseBar, ScoreBar, TrainProgress, err, out, print_json, show_path
from collapse_probe.errors import EXIT_COLLAPSED, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UserError
from collapse_probe.runs.report_dir import check_report_dir, stamp_report_dir
from collapse_probe.schema import POSITIONS, Position

TASKS_HELP = "Real tasks in the model's own chat template: bfcl:multi_turn_base|miss_param|miss_func or a JSONL file."
TEMPLATE_HELP = "With --tasks: auto, native (the template's tools) or hermes (Qwen2.5's tool prompt in the system turn)."
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find out why tool-use RL runs collapse, warn before they do, show the skill survives. "
                       + EXITS)


@app.command(epilog=EXITS)
def train(
    preset: str = typer.Option("sft", help="sft | instruct | instruct-sft | grpo-outcome | grpo-outcome-sft | "
                                           "grpo-collapse | grpo-stable | interleaved"),
    seed: int = typer.Option(0, help="Seed for sampling, data order and init."),
    out_dir: Path = typer.Option(..., "--out", help="Run directory to write (config, metrics.jsonl, checkpoints)."),
    init: Optional[str] = typer.Option(None, help="Start from this checkpoint (default: the cached model of the preset it starts from)."),
    model: Optional[str] = typer.Option(None, help="Any local HF causal LM directory or hub name to start from (same as --init)."),
    steps: Optional[int] = typer.Option(None, help="Override the preset's number of steps."),
    lr: Optional[float] = typer.Option(None, help="Override the learning rate."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                   help="Override any TrainConfig field, e.g. --set group_size=4 --set reward.tag_bonus=0"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out (its config, "
                                                             "metrics, rollouts and checkpoints)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (not supported yet: refused)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Train with a preset: SFT from scratch, or GRPO / interleaved SFT+RL from the SFT model."""
    from collapse_probe.train.config import apply_overrides
    from collapse_probe.train.presets import cached_model, get_preset, is_cached, start_chain
    from collapse_probe.train.run_files import check_run_dir

    if resume:
        raise UserError("--resume is not supported yet (the optimizer state is not saved): pass --overwrite to "
                        "start the run again, or a new --out")
    cfg = apply_overrides(get_preset(preset, seed=seed, steps=steps, lr=lr), set_)
    check_run_dir(out_dir, cfg, overwrite=overwrite)  # before the sft stage and any bar: a refusal is one line
    start = model or init
    if start is None and start_chain(preset):
        err.print(f"[dim]{preset} starts from the {start_chain(preset)[-1]} model (cached after the first run)[/dim]")
        for stage in start_chain(preset):
            if is_cached(stage):
                start = str(cached_model(stage))
                continue
            with TrainProgress(f"{stage} (first use, cached)", get_preset(stage).steps) as bar:
                start = str(cached_model(stage, progress=bar))
    cfg.init = start
    check_run_dir(out_dir, cfg, overwrite=overwrite)
    from collapse_probe.train.trainer import train as run_train  # torch: only once the arguments are good

    with TrainProgress(f"{preset} seed {seed}", cfg.steps) as bar:
        last = run_train(cfg, out_dir, progress=bar, overwrite=overwrite)
    if as_json:
        print_json({"run_dir": str(out_dir), "last_checkpoint": str(last), "steps": cfg.steps, "preset": preset})
    else:
        err.print(f"wrote {out_dir} (last checkpoint {last.name})", highlight=False)


# ----------------------------------------------------------------------------------------------- watch
@app.command(epilog=EXITS)
def watch(
    run_dir: Path = typer.Argument(..., help="Run dir, HF output dir (collapse_probe/metrics.jsonl) or a metrics "
                                             "JSONL file (ours or verl's file logger)."),
    as_json: bool = typer.Option(False, "--json",
                                 help="Print one status object per line (flushed) instead of the live view "
                                      "(with --once: one JSON object)."),
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
    """Follow a live run and alert as it happens; exit 3 once a collapse is confirmed, else 0.

    Live view: each control role's probability with a sparkline, state mix, success, alerts. Read-only."""
    from collapse_probe.commands.watch import watch as do_watch

    code = do_watch(run_dir, once=once, as_json=as_json, idle_timeout=idle_timeout, on_alert=on_alert,
                    poll_s=poll, source=source, position=position, console=err)
    raise typer.Exit(code)


# ----------------------------------------------------------------------------------------------- analyze
@app.command(epilog=EXITS)
def analyze(
    path: Path = typer.Argument(..., help="Run dir / metrics JSONL, or a directory of checkpoints "
                                          "(checkpoint-N/, verl global_step_N/actor/huggingface/)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    eval_tasks: int = typer.Option(32, "--eval-tasks", "-n", help="Greedy tool-world tasks per checkpoint (0: skip)."),
    probe: Optional[Path] = typer.Option(None, "--probe", metavar="FILE.jsonl",
                                         help="Chat conversations to probe with (tokenizers without the "
                                              "tool world's tokens)."),
    cache: Optional[Path] = typer.Option(None, "--cache", metavar="DIR",
                                         help="Directory for the per-checkpoint score cache (default: "
                                              "$COLLAPSE_PROBE_CACHE/analyze/<path hash>/, "
                                              "COLLAPSE_PROBE_CACHE defaulting to ~/.cache/collapse-probe)."),
    checkpoints: bool = typer.Option(False, "--checkpoints", help="Score the checkpoints even when metrics exist."),
    tasks: Optional[str] = typer.Option(None, "--tasks", metavar="bfcl:CAT|FILE", help=TASKS_HELP + " Per "
                                        "checkpoint: decision probabilities on -n gold trajectories; `plot` draws them."),
    template: str = typer.Option("auto", "--template", help=TEMPLATE_HELP),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", metavar="collapse|warning",
                                          help="Exit 3 when the run collapsed (collapse), or collapsed or raised a "
                                               "control-token/format warning (warning): gate a pipeline on it. A "
                                               "reward drop the records cannot explain (no control-token or format "
                                               "data: an unconfirmed collapse) fails either gate."),
) -> None:
    """Did the run collapse, when did the warning signs appear, and how early? From metrics or checkpoints."""
    from collapse_probe.commands.analyze import analyze as do_analyze, render

    if fail_on not in (None, "collapse", "warning"):
        raise UserError(f"unknown --fail-on {fail_on!r}: use collapse or warning")
    bar = ScoreBar()
    try:
        result = do_analyze(path, eval_tasks=eval_tasks, probe=probe, cache=cache, checkpoints=checkpoints,
                            progress=bar, tasks=tasks, template=template)
    finally:
        bar.close()
    if as_json:
        print_json({k: v for k, v in result.items() if k != "summary"})
    else:
        out.print(render(result), highlight=False, soft_wrap=True)
    # a gate fails closed: an unconfirmed collapse (collapsed null) is flagged, not waved through
    flagged = result.get("collapsed") is not False or \
        (fail_on == "warning" and result.get("first_alert_step") is not None)
    if fail_on and flagged:
        raise typer.Exit(EXIT_COLLAPSED)


# ----------------------------------------------------------------------------------------------- plot
@app.command(epilog=EXITS)
def plot(
    run_dir: Path = typer.Argument(..., help="Run dir or metrics JSONL."),
    out_stem: Optional[Path] = typer.Option(None, "--out", metavar="STEM",
                                            help="Output stem (default reports/<run name>/timeline)."),
    pressure: bool = typer.Option(False, "--pressure", help="Draw the gradient pressure on end-of-turn and {\" "
                                  "right after <tool_call>\\n instead (chosen/other parts; our GRPO trainer's runs)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace figures of another run at --out (kept "
                                                              "otherwise)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Draw the run's timeline (control-token probabilities, state mix, outcome, onsets) as PDF, SVG and PNG; or
    a saved `analyze --tasks --json` / `recover --tasks --json` result (a .json file)."""
    if run_dir.suffix == ".json" and run_dir.is_file():  # a saved `analyze --tasks` / `recover --tasks` result
        from collapse_probe.plots.decisions import plot_result_file
        paths = plot_result_file(run_dir, out_stem)
    elif pressure:
        from collapse_probe.plots.pressure import plot_pressure
        from collapse_probe.runs.rundir import RunDir
        from collapse_probe.runs.timeline import Timeline

        run = RunDir(run_dir)
        paths = plot_pressure(Timeline.from_run(run_dir), out_stem or Path("reports") / run.name / "pressure")
    else:
        from collapse_probe.commands.report import FIGURES, default_report_dir, plot_run, run_identity

        stem = out_stem if out_stem is not None else default_report_dir(run_dir) / "timeline"
        stem = stem.with_suffix("") if stem.suffix.lower() in tuple(f".{e}" for e in FIGURES) else stem
        ident = run_identity(run_dir)
        check_report_dir(stem.parent, name=stem.name, config=ident, overwrite=overwrite,
                         files=[f"{stem.name}.{e}" for e in FIGURES])
        paths, verdict = plot_run(run_dir, stem)
        stamp_report_dir(stem.parent, name=stem.name, config=ident)
        if as_json:
            print_json({"figures": [show_path(p) for p in paths], "collapsed": verdict.headline()["collapsed"]})
            return
    if as_json:
        print_json({"figures": [show_path(p) for p in paths]})
        return
    for p in paths:
        out.print(show_path(p), highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------- report
@app.command(epilog=EXITS)
def report(
    run_dir: Path = typer.Argument(..., help="Run dir or metrics JSONL."),
    out_dir: Optional[Path] = typer.Option(None, "--out", metavar="DIR",
                                           help="Output directory (default reports/<run name>/)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a report of another run at --out (kept "
                                                              "otherwise)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Write a short Markdown report: figure, verdict with the baselines, final state mix, reason codes, config."""
    from collapse_probe.commands.report import FIGURES, default_report_dir, run_identity, write_report

    target = out_dir if out_dir is not None else default_report_dir(run_dir)
    ident = run_identity(run_dir)
    check_report_dir(target, name="report", config=ident, overwrite=overwrite,
                     files=["report.md", *(f"timeline.{e}" for e in FIGURES)])
    path = write_report(run_dir, target)
    stamp_report_dir(target, name="report", config=ident)
    if as_json:
        print_json({"report": show_path(path)})
    else:
        out.print(show_path(path), highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------- recover
@app.command(epilog=EXITS)
def recover(
    ckpt: Path = typer.Argument(..., help="A checkpoint directory (HF save_pretrained layout, safetensors)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    formats: Optional[str] = typer.Option(None, "--formats", metavar="A,B",
                                          help="Comma-separated formats to try (default: all but llama3, "
                                               "mistral): hermes (alias canonical), renamed_tags, json, "
                                               "python_list, xml, markdown, llama3, mistral, reworded, "
                                               "renamed_tools."),
    n: int = typer.Option(32, "-n", "--n", help="Greedy held-out tasks per probe."),
    repair_steps: Optional[int] = typer.Option(None, "--repair-steps", help="At most this many SFT repair steps "
                                               "(default 50; with --tasks exactly this many, default 2)."),
    fresh_max_steps: int = typer.Option(300, "--fresh-max-steps",
                                        help="Budget of SFT steps for the fresh model to match the repair."),
    skip_repair: bool = typer.Option(False, "--skip-repair", help="Skip the SFT repair and the fresh-model run."),
    tasks: Optional[str] = typer.Option(None, "--tasks", metavar="bfcl:CAT|FILE", help=TASKS_HELP),
    template: str = typer.Option("auto", "--template", help=TEMPLATE_HELP),
    reference: Optional[Path] = typer.Option(None, "--reference", metavar="CKPT", help="With --tasks: the repair's "
                                             "reference (e.g. the model before RL; default a fresh model)."),
) -> None:
    """Does the tool skill survive the collapse? Format grid, masked decoding, SFT repair vs a fresh model."""
    from collapse_probe.recover.run import render_recovery_table, run_recovery

    bar = PhaseBar()  # run_recovery checks its arguments before it loads anything
    try:
        result = run_recovery(ckpt, formats=formats, n=n, repair_steps=repair_steps, fresh_max_steps=fresh_max_steps,
                              skip_repair=skip_repair, progress=bar, tasks=tasks, template=template,
                              reference=reference)
    finally:
        bar.close()
    if as_json:
        print_json(result)
    else:
        out.print(render_recovery_table(result), highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------- demo
@app.command(epilog=EXITS)
def demo(
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where the report, figures and JSON go (default "
                                                               "reports/demo; --fast: runs/demo-fast/report)."),
    work_dir: Optional[Path] = typer.Option(None, "--work", help="Where the training run is written (default "
                                                                 "runs/demo; --fast: runs/demo-fast)."),
    seed: int = typer.Option(0),
    fast: bool = typer.Option(False, "--fast", help="Tiny budgets everywhere (for tests): no real collapse."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an --out directory that holds another "
                                                              "configuration's results (kept otherwise)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """SFT -> GRPO collapse with capture on -> live detection -> recovery -> report, on the embedded default."""
    from collapse_probe.commands.demo import run_demo

    bar = PhaseBar()
    try:
        # --fast never lands on the committed demo (issue 22)
        out_dir = out_dir if out_dir is not None else Path("runs/demo-fast/report" if fast else "reports/demo")
        work_dir = work_dir if work_dir is not None else Path("runs/demo-fast" if fast else "runs/demo")
        res = run_demo(out_dir, work_dir=work_dir, seed=seed, fast=fast, say=lambda m: err.print(m, highlight=False),
                       progress_factory=TrainProgress, phase_progress=bar, overwrite=overwrite)
    finally:
        bar.close()
    v = res.verdict
    summary = {"run_dir": str(res.run_dir), "report": str(res.report), "seconds": round(res.seconds, 1),
               "first_alert_step": res.first_alert_step, **{k: v[k] for k in
               ("collapsed", "spike_step", "breakage_step", "collapse_step", "lead_steps")}}
    if res.recovery:
        summary["recovery"] = {k: res.recovery.get(k) for k in ("canonical", "masked", "repair", "findings")}
    if as_json:
        print_json(summary)
        return
    out.print(f"[bold]demo finished in {res.seconds / 60:.1f} min[/bold]")
    out.print(f"collapsed: {v['collapsed']}  spike step: {v['spike_step']}  breakage step: {v['breakage_step']}  "
              f"collapse step: {v['collapse_step']}  lead: {v['lead_steps']} steps  first live alert: "
              f"step {res.first_alert_step}", highlight=False)
    for line in (res.recovery or {}).get("findings", []):
        out.print(f"recovery: {line}", highlight=False)
    out.print(f"report: {res.report}", highlight=False)


# ----------------------------------------------------------------------------------------------- study
for command in (cli_inspect.formats, cli_inspect.tokens, cli_inspect.export):
    app.command(epilog=EXITS)(command)
app.command(name="study", epilog=EXITS)(cli_study.study)


# ----------------------------------------------------------------------------------------------- models
app.add_typer(cli_models.models_app, name="models", epilog=EXITS)


def _fail(msg: str, code: int) -> None:
    err.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(code)


def main() -> None:
    """Console entry point: one line on stderr for every error, no tracebacks (see the exit codes above)."""
    debug = bool(os.environ.get("COLLAPSE_PROBE_DEBUG"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded: a hub name not cached fails at once
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.showwarning = _warning_line
    try:
        code = app(prog_name="collapse-probe", standalone_mode=False)
    except NoArgsIsHelpError as exc:  # bare `collapse-probe CMD`: its help, as a usage error
        exc.show()
        sys.exit(EXIT_USAGE)
    except UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx is not None else "collapse-probe"
        _fail(f"{_escape(exc.format_message())} (see '{cmd} --help')", EXIT_USAGE)
    except Abort:
        err.print("interrupted")
        sys.exit(130)
    except UserError as exc:
        _fail(_escape(str(exc)), EXIT_FAILURE)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - never a traceback: one line, exit 1
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        _fail(f"{type(exc).__name__}: {_escape(first)} (set COLLAPSE_PROBE_DEBUG=1 for a traceback)", EXIT_FAILURE)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning (a skipped line, a fallback) as one line on stderr, without the source line under it."""
    err.print(f"[yellow]warning:[/yellow] {_escape(str(message))}", highlight=False, soft_wrap=True)


def _escape(text: str) -> str:
    """Rich markup off for user text (a path like [x] stays as written); one line; printable in any encoding."""
    from rich.markup import escape

    return escape(" ".join(text.split("\n"))).encode("utf-8", "backslashreplace").decode("utf-8")


if __name__ == "__main__":
    main()
