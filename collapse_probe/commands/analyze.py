"""`analyze`: a verdict for a finished (or running) run, from its metrics or from its checkpoints.

PATH is one of
* a run directory / metrics JSONL (ours, a callback's `collapse_probe/metrics.jsonl`, or verl's file logger, its
  directory, a run's parent holding verl's logs and dumps, a dump directory, step records, TensorBoard events):
  the records joined by `integrations.verl_run.open_run` -> replayed through the collapse monitor (the one
  `watch` runs live); with `--checkpoints`, the scored checkpoints' probe captures are joined in too;
* a checkpoint directory: `checkpoint-N/` subdirectories (HF Trainer, TRL, our trainer), verl checkpoints
  (a root of `global_step_N/`, one of them, its `actor/` or `actor/huggingface/`: HF weights needed, the `.pt`
  shards are never opened), or one save_pretrained directory. Each checkpoint is loaded (safetensors
  only, never remote code), the fixed probe set is scored on it and, when the tokenizer speaks the embedded
  tool world, greedy success is measured; the per-checkpoint records are replayed through the same monitor in
  its checkpoint mode (a spike is a >= 1.0 log-odds move from the first checkpoint: few, noise-free points).

Checkpoint scores are cached outside the checkpoint folder (default
`$COLLAPSE_PROBE_CACHE/analyze/<hash of the absolute path>/scores.jsonl`, COLLAPSE_PROBE_CACHE defaulting to
~/.cache/collapse-probe), keyed by step, the weight files' size and mtime, and the scoring settings, so a
second call scores nothing again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from collapse_probe import schema
from collapse_probe.detect.monitor import replay
from collapse_probe.errors import UserError
from collapse_probe.runs.joined import RunRecords, open_run
from collapse_probe.runs.rundir import Checkpoint, RunDir, usable_checkpoints
from collapse_probe.runs.timeline import Timeline
from collapse_probe.models.weights import check_weights

__all__ = ["analyze", "default_cache_dir", "render", "score_checkpoint"]

_CACHE_VERSION = 1


def default_cache_dir(path: Path) -> Path:
    root = Path(os.environ.get("COLLAPSE_PROBE_CACHE") or Path.home() / ".cache" / "collapse-probe")
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    return root / "analyze" / key


# ---------------------------------------------------------------------------------------------- the cache
class ScoreCache:
    """Append-only JSONL of per-checkpoint results; the last entry for (step, fingerprint, settings) wins."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.path = directory / "scores.jsonl"
        self.entries: dict[tuple, dict] = {}
        if self.path.is_file():
            for raw in self.path.read_text(errors="replace").splitlines():
                try:
                    e = json.loads(raw)
                    self.entries[(int(e["step"]), e["fingerprint"], e["settings"])] = e
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line (killed run): that checkpoint is scored again

    def get(self, ck: Checkpoint, settings: str) -> dict | None:
        return self.entries.get((ck.step, ck.fingerprint(), settings))

    def put(self, ck: Checkpoint, settings: str, record: dict) -> None:
        e = {"step": ck.step, "fingerprint": ck.fingerprint(), "settings": settings, "path": str(ck.path),
             "record": record}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(e, allow_nan=True) + "\n")
        except OSError as exc:
            raise UserError(f"cannot write the score cache {self.path}: {exc.strerror}; pass --cache DIR with a "
                            "writable directory") from None
        self.entries[(ck.step, e["fingerprint"], settings)] = e


# ---------------------------------------------------------------------------------------------- scoring
def _has_world_tokens(tok) -> bool:
    from collapse_probe import world
    from collapse_probe.tokens import single_token_id

    return all(single_token_id(tok, t) is not None for t in world.SPECIAL_TOKENS[1:])


def _read_probe_file(path: Path) -> tuple[list[list[dict]], list[dict] | None]:
    if not path.is_file():
        raise UserError(f"--probe {path} does not exist: pass a JSONL file of chat conversations")
    convs, tools = [], None
    for n, raw in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            raise UserError(f"--probe {path} line {n} is not JSON: write one conversation per line, "
                            'a list of messages or {"messages": [...], "tools": [...]}') from None
        msgs = obj.get("messages") if isinstance(obj, dict) else obj
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise UserError(f"--probe {path} line {n} holds no message list: write a list of "
                            '{"role", "content"} messages or {"messages": [...]}')
        if isinstance(obj, dict) and tools is None and isinstance(obj.get("tools"), list):
            tools = obj["tools"]
        convs.append(msgs)
    if not convs:
        raise UserError(f"--probe {path} is empty: add at least one conversation")
    return convs, tools


def _load(ck: Checkpoint):
    """The one loader (`models.load`), its one-line errors prefixed with the checkpoint's step."""
    from collapse_probe.models import load as model_load

    try:
        return model_load.load_pretrained(ck.path)
    except UserError as exc:
        raise UserError(f"checkpoint step {ck.step}: {exc}") from None


def score_checkpoint(ck: Checkpoint, *, eval_tasks: int = 32, probe_convs=None, probe_tools=None) -> dict:
    """One flat record: `cp/probe/...` of the probe set, `success` (greedy, tool world) when possible."""
    try:
        check_weights(ck.path)  # a cut or lying file is refused in milliseconds, before torch is imported
    except UserError as exc:
        raise UserError(f"checkpoint step {ck.step}: {exc}") from None
    import torch

    from collapse_probe.capture.probe_set import ProbeSet

    model, tok = _load(ck)
    world_ok = _has_world_tokens(tok)
    with torch.no_grad():
        if probe_convs is not None:
            probe = ProbeSet.from_messages(tok, probe_convs, tools=probe_tools)
        elif world_ok:
            probe = ProbeSet.from_world(tok)
        else:
            raise UserError(f"checkpoint {ck.path}: its tokenizer lacks the tool world's tokens (<tool_call>, "
                            "<|im_end|>, ...); pass --probe FILE.jsonl with chat conversations of your own tool use")
        rec: dict = {schema.STEP: ck.step}
        rec.update(probe.score(model))
        if world_ok and eval_tasks > 0:
            from collapse_probe.train.evaluate import evaluate

            rec[schema.SUCCESS] = rec[schema.EVAL_SUCCESS] = float(evaluate(model, tok, n=eval_tasks))
    return {k: (float(v) if isinstance(v, (int, float)) and k != schema.STEP else v) for k, v in rec.items()}


# ---------------------------------------------------------------------------------------------- analysis
def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) else None


class _RunStats:
    """What `analyze` reports besides the verdict, gathered while the records stream past (none is kept)."""

    def __init__(self) -> None:
        self.n, self.first_step, self.last_step, self.mix = 0, None, None, {}
        self.ends: dict[str, list] = {schema.SUCCESS: [None, None, False], schema.REWARD_MEAN: [None, None, False]}

    def watch(self, records: Iterable[dict]) -> Iterator[dict]:
        for rec in records:
            self.n += 1
            self.first_step = rec["step"] if self.first_step is None else self.first_step
            self.last_step = rec["step"]
            for key, end in self.ends.items():
                v = next((x for k in schema.metric_keys(key) if (x := _number(rec.get(k))) is not None), None)
                if v is not None:
                    end[0] = v if end[0] is None else end[0]
                    end[1], end[2] = v, end[2] or math.isfinite(v)
            mix = {s: _number(rec.get(schema.state_key(s))) for s in schema.STATES}
            mix = {s: v for s, v in mix.items() if v is not None}
            self.mix = mix or self.mix
            yield rec

    def success(self) -> tuple:
        """(first, last) of `success`, or of `reward/mean` when success was never logged (as Timeline.success)."""
        s, r = self.ends[schema.SUCCESS], self.ends[schema.REWARD_MEAN]
        first, last, _ = s if s[2] or not r[2] else r
        return _clean(first), _clean(last)


def _analyze_run(run: RunRecords, ckpt_info: dict | None = None) -> dict:
    """Stream the run's records through the monitor: memory is bounded by the number of steps, not the file."""
    source, sparse = run.monitor_mode()
    stats = _RunStats()
    v = replay(stats.watch(run.records()), source=source, checkpoints=sparse)
    if not stats.n:
        raise UserError(f"{run.metrics or run.path} holds no records (an empty run): wait until the run has logged "
                        "a step, or pass another run")
    first, last = stats.success()
    out = v.to_dict()
    out.update({"kind": "hf_output" if run.hf_output else "run", "path": str(run.metrics or run.path), "steps": stats.n, "first_step": stats.first_step,
                "last_step": stats.last_step, "success_first": first, "success_last": last,
                "final_state_mix": stats.mix, "skipped_lines": run.skipped, "sources": run.sources(),
                **(ckpt_info or {}), "summary": v.summary()})
    return out


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def analyze(path: str | os.PathLike, *, eval_tasks: int = 32, probe: str | os.PathLike | None = None,
            cache: str | os.PathLike | None = None, checkpoints: bool = False,
            progress: Callable[[int, int, str], None] | None = None, tasks: str | None = None,
            template: str = "auto") -> dict:
    """The verdict as a JSON-able dict (Verdict.to_dict() plus context keys). `progress(done, total, label)`
    is called around each checkpoint scored. `checkpoints=True` scores the checkpoints and, when the run has
    metrics (or verl dumps), joins their probe captures into the run's records: one verdict. `tasks` (bfcl:CAT
    or a JSONL file) instead gives each checkpoint's decision-position probabilities on those tasks' gold
    trajectories in its own template (kind "task_probe", no verdict; recover/chat_run.py)."""
    if tasks is not None:
        from collapse_probe.recover.chat_run import checkpoint_decisions

        tick = (lambda phase, done, total: progress(done, total, phase)) if progress else None
        return checkpoint_decisions(path, tasks, n=eval_tasks or 4, template=template, progress=tick)
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist: pass a run directory, a metrics JSONL file or a checkpoint directory")
    ckpts = RunDir(p).checkpoints() if p.is_dir() else []
    run = open_run(p)  # metrics (ours, verl's log, TensorBoard) joined with verl's rollout dumps / step records
    if run is not None and not (checkpoints and ckpts):
        return _analyze_run(run)
    if not ckpts:
        if checkpoints:
            raise UserError(f"no checkpoint-N/ or verl global_step_N/ under {p}: pass a directory holding "
                            "checkpoints")
        raise UserError(f"{p} holds no metrics (metrics.jsonl, verl's file-logger JSONL, TensorBoard events, rollout "
                        "dumps) and no checkpoints (checkpoint-N/, global_step_N/): pass a run directory or a "
                        "checkpoint directory")
    records, info = _score_checkpoints(p, usable_checkpoints(ckpts), eval_tasks=eval_tasks, probe=probe,
                                       cache=cache, progress=progress)
    if run is not None:
        return _analyze_run(run.with_checkpoints({r["step"]: r for r in records}), info)
    return _analyze_checkpoints(p, records, info)


def _score_checkpoints(p: Path, ckpts: list[Checkpoint], *, eval_tasks, probe, cache, progress
                       ) -> tuple[list[dict], dict]:
    """Each checkpoint's record (scored, or from the cache) and the scoring facts for the output."""
    if eval_tasks < 0:
        raise UserError(f"--eval-tasks {eval_tasks} is negative: pass 0 to skip the success evaluation")
    probe_convs = probe_tools = None
    probe_key = "world"
    if probe is not None:
        probe_convs, probe_tools = _read_probe_file(Path(probe))
        probe_key = hashlib.sha1(Path(probe).read_bytes()).hexdigest()[:16]
    settings = f"v{_CACHE_VERSION}:eval={int(eval_tasks)}:probe={probe_key}"
    cache_dir = Path(cache) if cache is not None else default_cache_dir(p)
    store = ScoreCache(cache_dir)
    todo = [ck for ck in ckpts if store.get(ck, settings) is None]
    scored = 0
    if todo:
        from collapse_probe.models.load import quiet_transformers

        with quiet_transformers():
            for i, ck in enumerate(todo):
                if progress:
                    progress(i, len(todo), f"step {ck.step}")
                rec = score_checkpoint(ck, eval_tasks=eval_tasks, probe_convs=probe_convs, probe_tools=probe_tools)
                store.put(ck, settings, rec)
                scored += 1
            if progress:
                progress(len(todo), len(todo), "done")
    records = [store.get(ck, settings)["record"] for ck in ckpts]
    rows = []
    for rec in records:
        rows.append({"step": rec["step"], "success": _clean(rec.get("success")),
                     **{f"p_{role}": _clean(rec.get(schema.cp_key(schema.Source.PROBE, schema.Position.AFTER_OPEN,
                                                                   role)))
                        for role in ("end_of_turn", "json_open", "tool_open")}})
    info = {"scored": scored, "cached": len(ckpts) - scored, "cache": str(store.path), "checkpoints": rows}
    return records, info


def _analyze_checkpoints(p: Path, records: list[dict], info: dict) -> dict:
    tl = Timeline.from_records(records, path=p)
    # Checkpoint series are few and noise-free (a fixed probe set, no sampling): the spike is a move of >= 1.0
    # log-odds from the first checkpoint (detect/shift.py); the collapse rule is the same as for a run.
    v = replay(records, source=schema.Source.PROBE.value, checkpoints=True)
    out = v.to_dict()
    out.update({"kind": "checkpoints", "path": str(p), "source": "probe", "steps": len(tl),
                "first_step": int(tl.steps[0]), "last_step": int(tl.steps[-1]), **info, "summary": v.summary()})
    return out


_JSON_HEAD = 'p({"|open)'


def render(result: dict) -> str:
    """A readable summary of `analyze`'s result."""
    lines = []
    if result["kind"] == "task_probe":
        from collapse_probe.recover.chat_run import render_decisions

        return render_decisions(result)
    if result["kind"] == "hf_output":
        lines.append(f"HF/TRL output dir {result['path']} (trainer_state.json, TensorBoard events, completions; "
                     f"no collapse-probe metrics): {result['steps']} steps ({result['first_step']}.."
                     f"{result['last_step']})")
    elif result["kind"] == "run":
        lines.append(f"run {result['path']}: {result['steps']} steps ({result['first_step']}..{result['last_step']}), "
                     f"captures: {result['source']}")
        src = result.get("sources") or {}
        joined = [f"{what} {', '.join(map(str, src[key]))}" for key, what in
                  (("tensorboard", "TensorBoard events"), ("rollouts", "rollout files"), ("checkpoints",
                                                                                          "checkpoints at steps"))
                  if src.get(key)]
        if joined:
            lines.append("joined: " + "; ".join(joined))
        if result.get("skipped_lines"):
            lines.append(f"skipped {result['skipped_lines']} torn or garbled line(s)")
    else:
        lines.append(f"checkpoints under {result['path']}: {result['steps']} "
                     f"(steps {result['first_step']}..{result['last_step']}); scored: {result['scored']}, "
                     f"cached: {result['cached']} ({result['cache']})")
        lines.append(f"{'step':>7}  {'success':>7}  {'p(eot|open)':>11}  {_JSON_HEAD:>10}")
        for r in result["checkpoints"]:
            f = lambda v, w: f"{v:>{w}.3f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"
            lines.append(f"{r['step']:>7}  {f(r['success'], 7)}  {f(r['p_end_of_turn'], 11)}  "
                         f"{f(r['p_json_open'], 10)}")
    lines.append(result["summary"])
    return "\n".join(lines)
