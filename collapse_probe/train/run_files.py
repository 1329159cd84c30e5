"""What a run of ours leaves in its directory, and the check that `train` never writes over another run.

Kept apart from trainer.py (which imports torch) so `train` refuses a directory in a fraction of a second.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from collapse_probe.errors import UserError
from collapse_probe.train.config import TrainConfig

__all__ = ["run_files", "remove_run_files", "check_run_dir"]


def run_files(out: Path) -> list[Path]:
    """What a run of ours leaves in its directory (nothing else is ever removed)."""
    if not out.is_dir():
        return []
    named = [out / n for n in ("config.json", "metrics.jsonl", "rollouts") if (out / n).exists()]
    return named + sorted(p for p in out.iterdir() if p.is_dir() and re.fullmatch(r"(\.tmp-)?checkpoint-\d+", p.name))


def remove_run_files(out: Path) -> None:
    import shutil

    for p in run_files(out):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def check_run_dir(out: str | Path, cfg: TrainConfig, *, overwrite: bool = False) -> None:
    """Refuse a directory that already holds a run, unless `overwrite`: nothing in it changes on a refusal."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a directory for the run")
    if overwrite or not run_files(out):
        return
    path = out / "config.json"
    try:
        same = json.loads(path.read_text()) == cfg.to_dict()
    except (OSError, ValueError):
        same = False
    what = "a run" if same else "a run with another config"
    raise UserError(f"{out} already holds {what} (its config.json, metrics or checkpoints); pass a new --out, or "
                    "--overwrite to replace it (--resume is not supported yet)")
