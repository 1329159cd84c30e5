"""One run's metrics as a step-indexed table, with named accessors for each concept.

`Timeline` wraps a pandas DataFrame built from the flat records of docs/DESIGN.md (one record per step).
The index is the step (sorted, unique; a repeated step keeps its last record). Accessors never raise for a
missing key: they return an all-NaN series on the run's steps, so detectors and plots can treat "not logged"
and "logged as NaN" alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

FORMAT_STATES = ("healthy_tool_call", "healthy_response", "text_pollution", "full_collapse")
_NON_ROLE_SUFFIXES = ("entropy", "count")


def _flatten(record: Mapping) -> dict:
    """Flat record; verl file-logger lines `{"step": N, "data": {...}}` are merged into the top level."""
    rec = dict(record)
    data = rec.get("data")
    if isinstance(data, Mapping):
        rec.pop("data")
        for k, v in data.items():
            rec.setdefault(k, v)
    return rec


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

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_records(cls, records: Iterable[Mapping], path: Path | None = None) -> "Timeline":
        """Build from flat records; records without an integer `step` are skipped."""
        rows = []
        for rec in records:
            rec = _flatten(rec)
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
        """Read a run dir / metrics file with `collapse_probe.runlog.read_records`."""
        from collapse_probe.runlog import read_records  # lazy: runlog is a sibling module

        return cls.from_records(read_records(path), path=Path(path))

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
        """Float series of `key` on all steps; non-numeric entries and a missing key give NaN."""
        if key not in self._num:
            if key in self._df.columns:
                s = pd.to_numeric(self._df[key], errors="coerce").astype("float64")
            else:
                s = pd.Series(np.nan, index=self._df.index, dtype="float64")
            s.name = key
            self._num[key] = s
        return self._num[key].copy()

    def has(self, key: str) -> bool:
        """True when `key` was logged with at least one finite value."""
        return key in self._df.columns and bool(np.isfinite(self.series(key).to_numpy()).any())

    # ---- control-token captures ---------------------------------------------------------------
    def _cp_parts(self) -> list[list[str]]:
        return [c.split("/") for c in self.keys() if c.startswith("cp/") and c.count("/") >= 3]

    def sources(self) -> list[str]:
        """Capture sources present (e.g. ["probe", "rollout"]), sorted."""
        return sorted({p[1] for p in self._cp_parts()})

    def positions(self, source: str = "rollout") -> list[str]:
        """Decision positions captured for `source`, sorted."""
        return sorted({p[2] for p in self._cp_parts() if p[1] == source})

    def control_series(self, source: str = "rollout", position: str = "after_open") -> dict[str, pd.Series]:
        """{role: series} of `cp/{source}/{position}/{role}`, without the entropy/count summaries."""
        prefix = f"cp/{source}/{position}/"
        out = {}
        for key in sorted(self.keys()):
            if key.startswith(prefix):
                role = key[len(prefix):]
                if role and "/" not in role and role not in _NON_ROLE_SUFFIXES:
                    out[role] = self.series(key)
        return out

    # ---- format states and outcome ------------------------------------------------------------
    def state_mix(self) -> pd.DataFrame:
        """Fractions of the format states present (columns in FORMAT_STATES order, no `fmt/` prefix)."""
        cols = {s: self.series(f"fmt/{s}") for s in FORMAT_STATES if f"fmt/{s}" in self}
        return pd.DataFrame(cols, index=self._df.index)

    def success(self) -> pd.Series:
        """`success`, or `reward/mean` when success was not logged (the series name says which)."""
        if self.has("success") or not self.has("reward/mean"):
            return self.series("success")
        return self.series("reward/mean")

    def __repr__(self) -> str:
        span = f"{self.steps[0]}..{self.steps[-1]}" if len(self) else "empty"
        return f"Timeline(steps={span}, n={len(self)}, keys={len(self._df.columns)})"
