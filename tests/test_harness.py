"""The paper-like harness (world.episode PAPER) and the instruct mixture (train/instruct.py)."""
import json
import random

import pytest

from collapse_probe import world
from collapse_probe.formats.registry import SYNTAXES
from collapse_probe.train import instruct


def _task():
    return world.make_task(12345, "weather")


def test_paper_harness_bare_tag_is_an_empty_reply_that_fails():
    ep = world.Episode(_task(), max_turns=30, harness=world.PAPER)
    assert ep.step(f"{world.TOOL_OPEN}\n") is None  # no closed call: a text reply ends the episode
    assert ep.done and ep.final_answer == f"{world.TOOL_OPEN}\n" and not ep.success
    strict = world.Episode(_task(), max_turns=30)
    assert strict.step(f"{world.TOOL_OPEN}\n") is not None  # strict: an empty call gets an error and goes on


def test_paper_harness_execution_errors_are_observations_and_the_episode_goes_on():
    task = _task()
    ep = world.Episode(task, max_turns=30, harness=world.PAPER)
    obs = ep.step(world.render_call("get_city", {"user_id": "nobody"}))
    assert obs is not None and "error" in obs and not ep.done
    obs = ep.step(world.render_call("no_such_tool", {"x": "y"}))
    assert obs is not None and "unknown tool" in obs
    for name, args, _ in task.oracle_calls():
        assert ep.step(world.render_call(name, args)) is not None
    assert ep.step(world.render_answer(task.answer)) is None and ep.success
    assert ep.n_errors == 2 and ep.n_calls == len(task.chain) + 2
    strict = world.Episode(task, max_turns=30)
    assert strict.step(world.render_call("get_city", {"user_id": "nobody"})) is None  # strict ends on a failed call


def test_paper_harness_unclosed_or_broken_calls_are_dropped_and_end_the_turn():
    for text in (f"{world.TOOL_OPEN}\n{{\"name\": \"find_user\"", f"{world.TOOL_OPEN}\nnot json\n{world.TOOL_CLOSE}"):
        ep = world.Episode(_task(), harness=world.PAPER)
        assert ep.step(text) is None and ep.final_answer == text and not ep.success


def test_paper_checker_reads_the_executed_calls_not_the_closing_text():
    task = _task()
    ep = world.Episode(task, max_turns=30, harness=world.PAPER)
    for name, args, _ in task.oracle_calls()[:-1]:
        ep.step(world.render_call(name, args))
    assert not ep.success  # one call short
    name, args, _ = task.oracle_calls()[-1]
    ep.step(world.render_call(name, args))
    assert ep.step(f"{world.TOOL_OPEN}\n") is None and ep.success  # an empty reply after the calls costs nothing
    ep = world.Episode(task, max_turns=30, harness=world.PAPER)
    assert ep.step(world.render_answer(task.answer)) is None and not ep.success  # the answer without the calls


def test_paper_harness_ends_at_max_turns():
    task = _task()
    ep = world.Episode(task, max_turns=30, harness=world.PAPER)
    call = world.render_call("find_user", {"name": task.subject})
    n = 0
    while ep.step(call) is not None:
        n += 1
    assert len(ep.turns) == 30 and n == 29 and ep.final_answer is None and not ep.success


def test_paper_reward_is_the_checker_even_when_the_turns_run_out():
    """The paper's reward is 1 when its checker passes: every oracle call executed, whether or not a closing
    answer came before max_turns (strict: the answer decides, so running out of turns is no_answer)."""
    task = _task()
    reward = world.RewardSpec(correct=1.0, wrong=0.0, no_answer=-0.5)
    calls = [world.render_call(n, a) for n, a, _ in task.oracle_calls()]
    ep = world.Episode(task, max_turns=len(calls), harness=world.PAPER)
    for text in calls:
        ep.step(text)
    assert ep.done and ep.final_answer is None and ep.success and reward(ep) == 1.0
    short = world.Episode(task, max_turns=len(calls) - 1, harness=world.PAPER)
    for text in calls[:-1]:
        short.step(text)
    assert short.done and not short.success and reward(short) == -0.5
    strict = world.Episode(task, max_turns=len(calls))
    for text in calls:
        strict.step(text)
    assert strict.final_answer is None and not strict.success and reward(strict) == -0.5


def test_unknown_harness_is_refused():
    with pytest.raises(ValueError, match="unknown harness"):
        world.Episode(_task(), harness="lenient")


def test_instruct_mixture_holds_every_syntax_said_in_the_system_prompt():
    rng = random.Random(0)
    seen: dict[str, int] = {}
    plain = 0
    for i in range(400):
        task = world.make_task(10**6 + i)
        prompt, turns = instruct.instruct_conversation(task, rng)
        if instruct.PLAIN_SYSTEM in prompt:
            plain += 1
            assert "<tools>" not in prompt and len(turns) == 1 and task.answer in turns[0][0]
            continue
        name = next(n for n, s in SYNTAXES.items() if prompt.split("</tools>\n")[1].split(world.IM_END)[0]
                    == s.call_instruction())
        seen[name] = seen.get(name, 0) + 1
        syn = SYNTAXES[name]
        calls = [syn.parse(t)[0] for t, obs in turns[:-1] if obs and "empty tool call" not in obs]
        oracle = [(n, a) for n, a, _ in task.oracle_calls()]
        got = [(c[0]["name"], c[0]["arguments"]) for c in calls]
        assert all(len(c) == 1 for c in calls)
        assert [g for g in got if g in oracle] == oracle  # the oracle chain, in order, in the asked syntax
        assert turns[-1] == (world.render_answer(task.answer), None)
    assert set(seen) == {n for n, _ in instruct.SYNTAX_MIX}
    assert seen["hermes"] > max(v for k, v in seen.items() if k != "hermes")  # canonical is the most common
    assert 20 <= plain <= 70


def test_instruct_error_traces_are_corrected_after_the_error():
    rng = random.Random(1)
    task = _task()
    turns = instruct.tool_turns(task, "python_list", rng, error_frac=1.0)
    errors = [i for i, (_, obs) in enumerate(turns) if obs and "error" in json.loads(obs.split("\n")[1])]
    assert 1 <= len(errors) <= 3 and errors == list(range(errors[0], errors[-1] + 1))  # one run of retries
    syn = SYNTAXES["python_list"]
    right = syn.parse(turns[errors[-1] + 1][0])[0][0]
    assert (right["name"], right["arguments"]) in [(n, a) for n, a, _ in task.oracle_calls()]
    for i in errors:
        wrong = syn.parse(turns[i][0])[0][0]
        assert wrong["name"] == right["name"] and wrong["arguments"] != right["arguments"]
