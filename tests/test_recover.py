"""Recovery forensics: the format grid's parsers, the masked-decoding processor, the SFT-repair bookkeeping and
`run_recovery`/`collapse-probe recover` on a tiny random model (shapes and errors; no trained model needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from collapse_probe.errors import UserError
from collapse_probe.recover.evaluate import evaluate_format, format_spread, score_episode
from collapse_probe.recover.grid import FORMAT_NAMES, get_format, parse_format_list
from collapse_probe.recover.masked import ForbidTokens, ObserveAfterOpen, masked_eval, spiking_roles
from collapse_probe.recover.run import (checkpoint_collapsed, findings, recovery_markdown, render_recovery_table,
                                        run_recovery)
from collapse_probe.recover import repair as repair_mod
from collapse_probe.formats.calls import parse_python_calls
from collapse_probe.recover.grid import PARAPHRASES, RenamedTask
from collapse_probe.tokens import ControlTokens
from collapse_probe import world

torch.set_num_threads(1)

ALL = ("hermes", "renamed_tags", "json", "python_list", "xml", "markdown", "reworded", "renamed_tools")
OPT_IN = ("llama3", "mistral")  # registered syntaxes the default grid leaves out


# ------------------------------------------------------------------------------------------------ formats
def test_grid_names_and_unknown_format():
    assert FORMAT_NAMES == ALL
    with pytest.raises(UserError) as exc:
        get_format("yaml")
    assert "yaml" in str(exc.value) and all(n in str(exc.value) for n in ALL + OPT_IN)
    assert [f.name for f in parse_format_list("xml, canonical,xml,hermes")] == ["xml", "hermes"]  # alias
    assert [f.name for f in parse_format_list("untagged_json,markdown_fence,llama3")] == ["json", "markdown", "llama3"]
    assert len(parse_format_list(None)) == len(ALL) and len(parse_format_list("")) == len(ALL)
    with pytest.raises(UserError):
        parse_format_list("canonical,nope")


@pytest.mark.parametrize("name", ALL + OPT_IN)
def test_render_parse_round_trip_on_oracle_calls(name):
    fmt = get_format(name)
    prompt = fmt.system_prompt()
    assert "<tools>" in prompt and prompt != "" and prompt.count("Call a tool") + prompt.count("Call tools") == 1
    for task in world.task_split("eval", 12, offset=500):
        posed = fmt.prepare(task)
        assert posed.answer == task.answer
        turns = fmt.oracle_turns(task)
        oracle = task.oracle_calls()
        assert len(turns) == len(oracle) + 1
        for turn, (tool, args, obs) in zip(turns, oracle):
            calls, error = fmt.parse(turn)
            assert error is None and len(calls) == 1, (turn, error)
            assert fmt.to_canonical(calls[0]) == (tool, args)
            assert fmt.validity(turn)
            result = posed.execute(calls[0]["name"], calls[0]["arguments"])  # the format's own executor
            assert "error" not in result and list(result.values()) == list(obs.values())
        assert fmt.parse(turns[-1]) == ([], None) and fmt.validity(turns[-1])  # the final answer
        # the whole oracle chain scores perfectly
        counts = score_episode(fmt, posed, turns, success=True)
        assert counts["matched_calls"] == counts["attempted_calls"] == len(oracle)
        assert counts["valid_turns"] == counts["turns"] == len(turns)
    # two calls in one turn
    two = "\n".join(fmt.render(*c) for c in [("find_user", {"name": "a"}), ("get_city", {"user_id": "b"})])
    if name == "python_list":
        two = '[find_user(name="a"), get_city(user_id="b")]'
    calls, error = fmt.parse(two)
    assert error is None and len(calls) == 2


def test_python_list_parser_never_runs_model_output(tmp_path):
    marker = tmp_path / "pwned"
    fmt = get_format("python_list")
    hostile = [
        f'[__import__("os").system("touch {marker}")]',
        f'[find_user(name=__import__("os").system("touch {marker}"))]',
        f'[find_user(name=open("{marker}", "w"))]',
        '[find_user(name=x)]', '[a.b(c=1)]', '[find_user("alice")]', '[f(**{"a": 1})]', '[(lambda: 1)()]',
        '[find_user(name="a")][0]', 'find_user(name="a")', '[find_user(name="a") for _ in range(3)]',
        '[find_user(name=1+1)]', '[find_user(name="a"' , '[' * 500 + ']' * 500, '[]',
    ]
    for text in hostile:
        calls, error = fmt.parse(text)
        assert calls == [] and isinstance(error, str), text
        assert not fmt.validity(text)
    assert not marker.exists()
    # literal values of any JSON-like kind are fine
    assert parse_python_calls('[f(a="x", b=[1, 2], c={"k": None}, d=True, e=-1.5)]') == [
        {"name": "f", "arguments": {"a": "x", "b": [1, 2], "c": {"k": None}, "d": True, "e": -1.5}}]
    assert fmt.parse("The answer is \"oslo\".") == ([], None)


@pytest.mark.parametrize("name,text", [
    ("hermes", "<tool_call>"), ("hermes", "<tool_call>\n"), ("hermes", "<tool_call>\n{\"name\": 1}"),
    ("renamed_tags", "<function_call>\n{oops}\n</function_call>"), ("renamed_tags", "<function_call>\n"),
    ("json", '{"name": "find_user"'), ("json", '{"name": "find_user", "arguments": 3}'),
    ("xml", '<invoke name="find_user"><parameter name="name">a</parameter>'),
    ("xml", '<invoke name="find_user">junk<parameter name="name">a</parameter></invoke>'),
    ("markdown", "```json\n{\"name\": \"find_user\", \"arguments\": {}}"),
    ("markdown", "```json\nnot json\n```"),
    ("llama3", "<|python_tag|>"), ("llama3", '<|python_tag|>{"name": "f", "arguments": 1}'),
    ("mistral", "[TOOL_CALLS][oops]"),
])
def test_malformed_calls_are_errors(name, text):
    fmt = get_format(name)
    calls, error = fmt.parse(text)
    assert calls == [] and error, (name, text)
    assert not fmt.validity(text)


def test_validity_is_syntax_specific():
    canonical_call = world.render_call("find_user", {"name": "alice"})
    # a canonical call is content in other syntaxes' eyes, never well-formed there
    for name in ("renamed_tags", "python_list", "xml", "markdown", "json", "llama3", "mistral"):
        assert not get_format(name).validity(canonical_call), name
    assert get_format("json").parse(canonical_call)[0]  # lenient: the JSON line is still read
    assert not get_format("hermes").validity("")  # an empty turn is not a clean answer
    assert not get_format("hermes").validity("chatter " + canonical_call)


def test_content_is_scored_per_call_against_the_oracle():
    task = world.task_split("eval", 1, offset=3)[0]
    (t0, a0, _), (t1, a1, _) = task.oracle_calls()[:2]
    py = get_format("python_list")
    wrong = py.render(t1, {k: "nobody" for k in a1})
    turns = [py.render(t0, a0), wrong, py.render(t1, a1), "<tool_call>"]
    c = score_episode(py, task, turns, success=False)
    assert (c["matched_calls"], c["attempted_calls"], c["valid_turns"], c["turns"]) == (2, 3, 3, 4)
    assert c["oracle_steps"] == len(task.chain) and c["answer_correct"] == 0
    # a model that ignores the requested syntax: its content shows only in the any-syntax count
    c = score_episode(py, task, [world.render_call(t0, a0)], success=False)
    assert c["matched_calls"] == 0 and c["matched_any_syntax"] == 1 and c["canonical_turns"] == 1


def test_reworded_and_renamed_tools_content():
    assert set(PARAPHRASES) >= set(world.TASK_KINDS)
    fmt = get_format("reworded")
    for task in world.task_split("eval", 8):
        q = fmt.prepare(task).question
        assert q != task.question and f'"{task.subject}"' in q
    ren = get_format("renamed_tools")
    task = ren.prepare(world.task_split("eval", 1)[0])
    assert isinstance(task, RenamedTask)
    names = {t["name"] for t in ren.tools()}
    assert names.isdisjoint(world.TOOL_NAMES) and "lookup_person" in ren.system_prompt()
    assert "find_user" not in ren.system_prompt()
    assert "error" in task.execute("find_user", {"name": task.subject})  # the old name is gone
    err = task.execute("lookup_person", {"name": task.subject})["error"]  # old argument name
    assert "lookup_person" in err and "person" in err and "find_user" not in err
    obs = task.execute("lookup_person", {"person": task.subject})
    assert obs == {"uid": task.users[task.subject]}
    assert ren.to_canonical({"name": "find_user", "arguments": {"name": "x"}}) is None


# ------------------------------------------------------------------------------------------------ masking
def _roles() -> ControlTokens:
    ids = {"tool_open": 1, "newline": 2, "tool_close": 3, "end_of_turn": 4, "eos": 4, "json_open": 5, "turn_open": 6}
    return ControlTokens(ids=ids, strings={k: k for k in ids})


def test_forbid_tokens_masks_only_right_after_the_open_tag():
    proc = ForbidTokens([4], open_id=1, newline_id=2, close_id=3)
    gen = [[1], [1, 2], [1, 2, 5], [], [7, 1], [2], [7, 2], [1, 2, 5, 3, 1, 2], [1, 2, 4]]
    logits = torch.zeros(len(gen), 10)
    logits[:, 4] = 5.0  # end_of_turn is the greedy choice everywhere
    out = proc(gen, logits)
    masked = [i for i in range(len(gen)) if out[i, 4] == float("-inf")]
    assert masked == [0, 1, 4, 7]
    assert torch.equal(out[:, :4], logits[:, :4]) and torch.equal(out[:, 5:], logits[:, 5:])
    assert torch.equal(logits[:, 4], torch.full((len(gen),), 5.0))  # the input is not modified in place
    assert proc.applied == 4 and proc.changed == 4
    inside = ForbidTokens([4], open_id=1, newline_id=2, close_id=3, position="in_call")
    out = inside([[1, 2, 5, 7], [1, 2, 5, 3], [5], [1, 2, 5, 3, 1]], torch.zeros(4, 10))
    assert [bool(out[i, 4] == float("-inf")) for i in range(4)] == [True, False, False, True]
    pytest.raises(UserError, ForbidTokens, [4], open_id=1, position="everywhere")  # an unknown position


def test_observer_and_spiking_roles():
    roles = _roles()
    obs = ObserveAfterOpen(roles)
    logits = torch.full((3, 10), -20.0)
    # after the tag: all mass on end_of_turn; after the newline: json_open (healthy); elsewhere: not recorded
    logits[0, 4] = logits[1, 5] = logits[2, 6] = 0.0
    assert obs([[1], [1, 2], [7]], logits) is logits
    probs = obs.probs()
    assert probs["after_tag"]["count"] == 1 and probs["after_tag"]["end_of_turn"] > 0.99
    assert probs["after_open"]["json_open"] > 0.99 and probs["after_open"]["end_of_turn"] < 1e-6
    picked, best = spiking_roles(roles, onpolicy=probs)
    assert picked == ["end_of_turn"] and "eos" not in best  # shared id reported once, under the canonical role
    picked, _ = spiking_roles(roles, probe={"cp/probe/after_open/json_open": 0.9, "cp/probe/after_open/turn_open": 0.2,
                                            "cp/probe/after_open/newline": 0.5, "cp/probe/after_open/count": 16.0})
    assert picked == ["turn_open"]
    assert format_spread({"a": {"content_accuracy": 0.9}, "b": {"content_accuracy": 0.25}}) == pytest.approx(0.65)


# ------------------------------------------------------------------------------------------------ tiny model
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from transformers.utils import logging as hf_logging

    from collapse_probe.train import tiny

    hf_logging.disable_progress_bar()
    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, "tiny", seed=0)
    path = tmp_path_factory.mktemp("recover") / "checkpoint-0"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def test_evaluate_and_masked_shapes(tiny_ckpt):
    _, model, tok = tiny_ckpt
    res = evaluate_format(model, tok, "python_list", n=2, max_turns=2, max_new_tokens=8)
    for key in ("validity", "content_accuracy", "success", "call_accuracy", "calls_per_episode"):
        assert isinstance(res[key], float) and 0.0 <= res[key] <= 1.0 or key == "calls_per_episode"
    assert res["n"] == 2 and res["format"] == "python_list"
    m = masked_eval(model, tok, ("end_of_turn",), n=2, max_turns=1)
    assert m["masked_roles"] == ["end_of_turn"] and m["selection"] == "given" and m["position"] == "after_open"
    assert {"validity", "success", "content_accuracy", "mask_applied", "mask_changed"} <= set(m)
    auto = masked_eval(model, tok, None, n=1, max_turns=1, probe={"cp/probe/after_open/tool_open": 0.3})
    assert auto["masked_roles"] == ["tool_open"] and auto["selection"] == "auto" and "per_role" not in auto
    two = masked_eval(model, tok, None, n=1, max_turns=1, probe={"cp/probe/after_open/tool_open": 0.3,
                                                                 "cp/probe/after_open/end_of_turn": 0.6})
    assert two["masked_roles"] == ["end_of_turn", "tool_open"] and set(two["per_role"]) == set(two["masked_roles"])
    with pytest.raises(UserError):
        masked_eval(model, tok, ("no_such_role",), n=1, max_turns=1)


def test_sft_repair_bookkeeping(tiny_ckpt, monkeypatch):
    """Real SFT steps on the tiny model; success values scripted so both branches of the comparison run."""
    _, model, tok = tiny_ckpt
    before = {k: v.clone() for k, v in model.state_dict().items()}
    script = iter([0.5, 0.9,  # repair: eval at step 1 (0.5), step 2 (0.9 >= target)
                   0.0, 0.1, 0.2])  # fresh: never reaches 0.9 within 3 steps
    monkeypatch.setattr(repair_mod, "evaluate", lambda *a, **k: next(script))
    seen = []
    rep = repair_mod.sft_repair(model, tok, max_steps=5, eval_every=1, target=0.8, batch=2, pool=3, n=1,
                                fresh_max_steps=3, success_before=0.0, progress=lambda *a: seen.append(a))
    assert rep["steps"] == 2 and rep["success_after"] == 0.9 and rep["reached_target"]
    assert rep["fresh_steps_to_same"] is None and rep["fresh_success_at_budget"] == 0.2
    assert rep["latent_skill_ratio"] == 1.5 and rep["latent_skill_ratio_is_lower_bound"]
    assert set(rep["p_after_open_before"]) >= {"end_of_turn", "json_open", "tool_open"}
    assert rep["p_after_open_before"] != rep["p_after_open_after"]  # the copy was trained
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model was not
    assert ("repair", 2, 5) in seen and ("fresh", 3, 3) in seen
    script = iter([0.9, 0.3, 0.95])  # fresh reaches the repaired level at step 2
    monkeypatch.setattr(repair_mod, "evaluate", lambda *a, **k: next(script))
    rep = repair_mod.sft_repair(model, tok, max_steps=5, eval_every=1, batch=2, pool=3, n=1, fresh_max_steps=9,
                                success_before=0.0)
    assert rep["steps"] == 1 and rep["fresh_steps_to_same"] == 2 and rep["latent_skill_ratio"] == 2.0
    assert not rep["latent_skill_ratio_is_lower_bound"]
    assert any("fresh model" in s for s in findings({
        "canonical": {"validity": 0.0, "success": 0.0}, "formats": {}, "spread": 0.0, "masked": None,
        "repair": rep, "collapsed": True}))


def test_run_recovery_result_shape(tiny_ckpt):
    path, _, _ = tiny_ckpt
    res = run_recovery(path, formats="canonical,python_list,renamed_tools", n=1, max_turns=1, repair_steps=1,
                       fresh_max_steps=1)
    assert set(res) == {"canonical", "formats", "spread", "masked", "repair", "collapsed", "findings"}
    assert set(res["canonical"]) == {"validity", "success"}
    assert list(res["formats"]) == ["hermes", "python_list", "renamed_tools"]  # keyed by registry name
    for r in res["formats"].values():
        assert set(r) == {"validity", "content_accuracy", "success"} and all(isinstance(v, float) for v in r.values())
    assert isinstance(res["spread"], float) and res["collapsed"] is True  # a random model
    assert {"validity", "success", "content_accuracy", "masked_roles"} <= set(res["masked"])
    assert {"steps", "success_before", "success_after", "fresh_steps_to_same"} <= set(res["repair"])
    assert isinstance(res["repair"]["steps"], int)
    assert res["findings"] and all(isinstance(s, str) for s in res["findings"])
    assert any("no perturbed format and no masking" in s for s in res["findings"])
    json.dumps(res)  # JSON-ready
    md = recovery_markdown(res)
    assert "| python_list |" in md and "Findings:" in md
    from rich.console import Console
    console = Console(record=True, width=160)
    console.print(render_recovery_table(res))
    assert '[find_user(name="alice")]' in console.export_text()  # markup in notes is escaped, not eaten


def test_findings_name_the_probe_that_found_the_skill():
    res = {"canonical": {"validity": 0.1, "success": 0.05}, "collapsed": True, "spread": 0.7,
           "formats": {"canonical": {"validity": 0.1, "content_accuracy": 0.1, "success": 0.05},
                       "python_list": {"validity": 0.9, "content_accuracy": 0.8, "success": 0.7}},
           "masked": {"validity": 0.9, "success": 0.84, "content_accuracy": 0.9, "masked_roles": ["end_of_turn"],
                      "position": "after_open", "selection": "auto", "mask_changed": 25},
           "repair": None}
    text = "\n".join(findings(res))
    assert "masking end_of_turn after <tool_call> restored 0.84 success" in text and "one token" in text
    assert "python_list 0.80" in text and "damage spread" not in text
    res["masked"] = {**res["masked"], "masked_roles": ["end_of_turn", "tool_open"], "per_role": {
        "end_of_turn": {"validity": 0.9, "success": 0.8, "content_accuracy": 0.85, "mask_changed": 20},
        "tool_open": {"validity": 0.1, "success": 0.0, "content_accuracy": 0.0, "mask_changed": 5}}}
    assert "hidden by one token (end_of_turn masked alone gives success 0.80" in "\n".join(findings(res))
    # a mask that never fired restores nothing, and a healthy model has nothing hidden
    res["masked"]["mask_changed"] = 0
    res["formats"]["python_list"]["content_accuracy"] = 0.1
    text = "\n".join(findings(res))
    assert "changed no greedy decision" in text and "damage spread beyond one token" in text
    assert "not in a control-token spike" not in text
    res["canonical"] = {"validity": 1.0, "success": 0.0}
    assert "not in a control-token spike" in "\n".join(findings(res))
    cases = ((0.1, 0.05), (None, 0.3), (1.0, 0.0), (0.0, 0.9))  # detect.rule: success dropped and turns broken
    assert [checkpoint_collapsed({"validity": v, "success": s}) for v, s in cases] == [True, True, False, False]
    healthy = {**res, "collapsed": False, "canonical": {"validity": 1.0, "success": 0.9},
               "formats": {"canonical": {"validity": 1.0, "content_accuracy": 0.92, "success": 0.9},
                           "xml": {"validity": 0.0, "content_accuracy": 0.0, "success": 0.0}}}
    healthy["masked"] = {**res["masked"], "mask_changed": 3}
    text = "\n".join(findings(healthy, details={"xml": {"canonical_turn_frac": 0.97}}))
    assert text.startswith("not collapsed (detect.rule:") and "restored" not in text and "damage spread" not in text
    assert "kept writing canonical <tool_call> calls (xml 97% of turns)" in text and "OOD brittleness" in text


# ------------------------------------------------------------------------------------------------ CLI
def _bad_tokenizer_ckpt(path: Path, model) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"[UNK]": 0, "<|im_end|>": 1, "hello": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="<|im_end|>").save_pretrained(path)
    model.save_pretrained(path)
    return path


# Runs each case through collapse_probe.cli.main in one fresh interpreter, stdout/stderr captured per case
# (one interpreter start instead of one per case keeps the test fast on a busy 2-core machine).
_DRIVER = """
import io, json, sys
from collapse_probe.cli.app import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    sys.argv, sys.stdout, sys.stderr = ["collapse-probe", "recover", *argv], out, err
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    results[name] = {"code": code, "out": out.getvalue(), "err": err.getvalue()}
print(json.dumps(results))
"""


def test_cli_recover_bad_inputs_one_line_exit_1(tiny_ckpt, tmp_path):
    good, model, _ = tiny_ckpt
    (tmp_path / "empty").mkdir()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(model.config.to_json_string())
    (tmp_path / "file.txt").write_text("x")
    badtok = str(_bad_tokenizer_ckpt(tmp_path / "badtok", model))
    run = tmp_path / "run"  # a run directory: the trainer's config.json, checkpoints below
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "checkpoint-5" / "config.json").write_text("{}")
    (run / "config.json").write_text('{"mode": "grpo"}')
    cases = {
        "missing": [str(tmp_path / "missing")],
        "not a dir": [str(tmp_path / "file.txt")],
        "empty": [str(tmp_path / "empty")],
        "no weights": [str(tmp_path / "noweights")],
        "no control tokens": [badtok],
        "run dir": [str(run)],
        "unknown format": [str(good), "--formats", "canonical,yaml"],
        "bad n": [str(good), "-n", "0"],
    }
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("COLLAPSE_PROBE_DEBUG", None)
    code = "from collapse_probe.cli.app import main; main()"
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, json.dumps(cases)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    # the real entry point, end to end: one bad input, one good run
    direct = subprocess.run([sys.executable, "-c", code, "recover", badtok], capture_output=True, text=True,
                            env=env, timeout=120)
    ok = subprocess.run([sys.executable, "-c", code, "recover", str(good), "--json", "-n", "1", "--formats",
                         "canonical,xml", "--skip-repair"], capture_output=True, text=True, env=env, timeout=120)
    stdout, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 0, stderr
    results = json.loads(stdout)
    results["direct"] = {"code": direct.returncode, "out": direct.stdout, "err": direct.stderr}
    for name, r in results.items():
        lines = r["err"].strip().splitlines()
        assert r["code"] == 1, (name, r)
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r["err"], (name, r["err"])
        assert r["out"] == "", name
    errs = {k: v["err"] for k, v in results.items()}
    assert "yaml" in errs["unknown format"] and "python_list" in errs["unknown format"]
    assert "<tool_call>" in errs["no control tokens"] and errs["direct"] == errs["no control tokens"]
    assert "config.json" in errs["empty"] and "safetensors" in errs["no weights"]
    assert "run directory" in errs["run dir"] and "checkpoint-5" in errs["run dir"]
    assert ok.returncode == 0, ok.stderr
    res = json.loads(ok.stdout)
    assert list(res["formats"]) == ["hermes", "xml"] and res["repair"] is None and res["collapsed"] is True
