"""Results are never silently replaced (issue 22): a report directory holding another configuration's results is
kept unless --overwrite, and `study --fast` / `demo --fast` write elsewhere by default. The real CLI in a
subprocess, in a temp directory laid out like a clone (the committed reports/ copied in)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from helpers.cli import run_cli
from helpers.runs import write_run

REPO = Path(__file__).resolve().parents[1]


def _digest(d: Path) -> dict:
    """Every file under `d` with the hash of its bytes: equal digests mean byte-identical contents."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def _clone(tmp_path: Path, *dirs: str) -> Path:
    clone = tmp_path / "clone"
    for d in dirs:
        shutil.copytree(REPO / "reports" / d, clone / "reports" / d)
    return clone


def _one_line_refusal(proc, *words):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert all(w in lines[0] for w in ("kept", "--overwrite", *words)), lines[0]


def test_study_fast_refuses_the_committed_study_before_any_work(tmp_path):
    clone = _clone(tmp_path, "study")
    before = _digest(clone / "reports" / "study")
    proc, wall = run_cli(["study", "--fast", "--report", "reports/study"], cwd=clone, timeout=120)
    _one_line_refusal(proc, "reports/study")
    assert _digest(clone / "reports" / "study") == before and not (clone / "runs").exists()


@pytest.mark.slow
def test_study_fast_in_a_clone_leaves_the_committed_study_byte_identical(tmp_path):
    clone = _clone(tmp_path, "study")
    before = _digest(clone / "reports" / "study")
    proc, _ = run_cli(["study", "--fast", "--json"], cwd=clone, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _digest(clone / "reports" / "study") == before
    assert json.loads(proc.stdout)["report"] == "runs/study-fast/report/report.md"
    assert (clone / "runs" / "study-fast" / "report" / "report.md").stat().st_size > 100


def test_demo_fast_refuses_the_committed_demo(tmp_path):
    clone = _clone(tmp_path, "demo")
    before = _digest(clone / "reports" / "demo")
    proc, _ = run_cli(["demo", "--fast", "--out", "reports/demo"], cwd=clone, timeout=120)
    _one_line_refusal(proc, "reports/demo")
    assert _digest(clone / "reports" / "demo") == before


def test_report_and_plot_keep_another_runs_results_unless_overwrite(tmp_path):
    a, b = write_run(tmp_path / "a" / "exp"), write_run(tmp_path / "b" / "exp", collapse=False)  # same name
    proc, _ = run_cli(["report", str(a), "--json"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "reports" / "exp"
    first = _digest(out)
    assert "report.md" in first and "timeline.png" in first
    again, _ = run_cli(["report", str(a / "metrics.jsonl")], cwd=tmp_path, timeout=120)  # the same run: refreshed
    assert again.returncode == 0, again.stderr
    other, _ = run_cli(["report", str(b)], cwd=tmp_path, timeout=120)
    _one_line_refusal(other, "reports/exp")
    kept = _digest(out)
    plot, _ = run_cli(["plot", str(b)], cwd=tmp_path, timeout=120)  # the figures of run a are kept too
    _one_line_refusal(plot)
    assert _digest(out) == kept
    forced, _ = run_cli(["report", str(b), "--overwrite"], cwd=tmp_path, timeout=120)
    assert forced.returncode == 0, forced.stderr
    assert _digest(out)["report.md"] != kept["report.md"]
    # a figure written beside unrelated files replaces nothing: allowed
    fig, _ = run_cli(["plot", str(a), "--out", str(tmp_path / "a" / "fig")], cwd=tmp_path, timeout=120)
    assert fig.returncode == 0, fig.stderr
