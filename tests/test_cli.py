"""The CLI as a user meets it: `formats` on hand-made samples, `tokens`, `export`, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
CLI = [sys.executable, "-c", "from collapse_probe.cli.app import main; main()"]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "160"}  # a wide terminal, as a user reading the table would have
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120, env=env)


def test_formats_classifies_every_hand_made_sample_as_documented():
    tools = ",".join(json.loads((FIXTURES / "known_tools.json").read_text()))
    proc = run("formats", FIXTURES / "samples.jsonl", "--json", "--known-tools", tools)
    assert proc.returncode == 0, proc.stderr
    groups = json.loads(proc.stdout)["groups"]
    samples = [json.loads(line) for line in (FIXTURES / "samples.jsonl").read_text().splitlines() if line.strip()]
    # Each sample's group is its expected state: every turn of a group must land in that state.
    for group, expected in Counter(s["group"] for s in samples).items():
        assert groups[group]["turns"] == expected
        assert groups[group][group] == expected, (group, groups[group])
    reasons = Counter(s["expected_reason"] for s in samples)
    got = Counter()
    for g in groups.values():
        got.update(g["reasons"])
    assert got == reasons


def test_formats_table_and_llama_syntax():
    proc = run("formats", FIXTURES / "samples_llama3.jsonl", "--format", "llama3")
    assert proc.returncode == 0, proc.stderr
    assert "tool call" in proc.stdout and "collapse" in proc.stdout


@pytest.mark.parametrize("make_bad, needle", [
    (lambda d: d / "missing.jsonl", "no such file"),
    (lambda d: (d / "notjsonl.jsonl").write_text("this is not json\nnor this\n") and d / "notjsonl.jsonl", "JSON"),
    (lambda d: (d / "empty.jsonl").write_text("") or d / "empty.jsonl", "empty"),
])
def test_formats_bad_input_is_one_line_exit_1(tmp_path, make_bad, needle):
    proc = run("formats", make_bad(tmp_path), "--json")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert needle.lower() in proc.stderr.lower()


def test_unknown_format_name_is_one_line(tmp_path):
    proc = run("formats", FIXTURES / "samples.jsonl", "--format", "yaml")
    assert proc.returncode == 1 and "unknown format 'yaml'" in proc.stderr and "Traceback" not in proc.stderr


def test_tokens_reports_roles_for_a_saved_tokenizer(tmp_path):
    from collapse_probe.train import tiny

    tiny.build_tokenizer().save_pretrained(tmp_path)
    proc = run("tokens", tmp_path, "--json")
    assert proc.returncode == 0, proc.stderr
    ids = json.loads(proc.stdout)["ids"]
    assert {"tool_open", "end_of_turn", "json_open", "newline"} <= set(ids)
    bad = run("tokens", tmp_path, "--token", "end_of_turn")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr


def test_export_parquet_and_bad_suffix(tmp_path):
    from collapse_probe.runs.runlog import RunLog

    with RunLog(tmp_path / "run") as log:
        for step in range(3):
            log.append({"step": step, "success": 0.5})
    assert run("export", tmp_path / "run", tmp_path / "m.parquet").returncode == 0
    import pandas as pd
    assert list(pd.read_parquet(tmp_path / "m.parquet")["success"]) == [0.5, 0.5, 0.5]
    proc = run("export", tmp_path / "run", tmp_path / "m.xlsx")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
