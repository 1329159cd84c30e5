"""A verdict never claims what it did not see (issue 22): a bare verl file log whose score fell 0.62 -> 0.05, with
no rollout dumps and no control-token captures, is an unconfirmed collapse in `analyze` (JSON and text), and
`--fail-on collapse` fails on it (a gate fails closed). The real CLI in a subprocess."""

import json

from helpers.cli import run_cli


def _bare_verl_log(path, *, drop: int = 20, n: int = 40):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(1, n + 1):
        score = 0.62 if s < drop else 0.05
        lines.append(json.dumps({"step": s, "data": {"critic/score/mean": score, "actor/entropy": 0.8,
                                                     "actor/grad_norm": 1.0, "response_length/mean": 120.0}}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_analyze_json_does_not_say_false_on_a_drop_it_cannot_explain(tmp_path):
    log = _bare_verl_log(tmp_path / "verl" / "exp.jsonl")
    proc, _ = run_cli(["analyze", str(log), "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["collapsed"] is None and d["status"] == "unconfirmed" and d["collapse_step"] == 20
    assert any("rollout_data_dir" in c for c in d["confirm_with"])
    assert any("collapse_probe.integrations.verl" in c for c in d["confirm_with"])


def test_analyze_text_names_the_missing_data(tmp_path):
    log = _bare_verl_log(tmp_path / "verl" / "exp.jsonl")
    proc, _ = run_cli(["analyze", str(log)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "collapsed: UNCONFIRMED" in text and "no control-token or format data" in text
    assert "rollout_data_dir" in text and "CollapseProbeCallback" in text
    assert "turns stay well-formed" not in text  # it read no turn at all


def test_fail_on_collapse_fails_closed(tmp_path):
    log = _bare_verl_log(tmp_path / "verl" / "exp.jsonl")
    for gate in ("collapse", "warning"):
        proc, _ = run_cli(["analyze", str(log), "--fail-on", gate, "--json"], cwd=tmp_path)
        assert proc.returncode == 3, (gate, proc.returncode, proc.stderr)
    # a run whose reward never fell passes the gate
    flat = tmp_path / "flat" / "exp.jsonl"
    _bare_verl_log(flat, drop=10_000)
    proc, _ = run_cli(["analyze", str(flat), "--fail-on", "collapse", "--json"], cwd=tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout)["status"] == "healthy"
