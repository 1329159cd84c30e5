"""Format states of assistant turns (formats/classify.py) and the rollout-file loaders (detect/rollout_files.py)."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pandas as pd
import pytest

import collapse_probe.formats.reasons as reasons_doc
from collapse_probe.formats.classify import FormatSpec, StateMix, TurnVerdict, classify_turn, state_mix
from collapse_probe.formats.reasons import EMPTY_AT, REASONS
from collapse_probe.formats.registry import format_spec
from collapse_probe.schema import STATES, FormatState, Position
from collapse_probe.runs.rollout_files import load_turns, split_trajectory
from collapse_probe.runs.turn_summary import render_summary, summarise_turns
from collapse_probe.errors import UserError

FIX = Path(__file__).parent / "fixtures" / "formats"
KNOWN = json.loads((FIX / "known_tools.json").read_text())


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIX / name).read_text().splitlines() if line.strip()]


HERMES = _rows("samples.jsonl")
NEW = _rows("new_failures.jsonl")  # degenerate output, another role's voice, an echoed user message, empties
SYNTAX_ROWS = _rows("samples_syntaxes.jsonl")  # rows name their format (registry names and aliases)


def _id(r: dict) -> str:
    return f"{r['expected_reason']}:{r['note']}"


@pytest.mark.parametrize("row", HERMES, ids=_id)
def test_hermes_samples(row):
    v = classify_turn(row["text"], FormatSpec.hermes(KNOWN))
    assert (v.state.value, v.reason) == (row["expected_state"], row["expected_reason"]), v.detail
    assert REASONS[v.reason][0] is v.state


@pytest.mark.parametrize("row", NEW + SYNTAX_ROWS, ids=lambda r: f"{r.get('format', 'hermes')}:{r['note']}")
def test_new_failure_and_syntax_samples(row):
    v = classify_turn(row["text"], format_spec(row.get("format", "hermes")), user_message=row.get("prompt"))
    assert (v.state.value, v.reason) == (row["expected_state"], row["expected_reason"]), v.detail
    assert classify_turn(row["text"]).reason != "echoed_user_message"  # only with the user's message at hand


def test_samples_cover_every_reason_and_state():
    rows = HERMES + NEW + SYNTAX_ROWS
    assert {r["expected_reason"] for r in rows} == set(REASONS)
    assert {r["expected_state"] for r in HERMES} == set(STATES)


def test_new_failure_classes():
    col, pol, msg = FormatState.FULL_COLLAPSE, FormatState.TEXT_POLLUTION, "What is the weather where alice lives?"
    cases = {"!" * 40: (col, "degenerate_output"), "ha" * 20: (col, "degenerate_output"),
             "Paris\n" * 12: (col, "degenerate_output"), "Users of the city say hi.": (FormatState.HEALTHY_RESPONSE,
             "ok_text"), **{t: (pol, "speaks_as_role") for t in ("user\nhi", "USER: hi", "User: hi", "assistant: sure",
                                                                 "assistant\nsure", "user what now")}}
    for text, want in cases.items():
        v = classify_turn(text)
        assert (v.state, v.reason) == want, text
    assert classify_turn("Paris is nice. Paris is big.").reason == "ok_text"  # repetition alone is not enough
    assert [classify_turn(t, user_message=u).reason for t, u in ((msg, msg), ("Sunny.", msg), ("ok", "ok"))] == [
        "echoed_user_message", "ok_text", "ok_text"]  # "ok" is too short to call a copy
    assert EMPTY_AT == {"empty_turn": Position.TURN_START, "bare_open_tag": Position.AFTER_OPEN}


def test_without_known_tools_only_unknown_tool_changes():
    for row in HERMES:
        v = classify_turn(row["text"])
        expected = "ok_call" if row["expected_reason"] == "unknown_tool" else row["expected_reason"]
        assert v.reason == expected, row["note"]


@pytest.mark.parametrize("name,spec", [("samples_llama3.jsonl", FormatSpec.llama3()),
                                       ("samples_mistral.jsonl", FormatSpec.mistral())])
def test_presets(name, spec):
    for row in _rows(name):
        v = classify_turn(row["text"], spec)
        assert (v.state.value, v.reason) == (row["expected_state"], row["expected_reason"]), (row["note"], v)


def test_calls_are_parsed_and_normalised():
    v = classify_turn('<tool_call>\n{"name": "f", "parameters": {"a": 1}}\n</tool_call>\n'
                      '<tool_call>{"name": "g", "arguments": {}}</tool_call><|im_end|>')
    assert v == TurnVerdict(FormatState.HEALTHY_TOOL_CALL, "ok_call",
                            [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}], "")
    assert classify_turn('{"name": "f", "arguments": {"a": 1}}').calls == [{"name": "f", "arguments": {"a": 1}}]
    assert classify_turn("<tool_call>").calls == []


def test_custom_tags_and_preset_by_name():
    spec = FormatSpec(tool_open="<call>", tool_close="</call>")
    assert classify_turn('<call>{"name": "f", "arguments": {}}</call>', spec).reason == "ok_call"
    assert classify_turn("<call>", spec).reason == "bare_open_tag"
    assert classify_turn('<tool_call>{"name": "f", "arguments": {}}</tool_call>', spec).reason == "other_syntax_call"
    assert format_spec("qwen").tool_open == "<tool_call>"
    assert format_spec("canonical").name == "hermes"
    assert format_spec("mistral", ["f"]).known_tools == frozenset({"f"})
    with pytest.raises(UserError) as exc:
        format_spec("nope")
    assert "nope" in str(exc.value) and "python_list" in str(exc.value) and "llama3" in str(exc.value)


def test_rules_are_documented():
    doc = reasons_doc.__doc__
    for code, (state, rule) in REASONS.items():
        assert isinstance(state, FormatState) and rule
        assert code in doc, code


FRAGMENTS = ["<tool_call>", "</tool_call>", "<tool_response>", "<|im_end|>", "<|im_start|>", "<think>", "</think>",
             '{"name": "f", "arguments": {"a": 1}}', "{", "}", "[", "]", '"', "\n", " ", "user", "assistant\n",
             "f(a=1)", "```json\n", "```", "[TOOL_CALLS]", "<|python_tag|>", "[ARGS]", "\x00", "é", "\\", ":", "name"]


@pytest.mark.parametrize("spec", [FormatSpec.hermes(["f"]), FormatSpec.llama3(), FormatSpec.mistral()],
                         ids=["hermes", "llama3", "mistral"])
def test_fuzz_never_raises(spec):
    rng = random.Random(0)
    for _ in range(1500):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 12)))
        if rng.random() < 0.3:
            text = "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 40)))
        v = classify_turn(text, spec)
        assert v.reason in REASONS and REASONS[v.reason][0] is v.state


def test_hostile_inputs():
    deep = "[" * 200_000
    for text in (deep, "<tool_call>" + deep + "</tool_call>", "{" * 50_000, '{"name": ' * 20_000,
                 "<tool_call>" * 10_000, None, b"<tool_call>", 12345, "x" * 1_000_000):
        v = classify_turn(text)  # type: ignore[arg-type]
        assert v.reason in REASONS
    assert classify_turn(None).reason == "empty_turn"  # type: ignore[arg-type]
    assert classify_turn(b"<tool_call>").reason == "bare_open_tag"  # type: ignore[arg-type]


def test_degenerate_inputs_stay_linear():
    """Collapsed runs produce long runs of tags, newlines and end-of-turn tokens: no quadratic regex or copying."""
    import time

    cases = ["x" + "<|im_end|>\n" * 50_000, "user\n<tool_response>" * 20_000, "<tool_call>x" * 20_000,
             "\n" * 200_000 + "x", "ipython\n\n" * 40_000, "[TOOL_RESULTS]" * 40_000]
    t0 = time.perf_counter()
    for text in cases:
        for spec in (FormatSpec.hermes(), FormatSpec.llama3(), FormatSpec.mistral()):
            classify_turn(text, spec)
            split_trajectory(text, spec)
    assert time.perf_counter() - t0 < 5.0


def test_state_mix():
    mix = state_mix([r["text"] for r in HERMES])
    d = mix.to_dict()
    assert list(d) == ["turns", *STATES, "reasons"]
    assert d["turns"] == len(HERMES) == sum(d[s] for s in STATES) == sum(d["reasons"].values())
    f = mix.fractions()
    assert math.isclose(sum(f[s] for s in STATES), 1.0)
    assert math.isclose(sum(f["reasons"].values()), 1.0)
    m = mix.metrics()
    assert set(STATES) <= {k.removeprefix("fmt/") for k in m}
    assert "fmt/reason/bare_open_tag" in m
    merged = StateMix().merge(mix).merge(mix)
    assert merged.to_dict()["turns"] == 2 * len(HERMES)
    assert merged.to_dict()["reasons"]["bare_open_tag"] == 2 * d["reasons"]["bare_open_tag"]
    assert StateMix.from_dict(d).to_dict() == d
    empty = StateMix()
    assert empty.to_dict() == {"turns": 0, **{s: 0 for s in STATES}, "reasons": {}}
    assert all(math.isnan(empty.fractions()[s]) for s in STATES)
    assert math.isclose(state_mix(["hi", "<tool_call>"]).healthy_fraction(), 0.5)


# ---- loaders ------------------------------------------------------------------------------------------------

CALL = '<tool_call>\n{"name": "get_city", "arguments": {"user_id": "u1"}}\n</tool_call>'


def _jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_text_jsonl():
    turns = load_turns(FIX / "samples.jsonl")
    assert len(turns) == len(HERMES)
    assert turns[0] == {"text": HERMES[0]["text"], "group": HERMES[0]["group"], "step": HERMES[0]["step"]}


def test_load_text_jsonl_defaults(tmp_path):
    p = _jsonl(tmp_path / "turns.jsonl", [{"text": CALL}, {"text": "<tool_call>", "step": 3}])
    (tmp_path / "turns.jsonl").write_text(p.read_text() + "\n\n")  # trailing blank lines are fine
    assert load_turns(p) == [{"text": CALL, "group": "all", "step": None},
                             {"text": "<tool_call>", "group": "all", "step": 3}]


def test_load_our_run_dir(tmp_path):
    run = tmp_path / "run"
    _jsonl(run / "metrics.jsonl", [{"step": 10, "time": 1.0, "reward/mean": 0.5}])
    for step in (20, 10):
        _jsonl(run / "rollouts" / f"step_{step:06d}.jsonl", [
            {"step": step, "group": "base", "sample": 0, "reward": 1.0, "success": 1,
             "turns": [CALL, "Done."], "text": "ignored"},
            {"step": step, "group": "miss_param", "sample": 1, "reward": 0.0, "success": 0, "turns": ["<tool_call>"]}])
    turns = load_turns(run)
    assert [t["step"] for t in turns] == [10, 10, 10, 20, 20, 20]
    assert [t["group"] for t in turns[:3]] == ["base", "base", "miss_param"]
    assert turns[:3] == load_turns(run / "rollouts" / "step_000010.jsonl")
    # the step comes from the file name when rows lack it
    p = _jsonl(tmp_path / "r" / "step_000042.jsonl", [{"turns": ["hi"]}])
    assert load_turns(p) == [{"text": "hi", "group": "all", "step": 42}]
    # a callback's output dir
    _jsonl(tmp_path / "out" / "collapse_probe" / "rollouts" / "step_000001.jsonl", [{"turns": ["a", "b"]}])
    assert len(load_turns(tmp_path / "out" / "collapse_probe")) == 2


def _trl_frame(step: int) -> pd.DataFrame:
    """Columns as GRPOTrainer.log writes them: step, prompt, completion, <reward func names>, advantage."""
    prompt = [{"role": "user", "content": "Where does u1 live?"}]
    healthy = [{"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "get_city", "arguments": {"user_id": "u1"}}}]},
               {"role": "tool", "name": "get_city", "content": "Paris"},
               {"role": "assistant", "content": "u1 lives in Paris."}]
    collapsed = [{"role": "assistant", "content": "<tool_call>\n"}]
    return pd.DataFrame({"step": [step, step], "prompt": [prompt, prompt], "completion": [healthy, collapsed],
                         "accuracy_reward": [1.0, 0.0], "advantage": [0.7, -0.7]})


def test_load_trl_parquet(tmp_path):
    comp = tmp_path / "out" / "completions"
    comp.mkdir(parents=True)
    _trl_frame(5).to_parquet(comp / "completions_00005.parquet")
    _trl_frame(1).drop(columns=["step"]).to_parquet(comp / "completions_00001.parquet")
    turns = load_turns(tmp_path / "out")
    assert [t["step"] for t in turns] == [1, 1, 1, 5, 5, 5]
    texts = [t["text"] for t in turns[:3]]
    assert [classify_turn(t).reason for t in texts] == ["ok_call", "ok_text", "bare_open_tag"]
    assert texts[0] == CALL
    assert {t["group"] for t in turns} == {"all"}
    # plain-string completions (non-conversational datasets)
    p = tmp_path / "completions_00007.parquet"
    pd.DataFrame({"step": [7], "prompt": ["q"], "completion": [CALL], "advantage": [0.0]}).to_parquet(p)
    assert load_turns(p) == [{"text": CALL, "group": "all", "step": 7, "user": "q"}]
    assert {t["user"] for t in turns} == {"Where does u1 live?"}  # the last user message of the prompt


def test_split_trajectory_hermes():
    resp = "\n<tool_response>\n{\"city\": \"Paris\"}\n</tool_response>"
    skipped = f"{CALL}\nuser{resp}\nassistant\n<tool_call>\nuser{resp}\nassistant\nIt is Paris."
    assert split_trajectory(skipped) == [CALL, "<tool_call>", "It is Paris."]
    kept = f"{CALL}<|im_end|>\n<|im_start|>user{resp}<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>"
    assert split_trajectory(kept) == [CALL, "Paris<|im_end|>"]
    assert split_trajectory(f"{CALL}\nuser{resp}") == [CALL]  # cut off after a tool response
    assert split_trajectory(f"{CALL}\nuser{resp}\nassistant\n") == [CALL, ""]  # an empty assistant turn
    two = f"{CALL}\nuser{resp}\n<tool_response>\nok\n</tool_response>\nassistant\nDone."
    assert split_trajectory(two) == [CALL, "Done."]
    assert split_trajectory("just text") == ["just text"]


def test_split_trajectory_other_presets():
    llama = ('<|python_tag|>{"name": "f", "parameters": {}}<|eom_id|><|start_header_id|>ipython<|end_header_id|>'
             '\n\n"ok"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nDone.')
    assert split_trajectory(llama, FormatSpec.llama3()) == ['<|python_tag|>{"name": "f", "parameters": {}}', "Done."]
    mistral = '[TOOL_CALLS][{"name": "f", "arguments": {}}]</s>[TOOL_RESULTS]{"x": 1}[/TOOL_RESULTS]Done.</s>'
    assert split_trajectory(mistral, FormatSpec.mistral()) == ['[TOOL_CALLS][{"name": "f", "arguments": {}}]',
                                                              "Done.</s>"]


def test_load_verl_dump(tmp_path):
    d = tmp_path / "rollout_data"
    resp = "\nuser\n<tool_response>\nParis\n</tool_response>\nassistant\n"
    _jsonl(d / "12.jsonl", [
        {"input": "system\n...\nuser\nWhere?\nassistant\n", "output": CALL + resp + "u1 lives in Paris.",
         "gts": "Paris", "score": 1.0, "step": 12, "acc": 1.0},
        {"input": "x", "output": "<tool_call>\n", "gts": "Paris", "score": 0.0, "step": 12, "acc": 0.0}])
    _jsonl(d / "3.jsonl", [{"input": "x", "output": "", "score": 0.0}])  # no step field: from the name
    turns = load_turns(d)
    assert turns == [{"text": "", "group": "all", "step": 3, "user": "x"},
                     {"text": CALL, "group": "all", "step": 12, "user": "Where?"},
                     {"text": "u1 lives in Paris.", "group": "all", "step": 12, "user": "Where?"},
                     {"text": "<tool_call>\n", "group": "all", "step": 12, "user": "x"}]
    assert [classify_turn(t["text"]).reason for t in turns] == ["empty_turn", "ok_call", "ok_text", "bare_open_tag"]


@pytest.mark.parametrize("make,needle", [
    (lambda d: d / "missing.jsonl", "no such file"),
    (lambda d: _touch(d / "empty.jsonl", b""), "empty"),
    (lambda d: _touch(d / "blank.jsonl", b"\n\n  \n"), "empty"),
    (lambda d: _touch(d / "table.csv", b"text,step\nhi,1\n"), "table.csv:1"),
    (lambda d: _touch(d / "pretty.jsonl", b'{\n  "text": "hi"\n}\n'), "pretty.jsonl:1"),
    (lambda d: _touch(d / "bad.jsonl", b'{"text": "ok"}\n{"prompt": "hi", "reward": 1}\n'), "bad.jsonl:2"),
    (lambda d: _touch(d / "list.jsonl", b'["a"]\n'), "list.jsonl:1"),
    (lambda d: _touch(d / "bin.jsonl", b"\xff\xfe\x00\x81garbage"), "bin.jsonl"),
    (lambda d: _touch(d / "fake.parquet", b"not parquet at all"), "fake.parquet"),
    (lambda d: _touch(d / "trunc.parquet", b"PAR1" + b"\x00" * 20), "trunc.parquet"),
    (lambda d: _mkdir(d / "emptydir"), "emptydir"),
])
def test_loader_errors(tmp_path, make, needle):
    path = make(tmp_path)
    with pytest.raises(UserError) as e:
        load_turns(path)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_parquet_without_completion_column(tmp_path):
    p = tmp_path / "x.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(p)
    with pytest.raises(UserError, match=r"x\.parquet: no 'completion' column"):
        load_turns(p)


def _touch(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _mkdir(p: Path) -> Path:
    p.mkdir()
    (p / "notes.txt").write_text("hi")
    return p


# ---- summary ------------------------------------------------------------------------------------------------

def _states(*counts: int) -> dict:
    return dict(zip(STATES, counts))


def _empty(at_start: int, after_open: int) -> dict:  # empty turns by where they are empty
    return {Position.TURN_START.value: at_start, Position.AFTER_OPEN.value: after_open}


def test_summary_shape():
    turns = [{"text": "<tool_call>", "group": "a", "step": 1}, {"text": CALL, "group": "a", "step": 2},
             {"text": "hi", "group": "b", "step": 9}, {"text": "", "group": "b", "step": None}]
    s = summarise_turns(turns)
    assert s == {"groups": {
        "a": {"turns": 2, **_states(1, 0, 0, 1), "reasons": {"bare_open_tag": 1, "ok_call": 1}, "empty": _empty(0, 1)},
        "b": {"turns": 2, **_states(0, 1, 0, 1), "reasons": {"empty_turn": 1, "ok_text": 1}, "empty": _empty(1, 0)}}}
    s = summarise_turns(turns, step_bins=3)
    assert [(r["first_step"], r["last_step"]) for r in s["step_ranges"]] == [(1, 3), (4, 6), (7, 9)]
    assert s["step_ranges"][0]["groups"]["a"]["turns"] == 2
    assert s["step_ranges"][1]["groups"] == {}
    assert s["step_ranges"][2]["groups"]["b"][FormatState.HEALTHY_RESPONSE.value] == 1
    assert summarise_turns(turns, step_bins=50)["step_ranges"][-1] == {
        "first_step": 9, "last_step": 9, "groups": {"b": s["step_ranges"][2]["groups"]["b"]}}
    assert "step_ranges" not in summarise_turns([{"text": "x", "group": "all", "step": None}], step_bins=4)
    assert summarise_turns([]) == {"groups": {}}


def test_summary_of_fixture_groups_match_expected_states():
    s = summarise_turns(load_turns(FIX / "samples.jsonl"), FormatSpec.hermes(KNOWN), step_bins=2)
    for state, d in s["groups"].items():
        assert d[state] == d["turns"] > 0
    assert sum(d["turns"] for r in s["step_ranges"] for d in r["groups"].values()) == len(HERMES)


def test_render_summary():
    from rich.console import Console

    s = summarise_turns(load_turns(FIX / "samples.jsonl"), step_bins=2)
    table = render_summary(s)
    console = Console(record=True, width=240)
    console.print(table)
    out = console.export_text()
    assert FormatState.FULL_COLLAPSE.value in out and "bare_open_tag" in out and "collapse" in out
    assert "at turn start" in out and "right after the call tag" in out
    console.print(render_summary({"groups": {}}))


def test_cli_formats_shows_the_new_codes():
    """`collapse-probe formats` on the fixture: the new codes, the user's message read from the prompt, the empty
    turns by where they are empty, and one list of format names for an unknown --format."""
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from collapse_probe.cli.app import main; main()", "formats", *args],
                              capture_output=True, text=True, env={"COLUMNS": "220", "PATH": "/usr/bin:/bin"},
                              timeout=120)

    run = cli(str(FIX / "new_failures.jsonl"), "--json")
    assert run.returncode == 0, run.stderr
    groups = json.loads(run.stdout)["groups"]
    for row in NEW:
        assert groups[row["group"]]["reasons"].get(row["expected_reason"]), row["note"]
    assert groups["empty_turn"]["empty"] == _empty(1, 0) and groups["bare_open_tag"]["empty"] == _empty(0, 1)
    table = cli(str(FIX / "new_failures.jsonl")).stdout
    assert "degenerate_output" in table and "at turn start" in table
    bad = cli(str(FIX / "new_failures.jsonl"), "--format", "yaml")
    assert bad.returncode == 1 and "yaml" in bad.stderr and "python_list" in bad.stderr
    syn = cli(str(FIX / "samples_syntaxes.jsonl"), "--format", "python_list", "--json")
    assert syn.returncode == 0 and json.loads(syn.stdout)["groups"]["all"]["reasons"]["ok_call"] >= 1
