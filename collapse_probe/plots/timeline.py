"""Paper-quality spike timeline of one run (one-column figure, PDF + SVG + PNG).

Panels share the step axis: (a) control-token probabilities at the decision positions on a log axis
(rollout solid, probe dashed, turn start thin; the rollout engine's own probability dash-dotted where the run
logged it), then, when the run logged a training-inference mismatch (ours or another trainer's), the mismatch
under them: k3 of the sampled control tokens at after_open per role and the whole-batch series; (b) the
format-state mix as a stacked area, (c) success and mean reward. Detected onsets from a `Verdict` are drawn as vertical lines in every panel, with the lead
between the first warning and the reward drop annotated. Okabe-Ito colours (colour-blind safe).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from collapse_probe.errors import UserError  # noqa: E402
from collapse_probe import schema  # noqa: E402
from collapse_probe.plots.style import (  # noqa: E402
    OKABE_ITO, P_FLOOR, ROLE_COLOURS, STATE_COLOURS, STATE_LABELS, STYLE, reproducible,
)
from collapse_probe.runs.timeline import Timeline  # noqa: E402


_SPARE = [OKABE_ITO[c] for c in ("yellow", "sky", "orange", "purple")]


def _role_colour(role: str, spare: dict) -> str:
    if role in ROLE_COLOURS:
        return ROLE_COLOURS[role]
    return spare.setdefault(role, _SPARE[len(spare) % len(_SPARE)])


def _probabilities(ax, tl: Timeline) -> tuple[list[Line2D], list[Line2D]]:
    spare: dict[str, str] = {}
    seen: dict[str, str] = {}
    drawn: set[str] = set()
    rollout, probe = schema.Source.ROLLOUT.value, schema.Source.PROBE.value
    after_open, turn_start = schema.Position.AFTER_OPEN.value, schema.Position.TURN_START.value
    lines = [(rollout, after_open, "-", 1.1, 1.0), (probe, after_open, "--", 1.0, 0.9),
             (rollout, turn_start, ":", 0.9, 0.8)]
    for source, position, ls, lw, alpha in lines:
        for role, s in tl.control_series(source, position).items():
            s = s.dropna()
            if s.empty or s.max() < P_FLOOR * 10:  # hugging the floor: clutter, not information
                continue
            colour = _role_colour(role, spare)
            seen.setdefault(role, colour)
            drawn.add(source if position == after_open else "turn")
            ax.plot(s.index, s.clip(lower=P_FLOOR), ls=ls, lw=lw, color=colour, alpha=alpha)
    for role, colour in list(seen.items()):  # the sampler's probability of the same roles (rollout engine)
        key = schema.mm_key(after_open, role, schema.MismatchStat.Q)
        if tl.has(key) and not (s := tl.series(key).dropna()).empty:
            drawn.add("sampler")
            ax.plot(s.index, s.clip(lower=P_FLOOR), ls="-.", lw=0.9, color=colour, alpha=0.9)
    ax.set_yscale("log")
    ax.set_ylim(P_FLOOR, 1.3)
    ax.set_ylabel("next-token prob.")
    roles = [Line2D([], [], color=c, lw=1.3, label=r.replace("_", " ")) for r, c in seen.items()]
    styles = [Line2D([], [], color="0.3", ls=ls, lw=lw, label=lab) for lab, ls, lw, key in
              (("rollout", "-", 1.1, "rollout"), ("probe", "--", 1.0, "probe"), ("turn start", ":", 0.9, "turn"),
               ("sampler", "-.", 0.9, "sampler"))
              if key in drawn]
    return roles, styles if len(styles) > 1 else []


def _mismatch_keys(tl: Timeline) -> tuple[str | None, dict[str, str]]:
    """(the whole-batch mismatch series key, {role: per-role k3 key at after_open}) the run logged; an on-policy
    run logs exact zeros, which get no panel (nothing to see)."""
    def moved(key: str) -> bool:
        return bool((tl.series(key).abs() > 1e-9).any())

    whole = schema.mismatch_series_key(tl.keys())
    whole = whole if whole is not None and moved(whole) else None
    ao = schema.Position.AFTER_OPEN.value
    roles = {r: schema.mm_key(ao, r, schema.MismatchStat.K3) for r in ("end_of_turn", "json_open", "tool_open")
             if tl.has(schema.mm_key(ao, r, schema.MismatchStat.K3)) and moved(schema.mm_key(ao, r, schema.MismatchStat.K3))}
    return whole, roles


def _mismatch(ax, tl: Timeline, whole: str | None, roles: dict[str, str]) -> None:
    spare: dict[str, str] = {}
    for role, key in roles.items():
        s = tl.series(key).dropna()
        ax.plot(s.index, s.clip(lower=1e-6), lw=1.0, color=_role_colour(role, spare))
    if whole is not None:
        s = tl.series(whole).dropna()
        ax.plot(s.index, s.clip(lower=1e-6), lw=1.1, color="0.2", ls="--")
    ax.set_yscale("log")
    name = "k3" if whole in (None, schema.MM_K3_KL) or "kl" in whole else whole.rsplit("/", 2)[-2]
    ax.set_ylabel(f"mismatch ({name})")


def _states(ax, tl: Timeline) -> None:
    """Stacked area; bands thick enough are labelled in place, thin ones go to a small legend."""
    mix = tl.state_mix().dropna(how="all").fillna(0.0)
    if mix.empty:
        ax.text(0.5, 0.5, "format states not logged", ha="center", va="center", transform=ax.transAxes,
                color="0.4", zorder=5, bbox=dict(boxstyle="square,pad=0.2", fc="white", ec="none"))
    else:
        cols = [c for c in schema.STATES if c in mix]
        polys = ax.stackplot(mix.index, *[mix[c].to_numpy() for c in cols], colors=[STATE_COLOURS[c] for c in cols],
                             alpha=0.85, linewidth=0)
        tops = mix[cols].cumsum(axis=1)
        thin = []
        for c, poly in zip(cols, polys):
            frac = mix[c].rolling(7, center=True, min_periods=1).mean()
            if frac.max() < 0.25:
                thin.append((poly, STATE_LABELS[c]))
                continue
            lo, hi = np.quantile(frac.index, [0.15, 0.85])  # keep the label inside the axes
            inner = frac[(frac.index >= lo) & (frac.index <= hi)]
            x = (inner if len(inner) else frac).idxmax()  # a run of a few steps may have no inner step
            ax.text(x, tops.loc[x, c] - mix.loc[x, c] / 2, STATE_LABELS[c], ha="center", va="center",
                    color="white", fontweight="bold", clip_on=True)
        if thin:
            ax.legend(*zip(*thin), loc="upper left", ncol=len(thin), handlelength=1.0, columnspacing=0.8,
                      borderaxespad=0.1, bbox_to_anchor=(0.0, 1.2))
    ax.set_ylim(0, 1)
    ax.set_ylabel("turn fraction")


def _outcome(ax, tl: Timeline) -> None:
    succ = tl.success()
    ax.plot(succ.index, succ, color=OKABE_ITO["black"], label=str(succ.name))
    reward = tl.series(schema.REWARD_MEAN)
    if tl.has(schema.REWARD_MEAN) and succ.name != schema.REWARD_MEAN and not np.allclose(
            reward.fillna(0).to_numpy(), succ.fillna(0).to_numpy()):
        ax.plot(reward.index, reward, color=OKABE_ITO["blue"], ls="--", lw=0.9, label=schema.REWARD_MEAN)
    lo = np.nanmin(np.r_[succ.to_numpy(), reward.to_numpy(), 0.0])
    hi = np.nanmax(np.r_[succ.to_numpy(), reward.to_numpy(), 1.0])
    ax.set_ylim(lo - 0.02 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set_ylabel("outcome" if len(ax.get_lines()) > 1 else
                  ("success" if succ.name == schema.SUCCESS else "mean reward"))
    ax.set_xlabel("training step")
    if len(ax.get_lines()) > 1:
        ax.legend(loc="upper right", handlelength=1.5, borderaxespad=0.2)


def _onsets(axes, verdict) -> None:
    marks = [(verdict.spike_step, "spike", (0, (3, 1.5))), (verdict.breakage_step, "breakage", (0, (1, 1))),
             (verdict.collapse_step, "reward drop", "-"), (verdict.first_alert_step, "first alert", (0, (6, 2)))]
    marks = sorted((m for m in marks if m[0] is not None), key=lambda m: m[0])
    x0, x1 = axes[0].get_xlim()
    level, prev = 0, None
    for step, label, ls in marks:
        for ax in axes:
            ax.axvline(step, color="0.25", ls=ls, lw=0.8, zorder=3)
        # stagger labels whose lines are close (up to four levels)
        level = (level + 1) % 4 if prev is not None and abs(step - prev) < 0.2 * (x1 - x0) else 0
        prev = step
        axes[0].annotate(label, (step, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 2 + 7 * level),
                         textcoords="offset points", ha="center", va="bottom", fontsize=7, annotation_clip=False)
    # the lead is drawn from the step at which the first alert was available, not from its back-dated onset
    if verdict.first_alert_step is not None and verdict.lead_steps is not None and verdict.lead_steps > 0:
        ax, start = axes[-1], verdict.first_alert_step
        ax.annotate("", xy=(verdict.collapse_step, 0.35), xytext=(start, 0.35), xycoords=("data", "axes fraction"),
                    arrowprops=dict(arrowstyle="<->", lw=0.7, color="0.2", shrinkA=0, shrinkB=0), zorder=4)
        x0, x1 = ax.get_xlim()
        left = (start - x0) > 0.25 * (x1 - x0)  # room for the text left of the arrow (success is high there)
        label = f"lead {verdict.lead_steps} step" + ("" if verdict.lead_steps == 1 else "s")
        ax.annotate(label, (start if left else (start + verdict.collapse_step) / 2,
                    0.35), xycoords=("data", "axes fraction"), xytext=(-3, 0) if left else (0, -2),
                    textcoords="offset points", ha="right" if left else "center", va="center" if left else "top",
                    fontsize=7, zorder=5, bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.85))


def plot_timeline(tl: Timeline, verdict=None, out_stem: Path | str = "timeline", *,
                  title: str | None = None) -> list[Path]:
    """Write `out_stem`.pdf, .svg and .png (200 dpi); returns the three paths."""
    if len(tl) == 0:
        raise UserError("nothing to plot: the run has no logged steps")
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    with plt.rc_context(STYLE):
        whole, mm_roles = _mismatch_keys(tl)
        if whole is None and not mm_roles:
            fig, axes = plt.subplots(3, 1, figsize=(3.4, 4.2), sharex=True, height_ratios=[1.35, 1, 0.9])
        else:  # the mismatch under the probabilities
            fig, axes = plt.subplots(4, 1, figsize=(3.4, 5.2), sharex=True, height_ratios=[1.35, 0.8, 1, 0.9])
            _mismatch(axes[1], tl, whole, mm_roles)
        roles, styles = _probabilities(axes[0], tl)
        _states(axes[-2], tl)
        _outcome(axes[-1], tl)
        steps = tl.steps
        axes[-1].set_xlim(steps.min(), steps.max() if steps.max() > steps.min() else steps.min() + 1)
        if verdict is not None:
            _onsets(axes, verdict)
        for ax, letter in zip(axes, "abcd"):
            ax.text(-0.22, 1.03, f"({letter})", transform=ax.transAxes, fontweight="bold", va="bottom")
        y = 0.955 if title else 1.0
        kw = dict(loc="upper center", handlelength=1.6, columnspacing=1.0, borderaxespad=0.1)
        for row in (roles, styles):
            if row:
                fig.legend(handles=row, ncol=min(len(row), 4), bbox_to_anchor=(0.55, y), **kw)
                y -= 0.04 * -(-len(row) // 4)
        if title:
            fig.suptitle(title, y=0.995, fontsize=8)
        fig.subplots_adjust(left=0.19, right=0.97, bottom=0.09, top=y - (0.095 if verdict is not None else 0.065),
                            hspace=0.36)  # room for up to three staggered onset labels
        fig.align_ylabels(axes)
        paths = [out_stem.parent / f"{out_stem.name}{ext}" for ext in (".pdf", ".svg", ".png")]
        for p in paths:
            fig.savefig(p, dpi=200, metadata=reproducible(p.suffix))
        plt.close(fig)
    return paths
