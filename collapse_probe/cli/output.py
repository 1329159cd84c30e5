"""What the command line prints besides results: JSON on stdout, progress bars on stderr, one-line errors.

Kept apart from cli.py so the commands stay thin; every bar draws on stderr, so stdout holds only the result.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from collapse_probe import schema

__all__ = ["EXITS", "JSON_HELP", "err", "out", "print_json", "show_path", "TrainProgress", "ScoreBar", "PhaseBar", "StudyBar"]

EXITS = "Exit codes: 0 ok, 1 bad input or failure, 2 usage error, 3 collapse confirmed."
JSON_HELP = "Print one JSON object on stdout."

out = Console()
err = Console(stderr=True)


def print_json(obj: Any) -> None:
    """One JSON object on one line of stdout (what every command's --json prints)."""
    sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class TrainProgress:
    """A rich progress bar fed by the trainer's per-step callback."""

    def __init__(self, label: str, total: int, enabled: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err, transient=False,
                          disable=not enabled)
        self.label, self.total = label, total

    def __enter__(self):
        self.p.start()
        self.task = self.p.add_task(self.label, total=self.total, info="")
        return self

    def __call__(self, step: int, rec: dict) -> None:
        info = []
        for key, name in ((schema.SUCCESS, "succ"), (schema.LOSS, "loss"),
                          (schema.cp_key(schema.Source.ROLLOUT, schema.Position.AFTER_OPEN, "end_of_turn"), "p(eot|open)")):
            if isinstance(rec.get(key), float):
                info.append(f"{name} {rec[key]:.3f}")
        self.p.update(self.task, completed=step + 1, info="  ".join(info))

    def __exit__(self, *exc):
        self.p.stop()


class ScoreBar:
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


class PhaseBar:
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


class StudyBar:
    """A rich progress bar over the RL steps of a whole study grid, labelled with the run in progress."""

    def __init__(self, enabled: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.p = Progress(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), console=err, disable=not enabled)
        self.task = None

    def __call__(self, label: str, done: int, total: int) -> None:
        if self.task is None:
            self.p.start()
            self.task = self.p.add_task(label, total=total)
        self.p.update(self.task, description=label, completed=done, total=total)

    def close(self) -> None:
        if self.task is not None:
            self.p.stop()


def show_path(p: Path) -> str:
    """A path as text that any terminal encoding can print (a non-UTF-8 name keeps its bytes escaped)."""
    return os.fsdecode(p).encode("utf-8", "backslashreplace").decode("utf-8")
