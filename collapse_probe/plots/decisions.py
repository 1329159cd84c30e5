"""Figures of the forensics on real tasks (`recover --tasks`, `analyze --tasks`).

    plot_decisions   per checkpoint, the gold probe set's decision-position probabilities (after the call tag:
                     `{"`, end-of-turn, the tag again; at a turn's start: the tag) on a log axis: the paper's spike
    plot_forensics   one checkpoint's format grid (success and content accuracy per syntax, masked decoding, repair
                     and its reference), beside its decision probabilities
"""

from __future__ import annotations

from pathlib import Path

from collapse_probe.plots.style import OKABE_ITO, P_FLOOR, ROLE_COLOURS, STYLE, reproducible

LABELS = {"after_open/json_open": '{" after tag', "after_open/end_of_turn": "end-of-turn after tag",
          "after_open/tool_open": "tag again after tag", "turn_start/tool_open": "tag at turn start"}
COLOURS = {"after_open/json_open": ROLE_COLOURS["json_open"], "after_open/end_of_turn": ROLE_COLOURS["end_of_turn"],
           "after_open/tool_open": ROLE_COLOURS["tool_open"], "turn_start/tool_open": OKABE_ITO["sky"]}


def _save(fig, out: Path | str) -> list[Path]:
    import matplotlib.pyplot as plt

    stem = Path(out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem] if stem.suffix in (".png", ".pdf", ".svg") else [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=200, bbox_inches="tight", metadata=reproducible(p.suffix))
    plt.close(fig)
    return paths


def plot_decisions(result: dict, out: Path | str) -> list[Path]:
    """`checkpoint_decisions` output -> a line per decision probability across checkpoint steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result["checkpoints"], key=lambda r: r["step"])
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(3.4, 2.2))
        steps = [r["step"] for r in rows]
        for key, label in LABELS.items():
            ys = [max(r["decisions"].get(key) or 0.0, P_FLOOR) for r in rows]
            ax.plot(steps, ys, marker="o", ms=2.5, color=COLOURS[key], label=label)
        ax.set_yscale("log")
        ax.set_ylim(P_FLOOR * 0.8, 1.2)
        ax.set_xlabel("checkpoint step")
        ax.set_ylabel("p on gold trajectories")
        ax.set_title(f"{result['tasks']}: {result['n']} gold tasks, the model's own template")
        ax.legend(loc="lower left", fontsize=6)
    return _save(fig, out)


def plot_forensics(result: dict, out: Path | str) -> list[Path]:
    """`run_chat_forensics` output -> success / content accuracy per format (+ masked, repair), and the probe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: list[tuple[str, float, float]] = [(k, v["success"] or 0.0, v["content_accuracy"] or 0.0)
                                            for k, v in result["formats"].items()]
    if result.get("masked"):
        m = result["masked"]
        bars.append(("masked", m["success"] or 0.0, m["content_accuracy"] or 0.0))
    rep = result.get("repair")
    if rep:
        bars.append((f"repair {rep['steps']}st", rep["after"]["success"] or 0.0, rep["after"]["content_accuracy"] or 0.0))
        bars.append((f"{rep['reference'][:10]} {rep['steps']}st", rep["reference_after"]["success"] or 0.0,
                     rep["reference_after"]["content_accuracy"] or 0.0))
    with plt.rc_context(STYLE):
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(6.8, 2.3), gridspec_kw={"width_ratios": [2.2, 1]})
        xs = range(len(bars))
        ax.bar([x - 0.2 for x in xs], [b[1] for b in bars], 0.4, color=OKABE_ITO["blue"], label="success")
        ax.bar([x + 0.2 for x in xs], [b[2] for b in bars], 0.4, color=OKABE_ITO["green"], label="content accuracy")
        ax.set_xticks(list(xs), [b[0] for b in bars], rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{Path(result['checkpoint']).name} on {result['tasks']} (n={result['n']}, greedy)")
        ax.legend(loc="upper left", fontsize=6, ncol=2)
        probe = result.get("probe") or {}
        keys = [k for k in LABELS if probe.get(k) is not None]
        bx.barh(range(len(keys)), [max(probe[k], P_FLOOR) for k in keys], color=[COLOURS[k] for k in keys])
        bx.set_yticks(range(len(keys)), [LABELS[k] for k in keys])
        bx.set_xscale("log")
        bx.set_xlim(P_FLOOR * 0.8, 1.2)
        bx.set_title("gold probe set")
    return _save(fig, out)


def plot_result_file(path: Path | str, out: Path | str | None = None) -> list[Path]:
    """Draw a saved `analyze --tasks --json` (decisions per checkpoint) or `recover --tasks --json` result;
    the figure goes beside it unless `out` names a stem. Anything else is one UserError line."""
    import json

    from collapse_probe.errors import UserError

    p = Path(path)
    try:
        result = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: cannot read it as JSON ({type(exc).__name__}); pass the output of "
                        "`analyze --tasks ... --json` or `recover --tasks ... --json`") from None
    kind = result.get("kind") if isinstance(result, dict) else None
    if kind not in ("task_probe", "task_forensics"):
        raise UserError(f"{path}: not a result of `analyze --tasks --json` or `recover --tasks --json` (kind "
                        f"{kind!r}); for a run's timeline pass the run directory")
    stem = Path(out) if out is not None else p.with_suffix("")
    return plot_decisions(result, stem) if kind == "task_probe" else plot_forensics(result, stem)
