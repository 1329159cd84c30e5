"""BFCL multi-turn tasks: our eval-free executor and the package's checkers agree with BFCL's own data (issue 20).

Figures (bfcl-eval 2026.3.23, categories multi_turn_base / miss_param / miss_func, 200 entries each):

- executing the ground truth passes on 600 of 600 entries: no entry is excluded (memory_* and web_search, whose
  classes import faiss/serpapi, are other categories; the `excluded_function` field of 18 entries per category is
  not read by BFCL's own pipeline either, so it is not read here).
- mutations of the ground truth, run as the model's calls: every single call removed (3422), the first argument of
  every call with arguments changed (3119), and the calls of the first two different non-empty turns swapped (591):
  7,011 of 7,132 fail. A mutation passes exactly when it is proved equivalent, each proof computed by replaying the
  calls on fresh instances, independently of the package's checker:
    observationally equivalent (112): every turn returns the same multiset of result texts and ends in the same
      public state as the ground truth (a removal: the ground truth's texts of that turn are all still returned so
      far, and a turn with ground truth keeps a call, BFCL's empty-turn rule)
        removed   3  `get_watchlist()` repeated in the turn after `add_to_watchlist` returned the same watchlist
                     (multi_turn_*_113)
        argument 98  the changed argument changes neither result nor state: `ls(a=...)` in folders without hidden
                     files (30), `estimate_drive_feasibility_by_mileage(distance+1)` far from the range limit (36),
                     `add_to_watchlist` of a stock already watched (20), `authenticate_travel` (9) and
                     `authenticate_twitter` (3), whose results do not depend on that argument
        swapped  11  two turns whose calls leave the state alone and return the same text (a watched stock added
                     again, then the watchlist read: multi_turn_*_103/137/139/142)
    equivalent under BFCL's documented rule (9): the state matches and the turn's ground-truth results were already
      returned in an earlier turn ("the model invokes a function in a previous turn"): `grep` of a file name made
      wrong when the same lines were grepped the turn before (3), `get_ticket` of another id when that ticket was
      fetched earlier (6)
"""

from __future__ import annotations

import builtins
import copy
import json
from collections import Counter

import pytest

from collapse_probe.errors import UserError
from collapse_probe.tasks import open_source
from collapse_probe.tasks.bfcl import CATEGORIES, keywordize
from collapse_probe.tasks.bfcl_env import make_instances, method_table, run_call

SPECS = [f"bfcl:{c}" for c in CATEGORIES]
SAME = {"remove": 3, "arg": 98, "swap": 11}  # observationally equivalent mutations (docstring)
EARLIER = {"arg": 9}  # equivalent under BFCL's rule: the results were already returned in an earlier turn


@pytest.fixture(scope="module")
def sources():
    return {s: open_source(s) for s in SPECS}


def _check(task, turns) -> bool:
    env = task.environment()
    ok = True
    for calls in turns:
        for c in calls:
            env.call(c["name"], c["arguments"])
        ok = env.end_turn().valid and ok
    return ok


_GOLD: dict[str, list] = {}


def _gold_trace(task) -> list[tuple[list[str], dict]]:
    if task.id not in _GOLD:
        _GOLD[task.id] = _trace(task, task.gold)
    return _GOLD[task.id]


def _trace(task, turns) -> list[tuple[list[str], dict]]:
    """Per turn: the result texts and a snapshot of the public state (independent of the checker)."""
    insts = make_instances(task.meta["involved_classes"], task.meta["initial_config"])
    table = method_table(insts)
    out = []
    for calls in turns:
        texts = [run_call(table, c["name"], c["arguments"]) for c in calls]
        state = {n: {k: copy.deepcopy(v) for k, v in vars(i).items() if not k.startswith("_")}
                 for n, i in insts.items()}
        out.append((texts, state))
    return out


def _equivalent(task, mutated, removed: tuple[int, str] | None = None) -> bool:
    gold, got = _gold_trace(task), _trace(task, mutated)
    seen: Counter = Counter()
    for k, ((gt, gs), (mt, ms)) in enumerate(zip(gold, got)):
        gt, mt = Counter(gt), Counter(mt)
        seen += mt
        want = gt - Counter([removed[1]]) if removed and removed[0] == k else gt
        if mt != want or ms != gs or (gt and not mt):  # BFCL: a turn with ground truth needs a call
            return False
        if removed and removed[0] == k and Counter(gt) - seen:  # the removed text, as often as BFCL needs it
            return False
    return True


def _already_returned(task, mutated) -> bool:
    """BFCL's documented rule, replayed here on our own: every turn ends in the ground truth's public state, a turn
    with ground truth has a call, and the turn's ground-truth texts were all returned at some point so far (a model
    may have fetched them in an earlier turn)."""
    seen: Counter = Counter()
    for (gt, gs), (mt, ms) in zip(_gold_trace(task), _trace(task, mutated)):
        seen += Counter(mt)
        if ms != gs or (gt and not mt) or Counter(gt) - seen:
            return False
    return True


def _change(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1
    if isinstance(v, str):
        return v + "_x"
    if isinstance(v, list):
        return v[:-1] if v else ["x"]
    return {**v, "x": 1} if isinstance(v, dict) else "x"


def test_ground_truth_passes_on_every_entry(sources):
    for spec, src in sources.items():
        assert len(src.tasks) == 200, spec
        failed = [t.id for t in src.tasks if not _check(t, t.gold)]
        assert failed == [], f"{spec}: ground truth fails on {failed}"


def test_mutations_fail_unless_provably_equivalent(sources):
    """Each mutation passes the checker exactly when it is proved equivalent, by one of the two rules above."""
    same, earlier, failed = Counter(), Counter(), Counter()

    def judge(kind, task, mutated, removed=None):
        passed = _check(task, mutated)
        identical = _equivalent(task, mutated, removed)
        fetched = _already_returned(task, mutated)
        assert passed == (identical or fetched), (task.id, kind)
        (same if identical and passed else earlier if passed else failed)[kind] += 1

    for src in sources.values():
        for task in src.tasks:
            g = task.gold
            for ti, turn in enumerate(g):
                for ci, call in enumerate(turn):
                    m = copy.deepcopy(g)
                    del m[ti][ci]
                    text = _gold_trace(task)[ti][0][ci]  # the removed call's text where it ran
                    judge("remove", task, m, (ti, text))
                    if call["arguments"]:
                        m = copy.deepcopy(g)
                        key = next(iter(call["arguments"]))
                        m[ti][ci]["arguments"][key] = _change(call["arguments"][key])
                        judge("arg", task, m)
            busy = [i for i, t in enumerate(g) if t]
            pair = next(((a, b) for a, b in zip(busy, busy[1:]) if g[a] != g[b]), None)
            if pair:
                m = copy.deepcopy(g)
                m[pair[0]], m[pair[1]] = m[pair[1]], m[pair[0]]
                judge("swap", task, m)
    assert same + earlier + failed == Counter({"remove": 3422, "arg": 3119, "swap": 591})
    assert dict(same) == SAME and dict(earlier) == EARLIER


def test_positional_ground_truth_is_bound_by_signature_not_evaluated():
    assert keywordize("[sort('a.pdf'), cd(folder='x')]", {"sort": ["file_name"]}) == \
        "[sort(file_name='a.pdf'), cd(folder='x')]"
    src = open_source("bfcl:multi_turn_base")
    assert src.tasks[0].gold[2] == [{"name": "sort", "arguments": {"file_name": "final_report.pdf"}}]


def test_executor_errors_are_observations_and_refusals_hold(sources):
    task = sources["bfcl:multi_turn_base"].tasks[0]
    env = task.environment()
    assert env.call("no_such_tool", {}) == "Error during execution: name 'no_such_tool' is not defined"
    assert env.call("__import__", {"name": "os"}).startswith("Error during execution")
    assert env.call("_load_scenario", {"scenario": {}}).startswith("Error during execution")  # private: not listed
    assert env.call("run", {}) == "Error during execution: Function call run is not allowed."
    assert "Error during execution" in env.call("cd", {"folder": "nowhere", "bogus": 1})


def test_bfcl_episodes_never_eval_or_exec(monkeypatch, sources):
    """Scripted turns that write the ground truth in each syntax go through the chat episode (parse, execute,
    check) with builtins.eval/exec made to fail: every task succeeds, so nothing on that path evaluates."""
    from transformers import AutoTokenizer

    from collapse_probe.models.fetch import fetch
    from collapse_probe.recover.chat_episode import EpisodeResult, chat_formats, run_episode
    from collapse_probe.recover.chat_eval import render_calls

    tok = AutoTokenizer.from_pretrained(str(fetch("smollm2-135m")), local_files_only=True)
    # the template is the tokenizer's own code: jinja compiles it (with exec) once, before any model output exists
    fmts, info, note = chat_formats(tok)
    assert not info.uses_tools and fmts[0].name == "hermes" and "ignores" in note

    def refuse(*a, **k):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)

    class Scripted:  # plays the ground truth: one message with the turn's calls, then a plain answer
        eos = {2}

        def __init__(self, task, fmt):
            self.msgs = []
            for calls in task.gold:
                self.msgs += ([render_calls(fmt, calls)] if calls else []) + ["Done."]

        def generate(self, ids, max_new_tokens, processor=None):
            return tok.encode(self.msgs.pop(0), add_special_tokens=False) + [2]

    for spec, src in sources.items():
        for task in src.tasks[:2]:
            for fmt in fmts:
                res = run_episode(Scripted(task, fmt), tok, fmt, task, max_steps=3)
                assert isinstance(res, EpisodeResult) and res.success, (spec, task.id, fmt.name)


# ------------------------------------------------------------------------------------------------ bad input
def _line(tmp_path, text: str):
    p = tmp_path / f"t{len(list(tmp_path.iterdir()))}.jsonl"
    p.write_text(text)
    return p


def test_bad_task_input_is_one_line(tmp_path, monkeypatch):
    good = {"tools": [{"name": "f", "parameters": {"type": "object", "properties": {}}}],
            "turns": [{"user": "hi", "calls": [{"name": "f", "arguments": {}}]}]}
    cases = {
        "no such task file": str(tmp_path / "missing.jsonl"),
        "not JSON": _line(tmp_path, "{oops\n"),
        "missing field 'turns'": _line(tmp_path, json.dumps({"tools": []}) + "\n"),
        "missing field 'calls'": _line(tmp_path, json.dumps({**good, "turns": [{"user": "hi"}]}) + "\n"),
        "unknown BFCL category": "bfcl:multi_turn_nope",
    }
    for want, spec in cases.items():
        with pytest.raises(UserError) as e:
            open_source(str(spec))
        assert want in str(e.value) and "\n" not in str(e.value), str(e.value)
    src = open_source(str(_line(tmp_path, json.dumps(good) + "\n" + json.dumps(good) + "\n")))
    assert [t.id for t in src.split("eval")] == ["line-1"] and [t.id for t in src.split("repair")] == ["line-2"]

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bfcl_eval" else real(name, *a))
    with pytest.raises(UserError, match="bfcl-eval package, which is not installed"):
        open_source("bfcl:multi_turn_base")


def test_a_template_that_fails_to_render_is_one_line():
    from transformers import AutoTokenizer

    from collapse_probe.models.fetch import fetch
    from collapse_probe.recover.chat_episode import chat_formats

    tok = AutoTokenizer.from_pretrained(str(fetch("smollm2-135m")), local_files_only=True)
    tok.chat_template = "{{ messages[0]['content'] | no_such_filter }}"
    with pytest.raises(UserError, match="the chat template failed to render"):
        chat_formats(tok)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(UserError, match="--template native"):
        chat_formats(tok, "native")


def test_cli_task_errors_are_one_line_exit_1(tmp_path):
    """`recover --tasks` / `analyze --tasks` refuse bad task input before any model loads (the other bad inputs
    reach the same `open_source`: test_bad_task_input_is_one_line)."""
    from helpers.cli import run_cli

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tools": [], "turns": [{"user": "hi"}]}\n')
    for args, want in ((["recover", str(tmp_path), "--tasks", str(bad)], "missing field 'calls'"),
                       (["analyze", str(tmp_path), "--tasks", "bfcl:nope"], "unknown BFCL category")):
        proc, _ = run_cli(args, tmp_path)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 1 and len(lines) == 1 and want in lines[0], (args, proc.stderr)


# Qwen2.5's chat template, the parts that handle tools (system tool block, assistant tool_calls, tool role)
QWEN_LIKE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not tools) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls or [] %}{%- set tool_call = tool_call.function %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' }}{{- message.content }}"
    "{{- '\\n</tool_response><|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_a_template_with_tool_support_is_used_natively():
    from transformers import AutoTokenizer

    from collapse_probe.models.fetch import fetch
    from collapse_probe.recover.chat_episode import chat_formats

    tok = AutoTokenizer.from_pretrained(str(fetch("smollm2-135m")), local_files_only=True)
    tok.chat_template = QWEN_LIKE
    fmts, info, note = chat_formats(tok)
    assert info.uses_tools and info.tool_role and info.native == "hermes" and fmts[0].name == "native"
    task = open_source("bfcl:multi_turn_base").tasks[0]
    conv = [*task.turns[0], {"role": "assistant", "content": "<tool_call>\n{}\n</tool_call>"},
            {"role": "tool", "content": "RESULT-1"}]
    text = tok.decode(fmts[0].render(tok, conv, task.tools_at(0)))
    assert '"name": "mv"' in text and "<tool_response>\nRESULT-1\n</tool_response>" in text
    assert chat_formats(tok, "hermes")[0][0].name == "hermes"
