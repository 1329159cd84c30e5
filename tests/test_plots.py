"""plot_timeline writes a non-trivial PDF, SVG and PNG for a collapsing run, a stable run and a sparse run."""

import numpy as np
import pytest

from collapse_probe.detect.monitor import replay
from collapse_probe.errors import UserError
from collapse_probe.plots.timeline import plot_timeline
from collapse_probe.runs.timeline import Timeline


def _run(collapse: bool, seed: int = 0, n: int = 100) -> list[dict]:
    """Small synthetic run: p(end_of_turn after open) 0.02 -> 0.5 from step 40, breakage from 50, drop at 60."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    ramp = np.clip((t - 40) / 15, 0, 1) if collapse else np.zeros(n)
    broken = np.clip((t - 50) / 12, 0, 1) if collapse else np.zeros(n)
    drop = np.clip((t - 58) / 12, 0, 1) if collapse else np.zeros(n)
    lo = np.log(0.02 / 0.98)
    eot = 1 / (1 + np.exp(-(lo * (1 - ramp) + rng.normal(0, 0.3, n))))
    recs = []
    for i in t:
        fc, tp = 0.01 + 0.7 * broken[i], 0.02 + 0.06 * broken[i]
        hr = 0.1 * (1 - broken[i])
        succ = rng.binomial(60, 0.9 - 0.8 * drop[i]) / 60
        recs.append({"step": int(i), "cp/rollout/after_open/end_of_turn": float(eot[i]),
                     "cp/rollout/after_open/json_open": float(0.99 - eot[i]),
                     "cp/rollout/after_open/tool_open": float(0.004 * np.exp(rng.normal(0, 0.3))),
                     "cp/probe/after_open/end_of_turn": float(0.03 + 0.07 * ramp[i]),
                     "cp/rollout/turn_start/tool_open": 0.75,
                     "fmt/healthy_tool_call": 1 - fc - tp - hr, "fmt/healthy_response": hr,
                     "fmt/text_pollution": tp, "fmt/full_collapse": fc, "success": succ, "reward/mean": 2 * succ - 1})
    return recs


def _check(paths, stem):
    assert [p.name for p in paths] == [f"{stem.name}.pdf", f"{stem.name}.svg", f"{stem.name}.png"]
    pdf, svg, png = paths
    assert pdf.read_bytes()[:4] == b"%PDF"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert b"<svg" in svg.read_bytes()[:2000]


def test_plot_collapsing_run_with_verdict(tmp_path):
    tl = Timeline.from_records(_run(True))
    verdict = replay(tl.records())
    assert verdict.collapsed and verdict.lead_steps > 0
    stem = tmp_path / "figs" / "run.timeline"  # a dot in the stem must not be taken for a suffix
    paths = plot_timeline(tl, verdict, stem, title="synthetic collapse")
    _check(paths, stem)
    svg = paths[1].read_text()
    assert "spike" in svg and "collapse" in svg and f"lead {verdict.lead_steps} steps" in svg


def test_plot_stable_run_without_verdict(tmp_path):
    tl = Timeline.from_records(_run(False, seed=1))
    _check(plot_timeline(tl, None, tmp_path / "stable"), tmp_path / "stable")


def test_plot_sparse_run(tmp_path):
    recs = [{"step": r["step"], "cp/rollout/after_open/end_of_turn": r["cp/rollout/after_open/end_of_turn"],
             "reward/mean": r["reward/mean"]} for r in _run(True, seed=2)]
    tl = Timeline.from_records(recs)
    _check(plot_timeline(tl, replay(tl.records()), tmp_path / "sparse"), tmp_path / "sparse")


@pytest.mark.parametrize("n", [1, 2, 3])
def test_plot_a_run_of_a_few_steps(tmp_path, n):
    """The state labels sit at an inner step; a run of 1-3 steps has none and takes its own."""
    tl = Timeline.from_records(_run(False, seed=3, n=n))
    _check(plot_timeline(tl, None, tmp_path / "short"), tmp_path / "short")


def test_plot_empty_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        plot_timeline(Timeline.from_records([]), None, tmp_path / "empty")
