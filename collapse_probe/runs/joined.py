"""One run's records from every file it left, joined by step: what `analyze`, `report`, `plot` and `watch --once`
read (`open_run`).

* the metrics: our `metrics.jsonl`, or verl's file-logger JSONL (streamed through a `StepIndex`: offsets only), or,
  when there is neither, TensorBoard event directories (verl's tensorboard backend, `tensorboard_log/...`);
* verl's rollout dumps (`rollout_data_dir/{step}.jsonl`) or the fork's step records (`*-step-N.json`) under the
  run's directory: each step's format-state mix (`fmt/...`), and, when they are the only source, the step's mean
  reward (`reward/mean`) and accuracy (`success`). Read lazily, one step file at a time (`StepExtras`);
* scored checkpoints (`analyze --checkpoints`): their probe captures (`cp/probe/...`) and `eval/success`.
A key a step already has is never replaced: the metrics log wins over what is derived from the other files.
"""
from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from collapse_probe import schema
from collapse_probe.runs.rollout_files import iter_rows
from collapse_probe.errors import UserError
from collapse_probe.formats.classify import FormatSpec, StateMix, classify_turn
from collapse_probe.runs.history import StepIndex
from collapse_probe.runs.hf_output import read_hf_output, read_tensorboard
from collapse_probe.runs.rundir import RunDir
from collapse_probe.runs.runlog import index_file
from collapse_probe.runs.verl_files import Layout, is_dump, records_step

__all__ = ["RunRecords", "StepExtras", "is_checkpoint_key", "joined", "open_run", "read_records"]


def is_checkpoint_key(key: str) -> bool:
    """The keys of a scored checkpoint joined into a run: probe captures and the greedy eval success (never
    `success` itself, which the run's own metrics define)."""
    cap = schema.parse_cp_key(key)
    return (cap is not None and cap.source == schema.Source.PROBE.value) or key == schema.EVAL_SUCCESS


class StepExtras:
    """Per-step keys derived from verl's rollout dumps or step records, computed when a step is first asked for
    (one step file read, line by line) and kept (a few floats a step). `outcome` adds `reward/mean` and
    `success` (for a run with no metrics of its own). A step without a file yet is looked for again next time
    (a followed run's dump is written while its metrics line is)."""

    def __init__(self, dumps: list[Path], records: list[Path], *, outcome: bool, spec: FormatSpec | None = None):
        self.dumps, self.records, self.outcome, self.spec = list(dumps), list(records), outcome, spec or FormatSpec()
        self.files: dict[int, list[Path]] = {}
        for d in self.dumps:
            for f in d.glob("*.jsonl"):
                if f.stem.isdigit():
                    self.files.setdefault(int(f.stem), []).append(f)
        for f, step in self._records():
            self.files.setdefault(step, []).append(f)
        self._done: dict[int, dict] = {}

    def _records(self, step: int | str = "*") -> list[tuple[Path, int]]:
        """The step records to read: training files, else validation ones (the fork's val-only runs)."""
        pattern = "*-step-*.json" if step == "*" else f"*-step-*{step}.json"
        recs = [(f, r) for d in self.records for f in d.glob(pattern) if (r := records_step(f))]
        train = [(f, r) for f, r in recs if not r[1]] or recs
        return [(f, r[0]) for f, r in train if step == "*" or r[0] == step]

    @classmethod
    def from_layout(cls, layout: Layout, *, outcome: bool) -> StepExtras | None:
        """Training dumps when there are any, else the step records; None when there are neither."""
        dumps = layout.train_dumps
        for kind, dirs in (("training rollout dumps", dumps), ("step records", [] if dumps else layout.records)):
            if len(dirs) > 1:  # two runs' files would be mixed into one step
                names = ", ".join(str(d) for d in dirs[:3]) + (", ..." if len(dirs) > 3 else "")
                raise UserError(f"found {kind} of {len(dirs)} runs ({names}): pass the directory of one run")
        return cls(dumps, [] if dumps else layout.records, outcome=outcome) if dumps or layout.records else None

    @property
    def dirs(self) -> list[Path]:
        return self.dumps + self.records

    def steps(self) -> list[int]:
        return sorted(self.files)

    def keys(self) -> set[str]:
        keys = {schema.state_key(s) for s in schema.STATES}
        return keys | ({schema.SUCCESS, schema.REWARD_MEAN} if self.outcome else set())

    def get(self, step: int) -> dict:
        """The step's derived keys ({} when the step has no dump)."""
        if step not in self._done:
            if step not in self.files:
                found = [f for d in self.dumps if (f := d / f"{step}.jsonl").is_file()]
                found += [f for f, _ in self._records(step)] if self.records else []
                if not found:
                    return {}
                self.files[step] = found
            self._done[step] = self._compute(step)
        return self._done[step]

    def _compute(self, step: int) -> dict:
        mix, scores, wins = StateMix(), [], []
        for f in sorted(self.files[step]):
            for row in iter_rows(f, self.spec):
                for t in row["texts"]:
                    mix.add(classify_turn(t, self.spec, row.get("user")))
                if row["score"] is not None:
                    scores.append(row["score"])
                if row["success"] is not None:
                    wins.append(row["success"])
        out = mix.metrics() if mix.total else {}
        if self.outcome and scores:
            out[schema.REWARD_MEAN] = sum(scores) / len(scores)
        if self.outcome and wins:
            out[schema.SUCCESS] = sum(wins) / len(wins)
        return out


def joined(base: Iterator[dict] | None, extras: StepExtras | None, more: Mapping[int, dict] | None = None
           ) -> Iterator[dict]:
    """`base` records (step order) with each step's extras and `more` records filled in (keys it lacks); steps
    only the extras or `more` know are inserted in order."""
    more = more or {}
    others = sorted(set(extras.steps() if extras else ()) | set(more))
    streams = [((r[schema.STEP], 0, r) for r in base or ()), ((s, 1, None) for s in others)]
    pending: dict | None = None
    for step, kind, rec in heapq.merge(*streams, key=lambda t: (t[0], t[1])):
        if pending is not None and pending[schema.STEP] != step:
            yield pending
            pending = None
        if kind == 0:
            if pending is not None:  # cannot happen for a StepIndex (one record a step); keep the later
                yield pending
            pending = dict(rec)
        elif pending is None:
            pending = {schema.STEP: step}
        if kind == 1:
            for k, v in {**(extras.get(step) if extras else {}), **more.get(step, {})}.items():
                pending.setdefault(k, v)
    if pending is not None:
        yield pending


@dataclass
class RunRecords:
    """A run's joined records; `records()` streams them again on every call."""

    path: Path
    metrics: Path | None = None
    index: StepIndex | None = None
    skipped: int = 0
    table: dict[int, dict] = field(default_factory=dict)  # records read whole: TensorBoard events, an HF output dir
    hf_output: bool = False  # an HF/TRL output dir without our callback (trainer_state.json, events, completions)
    events: list[Path] = field(default_factory=list)
    extras: StepExtras | None = None
    extra_dirs: list[Path] = field(default_factory=list)
    checkpoints: dict[int, dict] = field(default_factory=dict)

    def keys(self) -> set[str]:
        keys = set(self.index.keys) if self.index is not None else set()
        keys |= {k for r in self.table.values() for k in r}
        keys |= {k for r in self.checkpoints.values() for k in r}
        return keys | (self.extras.keys() if self.extras else set())

    def step_count(self) -> int:
        """How many steps `records()` yields (from the offsets and file names: nothing is read)."""
        steps = set(self.index.steps) if self.index is not None else set(self.table)
        return len(steps | set(self.extras.steps() if self.extras else ()) | set(self.checkpoints))

    def monitor_mode(self) -> tuple[str, bool]:
        """(capture source, checkpoint mode) to replay the run with: probe captures that only joined checkpoints
        hold are few, noise-free points, judged as a checkpoint series is (a move from the first value)."""
        source = schema.pick_source(self.keys())
        own = self.index.keys if self.index is not None else {k for r in self.table.values() for k in r}
        sparse = source == schema.Source.PROBE.value and bool(self.checkpoints) and \
            not any((c := schema.parse_cp_key(k)) is not None and c.source == source for k in own)
        return source, sparse

    def records(self) -> Iterator[dict]:
        base = self.index.records() if self.index is not None else \
            (self.table[s] for s in sorted(self.table))
        return joined(base, self.extras, self.checkpoints)

    def with_checkpoints(self, scored: Mapping[int, dict]) -> RunRecords:
        """The same run with scored checkpoint records joined (`is_checkpoint_key` only)."""
        picked = {s: {k: v for k, v in r.items() if is_checkpoint_key(k)} for s, r in scored.items()}
        return dataclasses.replace(self, checkpoints={s: r for s, r in picked.items() if r})

    def sources(self) -> dict:
        """What was read, for the JSON output."""
        return {"metrics": str(self.metrics) if self.metrics else None,
                "tensorboard": [str(d) for d in self.events],
                "rollouts": [str(d) for d in self.extra_dirs], "checkpoints": sorted(self.checkpoints)}

    @property
    def joins(self) -> bool:
        """True when anything besides one metrics file is read."""
        return bool(self.events or self.extras or self.checkpoints)


def open_run(path: str | Path, *, warn: bool = True) -> RunRecords | None:
    """The run at `path` (a run dir, a metrics file, verl's log file or its directory, a run's parent holding
    verl's logs and dumps, a dump directory, step records, a TensorBoard event directory); None when `path`
    holds none of these. A metrics file with unreadable lines only is a UserError (as `index_file`)."""
    p = Path(path)
    if p.is_file() and (is_dump(p) or records_step(p) is not None):  # one step's turns, not a run's metrics
        raise UserError(f"{p} is one step of verl's rollouts: pass its directory to follow the run, or run "
                        "`collapse-probe formats` on the file")
    run = RunDir(p)
    lay = run.layout
    f = run.metrics_path
    out = RunRecords(p, metrics=f)
    if f is not None:
        out.index, skipped = index_file(f, warn=warn)
        out.skipped = skipped.count
    elif lay.events and not (p / "runs").is_dir():  # an HF output dir's runs/ is read_hf_output's
        if len(lay.events) > 1:  # tensorboard_log/{project}/{experiment}: one directory a run
            names = ", ".join(str(d) for d in lay.events[:3]) + (", ..." if len(lay.events) > 3 else "")
            raise UserError(f"{p} holds TensorBoard events of {len(lay.events)} runs ({names}): pass one of them")
        try:
            out.table = read_tensorboard(lay.events)
        except ImportError:
            raise UserError(f"{p} holds TensorBoard event files but tensorboard is not installed: "
                            "pip install tensorboard") from None
        out.events = list(lay.events)
    out.extras = StepExtras.from_layout(lay, outcome=f is None and not out.table)
    out.extra_dirs = out.extras.dirs if out.extras is not None else []
    if out.index is None and not out.table and out.extras is None:
        hf = read_hf_output(p) if p.is_dir() else None  # an HF/TRL output dir written without our callback
        if not hf:
            return None
        out.table, out.hf_output = {int(r[schema.STEP]): r for r in hf}, True
    return out


def read_records(path: str | Path, *, warn: bool = True) -> list[dict]:
    """All records of a run, joined and sorted by step, as `open_run` reads them (a run with no records at all is
    a UserError). For small runs and tests: `open_run(path).records()` streams them instead."""
    run = open_run(path, warn=warn)
    if run is None:
        RunDir(path).require_metrics()  # its one-line error for a path that holds no run
        raise UserError(f"{path} holds no run records: pass a run directory or a metrics JSONL file")
    return list(run.records())
