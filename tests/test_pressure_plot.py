"""`plot --pressure`: the gradient-pressure figure from a run's gp/ records."""
import json

from typer.testing import CliRunner

from collapse_probe import schema
from collapse_probe.cli.app import app
from collapse_probe.plots.pressure import pressure_series
from collapse_probe.runs.timeline import Timeline
from helpers.cli import run_cli

runner = CliRunner()
AO = schema.Position.AFTER_OPEN


def _run(tmp_path, with_gp=True):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(12):
            rec = {"step": step, schema.SUCCESS: 0.7, schema.cp_key(schema.Source.ROLLOUT, AO, "end_of_turn"): 0.01}
            if with_gp:
                rec[schema.gp_key(AO, "end_of_turn", schema.Part.CHOSEN)] = -0.01 if step % 3 == 0 else 0.0
                rec[schema.gp_key(AO, "end_of_turn", schema.Part.OTHER)] = 0.001 * step
                rec[schema.gp_key(AO, "json_open", schema.Part.OTHER)] = 0.01 if step % 3 == 0 else 0.0
            f.write(json.dumps(rec) + "\n")
    return run


def test_pressure_series_and_figure(tmp_path):
    run = _run(tmp_path)
    series = pressure_series(Timeline.from_run(run))
    assert set(series) == {"end_of_turn/chosen", "end_of_turn/other", "json_open/other"}
    assert series["end_of_turn/other"][5] == 0.005 and len(series["end_of_turn/chosen"]) == 12
    res = runner.invoke(app, ["plot", str(run), "--pressure", "--out", str(tmp_path / "fig" / "p"), "--json"])
    assert res.exit_code == 0, res.output
    paths = json.loads(res.stdout)["figures"]
    assert [p.rsplit(".", 1)[1] for p in paths] == ["pdf", "svg", "png"]
    assert (tmp_path / "fig" / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_without_gradient_pressure_is_one_line(tmp_path):
    run = _run(tmp_path, with_gp=False)
    proc, _ = run_cli(["plot", str(run), "--pressure", "--out", str(tmp_path / "p")], tmp_path)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no gp/after_open/ records" in proc.stderr and "Traceback" not in proc.stderr
