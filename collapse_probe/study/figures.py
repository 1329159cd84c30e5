"""The study's figures (one-column, PNG 200 dpi + PDF): per-step traces of the runs at the main lr.

success: sampled success per RL step, one colour per method, the line the mean over seeds and the band their
min to max. p_eot: the same for the on-policy p(<|im_end|>) right after `<tool_call>\\n`, the mechanism the
collapse runs through. lr: vanilla's success at each lr, drawn only when the grid swept the lr. Seeds are
aligned on their logged step numbers; missing (None / NaN) values are skipped, so a step's mean and band use
the seeds that logged it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from collapse_probe.plots.style import OKABE_ITO, P_FLOOR, STYLE, reproducible  # noqa: E402
from collapse_probe.study.rows import group_rows, same_lr  # noqa: E402

__all__ = ["METHOD_COLOURS", "plot_study", "trace_band"]

METHOD_COLOURS = {"vanilla": OKABE_ITO["vermillion"], "interleaved": OKABE_ITO["blue"],
                  "off-policy": OKABE_ITO["orange"], "hint": OKABE_ITO["sky"], "error-sft": OKABE_ITO["purple"],
                  "reflection": OKABE_ITO["green"]}
_SPARE = [OKABE_ITO["black"], OKABE_ITO["yellow"], "0.5"]
_LR_COLOURS = [OKABE_ITO[c] for c in ("sky", "blue", "vermillion", "purple", "orange", "black")]  # low -> high
FIGSIZE = (3.4, 2.7)


def trace_band(rows: Iterable[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, min, max) over the rows' `trace[key]`, aligned on trace["step"]; steps no seed logged a
    finite value at are dropped. Empty arrays when no row has the trace."""
    per_step: dict[int, list[float]] = {}
    for row in rows:
        trace = row.get("trace") or {}
        for step, value in zip(trace.get("step") or [], trace.get(key) or []):
            if value is None or step is None:
                continue
            value = float(value)
            if math.isfinite(value):
                per_step.setdefault(int(step), []).append(value)
    steps = sorted(per_step)
    vals = [np.asarray(per_step[s]) for s in steps]
    return (np.asarray(steps, dtype=float), np.array([v.mean() for v in vals]),
            np.array([v.min() for v in vals]), np.array([v.max() for v in vals]))


def _colour(method: str, spare: dict) -> str:
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    return spare.setdefault(method, _SPARE[len(spare) % len(_SPARE)])


def _save(fig, stem: Path) -> Path:
    """PDF then PNG, each to a temp name in the same directory and os.replace'd (never a half-written file)."""
    for ext in ("pdf", "png"):
        tmp = stem.parent / f".{stem.name}.{os.getpid()}.{ext}.tmp"  # matplotlib opens it: the umask sets the mode
        try:
            fig.savefig(tmp, format=ext, dpi=200 if ext == "png" else None, metadata=reproducible(ext))
            os.replace(tmp, stem.parent / f"{stem.name}.{ext}")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    plt.close(fig)
    return stem.parent / f"{stem.name}.png"


def _bands(ax, series: Sequence[tuple[str, str, list[dict]]], key: str, *, floor: float | None = None) -> bool:
    """One mean line + min-max band per (label, colour, rows); False when nothing had the trace."""
    drawn = False
    for label, colour, group in series:
        steps, mean, lo, hi = trace_band(group, key)
        if steps.size == 0:
            continue
        if floor is not None:  # a log axis cannot show 0: clip to the floor (as plots.py does)
            mean, lo, hi = (np.clip(a, floor, None) for a in (mean, lo, hi))
        ax.fill_between(steps, lo, hi, color=colour, alpha=0.18, linewidth=0)
        ax.plot(steps, mean, color=colour, label=label, marker="o" if steps.size == 1 else None, ms=2.5)
        drawn = True
    return drawn


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} traces logged", ha="center", va="center", transform=ax.transAxes, color="0.4")


def _legend(ax, n: int) -> None:
    """Above the axes: the bands fill most of the plot, and a legend inside would hide some."""
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(n, 3), handlelength=1.4, columnspacing=0.8,
              borderaxespad=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # RL steps are whole numbers


def _main_series(rows: Sequence[dict], main_lr: float) -> list[tuple[str, str, list[dict]]]:
    spare: dict[str, str] = {}
    return [(f"{m} (n={len(g)})", _colour(m, spare), g) for (m, lr), g in group_rows(rows).items()
            if same_lr(lr, main_lr)]


def _success_figure(series, out: Path, name: str = "success") -> Path:
    """Sampled success per RL step, one mean line and seed band per series (methods, or vanilla's lrs)."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=FIGSIZE)
        if _bands(ax, series, "success"):
            _legend(ax, len(series))
        else:
            _empty(ax, "success")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("RL step")
        ax.set_ylabel("sampled success")
        fig.tight_layout()
        return _save(fig, out / name)


def _p_eot_figure(series, out: Path) -> Path:
    bands = [trace_band(g, "p_eot") for _, _, g in series]
    lows = np.concatenate([b[2] for b in bands] + [np.empty(0)])
    highs = np.concatenate([b[3] for b in bands] + [np.empty(0)])
    # log only when the values span more than a decade above the floor; otherwise linear reads better
    log = highs.size > 0 and highs.max() / max(lows.min(), P_FLOOR) > 10
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=FIGSIZE)
        if _bands(ax, series, "p_eot", floor=P_FLOOR if log else None):
            _legend(ax, len(series))
        else:
            _empty(ax, "p_eot")
        if log:
            ax.set_yscale("log")
            ax.set_ylim(P_FLOOR, 1.3)
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel("RL step")
        ax.set_ylabel(r"p(<|im_end|> after <tool_call>\n)")
        fig.tight_layout()
        return _save(fig, out / "p_eot")


def _lr_figure(vanilla: list[tuple[float, list[dict]]], main_lr: float, out: Path) -> Path:
    series = [(f"lr {lr:g}{' (main)' if same_lr(lr, main_lr) else ''} (n={len(g)})",
               _LR_COLOURS[i % len(_LR_COLOURS)], g) for i, (lr, g) in enumerate(vanilla)]
    return _success_figure(series, out, "lr")


def _methods_figure(series, out: Path) -> Path:
    """Small multiples: one column per method, success above and p(end-of-turn after the tag) below, each
    method's seed band against vanilla's mean (dashed grey), so no band hides another."""
    reference = next((g for label, _, g in series if label.startswith("vanilla ")), None)
    n = max(len(series), 1)
    p_all = np.concatenate([trace_band(g, "p_eot")[3] for _, _, g in series] + [np.empty(0)])
    log = p_all.size > 0 and p_all.max() > 10 * P_FLOOR
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, n, figsize=(1.25 * n + 0.6, 3.2), sharex=True, sharey="row", squeeze=False)
        for j, (label, colour, group) in enumerate(series):
            for i, key in enumerate(("success", "p_eot")):
                ax = axes[i, j]
                floor = P_FLOOR if key == "p_eot" and log else None
                if reference is not None and group is not reference:
                    steps, mean, _, _ = trace_band(reference, key)
                    ax.plot(steps, np.clip(mean, floor, None) if floor else mean, color="0.55", lw=0.9, ls="--")
                _bands(ax, [(label, colour, group)], key, floor=floor)
                ax.xaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
            axes[0, j].set_title(label.split(" (")[0], fontsize=8, color=colour)
            axes[1, j].set_xlabel("RL step")
        axes[0, 0].set_ylim(-0.02, 1.02)
        axes[0, 0].set_ylabel("sampled success")
        axes[1, 0].set_ylabel("p(<|im_end|> | <tool_call>\\n)")
        if log:
            axes[1, 0].set_yscale("log")
            axes[1, 0].set_ylim(P_FLOOR, 1.3)
        fig.tight_layout(pad=0.4, w_pad=0.3, h_pad=0.5)
        return _save(fig, out / "methods")


def plot_study(rows: Sequence[dict], out_dir: Path | str, *, main_lr: float) -> list[Path]:
    """Write success, p_eot (and lr, when vanilla ran at >= 2 lrs) as .png + .pdf into `out_dir`; returns the
    PNG paths. A figure with no traces to draw still gets written, saying so, so the report's links hold."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    series = _main_series(rows, main_lr)
    paths = [_methods_figure(series, out), _success_figure(series, out), _p_eot_figure(series, out)]
    vanilla = [(lr, g) for (m, lr), g in group_rows(rows).items() if m == "vanilla"]
    if len(vanilla) >= 2:
        paths.append(_lr_figure(vanilla, main_lr, out))
    return paths
