"""The study's grid: methods x seeds (and an lr sweep of vanilla RL), each a run of the reference trainer.

Every run is the same RL preset (default `grpo-outcome`: binary outcome reward, the paper-like harness, from
the instruct model) at the study's lr, with one method's trainer options on top (`METHOD_SETTINGS`). After
training, the last checkpoint is evaluated greedily on held-out tasks: in distribution (Hermes), format-OOD
(python-list and untagged-JSON calls) and content-OOD (reworded questions, renamed tools), all with the same
harness and grading (recover.evaluate_format), and the collapse verdict comes from `analyze` on the run.

Resumable: a finished run leaves `study.json` (its row and the config it was trained with) in its directory;
a later call with the same settings skips it, a run without one (killed) is trained afresh.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from collapse_probe import schema
from collapse_probe.errors import UserError
from collapse_probe.study.report import write_atomic, write_report
from collapse_probe.study.rows import METHODS

# method -> TrainConfig fields on top of the preset; `round` is the error-SFT round length (RL steps)
METHOD_SETTINGS: dict[str, Callable[[int], dict]] = {
    "vanilla": lambda rnd: {},
    "interleaved": lambda rnd: {"mode": "interleaved", "sft_every": 2, "sft_steps": 1},  # today's interleaved SFT
    "off-policy": lambda rnd: {"offpolicy_samples": 1},
    "hint": lambda rnd: {"hint_samples": 2},
    "error-sft": lambda rnd: {"error_sft_every": rnd, "error_sft_epochs": 2},
    "reflection": lambda rnd: {"error_sft_every": rnd, "error_sft_epochs": 2, "reflection": True},
}
assert tuple(METHOD_SETTINGS) == METHODS  # one display order (report.py), one set of names
FORMAT_OOD = ("python_list", "json")
CONTENT_OOD = ("reworded", "renamed_tools")
IN_DISTRIBUTION = "hermes"
ROW_FILE = "study.json"
# Part of every saved row's key: raise it when what a method does changes without its config changing
# (2: error-SFT phases got an optimizer of their own), so a resumed study retrains instead of reusing.
ROW_VERSION = 2


@dataclass
class StudyConfig:
    """What `collapse-probe study` runs; `fast()` is the few-second version the tests run."""

    preset: str = "grpo-outcome"
    lr: float = 2e-3  # grpo-outcome collapses at 2e-3 in every seed tried (reports/outcome-sweep), not at 5e-4
    steps: int = 20
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    lr_sweep: tuple[float, ...] = (1e-3, 5e-3)  # vanilla also runs at these lrs (claim "higher lr collapses sooner")
    error_round: int = 4  # RL steps per error-SFT round
    eval_tasks: int = 32
    threads: int = 2
    init: str | None = None  # the start model (None: the preset's cached start, e.g. instruct)
    extra: dict = field(default_factory=dict)  # TrainConfig fields for every run (fast(): small budgets)
    sft_start_steps: int | None = None  # no init: start from the sft preset trained this many steps (fast())

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHOD_SETTINGS]
        if unknown:
            raise UserError(f"unknown method {unknown[0]!r}: choose from {', '.join(METHOD_SETTINGS)}")
        if not self.methods or not self.seeds:
            raise UserError("a study needs at least one method and one seed")
        if self.steps < 1 or self.eval_tasks < 1 or self.error_round < 1:
            raise UserError("steps, eval tasks and the error round must be >= 1")
        if not math.isfinite(self.lr) or self.lr <= 0 or any(not math.isfinite(x) or x <= 0 for x in self.lr_sweep):
            raise UserError("learning rates must be positive numbers")
        if self.init is not None and not (Path(self.init) / "config.json").is_file():
            raise UserError(f"--init {self.init}: no model there (expected a Hugging Face model directory with "
                            "config.json and *.safetensors); pass a checkpoint directory or leave --init unset")
        for method in self.methods:  # every run's config is checked now, before anything trains
            self.train_config(method, self.seeds[0], self.lr)

    @classmethod
    def fast(cls, **changes) -> StudyConfig:
        small = dict(prompts_per_step=2, group_size=4, max_turns=4, max_new_tokens=24, probe_every=1,
                     save_every=0, log_rollouts=2, eval_tasks=2, sft_batch=8)
        return cls(**{**dict(steps=3, seeds=(0,), lr_sweep=(5e-3,), error_round=1, eval_tasks=4, extra=small,
                             sft_start_steps=20),
                      **changes})

    def runs(self) -> list[tuple[str, int, float]]:
        """(method, seed, lr) of every run, in order: each method at the study lr, then vanilla's lr sweep."""
        out = [(m, s, self.lr) for m in self.methods for s in self.seeds]
        out += [("vanilla", s, lr) for lr in self.lr_sweep if lr != self.lr for s in self.seeds]
        return out

    def train_config(self, method: str, seed: int, lr: float):
        from collapse_probe.train.config import TrainConfig
        from collapse_probe.train.presets import get_preset

        cfg = get_preset(self.preset, seed=seed, steps=self.steps, lr=lr)
        if cfg.mode.value == "sft":
            raise UserError(f"--preset {self.preset} is an SFT preset: a study needs an RL one (grpo-outcome, "
                            "grpo-outcome-sft, grpo-collapse, grpo-stable)")
        # plain GRPO under every method but interleaved, whatever mode the preset has
        changes = {"mode": "grpo", "sft_every": 0, "save_every": 0, **self.extra,
                   **METHOD_SETTINGS[method](self.error_round), "threads": self.threads}
        cfg = dataclasses.replace(cfg, **changes)
        return TrainConfig.from_dict(cfg.to_dict())  # checked like any config

    def settings(self) -> str:
        return (f"Preset `{self.preset}` at lr {self.lr:g}, {self.steps} RL steps, seeds "
                f"{', '.join(map(str, self.seeds))}; methods {', '.join(self.methods)}; vanilla also at lr "
                f"{', '.join(f'{x:g}' for x in self.lr_sweep) or '(none)'}; error-SFT rounds of {self.error_round} "
                f"steps; greedy evaluation on {self.eval_tasks} held-out tasks per syntax.")


def run_name(method: str, seed: int, lr: float) -> str:
    return f"{method}-lr{lr:g}-s{seed}"


def start_model(cfg: StudyConfig, *, threads: int | None = None) -> str:
    """The start model's directory: `init`, or the preset's start from the cache (trained on first use)."""
    if cfg.init:
        return cfg.init
    from collapse_probe.train.presets import START, cached_model

    if cfg.sft_start_steps is not None:  # fast(): a few SFT steps stand in for the instruct model
        return str(cached_model("sft", steps=cfg.sft_start_steps, threads=threads))
    return str(cached_model(START.get(cfg.preset, "sft"), threads=threads))


def evaluate_model(path: str, *, n: int) -> dict:
    """Greedy held-out success of the checkpoint at `path`: in distribution, per OOD syntax, per content change."""
    from collapse_probe.recover.evaluate import evaluate_format
    from collapse_probe.models.load import load_pretrained

    model, tok = load_pretrained(path)
    score = {name: evaluate_format(model, tok, name, n=n)["success"] for name in
             (IN_DISTRIBUTION, *FORMAT_OOD, *CONTENT_OOD)}
    return {"success_final": score[IN_DISTRIBUTION], "format_ood": {k: score[k] for k in FORMAT_OOD},
            "content_ood": {k: score[k] for k in CONTENT_OOD}}


def _read_row(path: Path, config: dict) -> dict | None:
    """The row saved at `path` if it was made with `config`, else None (missing, unreadable, other settings)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved.get("row") if isinstance(saved, dict) and saved.get("config") == config else None


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1))  # a killed study never leaves a half-written row


def _trace(records: list[dict]) -> dict:
    key = schema.cp_key(schema.Source.ROLLOUT, schema.Position.AFTER_OPEN, "end_of_turn")
    rl = [r for r in records if schema.SUCCESS in r]

    num = schema.finite_or_none
    return {"step": [int(r["step"]) for r in rl], "success": [num(r.get(schema.SUCCESS)) for r in rl],
            "p_eot": [num(r.get(key)) for r in rl]}


def run_one(cfg: StudyConfig, method: str, seed: int, lr: float, out: Path, init: str,
            progress: Callable[[int, dict], None] | None = None) -> dict:
    """Train one run into out/NAME (or reuse it when finished with the same config) and return its row."""
    from collapse_probe.commands.analyze import analyze
    from collapse_probe.runs.joined import read_records
    from collapse_probe.train.trainer import train

    tcfg = cfg.train_config(method, seed, lr)
    tcfg.init = init
    run = out / run_name(method, seed, lr)
    config = {"version": ROW_VERSION, "train": tcfg.to_dict()}
    row = _read_row(run / ROW_FILE, config)
    if row is not None:
        return row
    if run.exists():  # a killed or differently-configured attempt: its directory is the study's own
        shutil.rmtree(run)
    t0 = time.time()
    ckpt = train(tcfg, run, progress=progress)
    verdict = analyze(run)
    trace = _trace(read_records(run, warn=False))
    row = {"run": run.name, "method": method, "seed": seed, "lr": lr, "steps": cfg.steps,
           "collapsed": bool(verdict.get("collapsed")), "collapse_step": verdict.get("collapse_step"),
           "success_start": next((s for s in trace["success"] if s is not None), None),
           **evaluate_model(str(ckpt), n=cfg.eval_tasks), "trace": trace, "wall_s": round(time.time() - t0, 1)}
    _write_json(run / ROW_FILE, {"config": config, "row": row})
    return row


def run_study(cfg: StudyConfig, out: str | Path, report_dir: str | Path, *,
              progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Every run of the grid (finished ones reused), the start model's scores, then the report in `report_dir`.
    `progress(label, steps done, steps total)` follows the RL steps of the whole grid."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    init = start_model(cfg, threads=cfg.threads)
    start_file = out / "start.json"
    start_cfg = {"version": ROW_VERSION, "init": init, "eval_tasks": cfg.eval_tasks}
    start = _read_row(start_file, start_cfg)
    if start is None:
        start = {"run": "start", "method": "start", **evaluate_model(init, n=cfg.eval_tasks)}
        _write_json(start_file, {"config": start_cfg, "row": start})
    specs = cfg.runs()
    total, rows = len(specs) * (cfg.steps + 1), []
    for i, (method, seed, lr) in enumerate(specs):
        label, base = run_name(method, seed, lr), i * (cfg.steps + 1)
        if progress:
            progress(label, base, total)
        step_cb = (lambda step, rec, b=base, lab=label: progress(lab, b + step + 1, total)) if progress else None
        rows.append(run_one(cfg, method, seed, lr, out, init, progress=step_cb))
    if progress:
        progress("report", total, total)
    minutes = sum(r.get("wall_s", 0) for r in rows) / 60
    shown = init.replace(str(Path.home()), "~", 1)  # the report names the cache entry, not the user's home
    settings = cfg.settings() + f" Start model: `{shown}`. Training and evaluation of the runs: {minutes:.1f} min."
    return write_report(rows, start, report_dir, main_lr=cfg.lr, steps=cfg.steps, settings=settings)
