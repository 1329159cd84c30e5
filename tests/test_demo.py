"""`collapse-probe demo --fast`: the whole pipeline end to end on tiny budgets (no real collapse)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_fast_writes_report_figures_and_summary(tmp_path):
    env = {**os.environ, "COLLAPSE_PROBE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", "from collapse_probe.cli.app import main; main()", "demo", "--fast",
                           "--json", "--out", str(tmp_path / "report"), "--work", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("collapsed", "spike_step", "collapse_step", "lead_steps", "first_alert_step", "recovery", "report"):
        assert key in summary
    report = tmp_path / "report"
    md = (report / "report.md").read_text()
    assert "timeline" in md and "Recovery" in md
    assert (report / "timeline.png").stat().st_size > 10_000
    assert (report / "timeline.pdf").read_bytes()[:4] == b"%PDF"
    rec = json.loads((report / "recovery.json").read_text())
    assert {"canonical", "formats", "masked", "repair"} <= set(rec)
    assert json.loads((report / "verdict.json").read_text())["collapsed"] in (True, False)
