"""The paper's claims on a real pretrained model on a laptop CPU: SmolLM2-135M-Instruct (issue 14).

Stages, each adding its numbers to OUT/results.json as soon as it finishes (a stage that fails is recorded as
such and the rest still run, so the report says what happened whatever happens):

    base   the untouched model, greedy, canonical (hermes) syntax: it answers in prose, not with a tool call
    sft    tool SFT on the world's oracle trajectories (tags as plain text: `<tool_call>` is 5 pieces) with the
           reference trainer; held-out greedy success at the end; checkpoint in the HF layout
    grid   the format grid (recover.grid / recover.evaluate) on the SFT model: validity, content accuracy and
           success in each syntax; the spread of content accuracy
    grpo   a short GRPO run from the SFT model under the paper-like settings (grpo-outcome: binary outcome
           reward, paper harness) with capture on, smaller batches to fit the time; p(end-of-turn | after the
           tag), success over steps; the monitor's verdict
    report OUT/report.md (+ timeline.pdf/svg/png, the spike timeline) and OUT/summary.md

    python bench/real_model.py [--out reports/real-model] [--work runs/real-model] [--sft-steps 60] [--grpo-steps 8]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

P_EOT = "cp/rollout/after_open/end_of_turn"
P_EOT_PROBE = "cp/probe/after_open/end_of_turn"
P_JSON_PROBE = "cp/probe/after_open/json_open"
TITLE = "# SmolLM2-135M on CPU: SFT, format grid, GRPO with capture\n\n"


class Bench:
    def __init__(self, out: Path):
        self.out, self.t0 = out, time.time()
        out.mkdir(parents=True, exist_ok=True)
        self.res: dict = {"model": "SmolLM2-135M-Instruct (models fetch smollm2-135m)", "threads": torch.get_num_threads(),
                          "stages": {}}

    def stage(self, name: str, fn, *args, **kw):
        print(f"[{(time.time() - self.t0) / 60:5.1f} min] {name} ...", flush=True)
        t = time.time()
        try:
            got = fn(*args, **kw)
            self.res["stages"][name] = {"ok": True, "seconds": round(time.time() - t, 1), **(got or {})}
        except Exception as e:  # noqa: BLE001 - the report says what failed and the rest still runs
            got = None
            self.res["stages"][name] = {"ok": False, "seconds": round(time.time() - t, 1),
                                        "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        self.res["total_minutes"] = round((time.time() - self.t0) / 60, 1)
        (self.out / "results.json").write_text(json.dumps(self.res, indent=2, default=str))
        print(f"          {name}: {json.dumps({k: v for k, v in self.res['stages'][name].items() if k != 'traceback'}, default=str)[:600]}",
              flush=True)
        return got


def eval_canonical(path: Path, n: int) -> dict:
    from collapse_probe.recover.evaluate import evaluate_format
    from collapse_probe.models.load import load_chat_model

    model, tok, _ = load_chat_model(path)
    model.eval()
    r = evaluate_format(model, tok, "hermes", n=n, max_turns=8, keep_turns=2)
    return {k: r[k] for k in ("validity", "content_accuracy", "success", "calls_per_episode", "n", "examples")}


def sft(base: Path, work: Path, steps: int, batch: int, lr: float, eval_tasks: int) -> dict:
    from collapse_probe.train.config import Mode, Schedule, TrainConfig
    from collapse_probe.train.trainer import train

    cfg = TrainConfig(mode=Mode.SFT, init=str(base), steps=steps, sft_batch=batch, lr=lr, lr_schedule=Schedule.COSINE,
                      warmup_steps=min(5, steps), retry_frac=0.1, eval_every=0, eval_tasks=eval_tasks,
                      probe_every=max(1, steps // 2), save_every=0, threads=torch.get_num_threads())
    last = train(cfg, work / "sft", overwrite=True, progress=_every(10))
    recs = _records(work / "sft")
    return {"checkpoint": str(last), "steps": steps, "batch": batch, "lr": lr,
            "loss_first": recs[0].get("loss"), "loss_last": next(r["loss"] for r in reversed(recs) if "loss" in r),
            "eval_success": recs[-1].get("eval/success"), "eval_tasks": eval_tasks,
            "probe_after_open": {k: recs[-1].get(k) for k in (P_JSON_PROBE, P_EOT_PROBE)},
            "step_seconds_mean": _mean([r.get("time/step_s") for r in recs[:-1]])}


def grid(ckpt: Path, n: int) -> dict:
    from collapse_probe.recover.evaluate import evaluate_format, format_spread
    from collapse_probe.recover.grid import FORMAT_NAMES
    from collapse_probe.models.load import load_chat_model

    model, tok, _ = load_chat_model(ckpt)
    model.eval()
    out = {}
    for name in FORMAT_NAMES:
        t = time.time()
        r = evaluate_format(model, tok, name, n=n, max_turns=8, keep_turns=1)
        out[name] = {k: r[k] for k in ("validity", "content_accuracy", "success", "content_accuracy_any_syntax",
                                       "canonical_turn_frac", "examples")}
        out[name]["seconds"] = round(time.time() - t, 1)
        print(f"          grid {name}: {json.dumps({k: v for k, v in out[name].items() if k != 'examples'})}", flush=True)
    return {"n": n, "formats": out, "spread": format_spread(out)}


def grpo(ckpt: Path, work: Path, steps: int, prompts: int, group: int, eval_tasks: int, lr: float) -> dict:
    import dataclasses

    from collapse_probe.train.presets import get_preset
    from collapse_probe.train.trainer import train

    cfg = dataclasses.replace(get_preset("grpo-outcome"), init=str(ckpt), steps=steps, prompts_per_step=prompts, lr=lr,
                              group_size=group, max_turns=8, eval_tasks=eval_tasks, probe_every=2, save_every=0,
                              log_rollouts=4, warmup_steps=min(2, steps), threads=torch.get_num_threads())
    train(cfg, work / "grpo", overwrite=True, progress=_every(1))
    return {"config": {k: getattr(cfg, k) for k in ("steps", "prompts_per_step", "group_size", "lr", "max_turns",
                                                    "harness", "temperature")}, **grpo_numbers(work)}


def grpo_numbers(work: Path) -> dict:
    """The GRPO run's series and the monitor's verdict, read back from its metrics.jsonl."""
    from collapse_probe.detect.monitor import replay

    recs = _records(work / "grpo")
    v = replay(recs)
    keys = {"success": "success", "p_eot_after_open": P_EOT, "p_eot_after_open_probe": P_EOT_PROBE,
            "p_json_after_open_probe": P_JSON_PROBE, "calls": "tools/calls_mean", "turns": "len/turns_mean",
            "healthy_tool_call": "fmt/healthy_tool_call", "reward": "reward/mean", "step_s": "time/step_s"}
    series = [{"step": r["step"], **{k: r.get(x) for k, x in keys.items()}} for r in recs]
    return {"series": series, "eval_success_end": recs[-1].get("eval/success"), "collapsed": v.collapsed,
            "verdict": "; ".join(v.summary().splitlines())}


def report(work: Path, out: Path, res: dict) -> dict:
    from collapse_probe.commands.report import write_report

    sections = [("Real-model benchmark (bench/real_model.py)", summary_markdown(res))]
    path = write_report(work / "grpo", out, extra_sections=sections)
    return {"report": str(path)}


def summary_markdown(res: dict) -> str:
    st = res["stages"]
    lines = [f"Model: {res['model']}; {res['threads']} CPU threads; total {res.get('total_minutes')} min.", ""]
    for name in ("base", "sft", "grid", "grpo"):
        s = st.get(name)
        if s is None:
            lines.append(f"- {name}: not run")
        elif not s["ok"]:
            lines.append(f"- {name}: FAILED after {s['seconds']} s: {s['error']}")
    if st.get("base", {}).get("ok"):
        b = st["base"]
        lines.append(f"- untouched model, canonical syntax: success {b['success']:.2f}, validity {b['validity']:.2f}, "
                     f"calls/episode {b['calls_per_episode']:.2f} (n={b['n']})")
    if st.get("sft", {}).get("ok"):
        s = st["sft"]
        lines.append(f"- SFT: {s['steps']} steps x {s['batch']} at lr {s['lr']}, {s['seconds'] / 60:.1f} min; loss "
                     f"{s['loss_first']:.3f} -> {s['loss_last']:.3f}; held-out greedy success {s['eval_success']} "
                     f"(n={s['eval_tasks']}); probe set after the tag: p(`{{\"`) "
                     f"{_f(s['probe_after_open'][P_JSON_PROBE])}, p(`<|im_end|>`) {_f(s['probe_after_open'][P_EOT_PROBE])}")
    if st.get("grid", {}).get("ok"):
        g = st["grid"]
        lines += ["", "| format | validity | content accuracy | success |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['validity']:.2f} | {v['content_accuracy']:.2f} | {v['success']:.2f} |"
                  for k, v in g["formats"].items()]
        lines += ["", f"Content-accuracy spread across formats: {g['spread']:.2f} (n={g['n']} per format)."]
    if st.get("grpo", {}).get("ok"):
        g = st["grpo"]
        lines += ["", f"GRPO ({json.dumps(g['config'])}), {g['seconds'] / 60:.1f} min; held-out greedy success at "
                      f"the end {_f(g['eval_success_end'])}; the monitor's verdict: collapsed "
                      f"**{'yes' if g['collapsed'] else 'no'}** ({g['verdict']}).", "",
                  "| step | success | p(`<|im_end|>` after tag), on-policy | same, probe set | calls / episode | "
                  "turns / episode | reward |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['step']} | {_f(r['success'])} | {_f(r['p_eot_after_open'])} | {_f(r['p_eot_after_open_probe'])} | "
                  f"{_f(r.get('calls'))} | {_f(r.get('turns'))} | {_f(r['reward'])} |" for r in g["series"]]
    return "\n".join(lines)


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _mean(xs) -> float | None:
    xs = [x for x in xs if isinstance(x, (int, float))]
    return sum(xs) / len(xs) if xs else None


def _records(run: Path) -> list[dict]:
    from collapse_probe.runs.joined import read_records

    return list(read_records(run, warn=False))


def _every(k: int):
    def show(step: int, rec: dict) -> None:
        if step % k == 0:
            keys = ("loss", "success", "reward/mean", P_EOT, "time/step_s")
            print(f"          step {step}: " + ", ".join(f"{x}={rec[x]:.3f}" for x in keys if isinstance(rec.get(x), float)),
                  flush=True)
    return show


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("reports/real-model"))
    ap.add_argument("--work", type=Path, default=Path("runs/real-model"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base-n", type=int, default=8)
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--sft-batch", type=int, default=8)
    ap.add_argument("--sft-lr", type=float, default=2e-4)
    ap.add_argument("--eval-tasks", type=int, default=16)
    ap.add_argument("--grid-n", type=int, default=12)
    ap.add_argument("--grpo-steps", type=int, default=8)
    ap.add_argument("--grpo-prompts", type=int, default=4)
    ap.add_argument("--grpo-group", type=int, default=4)
    ap.add_argument("--grpo-lr", type=float, default=2e-5, help="the tiny preset's 5e-4 is for a 0.6M model")
    ap.add_argument("--sft-checkpoint", type=Path, default=None, help="skip SFT: use this checkpoint")
    ap.add_argument("--summary-only", action="store_true", help="rebuild summary.md and report.md from "
                                                                "OUT/results.json and the GRPO run, train nothing")
    args = ap.parse_args()
    if args.summary_only:
        res = json.loads((args.out / "results.json").read_text())
        if res["stages"].get("grpo", {}).get("ok"):
            res["stages"]["grpo"].update(grpo_numbers(args.work))
            (args.out / "results.json").write_text(json.dumps(res, indent=2, default=str))
            report(args.work, args.out, res)
        (args.out / "summary.md").write_text(TITLE + summary_markdown(res) + "\n")
        print((args.out / "summary.md").read_text())
        return
    from collapse_probe.models.fetch import fetch

    torch.set_num_threads(args.threads)
    b = Bench(args.out)
    base = fetch("smollm2-135m")
    b.stage("base", eval_canonical, base, args.base_n)
    if args.sft_checkpoint is None:
        got = b.stage("sft", sft, base, args.work, args.sft_steps, args.sft_batch, args.sft_lr, args.eval_tasks)
        ckpt = Path(got["checkpoint"]) if got else None
    else:
        ckpt = args.sft_checkpoint
        b.res["stages"]["sft"] = {"ok": True, "seconds": 0, "checkpoint": str(ckpt), "reused": True}
    if ckpt is not None:
        b.stage("grid", grid, ckpt, args.grid_n)
        b.stage("grpo", grpo, ckpt, args.work, args.grpo_steps, args.grpo_prompts, args.grpo_group, args.eval_tasks,
                args.grpo_lr)
    if b.res["stages"].get("grpo", {}).get("ok"):
        b.stage("report", report, args.work, args.out, b.res)
    (args.out / "summary.md").write_text(TITLE + summary_markdown(b.res) + "\n")
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
