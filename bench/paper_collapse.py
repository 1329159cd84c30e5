"""The paper's collapse, second attempt: its task structure and its off-policy training, one arm at a time.

Every arm is the `grpo-outcome` preset (binary 0/1 outcome reward, no format term, the paper harness, up to 30
turns) from the `instruct-paper` model (the instruct mixture with multi-question episodes and abstaining turns),
with an arm's fields changed along four axes:

    structure  one        one user turn per episode, no abstaining turn (the old world)
               one-abs    one user turn, 20% abstaining (a tool withheld or nobody named: call nothing)
               multi      1-5 user turns (BFCL-style: state carried over), none abstaining
               multi-abs  1-5 user turns, 20% of them abstaining (the paper's base + miss_param + miss_func mix)
    start      asis       the tasks as above, from instruct-paper
               hard       1-8 user turns (the harder mix: longer episodes than the instruct model saw)
               plain      from the plain `instruct` model, which never saw several user turns or a turn to
                          abstain on (as Qwen2.5-Instruct had not seen BFCL's miss_param / miss_func turns)
    training   onpolicy   the sampler is the trainer (today's default)
               verl       the paper's verl: old log-probs recomputed by the trainer, 4 mini-batch updates a step,
                          a bf16 sampler
               topp       verl plus a top-p 0.9 sampler
               lag        verl plus a sampler one step stale
    lr         the preset's 5e-4 up to 2e-3

Per run and step it records success, p(end-of-turn right after `<tool_call>\\n`) on-policy and on the probe set,
the gradient parts there (chosen, other, and the mismatch part when a mismatch source is on), the malformed-turn
reasons, and where the bare-tag turns were written (world.turn_sites: after a user turn's calls were done, on an
abstaining turn, or while calls were still due). The paper's form: p(end-of-turn) < 0.05 at the start rising above
0.3 before success halves, and the bare tag the most common malformed turn.

    python bench/paper_collapse.py --arms multi-abs:asis:onpolicy:2e-3 --seeds 0   # one arm, one seed
    python bench/paper_collapse.py --no-train                                       # the report from runs there

Writes reports/paper-collapse/{table.md,table.json,traces.jsonl,traces.png}. Complete runs are reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

STRUCTURES = {"one": (1, 0.0), "one-abs": (1, 0.2), "multi": (5, 0.0), "multi-abs": (5, 0.2)}  # (user_turns, abstain)
HARD_USER_TURNS = 8
_VERL = {"old_logp": "recompute", "ppo_mini_batches": 4, "rollout_dtype": "bf16"}
TRAININGS: dict[str, dict] = {"onpolicy": {}, "verl": _VERL, "topp": {**_VERL, "rollout_top_p": 0.9},
                              "lag": {**_VERL, "rollout_lag": 1}}
START_PRESET = "instruct-paper"
STARTS = {"asis": START_PRESET, "hard": START_PRESET, "plain": "instruct"}  # start -> the preset of its model
EOT, JSON = "end_of_turn", "json_open"
BARE = "bare_open_tag"


@dataclasses.dataclass(frozen=True)
class Arm:
    structure: str
    start: str
    training: str
    lr: float

    @classmethod
    def parse(cls, text: str) -> "Arm":
        parts = text.split(":")
        if len(parts) != 4 or parts[0] not in STRUCTURES or parts[1] not in STARTS \
                or parts[2] not in TRAININGS:
            sys.exit(f"arm {text!r}: expected STRUCTURE:START:TRAINING:LR with STRUCTURE in {', '.join(STRUCTURES)}, "
                     f"START in {', '.join(STARTS)}, TRAINING in {', '.join(TRAININGS)}, "
                     f"e.g. multi-abs:asis:onpolicy:2e-3")
        try:
            return cls(parts[0], parts[1], parts[2], float(parts[3]))
        except ValueError:
            sys.exit(f"arm {text!r}: the learning rate {parts[3]!r} is not a number")

    @property
    def name(self) -> str:
        return f"{self.structure}-{self.start}-{self.training}-lr{self.lr:g}"

    def fields(self) -> dict:
        """The TrainConfig fields this arm changes from grpo-outcome."""
        user_turns, abstain = STRUCTURES[self.structure]
        if self.start == "hard":
            user_turns = max(user_turns, HARD_USER_TURNS)
        return {"lr": self.lr, "user_turns": user_turns, "abstain_frac": abstain, **TRAININGS[self.training]}


def train_arm(arm: Arm, seed: int, out: Path, steps: int, init: str | None, threads: int,
              prompts: int | None = None) -> Path:
    from collapse_probe.train.config import TrainConfig
    from collapse_probe.train.presets import cached_model, get_preset
    from collapse_probe.train.trainer import train

    missing = [f for f in arm.fields() if f not in {f.name for f in dataclasses.fields(TrainConfig)}]
    if missing:
        sys.exit(f"arm {arm.name}: TrainConfig has no field {missing[0]!r} yet (the rollout-engine switches)")
    run = out / f"{arm.name}{f'-p{prompts}' if prompts else ''}-s{seed}"
    cfg = get_preset("grpo-outcome", seed=seed, steps=steps, prompts_per_step=prompts, **arm.fields())
    cfg.init = init or str(cached_model(STARTS[arm.start], threads=threads))
    cfg.threads = threads
    cfg.save_every, cfg.probe_every = 5, 2
    cfg.log_rollouts = cfg.prompts_per_step * cfg.group_size  # every sample: the bare-tag sites need them all
    if run.exists():
        if (run / f"checkpoint-{cfg.steps}" / "config.json").exists():  # saved after the last step: complete
            return run
        import shutil
        shutil.rmtree(run)
    print(f"training {run.name} ...", file=sys.stderr, flush=True)
    train(cfg, run)
    return run


def bare_tag_sites(run: Path) -> dict[int, Counter]:
    """Per step, the malformed-turn count by reason and the bare-tag turns by site (world.SITES), from the run's
    logged rollouts replayed on tasks re-made with the run's structure."""
    from collapse_probe import world
    from collapse_probe.formats.classify import FormatSpec, classify_turn

    cfg = json.loads((run / "config.json").read_text())
    user_turns, abstain = cfg.get("user_turns", 1), cfg.get("abstain_frac", 0.0)
    spec = FormatSpec.hermes()
    out: dict[int, Counter] = {}
    for path in sorted((run / "rollouts").glob("step_*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            task = world.make_task(row["task_seed"], user_turns=user_turns, abstain_frac=abstain)
            counts = out.setdefault(int(row["step"]), Counter())
            for text, site in zip(row["turns"], world.turn_sites(task, row["turns"], harness=cfg.get("harness",
                                                                                                    world.PAPER))):
                counts["turns"] += 1
                reason = classify_turn(text, spec).reason
                if reason == BARE:
                    counts[f"bare@{site}"] += 1
    return out


SITE_PROBE_TASKS = 40  # probe-split tasks (1-5 user turns, 30% abstaining) whose turns give the site contexts


def site_probe_sets(tok) -> dict:
    """One probe set per site (world.SITES): gold conversation prefixes up to an assistant turn written at that
    site, then `<tool_call>\n` and end-of-turn, scored on that last turn only: p(end-of-turn | after the tag)
    where a bare tag would be a failure (calls due), a harmless end (after the calls) or a right "no call"."""
    from collapse_probe import world
    from collapse_probe.capture.probe_set import ProbeSet
    from collapse_probe.tokens import resolve_control_tokens

    roles = resolve_control_tokens(tok)
    by_site: dict[str, tuple[list, list]] = {s: ([], []) for s in world.SITES}
    for task in world.task_split("probe", SITE_PROBE_TASKS, user_turns=5, abstain_frac=0.3):
        turns = world.oracle_turns(task)
        prompt = world.prompt_text(task)
        for j, site in enumerate(world.turn_sites(task, [t for t, _ in turns])):
            head, _ = world.encode_conversation(tok, prompt, turns[:j])
            ids, _ = world.encode_conversation(tok, prompt, turns[:j] + [(world.TOOL_OPEN + "\n", None)])
            by_site[site][0].append(ids)
            by_site[site][1].append([0] * len(head) + [1] * (len(ids) - len(head)))
    return {s: ProbeSet(seqs, masks, roles, tok.pad_token_id) for s, (seqs, masks) in by_site.items() if seqs}


def site_probe_rows(run: Path) -> list[dict]:
    """p(end-of-turn | after `<tool_call>\n`) at each site, on every checkpoint of the run."""
    from collapse_probe import schema
    from collapse_probe.models.load import load_pretrained

    key = schema.cp_key(schema.Source.PROBE, schema.Position.AFTER_OPEN, EOT)
    rows, sets = [], None
    ckpts = sorted(run.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    for ckpt in ckpts:
        model, tok = load_pretrained(ckpt)
        sets = sets or site_probe_sets(tok)
        row = {"run": run.name, "step": int(ckpt.name.split("-")[1])}
        for site, probe in sets.items():
            row[f"p_eot@{site}"] = probe.score(model).get(key)
        rows.append(row)
    return rows


def trace_rows(run: Path) -> list[dict]:
    """Per step: success, p(end-of-turn) and p(`{"`) after the open tag on-policy and on the probe set, the
    pressure parts on end-of-turn there, the top reasons and the bare-tag sites."""
    from collapse_probe import schema
    from collapse_probe.runs.timeline import Timeline

    tl = Timeline.from_run(run)
    ao = schema.Position.AFTER_OPEN.value
    keys = {"success": schema.SUCCESS, "p_eot": schema.cp_key(schema.Source.ROLLOUT, ao, EOT),
            "p_json": schema.cp_key(schema.Source.ROLLOUT, ao, JSON),
            "p_eot_probe": schema.cp_key(schema.Source.PROBE, ao, EOT),
            "gp_eot_chosen": schema.gp_key(ao, EOT, schema.Part.CHOSEN),
            "gp_eot_other": schema.gp_key(ao, EOT, schema.Part.OTHER),
            "gp_eot_mismatch": schema.mm_key(ao, EOT, schema.MismatchStat.PRESSURE),
            "q_eot": schema.mm_key(ao, EOT, schema.MismatchStat.Q),
            "bare_share": schema.reason_key(BARE), "format_valid": schema.FORMAT_VALID}
    cols = {name: tl.series(key).reindex(tl.steps) for name, key in keys.items() if tl.has(key)}
    sites = bare_tag_sites(run)
    rows = []
    for i, step in enumerate(tl.steps):
        row = {"run": run.name, "step": int(step)}
        row.update({n: (None if c.isna().iloc[i] else float(c.iloc[i])) for n, c in cols.items()})
        c = sites.get(int(step), Counter())
        row.update({f"bare@{s}": c.get(f"bare@{s}", 0) for s in ("after_calls", "abstaining", "calls_due")})
        rows.append(row)
    return rows


def summarise(run: Path, traces: list[dict]) -> dict:
    """One row of the table: success start/min/end, p(end-of-turn) on-policy and probe, summed pressure parts,
    the most common malformed turn, bare tags by site, and the verdicts."""
    from collapse_probe import schema
    from collapse_probe.formats.reasons import REASONS
    from collapse_probe.runs.timeline import Timeline

    tl = Timeline.from_run(run)
    cfg = json.loads((run / "config.json").read_text())
    row: dict = {"run": run.name, "steps": int(tl.steps[-1]) if len(tl) else 0,
                 "format_term": cfg["reward"].get("tag_bonus", 0.0)}
    succ = [(t["step"], t["success"]) for t in traces if t.get("success") is not None]
    p = [(t["step"], t["p_eot"]) for t in traces if t.get("p_eot") is not None]
    probe = [t["p_eot_probe"] for t in traces if t.get("p_eot_probe") is not None]
    if not succ:
        return row
    s0 = succ[0][1]
    tail = [v for _, v in succ[-5:]]
    row.update(success_start=s0, success_min=min(v for _, v in succ), success_end=sum(tail) / len(tail))
    if p:
        row.update(p_eot_start=p[0][1], p_eot_max=max(v for _, v in p), p_eot_end=p[-1][1])
    if probe:
        row.update(p_probe_start=probe[0], p_probe_max=max(probe))
    for part in ("chosen", "other", "mismatch"):
        vals = [t[f"gp_eot_{part}"] for t in traces if t.get(f"gp_eot_{part}") is not None]
        if vals:
            row[f"gp_eot_{part}"] = sum(vals)
    prefix = schema.reason_key("")
    broken = {code for code, (state, _) in REASONS.items() if state in schema.BROKEN_STATES}
    reasons = {k[len(prefix):]: float(tl.series(k).fillna(0).mean()) for k in tl.keys()
               if k.startswith(prefix) and k[len(prefix):] in broken}
    if reasons:
        top = max(reasons, key=reasons.get)
        row["top_malformed"] = f"{top} {reasons[top]:.2f}"
    low = [s for s, v in succ if v < 0.5 * s0]  # the collapsed window: success below half its start
    if low:  # the most common malformed turn there (the paper's collapsed logs: bare tags)
        at = {code: float(tl.series(prefix + code).reindex(low).fillna(0).mean())
              for code in reasons} if reasons else {}
        if at:
            top = max(at, key=at.get)
            row["top_malformed_low"] = f"{top} {at[top]:.2f}"
            row["bare_top"] = top == BARE and at[top] > 0
    for site in ("after_calls", "abstaining", "calls_due"):
        row[f"bare@{site}"] = sum(t.get(f"bare@{site}", 0) for t in traces)
    halved = [s for s, v in succ if v < 0.5 * s0]
    spiked = [s for s, v in p if v > 0.3]
    row["collapsed"] = bool(s0 > 0 and [s for s, v in succ if v < 0.2 * s0])
    row["paper_form"] = bool(p and p[0][1] < 0.05 and spiked and (not halved or spiked[0] <= halved[0])
                             and row.get("bare_top") and row["format_term"] == 0 and halved)
    return row


COLUMNS = ("run", "success_start", "success_min", "success_end", "p_eot_start", "p_eot_max", "p_eot_end",
           "p_probe_start", "p_probe_max", "p_due_start", "p_due_max", "p_after_start", "p_after_max",
           "p_abst_start", "p_abst_max", "gp_eot_chosen", "gp_eot_other", "gp_eot_mismatch", "top_malformed",
           "top_malformed_low",
           "bare@after_calls", "bare@abstaining", "bare@calls_due", "collapsed", "paper_form")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.0f}"
    return str(v)


def table_markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |\n" for r in rows)


def figure(traces: list[dict], sites: list[dict], path: Path) -> None:
    """Small multiples, one panel per run: success, p(end-of-turn | after `<tool_call>\\n`) on-policy, on the
    probe set, and at the calls-due and abstaining sites (checkpoints)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted({t["run"] for t in traces})
    cols = min(4, len(runs))
    rows_n = (len(runs) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 2.8 * rows_n), squeeze=False, sharey=True)
    for ax, run in zip(axes.flat, runs):
        tr = [t for t in traces if t["run"] == run]
        for key, label, style in (("success", "success", "-"), ("p_eot", "p(eot|tag) on-policy", "-"),
                                  ("p_eot_probe", "p(eot|tag) probe", "--")):
            pts = [(t["step"], t[key]) for t in tr if t.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        for site, style in (("calls_due", "o:"), ("abstaining", "s:")):
            pts = [(r["step"], r[f"p_eot@{site}"]) for r in sites
                   if r["run"] == run and r.get(f"p_eot@{site}") is not None]
            if pts:
                ax.plot(*zip(*pts), style, markersize=3, label=f"p(eot|tag) {site.replace('_', ' ')}")
        ax.set_title(run, fontsize=8)
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default="multi-abs:asis:onpolicy:2e-3",
                    help="comma-separated STRUCTURE:START:TRAINING:LR (module doc)")
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds (0 to choose, 1-2 to check)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("runs/paper-collapse"))
    ap.add_argument("--report", type=Path, default=Path("reports/paper-collapse"))
    ap.add_argument("--init", default=None, help=f"a model dir to start from instead of the cached {START_PRESET}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (default: the preset's 8)")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the table as JSON")
    args = ap.parse_args()
    arms = [Arm.parse(a) for a in args.arms.split(",") if a]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_train:
        for seed in seeds:
            for arm in arms:
                train_arm(arm, seed, args.out, args.steps, args.init, args.threads, args.prompts)
    runs = [p for p in sorted(args.out.iterdir()) if (p / "metrics.jsonl").exists()]
    traces = {run.name: trace_rows(run) for run in runs}
    rows = [summarise(run, traces[run.name]) for run in runs]
    sites = []
    for run, row in zip(runs, rows):  # per-site probe on the checkpoints, cached in the run dir
        cache = run / "site_probe.json"
        if not cache.exists() or json.loads(cache.read_text())[-1]["step"] < row.get("steps", 0):
            cache.write_text(json.dumps(site_probe_rows(run)))
        site_rows = json.loads(cache.read_text())
        sites += site_rows
        for short, site in (("due", "calls_due"), ("after", "after_calls"), ("abst", "abstaining")):
            vals = [r[f"p_eot@{site}"] for r in site_rows if r.get(f"p_eot@{site}") is not None]
            if vals:
                row[f"p_{short}_start"], row[f"p_{short}_max"] = vals[0], max(vals)
    (args.report / "site_probe.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (args.report / "site_probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sites))
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "table.json").write_text(json.dumps(rows, indent=2))
    flat = [t for run in runs for t in traces[run.name]]
    (args.report / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in flat))
    md = table_markdown(rows)
    (args.report / "table.md").write_text(md)
    if flat:
        figure(flat, sites, args.report / "traces.png")
    print(json.dumps(rows, indent=2) if args.json else md)


if __name__ == "__main__":
    main()
