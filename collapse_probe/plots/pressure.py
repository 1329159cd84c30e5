"""The gradient-pressure figure: why a control token rose, from the run's own `gp/` records.

The policy-gradient push on the logit of token k at a decision position is adv x (1[k = sampled] - p_k). The
trainer logs it split in two (schema.Part): "chosen", from samples that picked k, and "other", from samples that
picked another token (a negative-advantage sample that picked `{"` pushes every other token up in proportion
to its probability). Panel (a): both parts for end-of-turn and `{"` right after `<tool_call>\\n`, smoothed over
a few steps, with their cumulative sum in (b); panel (c): the on-policy p(end-of-turn) at the same position.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from collapse_probe import schema  # noqa: E402
from collapse_probe.errors import UserError  # noqa: E402
from collapse_probe.plots.style import OKABE_ITO, STYLE, reproducible  # noqa: E402
from collapse_probe.runs.timeline import Timeline  # noqa: E402

ROLES = (("end_of_turn", "end-of-turn", OKABE_ITO["vermillion"]), ("json_open", '{"', OKABE_ITO["green"]))
PARTS = ((schema.Part.CHOSEN, "-"), (schema.Part.OTHER, "--"))


def pressure_series(tl: Timeline, position: str = schema.Position.AFTER_OPEN.value) -> dict[str, np.ndarray]:
    """{"<role>/<part>": values per step} for the roles of ROLES (NaN where a step has no record)."""
    out = {}
    for role, _, _ in ROLES:
        for part, _ in PARTS:
            key = schema.gp_key(position, role, part)
            if tl.has(key):
                out[f"{role}/{part.value}"] = tl.series(key).reindex(tl.steps).to_numpy(dtype=float)
    return out


def plot_pressure(tl: Timeline, out_stem: Path | str, *, position: str = schema.Position.AFTER_OPEN.value,
                  smooth: int = 3, title: str | None = None) -> list[Path]:
    """Write `out_stem`.pdf/.svg/.png; returns the paths. UserError when the run logged no gradient pressure
    (our trainer logs it for GRPO steps; a callback run has no advantages to split)."""
    series = pressure_series(tl, position)
    if not series:
        raise UserError(f"{tl.path or 'the run'} has no gp/{position}/ records: gradient pressure is logged by "
                        "collapse-probe's GRPO trainer (train --preset grpo-...)")
    steps = np.asarray(tl.steps, dtype=float)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(3, 1, figsize=(3.4, 4.2), sharex=True,
                                 gridspec_kw={"height_ratios": [1.2, 1.0, 0.8]})
        for role, label, colour in ROLES:
            for part, ls in PARTS:
                v = series.get(f"{role}/{part.value}")
                if v is None:
                    continue
                filled = np.nan_to_num(v)
                k = max(1, smooth)
                sm = np.convolve(filled, np.ones(k) / k, mode="same")
                axes[0].plot(steps, sm, ls, color=colour, label=f"{label} {part.value}")
                axes[1].plot(steps, np.cumsum(filled), ls, color=colour)
        for ax in axes[:2]:
            ax.axhline(0, color="0.6", lw=0.5)
        axes[0].set_ylabel(f"push on logit\n(mean of {max(1, smooth)} steps)")
        axes[1].set_ylabel("cumulative push")
        axes[0].legend(ncol=2, loc="best")
        p_key = schema.cp_key(schema.Source.ROLLOUT, position, "end_of_turn")
        if tl.has(p_key):
            axes[2].semilogy(steps, tl.series(p_key).reindex(tl.steps).clip(lower=1e-5), color=ROLES[0][2])
        axes[2].set_ylabel("p(end-of-turn)\non-policy")
        axes[2].set_xlabel("step")
        axes[0].set_title(title or f"gradient pressure at {position}")
        fig.align_ylabels(axes)
        fig.tight_layout()
        stem = Path(out_stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        paths = [stem.with_suffix(f".{ext}") for ext in ("pdf", "svg", "png")]
        for p in paths:
            fig.savefig(p, dpi=200 if p.suffix == ".png" else None, metadata=reproducible(p.suffix))
        plt.close(fig)
    return paths
