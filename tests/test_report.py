"""`plot` writes the timeline as PDF/SVG/PNG; `report` writes a Markdown report referencing the PNG."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from collapse_probe.cli.app import app
from collapse_probe.commands.report import run_name, write_report
from helpers.runs import snapshot, write_run

runner = CliRunner()


def test_plot_default_and_explicit_out(tmp_path, monkeypatch):
    run = write_run(tmp_path / "runs" / "grpo-a", True)
    before = snapshot(run)
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["plot", str(run)])
    assert res.exit_code == 0, res.output
    paths = [Path(line) for line in res.stdout.split()]
    assert [p.as_posix() for p in paths] == [f"reports/grpo-a/timeline.{e}" for e in ("pdf", "svg", "png")]
    assert paths[0].read_bytes()[:4] == b"%PDF" and paths[2].read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in paths[1].read_bytes()[:2000]
    res = runner.invoke(app, ["plot", str(run / "metrics.jsonl"), "--out", str(tmp_path / "figs" / "x.png")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [".collapse-probe.json", "x.pdf", "x.png",
                                                                     "x.svg"]  # + what made them (issue 22)
    assert snapshot(run) == before


def test_report_markdown(tmp_path, monkeypatch):
    # a callback layout: OUTPUT_DIR/collapse_probe/metrics.jsonl; the run is named after OUTPUT_DIR
    out_dir = tmp_path / "trl-out"
    write_run(out_dir / "collapse_probe", True)
    assert run_name(out_dir) == "trl-out"
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["report", str(out_dir)])
    assert res.exit_code == 0, res.output
    md_path = Path(res.stdout.strip())
    assert md_path.as_posix() == "reports/trl-out/report.md"
    md = md_path.read_text()
    assert "![timeline](timeline.png)" in md and (md_path.parent / "timeline.png").is_file()
    assert "**Collapsed: yes.**" in md and "| control-token spike (ours) |" in md
    assert "baseline: entropy drop" in md and "| bare_open_tag | full_collapse |" in md
    assert '"preset": "synthetic"' in md  # the run's config

    stable = write_run(tmp_path / "stable", False, seed=1)
    p = write_report(stable, tmp_path / "rep", extra_sections=[("Recovery", "10 SFT steps: success 0.97.")])
    md = p.read_text()
    assert p == tmp_path / "rep" / "report.md" and "**Collapsed: no.**" in md
    assert md.rstrip().endswith("10 SFT steps: success 0.97.") and "## Recovery" in md
    assert (tmp_path / "rep" / "timeline.png").is_file()


def test_report_says_which_reward_trained_the_run(tmp_path):
    import json

    from collapse_probe.train.presets import get_preset

    for preset, words in (("grpo-collapse", "format-bonus reward hacking"),
                          ("grpo-outcome", "binary outcome (1.0 correct, 0.0 wrong, no format term), paper-like")):
        run = write_run(tmp_path / preset, True)
        (run / "config.json").write_text(get_preset(preset).to_json())
        md = write_report(run, tmp_path / f"rep-{preset}").read_text()
        assert words in md, md[:2000]
    run = write_run(tmp_path / "trl", True)  # another trainer's config: no reward sentence
    (run / "config.json").write_text(json.dumps({"source": "callback"}))
    assert "Reward:" not in write_report(run, tmp_path / "rep-trl").read_text()


def test_report_names_the_supervisory_signals_a_run_trained_with(tmp_path):
    from collapse_probe.train.config import apply_overrides
    from collapse_probe.train.presets import get_preset

    cfg = apply_overrides(get_preset("grpo-outcome"), ["offpolicy_samples=1", "hint_samples=2",
                                                       "error_sft_every=4", "reflection=true"])
    run = write_run(tmp_path / "signals", True)
    (run / "config.json").write_text(cfg.to_json())
    md = write_report(run, tmp_path / "rep").read_text()
    assert ("Supervisory signals: 1 of 8 samples per group the oracle's trajectory (off-policy, weighted p/(p+0.1)); "
            "2 of 8 sampled with a hint (removed for the loss); SFT on the failed prompts' corrected turns and the "
            "rule judge's reflections every 4 RL steps. Reward: binary outcome") in md
    (run / "config.json").write_text(get_preset("grpo-outcome").to_json())
    assert "Supervisory signals" not in write_report(run, tmp_path / "rep2").read_text()
