"""What verl writes, recognised from names and first bytes (nothing of verl is imported, no file is read whole).

    {VERL_FILE_LOGGER_ROOT:-.}/{project}/{experiment}.jsonl   file logger: {"step": N, "data": {...}} per line
    {trainer.rollout_data_dir}/{global_step}.jsonl            rollout dumps: {"input", "output", "gts", "score",
    {trainer.validation_data_dir}/{global_step}.jsonl          "step", ...}, decoded with skip_special_tokens
    verl_step_records/{run_id}/{name}-step-[val-]N.json       the verl-tool fork's step records: one JSON array
    tensorboard_log/{project}/{experiment}/events.out.tfevents.*   the tensorboard backend (TENSORBOARD_DIR)
    {default_local_dir}/global_step_N/actor/                   checkpoints: model/optim/extra_state_world_size_W_
        huggingface/                                           rank_R.pt pickles (never opened) + HF config and
                                                               tokenizer; HF weights only with save_contents hf_model

`scan` finds them under a directory (a few levels down, never inside checkpoint folders); `RunDir` and the
rollout reader use it. Checkpoint folders in all accepted forms are resolved by `checkpoint_dirs`.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

__all__ = [
    "EVENTS_PREFIX",
    "Layout",
    "VerlCheckpoint",
    "checkpoint_dirs",
    "is_dump",
    "is_log",
    "missing_weights_hint",
    "records_step",
    "scan",
]

EVENTS_PREFIX = "events.out.tfevents."
SCAN_DEPTH = 3                    # parent/{project}/{experiment}.jsonl, parent/checkpoints/{project}/{experiment}
_LOG_HEAD = re.compile(rb'\A\s*\{\s*"step"\s*:\s*-?\d+(?:\.0)?\s*,\s*"data"\s*:\s*\{')
_DUMP_HEAD = re.compile(rb'\A\s*\{\s*"input"\s*:')
_DUMP_NAME = re.compile(r"^\d+\.jsonl$")
_RECORDS_NAME = re.compile(r"^.+?-step-(val-)?(\d+)\.json$")
_STEP_DIR = re.compile(r"^global_step_(\d+)$")
_NO_DESCENT = re.compile(r"^(?:global_step_\d+|checkpoint-\d+|huggingface|__pycache__|node_modules)$")
_SHARD = re.compile(r"^model_world_size_\d+_rank_\d+\.pt$")


def _head(path: Path, n: int = 256) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def is_log(path: Path) -> bool:
    """A verl file-logger JSONL: its first line is {"step": N, "data": {...}} (orjson writes no spaces)."""
    return path.suffix == ".jsonl" and bool(_LOG_HEAD.match(_head(path)))


def is_dump(path: Path) -> bool:
    """A rollout/validation dump `{global_step}.jsonl` (its rows start with "input", as verl writes them)."""
    return bool(_DUMP_NAME.match(path.name)) and bool(_DUMP_HEAD.match(_head(path, 64)))


def records_step(path: Path) -> tuple[int, bool] | None:
    """(step, is validation) of a step-records file `{name}-step-[val-]N.json`, else None."""
    m = _RECORDS_NAME.match(path.name)
    return (int(m.group(2)), m.group(1) is not None) if m else None


def _number(v: object) -> float | None:
    return float(v) if isinstance(v, Real) and not isinstance(v, bool) and not math.isnan(float(v)) else None


def row_outcome(row: dict) -> tuple[float | None, float | None]:
    """(reward, 0/1 accuracy) of one dump row or step record, each None when absent. Dumps: ``score`` (the
    summed token-level reward) and reward extras such as ``acc``; records: ``score`` a dict holding ``score`` and
    ``accuracy``, and ``reward``."""
    score, acc = row.get("score"), row.get("acc", row.get("accuracy"))
    if isinstance(score, dict):
        acc = score.get("accuracy", score.get("acc", acc))
        score = score.get("score")
    reward = _number(row.get("reward"))
    return (reward if reward is not None else _number(score)), _number(acc)


def record_texts(row: dict, split: Callable[[str], list[str]]) -> list[str] | None:
    """Assistant turns of one step record: ``response`` cut by `split` at its tool responses; when the tool
    results are not in that format (fewer turns than the record's actions), each ``tool_interact_info`` action,
    then the text after the last observation. None when the record has neither."""
    info = row.get("tool_interact_info")
    steps = [a for a in info if isinstance(a, dict) and isinstance(a.get("action"), str)] \
        if isinstance(info, list) else []
    actions = [a["action"] for a in steps]
    resp = row.get("response")
    if not isinstance(resp, str):
        return actions or None
    turns = split(resp)
    if len(turns) > len(actions) or not actions:
        return turns
    obs = steps[-1].get("obs")
    at = resp.rfind(obs) if isinstance(obs, str) and obs else -1
    tail = resp[at + len(obs):] if at >= 0 else ""
    return actions + ([tail] if tail.strip() else [])


@dataclass
class Layout:
    """verl's files found under one directory, each list sorted."""

    logs: list[Path] = field(default_factory=list)     # file-logger JSONL files
    dumps: list[Path] = field(default_factory=list)    # directories of {step}.jsonl dumps
    records: list[Path] = field(default_factory=list)  # directories of {name}-step-N.json records
    events: list[Path] = field(default_factory=list)   # directories holding TensorBoard event files

    def __bool__(self) -> bool:
        return bool(self.logs or self.dumps or self.records or self.events)

    @property
    def train_dumps(self) -> list[Path]:
        """The training dumps: dump directories not named for validation (all of them when every one is)."""
        train = [d for d in self.dumps if "val" not in d.name.lower()]
        return train or list(self.dumps)


def scan(root: Path, depth: int = SCAN_DEPTH) -> Layout:
    """verl's files at most `depth` levels below `root`; hidden directories and checkpoint folders are not
    entered (a checkpoint holds gigabytes, and nothing this reads). Only names and first bytes are read."""
    out = Layout()

    def visit(d: Path, level: int) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        files = [Path(e.path) for e in entries if _is_file(e)]
        dumps = [f for f in files if _DUMP_NAME.match(f.name)]
        if dumps and is_dump(min(dumps, key=lambda f: int(f.stem))):
            out.dumps.append(d)
        if any(records_step(f) for f in files):
            out.records.append(d)
        if any(f.name.startswith(EVENTS_PREFIX) for f in files):
            out.events.append(d)
        out.logs.extend(f for f in files if f.suffix == ".jsonl" and not _DUMP_NAME.match(f.name) and is_log(f))
        if level < depth:
            for e in entries:
                if _is_dir(e) and not e.name.startswith(".") and not _NO_DESCENT.match(e.name):
                    visit(Path(e.path), level + 1)

    if root.is_dir():
        visit(root, 0)
    return out


def _is_file(e: os.DirEntry) -> bool:
    try:
        return e.is_file()
    except OSError:
        return False


def _is_dir(e: os.DirEntry) -> bool:
    try:
        return e.is_dir(follow_symlinks=False)
    except OSError:
        return False


@dataclass(frozen=True)
class VerlCheckpoint:
    step: int
    actor: Path      # global_step_N/actor
    hf: Path         # global_step_N/actor/huggingface (may lack weights)

    @property
    def has_weights(self) -> bool:
        return self.hf.is_dir() and any(self.hf.glob("*.safetensors"))


def _step_of(d: Path) -> int | None:
    m = _STEP_DIR.match(d.name)
    return int(m.group(1)) if m else None


def _from_step_dir(d: Path) -> VerlCheckpoint | None:
    step = _step_of(d)
    if step is None or not (d / "actor").is_dir():
        return None
    return VerlCheckpoint(step, d / "actor", d / "actor" / "huggingface")


def checkpoint_dirs(path: Path, depth: int = SCAN_DEPTH) -> list[VerlCheckpoint]:
    """verl checkpoints at `path` in every accepted form: a root holding global_step_N/ (possibly a few levels
    down, e.g. checkpoints/{project}/{experiment}), one global_step_N, its actor/, or actor/huggingface/.
    Sorted by step; with or without HF weights (see `VerlCheckpoint.has_weights`)."""
    path = Path(path)
    if not path.is_dir():
        return []
    if path.name == "huggingface" and path.parent.name == "actor":
        ck = _from_step_dir(path.parent.parent)
        return [ck] if ck else []
    if path.name == "actor" and _step_of(path.parent) is not None:
        ck = _from_step_dir(path.parent)
        return [ck] if ck else []
    own = _from_step_dir(path)
    if own:
        return [own]
    found: dict[int, VerlCheckpoint] = {}

    def visit(d: Path, level: int) -> None:
        try:
            subs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for s in subs:
            ck = _from_step_dir(s)
            if ck:
                found.setdefault(ck.step, ck)
            elif level < depth and not _NO_DESCENT.match(s.name):
                visit(s, level + 1)

    visit(path, 0)
    return [found[s] for s in sorted(found)]


def missing_weights_hint(ck: VerlCheckpoint) -> str:
    """What to do about a verl checkpoint without HF weights (its .pt shards are pickles: never loaded here)."""
    shards = sum(1 for f in ck.actor.iterdir() if _SHARD.match(f.name)) if ck.actor.is_dir() else 0
    what = f"only {shards} model_world_size_*_rank_*.pt shard(s), which are never unpickled" if shards else \
        "no model weights"
    return (f"verl checkpoint {ck.actor.parent} (step {ck.step}) has no HF weights in actor/huggingface/ ({what}): "
            "add hf_model to actor_rollout_ref.actor.checkpoint.save_contents (e.g. "
            "save_contents=['model','optimizer','extra','hf_model']) before saving, or convert it with: "
            f"python -m verl.model_merger merge --backend fsdp --local_dir {ck.actor} --target_dir {ck.hf}")
