"""Task-seed ranges: train / eval / probe / repair never share a task, for any run seed 0..10,000."""
import pytest

from collapse_probe import world
from collapse_probe.world.tasks import TASKS_PER_RUN_SEED, task_seed

EVAL_N, PROBE_N = 100_000, 100_000  # far more than any command draws


def _span(split: str, run_seed: int = 0, n: int = TASKS_PER_RUN_SEED) -> range:
    lo, hi = task_seed(split, 0, run_seed), task_seed(split, n - 1, run_seed)
    assert hi - lo == n - 1  # each split is one contiguous block of seeds per run seed
    return range(lo, hi + 1)


def _overlap(a: range, b: range) -> bool:
    return a.start < b.stop and b.start < a.stop


def test_train_eval_probe_repair_are_disjoint_for_seeds_0_to_10000():
    fixed = [_span("eval", n=EVAL_N), _span("probe", n=PROBE_N)]
    assert not _overlap(*fixed)
    blocks = list(fixed)
    for run_seed in range(10_001):
        for split in ("train", "repair"):
            block = _span(split, run_seed)
            assert not any(_overlap(block, other) for other in fixed), (split, run_seed)
            blocks.append(block)
    blocks.sort(key=lambda r: r.start)  # no two blocks of any split or run seed overlap
    assert all(a.stop <= b.start for a, b in zip(blocks, blocks[1:]))


def test_seeds_10_and_20_no_longer_train_on_eval_or_probe_tasks():
    held_out = {t.seed for t in world.task_split("eval", 64)} | {t.seed for t in world.task_split("probe", 16)}
    for run_seed in (0, 10, 20):
        train = {t.seed for t in world.task_split("train", 8 * 50, run_seed=run_seed)}
        assert not train & held_out


def test_seeds_0_to_9_keep_the_tuned_layout():
    assert task_seed("train", 5, 3) == 3_000_005 and task_seed("eval", 7) == 10_000_007


def test_out_of_range_is_refused():
    with pytest.raises(ValueError):
        task_seed("bogus", 0)
    with pytest.raises(ValueError):
        task_seed("train", TASKS_PER_RUN_SEED)


# ----------------------------------------------------------------------------------- the paper's task structure
def _structured(want, user_turns: int = 4, abstain_frac: float = 0.3, n: int = 3000) -> world.Task:
    """The first task (by seed) with the structure `want(task)` asks for."""
    for seed in range(n):
        task = world.make_task(seed, user_turns=user_turns, abstain_frac=abstain_frac)
        if want(task):
            return task
    raise AssertionError("no such task in range")


def _play(task: world.Task, turns: list[str], harness: str) -> world.Episode:
    ep = world.Episode(task, max_turns=60, harness=harness)
    for text in turns:
        assert not ep.done
        ep.step(text)
    return ep


def _oracle(task: world.Task) -> list[str]:
    return [turn for turn, _ in world.oracle_turns(task)]


def test_options_off_give_the_plain_task():
    for seed in range(200):
        plain, same = world.make_task(seed), world.make_task(seed, user_turns=1, abstain_frac=0.0)
        assert plain == same and plain.user_turns[0].question == plain.question and plain.withheld is None
        structured = world.make_task(seed, user_turns=5, abstain_frac=0.2)
        assert (structured.users, structured.city, structured.sky) == (plain.users, plain.city, plain.sky)


@pytest.mark.parametrize("harness", world.HARNESSES)
def test_multi_question_oracle_succeeds_and_a_missing_call_in_any_user_turn_fails(harness):
    task = _structured(lambda t: len(t.user_turns) >= 3 and not any(u.abstain for u in t.user_turns),
                       abstain_frac=0.0)
    turns = world.oracle_turns(task)
    ep = _play(task, [t for t, _ in turns], harness)
    assert ep.done and ep.success and len(ep.replies) == len(task.user_turns)
    # the observation after each user turn's answer is the next user turn's question
    questions = [obs for (t, obs) in turns if obs is not None and not obs.startswith(world.RESP_OPEN)]
    assert questions == [u.question for u in task.user_turns[1:]]
    owner = [sum(1 for _, obs in turns[:i] if obs is not None and not obs.startswith(world.RESP_OPEN))
             for i in range(len(turns))]  # the user turn each assistant turn belongs to
    for k in range(len(task.user_turns)):
        if harness == world.PAPER:  # the checker reads the calls: drop user turn k's last one
            drop = max(i for i, (t, _) in enumerate(turns) if owner[i] == k and t.startswith(world.TOOL_OPEN))
            script = [t for i, (t, _) in enumerate(turns) if i != drop]
        else:  # the strict checker reads each user turn's answer: a wrong one in turn k
            reply = max(i for i in range(len(turns)) if owner[i] == k)
            script = [t if i != reply else 'The answer is "nowhere".' for i, (t, _) in enumerate(turns)]
        ep = _play(task, script, harness)
        assert ep.done and not ep.success and not ep.turn_success(k)
        assert all(ep.turn_success(j) for j in range(len(task.user_turns)) if j != k)
    # stopping after the first user turn fails the turns never reached
    first = next(i for i, (t, obs) in enumerate(turns) if obs is not None and not obs.startswith(world.RESP_OPEN))
    ep = world.Episode(task, max_turns=first + 1, harness=harness)
    for t, _ in turns[: first + 1]:
        ep.step(t)
    assert ep.done and ep.turn_success(0) and not ep.success


@pytest.mark.parametrize("why", world.ABSTAIN_KINDS)
def test_abstaining_turn_oracle_calls_nothing_a_call_fails_a_bare_tag_is_no_call(why):
    task = _structured(lambda t: len(t.user_turns) == 1 and t.abstain == why, user_turns=1, abstain_frac=0.5)
    oracle = _oracle(task)
    assert oracle == [world.ABSTAIN_REPLY[why]]  # no call at all
    if why == world.MISS_FUNC:  # the tool is withheld from the list and cannot be executed
        assert task.withheld in task.chain and f'"{task.withheld}"' not in world.prompt_text(task)
        real = {"get_weather": {"city": next(iter(task.sky))}, "get_friend": {"user_id": next(iter(task.friend))}}
        args = real[task.withheld]
        assert "error" in task.execute(task.withheld, args)
    else:
        assert world.tasks.UNNAMED in task.question and f'"{task.subject}"' not in task.question
    for harness in world.HARNESSES:
        assert _play(task, oracle, harness).success
    call = world.render_call("find_user", {"name": task.subject})
    assert not _play(task, [call, "done"], world.PAPER).success  # calling anything fails the turn
    assert not _play(task, [call, "done"], world.STRICT).success
    ep = _play(task, [world.TOOL_OPEN + "\n"], world.PAPER)  # the paper harness: a turn without a closed call
    assert ep.done and ep.success and ep.n_calls == 0  # is no call, an empty reply
    ep = _play(task, [world.TOOL_OPEN], world.PAPER)
    assert ep.done and ep.success


def test_a_bare_tag_elsewhere_ends_the_user_turn_and_fails_it():
    task = _structured(lambda t: len(t.user_turns) >= 2 and not t.abstain and t.user_turns[1].abstain)
    ep = world.Episode(task, max_turns=60, harness=world.PAPER)
    assert ep.step(world.TOOL_OPEN + "\n") == task.user_turns[1].question  # the reply ended: next user turn
    assert not ep.turn_success(0)
    ep.step(world.TOOL_OPEN + "\n")  # on the abstaining turn the same bare tag is a correct "no call"
    assert ep.turn_success(1)


def test_miss_param_is_followed_by_the_user_naming_the_person():
    task = _structured(lambda t: len(t.user_turns) >= 2 and t.abstain == world.MISS_PARAM)
    ask, named = task.user_turns[:2]
    assert named.abstain is None and named.subject == ask.subject and f'"{ask.subject}"' in named.question
    assert named.chain == ask.chain and _play(task, _oracle(task), world.PAPER).success


def test_structure_rates():
    tasks = world.task_split("train", 2000, user_turns=5, abstain_frac=0.2)
    counts = {n: sum(len(t.user_turns) == n for t in tasks) for n in range(1, 6)}
    assert all(300 < c < 500 for c in counts.values())  # 1..5 user turns, uniform
    turns = [u for t in tasks for u in t.user_turns]
    assert 0.12 < sum(bool(u.abstain) for u in turns) / len(turns) < 0.25
    for t in tasks:  # every answerable turn avoids the withheld tool; every miss_func turn needs it
        for u in t.user_turns:
            assert t.withheld is None or (t.withheld in u.chain) == (u.abstain == world.MISS_FUNC)
    with pytest.raises(ValueError):
        world.make_task(0, user_turns=0)


def test_turn_sites_tell_where_a_turn_was_written():
    task = _structured(lambda t: len(t.user_turns) == 2 and not t.abstain and t.user_turns[1].abstain)
    oracle = _oracle(task)
    n0 = len(task.chain)
    sites = world.turn_sites(task, oracle)
    assert sites == [world.CALLS_DUE] * n0 + [world.AFTER_CALLS, world.ABSTAINING]
    bare = world.TOOL_OPEN + "\n"
    assert world.turn_sites(task, [bare, bare]) == [world.CALLS_DUE, world.ABSTAINING]
