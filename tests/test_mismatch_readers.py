"""Other trainers' mismatch metrics read into the schema and used by the monitor (a peer baseline): a verl
file-logger log whose rollout_corr/* and training/rollout_probs_diff_* come from verl's own functions, and a TRL
output dir with sampling/* (tests/fixtures/mismatch, written by tests/helpers/mismatch_fixtures.py)."""
import json
from pathlib import Path

from helpers.runs import synthetic_records
from typer.testing import CliRunner

from collapse_probe import schema
from collapse_probe.cli.app import app
from collapse_probe.detect.mismatch import KIND, mismatch_value
from collapse_probe.detect.monitor import metric_value, replay
from collapse_probe.runs.hf_output import read_hf_output
from collapse_probe.runs.joined import read_records

FIX = Path(__file__).parent / "fixtures" / "mismatch"
DRIFT, DROP = 10, 18  # the fixtures' sampler drifts from step 10; the score falls at step 18


def test_verl_mismatch_metrics_map_to_ours_and_warn_before_the_drop():
    recs = read_records(FIX / "verl_exp.jsonl")
    assert len(recs) == 30
    r = recs[-1]
    assert metric_value(r, schema.MM_K3_KL) == r["rollout_corr/k3_kl"]
    assert metric_value(r, schema.MM_ABS_PROB_DIFF) == r["training/rollout_probs_diff_mean"]
    assert metric_value(r, schema.MM_IS_MEAN) == r["rollout_corr/rollout_is_mean"]
    assert mismatch_value(r) == r["rollout_corr/k3_kl"]
    v = replay(recs)
    b = v.baselines[KIND]
    assert b["logged"] is True and v.collapse_step == DROP
    assert DRIFT < b["detected_at"] < DROP and b["lead_steps"] > 0


def test_trl_sampling_metrics_map_to_ours():
    recs = read_hf_output(FIX / "trl_out")
    r = recs[-1]
    assert metric_value(r, schema.MM_ABS_LOG_RATIO) == r["sampling/sampling_logp_difference/mean"]
    assert metric_value(r, schema.MM_IS_MAX) == r["sampling/importance_sampling_ratio/max"]
    assert schema.mismatch_series_key(r) in (schema.MM_ABS_LOG_RATIO, "sampling/sampling_logp_difference/mean")
    b = replay(recs).baselines[KIND]
    assert b["logged"] is True and DRIFT < b["detected_at"] < DROP


def test_cli_analyze_reports_the_mismatch_baseline():
    for path in (FIX / "verl_exp.jsonl", FIX / "trl_out"):
        res = CliRunner().invoke(app, ["analyze", str(path), "--json"])
        assert res.exit_code == 0, res.output
        b = json.loads(res.stdout)["baselines"][KIND]
        assert b["logged"] is True and b["detected_at"] is not None and b["lead_steps"] > 0, (path, b)
        res = CliRunner().invoke(app, ["analyze", str(path)])
        assert f"baseline {KIND}: alert at step" in res.stdout


def test_runs_without_mismatch_metrics_say_not_logged():
    v = replay(synthetic_records(collapse=True))
    assert v.baselines[KIND]["logged"] is False and f"baseline {KIND}: not logged" in v.summary()


def test_plot_draws_the_mismatch_under_the_probabilities(tmp_path):
    from collapse_probe.plots.timeline import plot_timeline
    from collapse_probe.runs.timeline import Timeline

    recs = synthetic_records(collapse=True)
    ao = schema.Position.AFTER_OPEN.value
    for r in recs:  # our trainer's keys: the sampler's p(eot) and per-role k3 beside the trainer's
        t = r["step"]
        r[schema.mm_key(ao, "end_of_turn", "q")] = 0.5 * r["cp/rollout/after_open/end_of_turn"]
        r[schema.mm_key(ao, "end_of_turn", "k3")] = 1e-4 * (1 + max(0, t - 15))
        r[schema.mm_key(ao, "json_open", "k3")] = 1e-5
        r[schema.MM_K3_KL] = 1e-3 * (1 + max(0, t - 15))
    verl = Timeline.from_records(read_records(FIX / "verl_exp.jsonl"))
    for tl, name in ((Timeline.from_records(recs), "ours"), (verl, "verl")):
        paths = plot_timeline(tl, replay(tl.records()), tmp_path / name)
        svg = paths[1].read_text()
        assert "mismatch (k3)" in svg and paths[2].stat().st_size > 20_000, name
    assert "sampler" in (tmp_path / "ours.svg").read_text()
