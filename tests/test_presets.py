"""The preset chain: which model each preset starts from, and the binary-reward preset's config."""
import json

from collapse_probe.train import presets
from collapse_probe.train.presets import START, get_preset, start_chain


def test_grpo_outcome_is_binary_outcome_reward_under_the_paper_harness():
    cfg = json.loads(get_preset("grpo-outcome").to_json())
    assert cfg["reward"]["tag_bonus"] == 0.0 and cfg["reward"]["correct"] == 1.0
    assert cfg["reward"]["wrong"] == 0.0 and cfg["reward"]["no_answer"] == 0.0  # 0/1: no format term anywhere
    assert cfg["harness"] == "paper" and cfg["max_turns"] == 30
    assert json.loads(get_preset("grpo-outcome-sft").to_json())["reward"] == cfg["reward"]
    assert "harness" not in json.loads(get_preset("grpo-collapse").to_json())  # written only when set


def test_start_chain():
    assert start_chain("grpo-outcome") == ["sft", "instruct"]
    assert start_chain("grpo-outcome-sft") == ["sft", "instruct", "instruct-sft"]
    assert start_chain("grpo-collapse") == ["sft"] == start_chain("instruct") and start_chain("sft") == []
    assert all(parent in presets.PRESETS for parent in START.values())
    assert get_preset("instruct").sft_data == "instruct" and get_preset("instruct-sft").sft_data == "oracle"


def test_cache_keys_follow_the_chain(tmp_path, monkeypatch):
    monkeypatch.setenv("COLLAPSE_PROBE_CACHE", str(tmp_path))
    sft_cfg, sft_ckpt = presets._cache_entry("sft")
    assert sft_ckpt.parent.name == "sft-6c52f53a39"  # the key users' caches already hold
    _, inst = presets._cache_entry("instruct")
    _, inst_sft = presets._cache_entry("instruct-sft")
    assert inst.parent.parent == tmp_path and inst_sft.parent.name.startswith("instruct-sft-")
    assert not presets.is_cached("instruct-sft")
    monkeypatch.setitem(presets.PRESETS, "instruct", get_preset("instruct", steps=601))
    assert presets._cache_entry("instruct-sft")[1] != inst_sft  # a changed parent retrains the child
