"""`watch`: follow a live run's metrics file, raise alerts as they happen, exit 3 once a collapse is confirmed.

Accepts our trainer's run dir, an HF/TRL output dir holding `collapse_probe/metrics.jsonl`, or a metrics JSONL
file (ours or verl's file logger, or its directory; verl's rollout dumps under the directory add each step's
format mix, as in `analyze`; `--once` reads what `analyze` reads, through `runs.joined.open_run`). The file is
followed with `runs.runlog.tail_records` (torn last lines wait for their newline; a truncated or replaced file is
read again from the top); every record goes through `RunWatcher.feed` (de-duplicates by step, handles restarts):

* a step after the last one processed is new: it goes to the `CollapseMonitor` (detect/monitor.py);
* a step at or before it is a line already seen (same content) or an older line read again (its `time` is not
  later than the newest record processed): ignored;
* a newer line for the last step adds keys to it (e.g. eval metrics logged after the train metrics): merged;
* otherwise the run restarted (resumed from an earlier checkpoint, or verl truncated its log on restart, which
  `tail_records` notices and reads from the top): the monitor is rebuilt from the records before that step and
  the new record is processed.

Follow mode reads the backlog first and then follows it, so a run that collapsed, was restarted from an earlier
checkpoint and is healthy now is judged by its current history. Nothing is written into the run directory.
Alerts reach the output within one poll interval (0.2 s) of their record being written.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from collapse_probe import schema
from collapse_probe.detect.monitor import CollapseMonitor
from collapse_probe.errors import EXIT_COLLAPSED, EXIT_OK, UserError
from collapse_probe.runs.joined import StepExtras, open_run
from collapse_probe.runs.rundir import RunDir
from collapse_probe.runs.history import StepHistory
from collapse_probe.runs.runlog import tail_records

__all__ = ["EXIT_COLLAPSED", "EXIT_OK", "POLL_S", "RunWatcher", "sparkline", "watch"]

POLL_S = 0.2
SPARK = "▁▂▃▄▅▆▇█"
STATE_STYLE = {schema.FormatState.HEALTHY_TOOL_CALL.value: "green", schema.FormatState.HEALTHY_RESPONSE.value: "cyan",
               schema.FormatState.TEXT_POLLUTION.value: "yellow", schema.FormatState.FULL_COLLAPSE.value: "red"}


def sparkline(values: Iterable[float | None], *, log: bool = True, lo: float | None = None,
              hi: float | None = None) -> str:
    """Unicode sparkline; `log` scales probabilities by log10; None/NaN are drawn as a space."""
    vals = [v if isinstance(v, (int, float)) and math.isfinite(v) else None for v in values]
    tr = [None if v is None else (math.log10(max(v, 1e-6)) if log else float(v)) for v in vals]
    finite = [v for v in tr if v is not None]
    if not finite:
        return " " * len(vals)
    a = min(finite) if lo is None else (math.log10(max(lo, 1e-6)) if log else lo)
    b = max(finite) if hi is None else (math.log10(max(hi, 1e-6)) if log else hi)
    span = b - a
    out = []
    for v in tr:
        if v is None:
            out.append(" ")
        elif span < 1e-9:
            out.append(SPARK[3])
        else:
            out.append(SPARK[min(len(SPARK) - 1, max(0, int((v - a) / span * (len(SPARK) - 1) + 0.5)))])
    return "".join(out)


class RunWatcher:
    """Feed records in file order; returns a status dict for each record processed (None when ignored).

    `source` is "rollout", "probe" or "auto" (rollout captures once the run logs them, else probe captures,
    exactly as `analyze` picks them). Repeated and restarted steps are sorted out by `runlog.StepHistory`;
    the monitor is rebuilt from the history whenever a step is merged or the run restarted.
    Keeps the last `spark_len` values of each role for the live view. `extras(step)` gives keys to fill into a
    step's record before the monitor sees it (verl's rollout dumps); the history keeps the lines as read.
    """

    def __init__(self, *, source: str = "auto", position: str = schema.Position.AFTER_OPEN.value,
                 spark_len: int = 40, extras: Callable[[int], dict] | None = None):
        sources = [s.value for s in schema.Source]
        if source != "auto" and source not in sources:
            raise UserError(f"unknown --source {source!r}: use auto, {' or '.join(sources)}")
        if position not in schema.POSITIONS:
            raise UserError(f"unknown --position {position!r}: use one of {', '.join(schema.POSITIONS)}")
        self.auto = source == "auto"
        self.source = None if self.auto else source
        self.position, self.spark_len, self.extras = position, int(spark_len), extras
        self.history = StepHistory()
        self.resolved_restarts = 0
        self.last_status: dict | None = None
        self._reset()

    # ---- state -------------------------------------------------------------------------------
    def _reset(self) -> None:
        self.monitor = CollapseMonitor(source=self.source or schema.Source.ROLLOUT.value, position=self.position)
        self.sparks: dict[str, deque] = {}
        self.success_spark: deque = deque(maxlen=self.spark_len)
        self.probs: dict[str, float | None] = {}   # last known value per role (captures may be sparse)

    @property
    def restarts(self) -> int:
        return self.history.restarts + self.resolved_restarts

    def feed_resolved(self, rec: dict, *, light: bool = False) -> dict | None:
        """Process a record already sorted out by a `StepIndex` (one per step, in order): no history is kept,
        so memory stays bounded however long the run (`watch --once`). `light` only updates the monitor and
        returns None unless the step raised an alert or confirmed the collapse (no status, no sparkline)."""
        was = self.monitor.collapsed
        if light and not self.monitor.update(rec) and self.monitor.collapsed == was:
            return None
        status = self._process(rec)  # after update() the monitor ignores the step; last_alerts are this step's
        status["restarted"], status["restarts"] = False, self.restarts
        self.last_status = status
        return status

    @property
    def last_step(self) -> int | None:
        return self.monitor.last_step

    @property
    def collapsed(self) -> bool:
        return self.monitor.collapsed

    @property
    def events(self) -> list:
        return self.monitor.events

    def _track(self, status: dict) -> None:
        for role, p in status["probs"].items():
            self.probs[role] = p
        for role in self.probs:
            self.sparks.setdefault(role, deque(maxlen=self.spark_len)).append(status["probs"].get(role))
        self.success_spark.append(status["success"])

    def _process(self, rec: dict) -> dict:
        if self.extras is not None:
            rec = {**self.extras(rec["step"]), **rec}
        status = self.monitor.status(rec)
        status["source"] = self.monitor.source
        self._track(status)
        return status

    def _rebuild(self) -> dict | None:
        """A fresh monitor fed the whole history; the status of its last record."""
        self._reset()
        status = None
        for rec in self.history.sorted_records():
            status = self._process(rec)
        return status

    # ---- the entry point ---------------------------------------------------------------------
    def feed(self, rec: dict) -> dict | None:
        try:
            int(rec["step"])
        except (KeyError, TypeError, ValueError, OverflowError):
            return None
        kind = self.history.add(rec)
        if kind == "duplicate":
            return None
        if self.auto and self.source != schema.Source.ROLLOUT.value and any(schema.parse_cp_key(k) for k in rec):
            picked = schema.pick_source(rec)  # rollout captures win as soon as they appear, as in `analyze`
            self.source, rebuild = picked, picked != self.monitor.source
            kind = "rebuild" if rebuild else kind
        status = self._process(self.history.records[rec["step"]]) if kind == "new" else self._rebuild()
        status["restarted"] = kind == "restart"
        status["restarts"] = self.restarts
        self.last_status = status
        return status


# ---------------------------------------------------------------------------------------------- output
def _fmt_p(p) -> str:
    if p is None:
        return "–"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _alert_line(ev: dict) -> str:
    who = ev.get("role") or ev.get("key")
    mag = ev.get("magnitude")
    mag = "" if mag is None else (f", {mag:+.2f} log-odds" if ev["kind"] in ("control_spike", "format_breakage")
                                  else f", x{mag:.2f}")
    return (f"step {ev['detected_at']}: {ev['kind']} {who} {ev.get('direction', '')}{mag} "
            f"(onset step {ev['step']})")


def render_view(w: RunWatcher, path: Path | str, max_roles: int = 8):
    """The live panel: per-role probability at the decision position with a sparkline, state mix, success."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    st = w.last_status or {}
    head = Text()
    head.append(f"step {st.get('step', '–')}", style="bold")
    succ = st.get("success")
    head.append(f"   success {_fmt_p(succ) if succ is not None else '–'} ")
    head.append(sparkline(w.success_spark, log=False, lo=0.0, hi=1.0), style="bold")
    if w.restarts:
        head.append(f"   restarts {w.restarts}", style="yellow")
    roles = sorted(w.probs, key=lambda r: (r not in ("end_of_turn", "json_open"), -(w.probs[r] or 0.0)))
    tab = Table(box=None, pad_edge=False, show_edge=False, header_style="dim")
    tab.add_column(f"p(next) at {w.position} [{st.get('source') or w.source or 'rollout'}]")
    tab.add_column("now", justify="right")
    tab.add_column("recent (log scale)")
    for role in roles[:max_roles]:
        style = "bold red" if role == "end_of_turn" and (w.probs[role] or 0) > 0.3 else None
        tab.add_row(role, _fmt_p(w.probs[role]), sparkline(w.sparks.get(role, [])), style=style)
    mix = Text()
    for s in schema.STATES:
        v = (st.get("state_mix") or {}).get(s)
        if v is not None:
            mix.append(f"{s} {100 * v:4.0f}%  ", style=STATE_STYLE[s])
    parts = [head, tab]
    if mix:
        parts.append(mix)
    if w.collapsed:
        state = Text(f"COLLAPSED ({w.monitor.collapse_reason})", style="bold white on red")
    elif w.events:
        state = Text(f"{len(w.events)} alert(s); last: {_alert_line(w.events[-1].to_dict())}", style="yellow")
    else:
        state = Text("no alerts", style="green")
    parts.append(state)
    return Panel(Group(*parts), title=f"collapse-probe watch {path}", title_align="left")


class _Hooks:
    """`--on-alert CMD`: one shell command per alert, started without waiting; reaped at the end."""

    def __init__(self, cmd: str | None, path: Path, to_stderr: bool, console):
        self.cmd, self.path, self.console = cmd, path, console
        self.procs: list[tuple[subprocess.Popen, str]] = []
        self.stdout = None
        if to_stderr:  # keep stdout a clean JSON stream
            try:
                self.stdout = sys.stderr.fileno()
            except (AttributeError, OSError, ValueError):
                self.stdout = subprocess.DEVNULL

    def fire(self, alert: dict, status: dict) -> None:
        if not self.cmd:
            return
        env = dict(os.environ)
        env.update({"COLLAPSE_PROBE_ALERT": json.dumps(alert, default=str),
                    "COLLAPSE_PROBE_KIND": str(alert.get("kind", "")),
                    "COLLAPSE_PROBE_STEP": str(alert.get("detected_at", status.get("step"))),
                    "COLLAPSE_PROBE_ONSET": str(alert.get("step", "")),
                    "COLLAPSE_PROBE_RUN": str(self.path),
                    "COLLAPSE_PROBE_COLLAPSED": "1" if status.get("collapsed") else "0"})
        try:
            p = subprocess.Popen(self.cmd, shell=True, env=env, stdin=subprocess.DEVNULL, stdout=self.stdout)
        except OSError as exc:
            self.console.print(f"[yellow]warning:[/yellow] --on-alert could not start: {exc}", highlight=False)
            return
        self.procs.append((p, str(alert.get("kind"))))
        self.reap(0.0)

    def reap(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        left = []
        for p, kind in self.procs:
            try:
                rc = p.wait(timeout=max(0.0, deadline - time.monotonic())) if timeout else p.poll()
            except subprocess.TimeoutExpired:
                rc = None
            if rc is None:
                left.append((p, kind))
            elif rc != 0:
                self.console.print(f"[yellow]warning:[/yellow] --on-alert command exited {rc} ({kind} alert)",
                                   highlight=False)
        self.procs = left


def watch(path: str | os.PathLike, *, once: bool = False, as_json: bool = False,
          idle_timeout: float | None = None, on_alert: str | None = None, poll_s: float = POLL_S,
          source: str = "auto", position: str = schema.Position.AFTER_OPEN.value, out: TextIO | None = None,
          console=None, stop: Callable[[], bool] | None = None) -> int:
    """Watch a run; returns the exit code (EXIT_COLLAPSED, 3, once a collapse is confirmed, else 0).

    `as_json` writes one status object per processed record to `out` (default stdout), flushed at once;
    with `once`, only the last one. `stop()` ends following (tests, embedding)."""
    from rich.console import Console

    if idle_timeout is not None and not idle_timeout >= 0:
        raise UserError(f"--idle-timeout {idle_timeout} must be 0 or more seconds (leave it out to follow forever)")
    if not poll_s > 0:
        raise UserError(f"--poll {poll_s} must be positive: pass a poll interval in seconds, e.g. 0.2")
    p = Path(path)
    out = out or sys.stdout
    console = console or Console(stderr=True)  # messages and warnings
    view_console = Console(file=out) if not as_json else None
    run = open_run(p, warn=False) if once and p.exists() else None
    if once and run is None:
        RunDir(p).require_metrics()  # UserError for a missing path or a dir without metrics
    elif not p.exists():
        if p.suffix:
            raise UserError(f"{p} does not exist: pass a run directory or a metrics JSONL file")
        console.print(f"[dim]waiting for {p}/metrics.jsonl to appear[/dim]", highlight=False)
    extras = StepExtras.from_layout(RunDir(p).layout, outcome=False) if not once and p.is_dir() else None
    w = RunWatcher(source=source, position=position, extras=extras.get if extras else None)
    hooks = _Hooks(on_alert, p, as_json, console)

    def emit(status: dict) -> None:
        out.write(json.dumps(status, default=str) + "\n")
        out.flush()

    def note_warnings(caught: list) -> None:
        for wm in caught:  # the reader already rate-limits them (one per file pass, or per few seconds)
            console.print(f"[yellow]warning:[/yellow] {wm.message}", highlight=False, soft_wrap=True)
        caught.clear()

    live = None
    reported = {"collapsed": False}

    def handle(status: dict, quiet: bool) -> bool:
        """Report one processed record; True once the run collapsed."""
        if status["restarted"] and not as_json:
            (view_console or console).print(f"[yellow]run restarted at step {status['step']}[/yellow]")
        for a in status["alerts"]:
            if not as_json:
                (live.console if live else view_console).print(f"[bold yellow]alert[/bold yellow] {_alert_line(a)}",
                                                               highlight=False, soft_wrap=True)
            hooks.fire(a, status)
        newly = status["collapsed"] and not reported["collapsed"]
        reported["collapsed"] = bool(status["collapsed"])
        if newly:
            msg = {"kind": "collapse", "step": status.get("collapse_step"), "detected_at": status["step"],
                   "reason": status.get("collapse_reason")}
            if not as_json:
                drop = status.get("collapse_step")
                why = status.get("collapse_reason") or ""
                why = why if drop is None else f"reward drop from step {drop}; {why}"
                (live.console if live else view_console).print(
                    f"[bold red]collapse confirmed[/bold red] at step {status['step']} ({why})",
                    highlight=False, soft_wrap=True)
            hooks.fire(msg, status)
        if as_json and not quiet:
            emit(status)
        if live is not None:
            live.update(render_view(w, p), refresh=False)
        return bool(status["collapsed"])

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if not as_json and not once:
                from rich.live import Live
                live = Live(render_view(w, p), console=view_console, refresh_per_second=5, transient=False,
                            redirect_stdout=False, redirect_stderr=False)
                live.start()
            if once:  # one streaming pass over the files as they are now (joined as `analyze` joins them)
                f = run.metrics or p
                w = RunWatcher(source=run.monitor_mode()[0] if source == "auto" else source, position=position)
                tail_from = run.step_count() - w.spark_len  # full statuses (sparklines) for the last steps only
                for i, rec in enumerate(run.records()):
                    status = w.feed_resolved(rec, light=i < tail_from)
                    if status is not None:
                        handle(status, quiet=True)
                w.resolved_restarts = run.index.restarts if run.index is not None else 0
                if w.last_status is None:
                    raise UserError(f"{f} holds no records yet: run it again once the run has logged a step")
                w.last_status["restarts"] = w.restarts
                if run.skipped:
                    console.print(f"[yellow]warning:[/yellow] skipped {run.skipped} torn or garbled line(s) of "
                                  f"{f}", highlight=False, soft_wrap=True)
                if as_json:
                    emit(w.last_status)
                else:
                    view_console.print(render_view(w, p))
                return EXIT_COLLAPSED if w.collapsed else EXIT_OK
            # 1) the backlog: the file as it is now, in file order
            for rec in tail_records(p, poll_s=poll_s, stop=lambda: True):
                status = w.feed(rec)
                if status is not None:
                    handle(status, quiet=False)
            note_warnings(caught)
            if w.collapsed:
                return EXIT_COLLAPSED
            # 2) follow: the backlog is read again and de-duplicated, so no line written in between is lost
            for rec in tail_records(p, poll_s=poll_s, stop=stop, idle_timeout_s=idle_timeout):
                note_warnings(caught)
                status = w.feed(rec)
                if status is not None and handle(status, quiet=False):
                    return EXIT_COLLAPSED
            note_warnings(caught)
            return EXIT_COLLAPSED if w.collapsed else EXIT_OK
    finally:
        if live is not None:
            live.update(render_view(w, p))
            live.stop()
            if not view_console.is_terminal:
                view_console.line()
        hooks.reap(10.0)
