"""Report directories: results are never silently replaced by another configuration's (issue 22).

A command that writes results into a directory (study, demo, report, plot) records what produced them in
`DIR/.collapse-probe.json`: {output name: configuration}. Before any work it asks `check_report_dir`: the same
configuration may refresh its own results; another configuration's results, or result files this version cannot
attribute (no record, e.g. a report committed before the record existed), are kept unless `overwrite`.
`stamp_report_dir` records the configuration once the results are written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from collapse_probe.errors import UserError

STAMP = ".collapse-probe.json"

__all__ = ["STAMP", "check_report_dir", "stamp_report_dir"]


def _canonical(config: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps(config, sort_keys=True, default=str))  # tuples -> lists, paths -> str


def _read(directory: Path) -> dict:
    try:
        data = json.loads((directory / STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_report_dir(directory: str | os.PathLike, *, name: str, config: Mapping[str, Any],
                     files: Iterable[str] | None = None, overwrite: bool = False, flag: str = "--out") -> None:
    """Refuse (UserError) to write output `name` into `directory` when that would replace results of another
    configuration, unless `overwrite`. `files`: the file names the output writes (None: the whole directory is
    the output, so any file in it counts). Nothing is written."""
    d = Path(directory)
    if overwrite or not d.exists():
        return
    if not d.is_dir():
        raise UserError(f"{flag} {d} is a file: pass a directory")
    recorded = _read(d).get(name)
    if recorded is not None:
        if recorded == _canonical(config):
            return
        what = "results of another configuration"
    else:
        present = [p.name for p in d.iterdir() if p.name != STAMP] if files is None else \
            [f for f in files if (d / f).exists()]
        if not present:
            return
        shown = ", ".join(sorted(present)[:3]) + (", ..." if len(present) > 3 else "")
        what = f"results this command did not record ({shown})"
    raise UserError(f"{flag} {d} holds {what}: they are kept; pass another {flag}, or --overwrite to replace them")


def stamp_report_dir(directory: str | os.PathLike, *, name: str, config: Mapping[str, Any]) -> None:
    """Record that output `name` in `directory` now holds the results of `config`."""
    d = Path(directory)
    data = _read(d)
    data[name] = _canonical(config)
    tmp = d / (STAMP + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, d / STAMP)
