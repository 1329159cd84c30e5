"""The bad-input corpus (issue 13): every command, run through the real CLI in a subprocess.

Each case asserts the documented exit code (1 bad input, 2 usage), exactly one line on stderr once progress-bar
lines are stripped, no traceback, under 10 s, and that every file there before is byte-identical afterwards.
The fixtures are built once per module; only the weight cases need a model (a tiny one, built in a second).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from collapse_probe.errors import EXIT_COLLAPSED, EXIT_FAILURE, EXIT_USAGE
from collapse_probe.runs.runlog import RunLog
from helpers.cli import run_cli
from helpers.runs import synthetic_records

BAR = re.compile(r"━|%\||it/s\]|s/it\]|\d+/\d+\s+(-:--:--|\d+:\d\d:\d\d)")  # rich / tqdm progress-bar lines


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip() and not BAR.search(ln)]


def _write_run(d: Path, records: list[dict]) -> None:
    d.mkdir(parents=True)
    with RunLog(d) as log:
        for r in records:
            log.append(r)


def _model_variants(root: Path) -> None:
    from safetensors.torch import load_file, save_file

    from collapse_probe.train import tiny

    tok = tiny.build_tokenizer()
    ok = root / "model_ok"
    tiny.build_model(tok, "tiny").save_pretrained(ok)
    tok.save_pretrained(ok)

    def variant(name: str, change) -> None:
        shutil.copytree(ok, root / name)
        change(root / name / "model.safetensors")

    def lying(f: Path) -> None:  # the header claims a tensor runs far past the end of the file
        b = f.read_bytes()
        n = struct.unpack("<Q", b[:8])[0]
        head = json.loads(b[8:8 + n])
        key = next(k for k in head if k != "__metadata__")
        head[key]["data_offsets"] = [0, 10 ** 12]
        hb = json.dumps(head).encode()
        f.write_bytes(struct.pack("<Q", len(hb)) + hb + b[8 + n:])

    def missing(f: Path) -> None:
        t = load_file(f)
        t.pop(next(iter(t)))
        save_file(t, f, metadata={"format": "pt"})

    def pickled(f: Path) -> None:  # only a pickle: never loaded
        f.rename(f.with_name("pytorch_model.bin"))

    variant("model_trunc", lambda f: f.write_bytes(f.read_bytes()[:1000]))
    variant("model_garbage", lambda f: f.write_bytes(b"\x00garbage" * 50))
    variant("model_lying", lying)
    variant("model_missing", missing)
    variant("model_pickle", pickled)
    variant("model_hugeheader", lambda f: f.write_bytes(struct.pack("<Q", 2 ** 62) + b"{}"))
    shutil.copytree(ok, root / "model_badtok")
    (root / "model_badtok" / "tokenizer.json").write_text("{not json")
    ck = root / "ckpts_trunc" / "checkpoint-0"
    shutil.copytree(root / "model_trunc", ck)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    _write_run(root / "stable", synthetic_records(collapse=False, n=30))
    _write_run(root / "collapsed", synthetic_records(collapse=True, n=60))
    (root / "afile").write_text("just a file\n")
    (root / "empty.jsonl").write_bytes(b"")
    (root / "binary.jsonl").write_bytes(bytes(range(256)) * 40)
    (root / "junk.jsonl").write_text("".join(f"junk line {i} {{\n" for i in range(500)))
    (root / "bigstep.jsonl").write_text('{"step": 1e30, "success": 0.5}\n{"step": 10000000000000000000000000000}\n')
    (root / "deep.jsonl").write_text('{"step": 0, "a": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    (root / "notext.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    (root / "fake.parquet").write_text("not parquet\n")
    (root / "nodir").mkdir()
    (root / "emptyrun").mkdir()
    (root / "emptyrun" / "metrics.jsonl").write_bytes(b"")
    huge = root / "huge" / "metrics.jsonl"
    huge.parent.mkdir()
    with open(huge, "wb") as f:  # one line longer than the reader's bound
        f.write(b'{"step": 0, "x": "' + b"a" * (65 << 20) + b'"}\n')
    existing = root / "existing_run"
    existing.mkdir()
    (existing / "config.json").write_text('{"mode": "sft"}')
    (existing / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    _model_variants(root)
    return root


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
    return out


U, B = EXIT_USAGE, EXIT_FAILURE
CASES = [  # (id, args ("{b}" is the fixture dir), exit code)
    # usage errors: click's, one line
    ("no-such-command", ["bogus"], U),
    ("watch-missing-arg", ["watch"], U),
    ("analyze-unknown-option", ["analyze", "{b}/stable", "--bogus"], U),
    ("train-steps-not-int", ["train", "--steps", "abc", "--out", "{b}/t1"], U),
    ("watch-poll-not-number", ["watch", "{b}/stable", "--poll", "abc"], U),
    ("analyze-fail-on-no-value", ["analyze", "{b}/stable", "--fail-on"], U),
    ("formats-step-bins-not-int", ["formats", "{b}/junk.jsonl", "--step-bins", "x"], U),
    ("recover-missing-arg", ["recover"], U),
    ("study-seeds-not-int", ["study", "--seeds", "abc"], U),
    ("study-steps-zero", ["study", "--steps", "0"], U),
    ("study-unknown-method", ["study", "--methods", "vanilla,bogus"], B),
    ("study-lr-sweep-not-numbers", ["study", "--lr-sweep", "1e-3,x"], B),
    ("study-negative-lr", ["study", "--lr", "-1"], B),
    ("study-init-no-model", ["study", "--init", "{b}/stable"], B),
    ("study-sft-preset", ["study", "--preset", "sft"], B),
    ("export-missing-out", ["export", "{b}/stable"], U),
    ("demo-seed-not-int", ["demo", "--seed", "x"], U),
    ("plot-extra-arg", ["plot", "{b}/stable", "extra"], U),
    # analyze
    ("analyze-missing-path", ["analyze", "{b}/nope"], B),
    ("analyze-empty-file", ["analyze", "{b}/empty.jsonl"], B),
    ("analyze-binary", ["analyze", "{b}/binary.jsonl"], B),
    ("analyze-junk", ["analyze", "{b}/junk.jsonl"], B),
    ("analyze-no-metrics", ["analyze", "{b}/nodir"], B),
    ("analyze-bad-fail-on", ["analyze", "{b}/stable", "--fail-on", "bogus"], B),
    ("analyze-step-1e30", ["analyze", "{b}/bigstep.jsonl"], B),
    ("analyze-deep-line", ["analyze", "{b}/deep.jsonl"], B),
    ("analyze-huge-line", ["analyze", "{b}/huge"], B),
    ("analyze-empty-run", ["analyze", "{b}/emptyrun"], B),
    ("analyze-truncated-checkpoint", ["analyze", "{b}/ckpts_trunc", "-n", "0"], B),
    ("analyze-negative-eval-tasks", ["analyze", "{b}/ckpts_trunc", "-n", "-1"], B),
    ("analyze-missing-probe", ["analyze", "{b}/ckpts_trunc", "--probe", "{b}/none.jsonl"], B),
    # watch
    ("watch-missing-file", ["watch", "{b}/none.jsonl"], B),
    ("watch-once-no-metrics", ["watch", "{b}/nodir", "--once"], B),
    ("watch-bad-position", ["watch", "{b}/stable", "--once", "--position", "bogus"], B),
    ("watch-bad-source", ["watch", "{b}/stable", "--once", "--source", "bogus"], B),
    ("watch-negative-idle-timeout", ["watch", "{b}/stable", "--idle-timeout", "-1"], B),
    ("watch-zero-poll", ["watch", "{b}/stable", "--poll", "0"], B),
    ("watch-negative-poll", ["watch", "{b}/stable", "--poll", "-1"], B),
    ("watch-once-junk", ["watch", "{b}/junk.jsonl", "--once"], B),
    ("watch-once-empty", ["watch", "{b}/empty.jsonl", "--once"], B),
    ("watch-once-binary", ["watch", "{b}/binary.jsonl", "--once"], B),
    ("watch-once-step-1e30", ["watch", "{b}/bigstep.jsonl", "--once", "--json"], B),
    ("watch-once-deep-line", ["watch", "{b}/deep.jsonl", "--once"], B),
    # formats
    ("formats-missing", ["formats", "{b}/none.jsonl"], B),
    ("formats-unknown-format", ["formats", "{b}/notext.jsonl", "--format", "yaml"], B),
    ("formats-empty", ["formats", "{b}/empty.jsonl"], B),
    ("formats-binary", ["formats", "{b}/binary.jsonl"], B),
    ("formats-fake-parquet", ["formats", "{b}/fake.parquet"], B),
    ("formats-negative-step-bins", ["formats", "{b}/notext.jsonl", "--step-bins", "-3"], B),
    ("formats-zero-step-bins", ["formats", "{b}/notext.jsonl", "--step-bins", "0"], B),
    ("formats-no-text-field", ["formats", "{b}/notext.jsonl"], B),
    ("formats-junk", ["formats", "{b}/junk.jsonl"], B),
    ("formats-deep-line", ["formats", "{b}/deep.jsonl"], B),
    # tokens
    ("tokens-hub-name-not-cached", ["tokens", "some-org/not-a-model"], B),
    ("tokens-empty-dir", ["tokens", "{b}/nodir"], B),
    ("tokens-bad-override", ["tokens", "{b}/model_ok", "--token", "bogus"], B),
    ("tokens-corrupt-tokenizer", ["tokens", "{b}/model_badtok"], B),
    # export
    ("export-bad-suffix", ["export", "{b}/stable", "{b}/out.txt"], B),
    ("export-missing-run", ["export", "{b}/nope", "{b}/out.csv"], B),
    ("export-empty-run", ["export", "{b}/emptyrun", "{b}/out.csv", "--json"], B),
    # plot
    ("plot-missing", ["plot", "{b}/nope"], B),
    ("plot-junk", ["plot", "{b}/junk.jsonl"], B),
    ("plot-step-1e30", ["plot", "{b}/bigstep.jsonl", "--json"], B),
    ("plot-out-under-a-file", ["plot", "{b}/stable", "--out", "{b}/afile/fig"], B),
    # report
    ("report-missing", ["report", "{b}/nope"], B),
    ("report-empty-run", ["report", "{b}/emptyrun"], B),
    ("report-step-1e30", ["report", "{b}/bigstep.jsonl", "--out", "{b}/rep"], B),
    ("report-out-is-a-file", ["report", "{b}/stable", "--out", "{b}/afile"], B),
    # recover
    ("recover-missing", ["recover", "{b}/nope"], B),
    ("recover-no-config", ["recover", "{b}/nodir"], B),
    ("recover-bad-formats", ["recover", "{b}/model_ok", "--formats", "bogus"], B),
    ("recover-zero-n", ["recover", "{b}/model_ok", "-n", "0"], B),
    ("recover-truncated-weights", ["recover", "{b}/model_trunc", "--skip-repair", "-n", "1"], B),
    ("recover-garbage-weights", ["recover", "{b}/model_garbage", "--skip-repair", "-n", "1"], B),
    ("recover-lying-header", ["recover", "{b}/model_lying", "--skip-repair", "-n", "1"], B),
    ("recover-missing-tensor", ["recover", "{b}/model_missing", "--skip-repair", "-n", "1"], B),
    ("recover-pickle-only", ["recover", "{b}/model_pickle", "--skip-repair", "-n", "1"], B),
    ("recover-huge-header", ["recover", "{b}/model_hugeheader", "--skip-repair", "-n", "1"], B),
    # train
    ("train-unknown-preset", ["train", "--preset", "nope", "--out", "{b}/t2"], B),
    ("train-set-steps-abc", ["train", "--set", "steps=abc", "--out", "{b}/t3"], B),
    ("train-set-unknown-field", ["train", "--set", "reward.bogus=1", "--out", "{b}/t4"], B),
    ("train-set-size-huge", ["train", "--set", "size=huge", "--out", "{b}/t5"], B),
    ("train-set-mode-bogus", ["train", "--set", "mode=bogus", "--out", "{b}/t6"], B),
    ("train-set-group-size-0", ["train", "--set", "group_size=0", "--out", "{b}/t7"], B),
    ("train-set-steps-negative", ["train", "--set", "steps=-1", "--out", "{b}/t8"], B),
    ("train-set-reward-list", ["train", "--set", "reward=[1]", "--out", "{b}/t9"], B),
    ("train-resume", ["train", "--resume", "--out", "{b}/existing_run"], B),
    ("train-into-existing-run", ["train", "--out", "{b}/existing_run"], B),
    ("train-out-is-a-file", ["train", "--out", "{b}/afile"], B),
    ("train-init-truncated", ["train", "--preset", "grpo-collapse", "--init", "{b}/model_trunc", "--out", "{b}/t10"],
     B),
    ("train-init-missing", ["train", "--preset", "grpo-collapse", "--init", "{b}/nope", "--out", "{b}/t11"], B),
    # demo
    ("demo-work-is-a-file", ["demo", "--work", "{b}/afile", "--out", "{b}/d1"], B),
    ("demo-out-is-a-file", ["demo", "--out", "{b}/afile", "--work", "{b}/d2"], B),
]


def test_the_corpus_is_large_and_covers_every_command():
    from collapse_probe.cli.app import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    covered = {args[0] for _, args, _ in CASES}
    assert len(CASES) >= 60 and commands <= covered, commands - covered


@pytest.mark.parametrize("args, code", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(base, args, code):
    before = _snapshot(base)
    proc, took = run_cli([a.replace("{b}", str(base)) for a in args], cwd=base)
    lines = error_lines(proc.stderr)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error:"), lines
    assert took < 60, f"took {took:.1f} s"  # refused before any long work (loose: the machine may be busy)
    after = _snapshot(base)
    assert {k: after.get(k) for k in before} == before  # nothing that was there changed or went away


@pytest.mark.parametrize("kind, code", [("collapsed", EXIT_COLLAPSED), ("stable", 0)])
def test_analyze_fail_on_gates_a_pipeline(base, kind, code):
    for fail_on in ("collapse", "warning"):
        proc, _ = run_cli(["analyze", str(base / kind), "--fail-on", fail_on, "--json"], cwd=base)
        assert proc.returncode == code, proc.stderr
        assert json.loads(proc.stdout)["collapsed"] is (kind == "collapsed")
    assert run_cli(["analyze", str(base / "collapsed")], cwd=base)[0].returncode == 0  # no --fail-on: a report


def test_watch_exits_with_the_collapse_code(base):
    assert run_cli(["watch", str(base / "collapsed"), "--once"], cwd=base)[0].returncode == EXIT_COLLAPSED
    assert run_cli(["watch", str(base / "stable"), "--once"], cwd=base)[0].returncode == 0


def test_a_second_writer_is_refused_with_one_line(base, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom collapse_probe.runs.runlog import RunLog\n"
                               f"log = RunLog({str(run)!r}); log.append({{'step': 0}}); print('ok', flush=True)\n"
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        from collapse_probe.errors import UserError

        with pytest.raises(UserError, match="being written by another process"):
            RunLog(run)
        before = (run / "metrics.jsonl").read_bytes()
        proc, _ = run_cli(["train", "--overwrite", "--set", "steps=1", "--out", str(run)], cwd=tmp_path)
        lines = error_lines(proc.stderr)
        assert proc.returncode == 1 and len(lines) == 1 and "another process" in lines[0], proc.stderr
        assert (run / "metrics.jsonl").read_bytes() == before  # --overwrite removed nothing of the live run
    finally:
        holder.kill()
        holder.wait(10)
        holder.stdout.close()
    with RunLog(run) as log:  # the lock died with its holder
        log.append({"step": 1})


def test_every_command_has_json_and_states_the_exit_codes():
    from typer.main import get_command

    from collapse_probe.cli.app import app

    group = get_command(app)
    for name, cmd in group.commands.items():
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert "--json" in opts, name
        assert "3 collapse confirmed" in (cmd.epilog or ""), name


def test_plot_on_a_non_utf8_directory_name(base, tmp_path):
    run = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/run\xff\xfe"))
    _write_run(run, synthetic_records(collapse=False, n=10))
    proc, _ = run_cli(["plot", str(run), "--json", "--out", str(tmp_path / "fig")], cwd=tmp_path)
    assert proc.returncode == 0 and len(json.loads(proc.stdout)["figures"]) == 3, proc.stderr


def test_formats_skips_one_torn_line_in_a_rollouts_dir(tmp_path):
    rollouts = tmp_path / "run" / "rollouts"
    rollouts.mkdir(parents=True)
    good = json.dumps({"step": 1, "group": 0, "sample": 0, "turns": ["It is Paris."]})
    (rollouts / "step_000001.jsonl").write_text(good + "\n" + good[:20] + "\n")
    (rollouts / "step_000002.jsonl").write_text(good.replace('"step": 1', '"step": 2') + "\n")
    proc, _ = run_cli(["formats", str(tmp_path / "run" / "rollouts"), "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(error_lines(proc.stderr)) == 1 and "skipped 1" in proc.stderr  # one warning, with its count
    assert sum(g["turns"] for g in json.loads(proc.stdout)["groups"].values()) == 2
