"""`collapse-probe study --fast`: the whole grid on tiny budgets, resumable, with the table, figures and claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-c", "from collapse_probe.cli.app import main; main()"]


def _study(tmp_path, *args):
    env = {**os.environ, "COLLAPSE_PROBE_CACHE": str(tmp_path / "cache")}
    return subprocess.run([*CLI, "study", "--fast", "--out", str(tmp_path / "runs"), "--report",
                           str(tmp_path / "report"), *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_study_fast_writes_table_figures_and_claims_and_resumes(tmp_path):
    proc = _study(tmp_path, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    methods = [r["method"] for r in res["table"]]
    assert methods == ["vanilla", "vanilla", "interleaved", "off-policy", "hint", "error-sft", "reflection"]
    assert [c["claim"] for c in res["claims"]][0] == "Vanilla RL collapses"
    assert all(c["holds"] in (True, False, None) and c["evidence"] for c in res["claims"])
    report = tmp_path / "report"
    for name in ("table.md", "table.json", "claims.md", "report.md"):
        assert (report / name).stat().st_size > 100, name
    for name in ("methods.png", "success.png", "p_eot.png", "lr.png"):
        assert (report / name).stat().st_size > 5_000, name
    md = (report / "report.md").read_text()
    assert "The paper's claims" in md and "| method |" in md and "![" in md
    rows = json.loads((report / "table.json").read_text())["rows"]
    assert len(rows) == 7 and all(set(r["format_ood"]) == {"python_list", "json"} for r in rows)
    assert all(set(r["content_ood"]) == {"reworded", "renamed_tools"} for r in rows)
    reflection = tmp_path / "runs" / "reflection-lr0.002-s0" / "config.json"
    assert json.loads(reflection.read_text())["reflection"] is True
    # resumable: a second call trains nothing (every run's study.json kept as written)
    saved = {p: p.read_bytes() for p in (tmp_path / "runs").glob("*/study.json")}
    again = _study(tmp_path, "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.read_bytes() for p in saved} == saved and json.loads(again.stdout)["table"] == res["table"]


@pytest.mark.parametrize("args, message", [
    (["--methods", "vanilla,bogus"], "unknown method 'bogus'"),
    (["--lr-sweep", "1e-3,x"], "--lr-sweep takes comma-separated numbers"),
])
def test_bad_study_input_is_one_line_exit_1(tmp_path, args, message):
    proc = _study(tmp_path, *args)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()
