"""One call reader: the same call strings fed to the tool world's harness, the turn classifier and the grid's
hermes syntax get one answer (well-formed or not, and the same parsed calls)."""
from __future__ import annotations

import json

import pytest

from collapse_probe import world
from collapse_probe.formats import calls as C
from collapse_probe.formats.classify import classify_turn
from collapse_probe.recover.grid import get_format
from collapse_probe.schema import BROKEN_STATES, FormatState


def _call(name: str = "find_user", args: object = None, key: str = "arguments") -> str:
    body = json.dumps({"name": name, key: {"name": "alice"} if args is None else args})
    return f"<tool_call>\n{body}\n</tool_call>"


GOOD = _call()
DEEP = "<tool_call>\n" + '{"name": "f", "arguments": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001 + "\n</tool_call>"

# (text, expected error); expected calls are checked separately for the well-formed ones
CASES: list[tuple[str, str | None]] = [
    (GOOD, None),                                                                  # 1 one good call
    (_call(key="parameters"), None),                                               # 2 Llama 3.1 spelling
    (_call(args={"filter": {"city": ["oslo", "rome"], "n": 2}}), None),            # 3 nested arguments
    (_call(args={}), None),                                                        # 4 no arguments at all
    (GOOD + "\n" + _call("get_city", {"user_id": "ub"}), None),                    # 5 two calls
    (GOOD + GOOD + GOOD, None),                                                    # 6 three calls, no newlines
    ("Let me look that up.\n" + GOOD, None),                                       # 7 text before
    (GOOD + "\nI will wait for the result.", None),                                # 8 text after
    ('<tool_call>{"name":"find_user","arguments":{"name":"alice"}}</tool_call>', None),  # 9 compact
    ("The answer is \"oslo\".", None),                                             # 10 plain answer
    ("<tool_call>", C.EMPTY),                                                      # 11 bare tag
    ("<tool_call>\n", C.EMPTY),                                                    # 12 bare tag + newline
    ("<tool_call>\n</tool_call>", C.EMPTY),                                        # 13 empty body
    ("<tool_call>\n\n  \n</tool_call>", C.EMPTY),                                  # 14 whitespace body
    ('<tool_call>\n{"name": "find_user", "arguments": {"name": "alice"}}', C.NOT_CLOSED),  # 15 unclosed
    ("<tool_call>\n<tool_call>\n", C.NOT_CLOSED),                                  # 16 repeated tag
    ("<tool_call>\n" + GOOD, C.NOT_CLOSED),                                        # 17 tag opened twice
    ("<tool_call>\n{oops}\n</tool_call>", C.NOT_JSON),                             # 18 bad JSON
    ('<tool_call>\n{"name": "find_user", "arguments": {"name": "alice"}\n</tool_call>', C.NOT_JSON),  # 19 brace
    ("<tool_call>\n[find_user(name='alice')]\n</tool_call>", C.NOT_JSON),         # 20 python list in tags
    (DEEP, C.NOT_JSON),                                                            # 21 100,000 levels deep
    ("<tool_call>\n" + "[" * 100_000 + "\n</tool_call>", C.NOT_JSON),              # 22 deep, unbalanced
    ("<tool_call>\n" + json.dumps({"name": "f", "arguments": {"x": "y" * 30_000}}) + "\n</tool_call>",
     C.NOT_JSON),                                                                  # 23 huge body
    ('<tool_call>\n{"arguments": {"name": "alice"}}\n</tool_call>', C.NOT_A_CALL),  # 24 missing name
    (_call(name=""), C.NOT_A_CALL),                                                # 25 empty name
    (_call(args=["alice"]), C.NOT_A_CALL),                                         # 26 list arguments
    (_call(args="alice"), C.NOT_A_CALL),                                           # 27 string arguments
    ('<tool_call>\n{"name": "f", "arguments": 1, "parameters": {}}\n</tool_call>', C.NOT_A_CALL),  # 28 both
    ('<tool_call>\n["find_user"]\n</tool_call>', C.NOT_A_CALL),                    # 29 not an object
    (GOOD + "\n<tool_call>\n{bad}\n</tool_call>", C.NOT_JSON),                     # 30 good then bad
]
EXPECTED_CALLS = {
    0: [{"name": "find_user", "arguments": {"name": "alice"}}],
    1: [{"name": "find_user", "arguments": {"name": "alice"}}],
    2: [{"name": "find_user", "arguments": {"filter": {"city": ["oslo", "rome"], "n": 2}}}],
    3: [{"name": "find_user", "arguments": {}}],
    4: [{"name": "find_user", "arguments": {"name": "alice"}}, {"name": "get_city", "arguments": {"user_id": "ub"}}],
    5: [{"name": "find_user", "arguments": {"name": "alice"}}] * 3,
    6: [{"name": "find_user", "arguments": {"name": "alice"}}],
    7: [{"name": "find_user", "arguments": {"name": "alice"}}],
    8: [{"name": "find_user", "arguments": {"name": "alice"}}],
    9: [],
}


def test_thirty_cases():
    assert len(CASES) == 30
    assert set(EXPECTED_CALLS) == {i for i, (_, err) in enumerate(CASES) if err is None}


@pytest.mark.parametrize("i", range(len(CASES)))
def test_one_answer_on_every_path(i):
    text, expected_error = CASES[i]
    harness = world.parse_calls(text)
    assert harness == (EXPECTED_CALLS.get(i, []), expected_error)
    assert get_format("hermes").parse(text) == harness == get_format("canonical").parse(text)
    v = classify_turn(text)
    assert v.error == expected_error
    if expected_error is None:
        assert v.calls == harness[0]
        if harness[0] and v.reason == "ok_call":
            assert v.state is FormatState.HEALTHY_TOOL_CALL
    else:  # the harness cannot execute it: never a healthy turn
        assert v.state in BROKEN_STATES, v


@pytest.mark.parametrize("i", range(len(CASES)))
def test_the_episode_answers_the_same(i):
    text, expected_error = CASES[i]
    task = world.task_split("eval", 1)[0]
    ep = world.Episode(task, end_on_call_error=False)
    obs = ep.step(text)
    calls = EXPECTED_CALLS.get(i, [])
    if expected_error is not None:
        assert obs == f"{world.RESP_OPEN}\n{json.dumps({'error': expected_error})}\n{world.RESP_CLOSE}"
    elif calls:
        assert ep.n_calls == len(calls) and obs is not None
    else:
        assert ep.done and ep.final_answer == text


def test_strict_harness_goes_on_only_after_an_empty_call():
    task = world.task_split("eval", 1)[0]
    for text, err in CASES:
        if err is None:
            continue
        ep = world.Episode(task)
        obs = ep.step(text)
        assert (obs is not None) == (err == C.EMPTY), text[:60]


def test_bounds_never_raise():
    for text in ("{" * 100_000, "[" * 100_000 + "]" * 100_000, '{"a": ' * 100_000):
        assert C.loads(text) == (None, False)
        assert C.too_deep(text)
    assert C.loads('{"a": [1, {"b": 2}]}') == ({"a": [1, {"b": 2}]}, True)
    assert not C.too_deep('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}')
    with pytest.raises(C.PythonCallError):
        C.parse_python_calls("[" * 100_000 + "]" * 100_000)
