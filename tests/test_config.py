"""The trainer's typed config: `--set` parsing and checks, JSON round trip, the lr schedule, run-dir safety."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from collapse_probe import world
from collapse_probe.errors import UserError
from collapse_probe.train.config import Mode, Schedule, TrainConfig, apply_overrides
from collapse_probe.train.presets import PRESETS, get_preset
from collapse_probe.train.trainer import get_lr, train

CLI = Path(sys.executable).parent / "collapse-probe"


@pytest.mark.parametrize("item, message", [
    ("steps=abc", "--set steps=abc: steps takes an integer >= 1, got 'abc'"),
    ("steps=-1", "--set steps=-1: steps takes an integer >= 1, got -1"),
    ("steps=2.5", "steps takes an integer >= 1, got '2.5'"),
    ("reward.bogus=1", "--set reward.bogus=1: unknown reward field 'bogus'; reward fields are correct, wrong, "
                       "no_answer, tag_bonus, max_bonus_tags"),
    ("reward=[1]", "--set reward=[1]: reward is a group: set its fields as reward.NAME=VALUE"),
    ("reward.correct=high", "reward.correct takes a number, got 'high'"),
    ("reward.max_bonus_tags=-2", "reward.max_bonus_tags takes an integer >= 0, got -2"),
    ("size=huge", "--set size=huge: size must be one of tiny, small, base, got 'huge'"),
    ("mode=bogus", "--set mode=bogus: mode must be one of sft, grpo, interleaved, got 'bogus'"),
    ("lr_schedule=linear", "lr_schedule must be one of constant, cosine, got 'linear'"),
    ("group_size=0", "--set group_size=0: group_size takes an integer >= 2, got 0"),
    ("lr=0", "lr takes a number > 0, got 0"),
    ("lr=inf", "lr takes a number > 0, got inf"),
    ("retry_frac=1.5", "retry_frac takes a number in [0, 1], got 1.5"),
    ("sft_lr=fast", "sft_lr takes a number > 0 or none, got 'fast'"),
    ("bogus=1", "--set bogus=1: unknown field 'bogus'; fields are mode, steps,"),
    ("steps", "--set steps: expected KEY=VALUE"),
])
def test_a_bad_set_names_the_field_the_value_and_what_is_allowed(item, message):
    with pytest.raises(UserError) as exc:
        apply_overrides(get_preset("grpo-collapse"), [item])
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_checks_also_cover_presets_constructors_and_cross_field_rules():
    with pytest.raises(UserError, match="steps takes an integer >= 1, got -1"):
        get_preset("sft", steps=-1)
    with pytest.raises(UserError, match="reward takes a RewardSpec"):
        TrainConfig(reward={"correct": 1.0})
    with pytest.raises(UserError, match="threads takes an integer >= 1, got True"):
        TrainConfig(threads=True)
    with pytest.raises(UserError, match="mode interleaved needs sft_every >= 1"):
        apply_overrides(get_preset("interleaved"), ["sft_every=0"])


def test_good_values_parse_by_type_and_round_trip_through_json():
    cfg = apply_overrides(get_preset("grpo-collapse"), [
        "steps=7", "lr=1", "mode=interleaved", "sft_every=3", "lr_schedule=cosine", "sft_lr=none", "init=ckpt/x",
        "size=tiny", "reward.tag_bonus=0.25", "reward.max_bonus_tags=3", "reward.wrong=-1"])
    assert cfg.steps == 7 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.mode is Mode.INTERLEAVED and cfg.lr_schedule is Schedule.COSINE and cfg.sft_lr is None
    assert cfg.reward == world.RewardSpec(correct=1.0, wrong=-1.0, tag_bonus=0.25, max_bonus_tags=3)
    back = TrainConfig.from_json(cfg.to_json())
    assert back == cfg and back.to_json() == cfg.to_json()
    assert json.loads(cfg.to_json())["mode"] == "interleaved"
    assert get_preset("grpo-collapse").steps == PRESETS["grpo-collapse"].steps == 50  # the preset is untouched
    for name, preset in PRESETS.items():
        assert TrainConfig.from_json(preset.to_json()) == preset, name
    with pytest.raises(UserError, match="unknown field 'lrate'"):
        TrainConfig.from_dict({"lrate": 1e-3})
    with pytest.raises(UserError, match="unknown reward field 'bonus'"):
        TrainConfig.from_dict({"reward": {"bonus": 1.0}})


def test_json_is_what_it_was_before_the_typed_config():
    """The sft cache key is a hash of to_json: strings for enums, the reward as the same dict."""
    sft = json.loads(PRESETS["sft"].to_json())
    assert sft["mode"] == "sft" and sft["lr_schedule"] == "cosine" and sft["size"] == "tiny"
    assert sft["reward"] == {"correct": 1.0, "wrong": 0.0, "no_answer": 0.0, "tag_bonus": 0.0}
    assert json.loads(PRESETS["grpo-collapse"].to_json())["reward"] == {
        "correct": 1.0, "wrong": 0.0, "no_answer": 0.0, "tag_bonus": 0.5, "max_bonus_tags": 12}
    key = hashlib.sha1(get_preset("sft").to_json().encode()).hexdigest()[:10]
    assert key == "6c52f53a39"  # changing it retrains every user's cached sft model


def test_get_lr_warms_up_linearly_then_follows_the_schedule():
    cfg = TrainConfig(lr=1e-3, steps=100, warmup_steps=10)
    assert [get_lr(s, cfg) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert get_lr(50, cfg) == get_lr(99, cfg) == 1e-3
    cos = dataclasses.replace(cfg, lr_schedule=Schedule.COSINE, warmup_steps=0)
    lrs = [get_lr(s, cos) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[50] == pytest.approx(5.5e-4) and lrs[100] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    both = dataclasses.replace(cos, warmup_steps=10)
    assert get_lr(0, both) == pytest.approx(0.1 * lrs[0]) and get_lr(20, both) == lrs[20]


def test_a_failed_train_leaves_the_run_directory_alone(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    before = get_preset("sft").to_json()
    (run / "config.json").write_text(before)
    bad = get_preset("sft")
    bad.steps = "abc"  # set after construction: train() checks again
    with pytest.raises(UserError, match="steps takes an integer"):
        train(bad, run)
    with pytest.raises(UserError, match="already holds a run with another config.*pass a new --out"):
        train(get_preset("sft", lr=1e-2), run)
    assert (run / "config.json").read_text() == before and sorted(p.name for p in run.iterdir()) == ["config.json"]

    fresh, no_model = tmp_path / "fresh", tmp_path / "empty"
    no_model.mkdir()
    with pytest.raises(UserError, match=r"no model here \(no config\.json\)"):
        train(get_preset("grpo-collapse", init=str(no_model)), fresh)
    assert not fresh.exists()  # the model failed to load: nothing written


@pytest.mark.parametrize("args, message", [
    (["--set", "steps=abc"], "--set steps=abc: steps takes an integer >= 1, got 'abc'"),
    (["--set", "lr=1e-2"], "already holds a run with another config"),
])
def test_cli_train_bad_config_is_one_line_exit_1(tmp_path, args, message):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(get_preset("sft").to_json())
    proc = subprocess.run([str(CLI), "train", "--preset", "sft", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (out / "config.json").read_text() == get_preset("sft").to_json()
