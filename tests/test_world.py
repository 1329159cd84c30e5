"""Task-seed ranges: train / eval / probe / repair (and the other splits) never share a task, for any run seed."""
import pytest

from collapse_probe import world
from collapse_probe.world.tasks import SPLITS, TASKS_PER_RUN_SEED, task_seed


def test_splits_and_run_seeds_are_disjoint_for_seeds_0_to_10000():
    fixed = {s: {task_seed(s, i) for i in range(256)} for s in ("eval", "probe", "format_probe", "tokenizer")}
    seen: dict[int, tuple] = {}
    for split, seeds in fixed.items():
        for t in seeds:
            assert t not in seen, (split, t, seen.get(t))
            seen[t] = (split, 0)
    for run_seed in range(10_001):
        for split in ("train", "train_fill", "repair"):
            for i in (0, 1, 63, 16_000, TASKS_PER_RUN_SEED - 1):
                t = task_seed(split, i, run_seed)
                key = (split, run_seed, i)
                assert seen.setdefault(t, key) == key, (key, seen[t])
                # the seed decodes back to its split and run seed: ranges cannot overlap anywhere in between
                assert SPLITS[t % len(SPLITS)] == split
                assert (t // len(SPLITS)) // TASKS_PER_RUN_SEED == run_seed


def test_seed_10_trains_on_none_of_the_eval_or_probe_tasks():
    eval_q = {t.seed for t in world.task_split("eval", 64)} | {t.seed for t in world.task_split("probe", 16)}
    for run_seed in (0, 10, 20):
        train = {t.seed for t in world.task_split("train", 8 * 50, run_seed=run_seed)}
        assert not train & eval_q


def test_out_of_range_is_refused():
    with pytest.raises(ValueError):
        task_seed("bogus", 0)
    with pytest.raises(ValueError):
        task_seed("train", TASKS_PER_RUN_SEED)
