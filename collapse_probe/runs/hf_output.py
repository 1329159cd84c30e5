"""Records from an HF / TRL output dir written without our callback.

Three sources, merged per step (later ones fill keys the earlier ones lack):
- `trainer_state.json` (the output dir's, else the newest `checkpoint-N/`'s): its `log_history`, with TRL's
  metric names mapped to ours (`reward` -> `reward/mean`, `reward_std` -> `reward/std`, ...);
- TensorBoard event files under `runs/` (read with tensorboard's own reader, when installed), `train/` prefix
  dropped (`read_tensorboard` also reads verl's tensorboard backend: `tensorboard_log/{project}/{experiment}/`);
- TRL's `completions/completions_NNNNN.parquet` (`log_completions=True`) -> the per-step format mix (`fmt/...`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from collapse_probe import schema
from collapse_probe.errors import UserError
from collapse_probe.formats.classify import state_mix
from collapse_probe.runs.rollout_files import load_turns
from collapse_probe.runs.rundir import find_checkpoints
from collapse_probe.schema import STEP, TIME, from_verl_key

_SUMMARY = ("train_runtime", "train_loss", "train_samples_per_second", "train_steps_per_second", "total_flos")


def _state_file(root: Path) -> Path | None:
    if (root / "trainer_state.json").is_file():
        return root / "trainer_state.json"
    ckpts = [c for c in find_checkpoints(root) if (c.path / "trainer_state.json").is_file()]
    return ckpts[-1].path / "trainer_state.json" if ckpts else None


def _number(v: Any) -> float | None:
    return schema.finite_or_none(v)


def _add(steps: dict[int, dict], step: int, key: str, value: float) -> None:
    rec = steps.setdefault(step, {STEP: step})
    rec.setdefault(key, value)


def _from_state(root: Path, steps: dict[int, dict]) -> None:
    f = _state_file(root)
    if f is None:
        return
    for entry in json.loads(f.read_text()).get("log_history", []):
        step = entry.get("step")
        if not isinstance(step, int) or any(k in entry for k in _SUMMARY):
            continue
        for k, v in entry.items():
            x = _number(v)
            if x is not None and k not in (STEP, "epoch"):
                _add(steps, step, k, x)


def _from_tensorboard(root: Path, steps: dict[int, dict]) -> None:
    dirs = sorted({p.parent for p in (root / "runs").rglob("events.out.tfevents.*")}) if (root / "runs").is_dir() \
        else []
    try:
        read_tensorboard(dirs, steps)
    except ImportError:
        return


def read_tensorboard(dirs: list[Path], steps: dict[int, dict] | None = None) -> dict[int, dict]:
    """Scalars of TensorBoard event directories (HF's `runs/...`, verl's tensorboard backend), read with
    tensorboard's own `EventAccumulator`, into records by step: HF's `train/` prefix dropped, verl's
    `actor/cp/...` mapped back to ours, a key already present kept. ImportError when tensorboard is missing."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = {} if steps is None else steps
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})  # 0: every point, not a reservoir sample
        try:
            acc.Reload()
        except Exception as exc:  # noqa: BLE001 - a cut or foreign event file: tensorboard's errors vary
            raise UserError(f"{d}: cannot read its TensorBoard event files ({type(exc).__name__}); "
                            "pass a directory written by a TensorBoard SummaryWriter") from None
        for tag in acc.Tags().get("scalars", []):
            key = from_verl_key(tag.removeprefix("train/"))
            for ev in acc.Scalars(tag):
                x = _number(ev.value)
                if x is not None:
                    _add(steps, int(ev.step), key, x)
    return steps


def _from_completions(root: Path, steps: dict[int, dict]) -> None:
    files = sorted((root / "completions").glob("completions_*.parquet")) if (root / "completions").is_dir() else []
    if not files:
        return
    for f in files:
        by_step: dict[int, list[str]] = {}
        for turn in load_turns(f):
            if turn.get("step") is not None:
                by_step.setdefault(int(turn["step"]), []).append(turn["text"])
        for step, texts in by_step.items():
            for k, v in state_mix(texts).metrics().items():
                _add(steps, step, k, v)


def read_hf_output(path: str | Path) -> list[dict] | None:
    """One record per logged step (step order), or None when `path` holds no HF/TRL training logs."""
    root = Path(path)
    if not root.is_dir():
        return None
    steps: dict[int, dict] = {}
    _from_state(root, steps)
    _from_tensorboard(root, steps)
    _from_completions(root, steps)
    if not any(len(r) > 1 for r in steps.values()):
        return None
    out = []
    for step in sorted(steps):
        rec = steps[step]
        rec.setdefault(TIME, float(step))  # no wall clock in these logs: step order stands in for it
        out.append(schema.add_aliases(rec))
    return out
