"""Where a run's files are: one `RunDir` for our trainer's run dirs, an HF/TRL `output_dir` and plain files.

    RUN_DIR/metrics.jsonl              our trainer, or a callback's OUTPUT_DIR/collapse_probe/metrics.jsonl
    RUN_DIR/rollouts/step_NNNNNN.jsonl sampled rollouts
    RUN_DIR/config.json                the run's config
    RUN_DIR/checkpoint-N/              HF Trainer / TRL / our trainer checkpoints (safetensors)
    RUN_DIR/global_step_N/actor/huggingface/   verl checkpoints (root, global_step_N, its actor/ or huggingface/)
    RUN_DIR/{project}/{experiment}.jsonl       verl's file logger (found a few levels down, verl_files.scan)

Every command finds files through this module; verl's layouts are recognised by verl_files.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from collapse_probe.errors import UserError
from collapse_probe.runs.verl_files import (
    Layout,
    VerlCheckpoint,
    checkpoint_dirs,
    missing_weights_hint,
    scan,
)

__all__ = ["METRICS_FILE", "Checkpoint", "RunDir", "find_checkpoints", "usable_checkpoints"]

METRICS_FILE = "metrics.jsonl"
CALLBACK_DIR = "collapse_probe"  # what CollapseProbeCallback writes under an HF/TRL output_dir
ROLLOUTS_DIR = "rollouts"
_HINT = "pass a run directory written by collapse-probe, a JSONL metrics file or verl's {project}/{experiment}.jsonl"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_VERL_RE = re.compile(r"^global_step_(\d+)$")
_FINGERPRINTED = ("config.json", "model.safetensors.index.json")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    verl: VerlCheckpoint | None = None  # set for verl's global_step_N (path is its actor/huggingface/)

    def fingerprint(self) -> str:
        """Size and mtime of the weight and config files (what changes when a checkpoint is rewritten)."""
        parts = []
        for f in sorted(self.path.iterdir()):
            if f.is_file() and (f.suffix == ".safetensors" or f.name in _FINGERPRINTED):
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
        return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _trainer_state_step(p: Path) -> int:
    try:
        return int(json.loads((p / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def find_checkpoints(path: str | os.PathLike) -> list[Checkpoint]:
    """Checkpoints under `path` (or `path` itself when it is one save_pretrained dir), sorted by step. verl
    checkpoints come in every accepted form (verl_files.checkpoint_dirs), with or without HF weights: see
    `usable_checkpoints`."""
    path = Path(path)
    found: dict[int, Checkpoint] = {}
    for d in path.iterdir() if path.is_dir() else []:
        m = _CKPT_RE.match(d.name)
        if m and d.is_dir():
            found[int(m.group(1))] = Checkpoint(int(m.group(1)), d)
    if not found:
        found = {ck.step: Checkpoint(ck.step, ck.hf, ck) for ck in checkpoint_dirs(path)}
    if not found and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        m = _CKPT_RE.match(path.name) or _VERL_RE.match(path.name)
        step = int(m.group(1)) if m else _trainer_state_step(path)
        found[step] = Checkpoint(step, path)
    return [found[s] for s in sorted(found)]


def usable_checkpoints(ckpts: list[Checkpoint]) -> list[Checkpoint]:
    """The checkpoints with weights to load. verl checkpoints saved without HF weights are left out with one
    warning; when none has weights, a UserError naming the two fixes (save_contents hf_model, verl.model_merger)."""
    ok = [c for c in ckpts if c.verl is None or c.verl.has_weights]
    lacking = [c.verl for c in ckpts if c.verl is not None and not c.verl.has_weights]
    if lacking and not ok:
        raise UserError(missing_weights_hint(lacking[0]))
    if lacking:
        steps = ", ".join(str(c.step) for c in lacking[:5]) + (", ..." if len(lacking) > 5 else "")
        warnings.warn(f"skipped {len(lacking)} verl checkpoint(s) without HF weights (steps {steps}); "
                      + missing_weights_hint(lacking[0]).split(": ", 1)[1], stacklevel=2)
    return ok


class RunDir:
    """One run's files. `RunDir(path)` accepts a run dir, an HF/TRL output dir (with `collapse_probe/`), or a
    metrics JSONL file; nothing is read until asked and nothing is ever written."""

    def __init__(self, path: str | os.PathLike):
        self.given = Path(path)
        if self.given.is_file():
            self.root = self.given.parent.parent if self.given.parent.name == CALLBACK_DIR else self.given.parent
        else:
            self.root = self.given
        self._layout: Layout | None = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.given)!r})"

    @property
    def name(self) -> str:
        """The run's name: its directory's (the output dir above `collapse_probe/` for a callback's files)."""
        return self.root.resolve().name or "run"

    def _data_dirs(self) -> list[Path]:
        return [self.root, self.root / CALLBACK_DIR]

    @property
    def layout(self) -> Layout:
        """verl's files under the run's directory (scanned once, only when asked; not in a directory holding our
        own metrics.jsonl, nor for a file)."""
        if self._layout is None:
            ours = any((d / METRICS_FILE).is_file() for d in self._data_dirs())
            self._layout = scan(self.root) if self.root.is_dir() and not self.given.is_file() and not ours \
                else Layout()
        return self._layout

    @property
    def metrics_path(self) -> Path | None:
        """The metrics file (ours, a callback's, or verl's file logger), or None when there is none (yet). Two
        verl logs under one directory (two experiments) are a UserError: which run is meant cannot be told."""
        if self.given.is_file():
            return self.given
        ours = next((d / METRICS_FILE for d in self._data_dirs() if (d / METRICS_FILE).is_file()), None)
        if ours is not None:
            return ours
        logs = self.layout.logs
        if len(logs) > 1:
            names = ", ".join(str(f.relative_to(self.root)) for f in logs[:4]) + (", ..." if len(logs) > 4 else "")
            raise UserError(f"{self.given} holds {len(logs)} verl logs ({names}): pass one of them, or the "
                            "directory of one experiment")
        return logs[0] if logs else None

    def metrics_candidates(self) -> list[Path]:
        """Files `watch` waits for when the run has not written one yet."""
        if self.given.is_file() or (not self.given.exists() and self.given.suffix):
            return [self.given]
        found = self.metrics_path if self.given.is_dir() else None
        return ([found] if found is not None else []) + [d / METRICS_FILE for d in self._data_dirs()]

    def require_metrics(self) -> Path:
        """The metrics file, or a UserError saying what is missing."""
        f = self.metrics_path
        if f is not None:
            return f
        if not self.given.exists():
            raise UserError(f"{self.given} does not exist: {_HINT}")
        raise UserError(f"no {METRICS_FILE} under {self.given}: {_HINT}")

    def has_metrics(self) -> bool:
        return self.metrics_path is not None

    @property
    def rollouts_dir(self) -> Path | None:
        """The directory holding rollouts/step_*.jsonl, or None."""
        cands = [d / ROLLOUTS_DIR for d in self._data_dirs()] + [self.root]
        return next((d for d in cands if d.is_dir() and any(d.glob("step_*.jsonl"))), None)

    def require_rollouts(self) -> Path:
        d = self.rollouts_dir
        if d is None:
            raise UserError(f"no rollouts/step_*.jsonl under {self.given}: pass a run directory written by "
                            "collapse-probe")
        return d

    @property
    def config_path(self) -> Path | None:
        return next((d / "config.json" for d in self._data_dirs() if (d / "config.json").is_file()), None)

    def checkpoints(self) -> list[Checkpoint]:
        return find_checkpoints(self.root) if self.root.is_dir() else []

    def checkpoint_at_or_after(self, step: int) -> Checkpoint | None:
        """The first saved checkpoint at or after `step` (e.g. the model right at its collapse)."""
        return next((c for c in self.checkpoints() if c.step >= step), None)
