"""One run's metrics as a step-indexed table, with named accessors for each concept.

`Timeline` wraps a pandas DataFrame built from the flat records of docs/DESIGN.md (one record per step).
The index is the step (sorted, unique; a repeated step keeps its last record). Accessors never raise for a
missing key: they return an all-NaN series on the run's steps, so detectors and plots can treat "not logged"
and "logged as NaN" alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import pandas as pd

from collapse_probe import schema
from collapse_probe.errors import UserError
from collapse_probe.runs.rundir import RunDir
from collapse_probe.runs.joined import open_run



class Timeline:
    """Step-indexed metrics of one run (see module docstring)."""

    def __init__(self, frame: pd.DataFrame, path: Path | None = None):
        frame = frame.copy()
        frame = frame[~frame.index.duplicated(keep="last")].sort_index()
        frame.index = frame.index.astype("int64")
        frame.index.name = "step"
        self._df = frame
        self.path = path
        self._num: dict[str, pd.Series] = {}
        self.skipped_lines = 0

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_records(cls, records: Iterable[Mapping], path: Path | None = None) -> "Timeline":
        """Build from flat records; records without an integer `step` are skipped."""
        rows = []
        for rec in records:
            rec = dict(rec)
            try:
                step = int(rec["step"])
            except (KeyError, TypeError, ValueError):
                continue
            rec["step"] = step
            rows.append(rec)
        if not rows:
            return cls(pd.DataFrame(index=pd.Index([], dtype="int64", name="step")), path)
        df = pd.DataFrame.from_records(rows)
        df = df.drop_duplicates(subset="step", keep="last").set_index("step")
        return cls(df, path)

    @classmethod
    def from_run(cls, path: str | Path) -> "Timeline":
        """Read a run through the one joining reader (`runs.joined.open_run`: our metrics, verl's log joined with
        its rollout dumps, dumps or step records alone, TensorBoard events, an HF/TRL output dir), so a table, a
        figure and `analyze` see the same steps. Torn or garbled lines are skipped and counted in
        `skipped_lines`; a missing, unreadable or empty run is a UserError."""
        run = open_run(path)
        if run is None:
            RunDir(path).require_metrics()  # its one-line errors for a missing or unrecognised run
            raise UserError(f"{path} holds no run records: pass a run directory or a metrics JSONL file")
        tl = cls.from_records(run.records(), path=run.metrics or Path(path))
        if not len(tl):
            raise UserError(f"{run.metrics or path} holds no records (an empty run): wait until the run has logged "
                            "a step, or pass another run")
        tl.skipped_lines = run.skipped
        return tl

    def records(self) -> Iterator[dict]:
        """One dict per step, in step order, without the keys a step did not log (for replaying)."""
        cols = list(self._df.columns)
        for step, row in zip(self._df.index, self._df.itertuples(index=False, name=None)):
            rec = {"step": int(step)}
            rec.update((k, v) for k, v in zip(cols, row) if not (isinstance(v, float) and v != v))
            yield rec

    # ---- basic accessors ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._df)

    def __contains__(self, key: str) -> bool:
        return key in self._df.columns

    @property
    def steps(self) -> np.ndarray:
        return self._df.index.to_numpy(dtype=np.int64)

    def keys(self) -> list[str]:
        return [str(c) for c in self._df.columns]

    def to_frame(self) -> pd.DataFrame:
        return self._df.copy()

    def series(self, key: str) -> pd.Series:
        """Float series of `key` on all steps (or of another trainer's name for it, schema.METRIC_ALIASES);
        non-numeric entries and a missing key give NaN."""
        if key not in self._num:
            col = next((k for k in schema.metric_keys(key) if k in self._df.columns), None)
            if col is not None:
                s = pd.to_numeric(self._df[col], errors="coerce").astype("float64")
            else:
                s = pd.Series(np.nan, index=self._df.index, dtype="float64")
            s.name = key
            self._num[key] = s
        return self._num[key].copy()

    def has(self, key: str) -> bool:
        """True when `key` was logged with at least one finite value."""
        return any(k in self._df.columns for k in schema.metric_keys(key)) and \
            bool(np.isfinite(self.series(key).to_numpy()).any())

    # ---- control-token captures ---------------------------------------------------------------
    def _captures(self) -> list[schema.CaptureKey]:
        return [k for k in map(schema.parse_cp_key, self.keys()) if k is not None]

    def sources(self) -> list[str]:
        """Capture sources present (e.g. ["probe", "rollout"]), sorted."""
        return sorted({k.source for k in self._captures()})

    def positions(self, source: str = schema.Source.ROLLOUT.value) -> list[str]:
        """Decision positions captured for `source`, sorted."""
        return sorted({k.position for k in self._captures() if k.source == source})

    def control_series(self, source: str = schema.Source.ROLLOUT.value,
                       position: str = schema.Position.AFTER_OPEN.value) -> dict[str, pd.Series]:
        """{role: series} of `cp/{source}/{position}/{role}`, without the entropy/count summaries."""
        return {k.stat: self.series(k.key) for k in sorted(self._captures(), key=lambda k: k.stat)
                if k.source == source and k.position == position and k.is_role}

    # ---- format states and outcome ------------------------------------------------------------
    def state_mix(self) -> pd.DataFrame:
        """Fractions of the format states present (columns in schema.STATES order, no `fmt/` prefix)."""
        cols = {s: self.series(schema.state_key(s)) for s in schema.STATES if schema.state_key(s) in self}
        return pd.DataFrame(cols, index=self._df.index)

    def success(self) -> pd.Series:
        """`success`, or `reward/mean` when success was not logged (the series name says which)."""
        if self.has(schema.SUCCESS) or not self.has(schema.REWARD_MEAN):
            return self.series(schema.SUCCESS)
        return self.series(schema.REWARD_MEAN)

    def export(self, out_path: str | os.PathLike) -> Path:
        """Write the table as Parquet (.parquet) or CSV (.csv), chosen by the output's suffix."""
        out = Path(out_path)
        kind = out.suffix.lower()
        if kind not in (".parquet", ".csv"):
            raise UserError(f"cannot export to {out}: the output file name must end in .parquet or .csv")
        df = self.to_frame()
        out.parent.mkdir(parents=True, exist_ok=True)
        if kind == ".csv":
            df.to_csv(out)
            return out
        try:
            df.to_parquet(out)
        except (TypeError, ValueError):  # pyarrow errors for a column mixing strings and numbers subclass these
            for col in df.columns[df.dtypes == object]:
                df[col] = df[col].map(lambda v: v if v is None or isinstance(v, str) or v != v else json.dumps(v))
            df.to_parquet(out)
        return out

    def __repr__(self) -> str:
        span = f"{self.steps[0]}..{self.steps[-1]}" if len(self) else "empty"
        return f"Timeline(steps={span}, n={len(self)}, keys={len(self._df.columns)})"
